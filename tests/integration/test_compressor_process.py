"""``deltavault serve`` as a process: SIGTERM lets a Compress stream in flight finish and
commit, then the process exits cleanly and its store keeps what was committed; SIGKILL
mid-stream leaves no ref and no manifest, and a retry uploads only what is missing."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.compressor_client import CompressorClient
from clients.encoding import RoleTensor
from clients.errors import DeltaVaultError
from clients.sdk import DeltaVault
from clients.store_client import StoreClient
from store_svc.backends.local import LocalBackend
from store_svc.cas import CHUNK_PREFIX
from store_svc.digest import Digest
from store_svc.manifests import MANIFEST_PREFIX
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
