"""``python -m store_svc`` as an operator runs it: flags, health, reflection, metrics,
SIGTERM; no secret in its log or its metrics, even at DEBUG."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients._generated.deltavault.common.v1 import common_pb2
from clients.channel import BearerToken
from clients.errors import DeltaVaultError
from clients.store_client import RetryPolicy, StoreClient
from store_svc.digest import Algorithm, Digest
from store_svc.manifests import FORMAT_VERSION
from tests.support.children import free_port
from tests.support.seaweedfs import SeaweedS3

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_serving(target: str, process: subprocess.Popen[bytes]) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return
        except grpc.RpcError:
            time.sleep(0.1)
    pytest.fail("store did not become healthy")


@pytest.fixture
def run_store() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def backend_flags(kind: str, tmp_path: Path, s3: SeaweedS3 | None) -> list[str]:
    if kind == "local":
        return ["--backend", "local", "--root", str(tmp_path)]
    assert s3 is not None
    return [
        "--backend",
        "s3",
        "--endpoint",
        s3.endpoint,
        "--bucket",
        "process-test",
        "--access-key",
        s3.access_key,
        "--secret-key",
        s3.secret_key,
    ]


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_starts_serves_and_stops_on_sigterm(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    run_store: list[subprocess.Popen[bytes]],
) -> None:
    s3 = request.getfixturevalue("s3_server") if kind == "s3" else None
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "store_svc",
            *backend_flags(kind, tmp_path, s3),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
        ],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
    )
    run_store.append(process)
    target = f"127.0.0.1:{port}"
    wait_serving(target, process)

    reflect = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(target))
    request_ = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = reflect.ServerReflectionInfo(iter([request_]), timeout=5)
    assert "deltavault.store.v1.DeltaStore" in {
        s.name for s in answer.list_services_response.service
    }
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        assert b"deltavault_store_rpc_requests_total" in r.read()

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_help_documents_every_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "store_svc", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in (
        "--backend",
        "--root",
        "--endpoint",
        "--bucket",
        "--port",
        "--metrics-port",
        "--max-frame-bytes",
        "--gc-grace-seconds",
        "DELTAVAULT_STORE_",
    ):
        assert flag in result.stdout


def test_s3_backend_without_credentials_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "store_svc", "--backend", "s3", "--endpoint", "127.0.0.1:1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "--access-key" in result.stderr


def test_sigterm_lets_an_in_flight_stream_finish(
    tmp_path: Path, run_store: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "store_svc",
            "--root",
            str(tmp_path),
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            "--max-frame-bytes",
            str(256 * 1024),
        ],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
    )
    run_store.append(process)
    target = f"127.0.0.1:{port}"
    wait_serving(target, process)
    client = StoreClient(
        target, chunk_bytes=1 << 20, frame_bytes=128 * 1024, retry=RetryPolicy(attempts=1)
    )
    payload = os.urandom(32 << 20)  # far more than gRPC's flow-control windows buffer
    refs, _ = client.upload(payload)
    stream = client.get_chunks([(Digest.from_proto(r.digest), 0, 0) for r in refs])
    received = [next(stream)[1]]
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the server is draining now
    received += [data for _, data in stream]
    assert b"".join(received) == payload
    assert process.wait(timeout=30) == 0
    client.close()


@pytest.mark.s3
def test_secrets_reach_neither_the_log_nor_metrics(
    tmp_path: Path, s3_server: SeaweedS3, run_store: list[subprocess.Popen[bytes]]
) -> None:
    writer, wrong = "tok-writer-9f2c41", "tok-wrong-77e1a0"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [{"name": "ci", "role": "writer", "token": writer}]}))
    port, metrics_port = free_port(), free_port()
    flags = [f for f in backend_flags("s3", tmp_path, s3_server) if f != s3_server.secret_key]
    flags.remove("--secret-key")
    serving = ["--port", str(port), "--metrics-port", str(metrics_port)]
    secured = ["--auth-tokens", str(tokens), "--log-level", "DEBUG"]
    process = subprocess.Popen(
        [sys.executable, "-m", "store_svc", *flags, *serving, *secured],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        env={**os.environ, "DELTAVAULT_STORE_SECRET_KEY": s3_server.secret_key},
    )
    run_store.append(process)
    target = f"127.0.0.1:{port}"
    wait_serving(target, process)

    def client(token: str) -> StoreClient:
        channel = grpc.intercept_channel(grpc.insecure_channel(target), BearerToken(token))
        return StoreClient(target, channel=channel, timeout=10, retry=RetryPolicy(attempts=1))

    payload = b"private weights" * 64
    with client(writer) as store:
        chunks, _ = store.upload(payload)
        store.commit_manifest(one_part_manifest(chunks, len(payload)), ref="team-a/private-model")
    with client(wrong) as intruder, pytest.raises(DeltaVaultError) as refused:
        list(intruder.list_refs())
    assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    log = process.communicate()[1].decode()
    assert "DEBUG" in log  # the log was as verbose as it gets
    for secret in (s3_server.secret_key, writer, wrong):
        assert secret not in log and secret not in metrics
    assert "private-model" not in metrics


def one_part_manifest(chunks: list[common_pb2.ChunkRef], size: int) -> common_pb2.Manifest:
    part = common_pb2.EncodedPart(name="p", byte_length=size, chunks=chunks)
    return common_pb2.Manifest(
        format_version=FORMAT_VERSION,
        digest_algorithm=Algorithm.BLAKE3.to_proto(),
        tensors=[common_pb2.TensorEntry(name="t", parts=[part])],
    )
