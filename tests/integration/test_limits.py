"""Admission limits over real gRPC: a stream past the per-client or global bound, or bytes
past the byte budget, get RESOURCE_EXHAUSTED with a retry delay and write nothing; the
clients' own retries then get through once capacity frees up."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients._generated.deltavault.store.v1 import store_pb2
from clients.errors import ResourceExhaustedError, from_rpc_error
from clients.sdk import DeltaVault
from clients.store_client import RetryPolicy, StoreClient
from clients.wire import method_path
from store_svc.backends.base import Backend
from store_svc.digest import Digest
from store_svc.limits import Limits
from tests.integration.conftest import RunningStore, start_compressor, start_store

BYTE_BUDGET = 100_000
PUT_CHUNKS = method_path(store_pb2, "DeltaStore", "PutChunks")
COMPRESS = method_path(compressor_pb2, "Compressor", "Compress")


class HeldStream:
    """A client stream that sends ``first`` and then waits until released: it holds one
    stream slot on the server for as long as the test needs."""

    def __init__(
        self, channel: grpc.Channel, method: str, first: bytes, *, unary_reply: bool
    ) -> None:
        self._release = threading.Event()
        self._first = first
        if unary_reply:
            put: Any = channel.stream_unary(method, request_serializer=None)
            self._call: Any = put.future(self._requests(), timeout=60)
        else:
            stream: Any = channel.stream_stream(method, request_serializer=None)
            self._call = stream(self._requests(), timeout=60)

    def _requests(self) -> Iterator[bytes]:
        yield self._first
        self._release.wait(60)

    def release(self) -> None:
        self._release.set()
        self._call.cancel()


def refusals(registry: CollectorRegistry, service: str, method: str) -> float:
    value = registry.get_sample_value(
        f"deltavault_{service}_rpc_requests_total",
        {"grpc_method": method, "grpc_code": "RESOURCE_EXHAUSTED"},
    )
    return value or 0.0


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def frames(data: bytes, size: int = 40_000) -> list[bytes]:
    """PutChunks frames of one chunk."""
    digest = Digest.of(data).to_proto()
    return [
        store_pb2.PutChunksRequest(
            digest=digest, total_size=len(data), offset=start, data=data[start : start + size]
        ).SerializeToString()
        for start in range(0, max(len(data), 1), size)
    ]


@pytest.fixture
def limited_store(local_backend: Backend, tmp_path: Path) -> Iterator[RunningStore]:
    running = start_store(
        local_backend,
        tmp_path,
        limits=Limits(max_streams_per_client=1, max_bytes=BYTE_BUDGET),
    )
    yield running
    running.client.close()
    running.server.stop(grace=0)


def put_once(target: str, data: bytes) -> grpc.RpcError | None:
    """One PutChunks of ``data``, no retries: its error, or None."""
    with grpc.insecure_channel(target) as channel:
        put: Any = channel.stream_unary(PUT_CHUNKS, request_serializer=None)
        try:
            put(iter(frames(data)), timeout=10)
        except grpc.RpcError as error:
            return error
    return None


def test_a_second_stream_of_one_client_is_shed_then_retried_through(
    limited_store: RunningStore,
) -> None:
    store = limited_store
    registry = store.server.metrics.registry
    channel = grpc.insecure_channel(store.target)
    unfinished = store_pb2.PutChunksRequest(
        digest=Digest.of(b"never").to_proto(), total_size=100, offset=0, data=b"x" * 10
    )
    held = HeldStream(channel, PUT_CHUNKS, unfinished.SerializeToString(), unary_reply=True)
    # Admitted once its frame has been read by the handler.
    wait_until(
        lambda: (registry.get_sample_value("deltavault_store_received_bytes_total") or 0) > 0
    )

    error = put_once(store.target, b"refused")
    assert error is not None
    refused = from_rpc_error(error)
    assert isinstance(refused, ResourceExhaustedError)
    assert "limit per client is 1" in str(refused) and refused.retry_after == 1
    assert store.client.missing_chunks([Digest.of(b"refused")]) == [Digest.of(b"refused")]

    # A client with retries is shed too while the slot is taken, and gets through after.
    client = StoreClient(store.target, retry=RetryPolicy(attempts=6), timeout=10)
    payload = os.urandom(1000)
    result: list[object] = []
    uploader = threading.Thread(target=lambda: result.append(client.upload(payload)))
    shed_before = refusals(registry, "store", "PutChunks")
    uploader.start()
    wait_until(lambda: refusals(registry, "store", "PutChunks") > shed_before)
    held.release()
    uploader.join(30)
    assert result and client.missing_chunks([Digest.of(payload)]) == []
    client.close()
    channel.close()


def test_bytes_past_the_budget_are_refused_and_nothing_is_written(
    limited_store: RunningStore,
) -> None:
    store = limited_store
    big = os.urandom(BYTE_BUDGET + 20_000)  # one chunk, larger than the whole byte budget
    error = put_once(store.target, big)
    assert error is not None and error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "bytes in flight" in (error.details() or "")
    assert store.client.missing_chunks([Digest.of(big)]) == [Digest.of(big)]
    # Within the budget, uploads go through, one after another.
    for _ in range(3):
        assert put_once(store.target, os.urandom(BYTE_BUDGET - 10_000)) is None


def test_the_compressor_sheds_streams_past_its_limit_and_the_sdk_retries(
    store: RunningStore, pair: tuple[Path, Path]
) -> None:
    compressor = start_compressor(store.target, limits=Limits(max_streams=1))
    target = f"127.0.0.1:{compressor.port}"
    registry = compressor.metrics.registry
    channel = grpc.insecure_channel(target)
    header = compressor_pb2.CompressRequest(
        header=compressor_pb2.CompressHeader(ref="team/held", method="adamix", ratio=8)
    )
    held = HeldStream(channel, COMPRESS, header.SerializeToString(), unary_reply=False)
    base, tuned = pair
    reports: list[object] = []
    try:
        with DeltaVault(store.target, target) as vault:
            worker = threading.Thread(
                target=lambda: reports.append(
                    vault.compress(base, tuned, ref="team/shed", method="adamix", ratio=8)
                )
            )
            worker.start()
            wait_until(lambda: refusals(registry, "compressor", "Compress") >= 1)
            held.release()
            worker.join(120)
        assert reports, "the retried compress did not finish"
        assert store.client.resolve_ref("team/shed")
    finally:
        held.release()
        channel.close()
        compressor.stop(grace=0)
