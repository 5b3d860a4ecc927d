"""``deltavault serve`` as a process: SIGTERM lets a Compress stream in flight finish and
commit, then the process exits cleanly and its store keeps what was committed; SIGKILL
mid-stream leaves no ref and no manifest, and a retry uploads only what is missing; no
token reaches its log or its metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.channel import TOKEN_ENV, TOKEN_FILE_ENV
from clients.compressor_client import CompressorClient
from clients.encoding import RoleTensor
from clients.errors import DeltaVaultError
from clients.sdk import DeltaVault
from clients.store_client import StoreClient
from store_svc.backends.local import LocalBackend
from store_svc.cas import CHUNK_PREFIX
from store_svc.digest import Digest
from store_svc.manifests import MANIFEST_PREFIX
from tests.integration.conftest import start_store, stop_store
from tests.integration.test_store_process import REPO_ROOT, wait_serving
from tests.support.children import free_port
from tests.support.embedded import EmbeddedServer

BASE = compressor_pb2.TENSOR_ROLE_BASE
FINETUNED = compressor_pb2.TENSOR_ROLE_FINETUNED
TENSORS = 4


def held_back_stream(first_event: threading.Event) -> Iterator[RoleTensor]:
    """Every tensor pair but the last, then (once the server has answered for the first and
    been told to stop) the last: the stream is certainly in flight while the server drains."""
    generator = torch.Generator().manual_seed(0)
    for i in range(TENSORS):
        if i == TENSORS - 1:
            assert first_event.wait(timeout=60)
        base = torch.randn(256, 512, generator=generator)
        yield f"layers.{i}.weight", BASE, base
        yield f"layers.{i}.weight", FINETUNED, base + 0.01


def test_sigterm_lets_an_in_flight_compress_finish(tmp_path: Path) -> None:
    root = tmp_path / "store"
    server = EmbeddedServer(root).__enter__()
    try:
        process = server.process
        assert process is not None
        first_event = threading.Event()
        header = compressor_pb2.CompressHeader(method="lossless", ref="ops/drain")
        events, result = [], None
        with CompressorClient(server.compressor) as client:
            for response in client.compress(header, held_back_stream(first_event)):
                if response.HasField("tensor") and not first_event.is_set():
                    process.send_signal(signal.SIGTERM)
                    time.sleep(1.0)  # the server is draining now, the last tensor unsent
                    first_event.set()
                if response.HasField("tensor"):
                    events.append(response.tensor.name)
                else:
                    result = response.result
        assert len(events) == TENSORS and result is not None
        assert process.wait(timeout=120) == 0
    finally:
        server.__exit__(None, None, None)

    with EmbeddedServer(root) as again, StoreClient(again.store) as store:
        assert store.resolve_ref("ops/drain") == Digest.from_proto(result.manifest)
        with DeltaVault(again.store, again.compressor) as vault:
            assert vault.verify("ops/drain")["damaged"] == []


def compress_until_killed(
    client: CompressorClient,
    header: compressor_pb2.CompressHeader,
    process: subprocess.Popen[str],
) -> None:
    """Stream the model; once the first tensor is answered (its chunks stored), SIGKILL the
    server, then offer the rest."""
    first_event = threading.Event()
    for response in client.compress(header, held_back_stream(first_event)):
        if response.HasField("tensor"):
            process.kill()
            process.wait(timeout=60)
            first_event.set()


def test_sigkill_mid_stream_leaves_nothing_visible_and_a_retry_sends_only_the_rest(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    header = compressor_pb2.CompressHeader(method="lossless", ref="ops/killed")
    server = EmbeddedServer(root).__enter__()
    try:
        process = server.process
        assert process is not None
        with CompressorClient(server.compressor) as client, pytest.raises(DeltaVaultError):
            compress_until_killed(client, header, process)
    finally:
        server.__exit__(None, None, None)

    backend = LocalBackend(root)
    assert list(backend.list(MANIFEST_PREFIX)) == []
    assert list(backend.list(CHUNK_PREFIX))  # the first tensor's chunks, orphaned
    with EmbeddedServer(root) as again, StoreClient(again.store) as store:
        assert list(store.list_refs()) == []
        everything = threading.Event()
        everything.set()
        with CompressorClient(again.compressor) as client:
            responses = list(client.compress(header, held_back_stream(everything)))
        result = responses[-1].result
        assert result.tensor_count == TENSORS
        assert 0 < result.new_chunk_bytes < result.bytes_stored  # the orphans were reused
        assert store.resolve_ref("ops/killed") == Digest.from_proto(result.manifest)


def test_the_compressor_keeps_tokens_out_of_its_log_and_metrics(
    tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m compressor_svc`` at DEBUG, with tokens on both services: after a compress
    (the caller's token forwarded to the store) and a refused call, no token (the caller's,
    its own, a wrong one) is in its log or its /metrics, and the ref name is not in /metrics."""
    caller, own, wrong = "tok-caller-5be01d", "tok-compressor-c3a9f2", "tok-wrong-0d77e4"
    tokens = tmp_path / "tokens.json"
    entries = [
        {"name": "pipeline", "role": "writer", "token": caller},
        {"name": "compressor", "role": "writer", "token": own},
    ]
    tokens.write_text(json.dumps({"tokens": entries}))
    own_file = tmp_path / "compressor-token"
    own_file.write_text(own)
    store = start_store(LocalBackend(tmp_path / "objects"), tmp_path, auth_tokens=tokens)
    port, metrics_port = free_port(), free_port()
    argv = ["--store", store.target, "--port", str(port), "--metrics-port", str(metrics_port)]
    secured = ["--auth-tokens", str(tokens), "--log-level", "DEBUG"]
    process = subprocess.Popen(
        [sys.executable, "-m", "compressor_svc", *argv, *secured],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        env={**os.environ, TOKEN_FILE_ENV: str(own_file)},
    )
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(target, process)
        base, tuned = pair
        monkeypatch.setenv(TOKEN_ENV, caller)
        with DeltaVault(store.target, target) as vault:
            vault.compress(base, tuned, ref="team-a/private-model", method="adamix", ratio=8)
        monkeypatch.setenv(TOKEN_ENV, wrong)
        with DeltaVault(store.target, target) as intruder, pytest.raises(DeltaVaultError):
            intruder.compress(base, tuned, ref="team-a/other", method="adamix", ratio=8)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        log = process.communicate()[1].decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stop_store(store)
    assert "DEBUG compressor_svc.service: compress team-a/private-model" in log  # verbose
    assert 'grpc_method="Compress"' in metrics
    for secret in (caller, own, wrong):
        assert secret not in log and secret not in metrics
    assert "private-model" not in metrics
