"""The ``deltavault`` CLI as scripts use it: real processes, flags, JSON, exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from clients.cli import EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from clients.safetensors_io import Checkpoint
from tests.support.checkpoints import write_checkpoint
from tests.support.embedded import REPO_ROOT, EmbeddedServer

pytestmark = pytest.mark.e2e


def deltavault(*args: str, server: EmbeddedServer) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "clients.cli",
            *args,
            "--store",
            server.store,
            "--compressor",
            server.compressor,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    generator = torch.Generator().manual_seed(0)
    base = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(128, 64, generator=generator).half(),
        "model.norm.weight": torch.ones(64).half(),
    }
    tuned = dict(base)
    tuned["model.layers.0.mlp.up_proj.weight"] = (
        base["model.layers.0.mlp.up_proj.weight"].float()
        + 0.01 * torch.randn(128, 64, generator=generator)
    ).half()
    return write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "tuned", tuned)


def test_scripted_session(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = (str(p) for p in pair)
    with EmbeddedServer(tmp_path / "store", ("--metrics-port", "0")) as server:
        compress = ("compress", base, tuned, "--ref", "ci/toy", "--method", "dare", "--ratio", "8")
        done = deltavault(*compress, "--json", server=server)
        assert done.returncode == EXIT_OK, done.stderr
        report = json.loads(done.stdout)
        assert {"manifest", "ratio", "bytes_stored", "new_chunk_bytes"} <= set(report)
        assert report["lossy_ratio"] >= 8

        again = deltavault(*compress, server=server)
        assert again.returncode == EXIT_CONFLICT
        assert "ci/toy" in again.stderr

        out = tmp_path / "rebuilt"
        done = deltavault("reconstruct", "ci/toy", "--base", base, "--out", str(out), server=server)
        assert done.returncode == EXIT_OK, done.stderr
        assert Checkpoint(out).names() == Checkpoint(tuned).names()

        done = deltavault("register-base", base, "--ref", "bases/toy", "--json", server=server)
        assert done.returncode == EXIT_OK, done.stderr
        registered = json.loads(done.stdout)
        assert registered["tensor_count"] == 2 and registered["new_chunk_bytes"] > 0
        from_store = tmp_path / "from-store"
        rebuild = ("reconstruct", "ci/toy", "--base-ref", "bases/toy", "--out", str(from_store))
        done = deltavault(*rebuild, server=server)
        assert done.returncode == EXIT_OK, done.stderr
        for name in Checkpoint(out).names():
            assert torch.equal(Checkpoint(from_store).get(name), Checkpoint(out).get(name))
        mistaken = deltavault(
            "reconstruct", "bases/toy", "--base", base, "--out", str(out), server=server
        )
        assert mistaken.returncode == EXIT_USAGE
        assert "registered base, not a delta" in mistaken.stderr

        listed = json.loads(deltavault("ls", "--json", server=server).stdout)
        assert {r["ref"]: r["manifest"] for r in listed} == {
            "ci/toy": report["manifest"],
            "bases/toy": registered["manifest"],
        }
        assert deltavault("verify", server=server).returncode == EXIT_OK
        assert deltavault("rm", "ci/toy", server=server).returncode == EXIT_OK
        assert deltavault("rm", "ci/toy", server=server).returncode == EXIT_NOT_FOUND
        gc = json.loads(deltavault("gc", "--json", "--grace-seconds", "1", server=server).stdout)
        assert "chunks_swept" in gc

        bad = deltavault("compress", base, tuned, "--ref", "ci/x", "--method", "zip", server=server)
        assert bad.returncode == EXIT_USAGE
        assert "unknown method" in bad.stderr

        line_metrics = _metrics(server)
        assert "deltavault_compressor_tensors_total" in line_metrics
        assert "deltavault_store_rpc_requests_total" in line_metrics
        assert server.stop() == 0


def _metrics(server: EmbeddedServer) -> str:
    port = re.search(r"metrics=\S+:(\d+)", server.banner)
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as r:
        return str(r.read().decode())


def test_unreachable_services_exit_unavailable() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "clients.cli", "ls", "--store", "127.0.0.1:1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
