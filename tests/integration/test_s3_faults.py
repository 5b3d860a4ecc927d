"""The S3 server stopped in the middle of calls: the real store (and compressor) over
loopback gRPC, on a real SeaweedFS that each test owns and halts (never the session's).

An outage must reach the caller as UNAVAILABLE within seconds, never as INTERNAL or a
hang: the dead endpoint refuses connections at once, and the calls' deadlines are only a
backstop, far above the bound checked here. Nothing a failed call began becomes visible
(no manifest, no ref, no partial object); once the server is back on the same port with
the same data, the same call completes, sending only what is missing, and every stored
object verifies.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
import torch

from clients.errors import DeltaVaultError, NotFoundError, UnavailableError
from clients.safetensors_io import Checkpoint
from clients.sdk import DeltaVault, TensorReport
from store_svc.backends.base import Backend, BackendUnavailable, ObjectInfo
from store_svc.backends.s3 import S3Backend
from store_svc.cas import CHUNK_PREFIX
from store_svc.digest import Digest
from store_svc.manifests import MANIFEST_PREFIX
from store_svc.refs import REF_PREFIX
from tests.integration.conftest import (
    EMBEDDING,
    SMALL_CHUNK,
    start_compressor,
    start_store,
    stop_store,
)
from tests.support.manifests import byte_tensor_manifest
from tests.support.seaweedfs import SeaweedS3

pytestmark = pytest.mark.s3

FAIL_FAST_SECONDS = 10.0
"""An outage is reported within this: a third of the 30 s deadline of the store client
``start_store`` makes (the compressor's is 300 s), so a call that hung until its deadline
fails the bound."""
GATE_SECONDS = 30.0
"""Longest the outage trigger waits for the chunk writes around it (they take
milliseconds): past it the trigger fails the write, and the test with it."""
BUCKET = "deltavault-faults"


@pytest.fixture
def s3() -> Iterator[SeaweedS3]:
    """A SeaweedFS of this test's own, which it may halt and start again."""
    server = SeaweedS3(use_external=False)
    server.start()
    try:
        yield server
    finally:
        server.halt(kill=True)  # nothing left worth flushing: skip the polite seconds
        server.stop()


def s3_backend(server: SeaweedS3) -> S3Backend:
    return S3Backend(server.endpoint, BUCKET, server.access_key, server.secret_key)


class PassThrough:
    """A backend that hands every call to ``inner``; the fault injectors below override
    the write."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self.inner.put_if_absent(key, data)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def close(self) -> None:
        self.inner.close()


class OutageAt(PassThrough):
    """Stops the S3 server just before the store's ``nth`` chunk write, once every chunk
    write before it has landed; writes after it wait for the outage. So the outage comes
    mid-upload with exactly ``nth - 1`` chunks stored, and every later write meets the
    dead endpoint."""

    def __init__(self, inner: Backend, server: SeaweedS3, nth: int) -> None:
        super().__init__(inner)
        self._server, self._nth = server, nth
        self._landed = threading.Condition()
        self._started = self._finished = 0
        self._stopped = threading.Event()
        self.stopped_at = 0.0
        """``time.monotonic()`` when the server had exited."""

    def put_if_absent(self, key: str, data: bytes) -> bool:
        if key.startswith(CHUNK_PREFIX) and not self._stopped.is_set():
            with self._landed:
                self._started += 1
                index = self._started
            if index < self._nth:
                return self._put_before_outage(key, data)
            if index == self._nth:
                self._stop_server()
            elif not self._stopped.wait(GATE_SECONDS):
                raise AssertionError("the outage never came")
        return self.inner.put_if_absent(key, data)

    def _put_before_outage(self, key: str, data: bytes) -> bool:
        try:
            return self.inner.put_if_absent(key, data)
        finally:
            with self._landed:
                self._finished += 1
                self._landed.notify_all()

    def _stop_server(self) -> None:
        with self._landed:
            if not self._landed.wait_for(lambda: self._finished == self._nth - 1, GATE_SECONDS):
                raise AssertionError("the chunk writes before the outage never landed")
        self._server.halt(kill=True)  # a crash: nothing is flushed, connections are reset
        self.stopped_at = time.monotonic()
        self._stopped.set()


class AnswerLost(PassThrough):
    """The first write under ``prefix`` lands, then the S3 server crashes before the store
    hears back, and is up again by the client's retry. The store gets what ``S3Backend``
    raises for a connection dropped after its request went out."""

    def __init__(self, inner: Backend, server: SeaweedS3, prefix: str) -> None:
        super().__init__(inner)
        self._server, self._prefix = server, prefix
        self.lost: list[str] = []

    def put_if_absent(self, key: str, data: bytes) -> bool:
        created = self.inner.put_if_absent(key, data)
        if key.startswith(self._prefix) and not self.lost:
            self.lost.append(key)
            self._server.halt(kill=True)
            self._server.start()
            raise BackendUnavailable(f"S3 endpoint unreachable for {key!r}: no answer")
        return created


def assert_fails_fast(error: DeltaVaultError, since: float, what: str = "the call") -> None:
    """``what`` failed UNAVAILABLE for the store's backend, soon after ``since``
    (``time.monotonic()``).

    The code is checked, not only the class: the client maps DEADLINE_EXCEEDED, a call
    that waited for its deadline, to ``UnavailableError`` too."""
    waited = time.monotonic() - since
    assert error.code is grpc.StatusCode.UNAVAILABLE, f"{what}: {error.code}: {error}"
    assert "object store unavailable" in str(error), f"{what}: {error}"
    assert waited < FAIL_FAST_SECONDS, f"{what}: UNAVAILABLE only after {waited:.1f} s"


def stored_keys(backend: Backend, prefix: str) -> list[str]:
    """What the bucket holds under ``prefix``, read from S3 itself."""
    return [info.key for info in backend.list(prefix)]


def test_an_upload_cut_by_an_outage_fails_fast_and_its_retry_sends_only_the_rest(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    chunks, nth = 11, 4
    backend = OutageAt(s3_backend(s3), s3, nth)
    store = start_store(backend, tmp_path)
    try:
        payload = os.urandom((chunks - 1) * SMALL_CHUNK + 123)
        with pytest.raises(UnavailableError) as caught:
            store.client.upload(payload)
        assert_fails_fast(caught.value, backend.stopped_at)

        s3.start()
        assert len(stored_keys(backend.inner, CHUNK_PREFIX)) == nth - 1
        assert stored_keys(backend.inner, MANIFEST_PREFIX) == []
        assert stored_keys(backend.inner, REF_PREFIX) == []
        refs, stats = store.client.upload(payload)
        assert (stats.chunks, stats.chunks_sent) == (chunks, chunks - (nth - 1))
        assert stats.bytes_written == stats.bytes_sent  # each chunk sent was new, and written

        info = store.client.commit_manifest(byte_tensor_manifest(refs), ref="ns/m")
        assert store.client.resolve_ref("ns/m") == info.digest
        assert store.client.read(refs) == payload
        report = store.client.verify()
        assert (report.chunks_checked, report.manifests_checked) == (chunks, 1)
        assert list(report.damaged) == []
    finally:
        stop_store(store)


def test_reads_while_s3_is_down_fail_fast_and_succeed_once_it_is_back(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    store = start_store(s3_backend(s3), tmp_path)
    try:
        payload = os.urandom(3 * SMALL_CHUNK + 7)
        refs, _ = store.client.upload(payload)
        info = store.client.commit_manifest(byte_tensor_manifest(refs), ref="ns/m")
        client = store.client
        reads: dict[str, Callable[[], object]] = {
            "GetChunks": lambda: client.read(refs),
            "ResolveRef": lambda: client.resolve_ref("ns/m"),
            "GetManifest": lambda: client.get_manifest(info.digest),
            "MissingChunks": lambda: client.missing_chunks([Digest.from_proto(refs[0].digest)]),
            "ListRefs": lambda: list(client.list_refs("ns/")),
            "Verify": lambda: client.verify(info.digest),
        }
        answers = {name: read() for name, read in reads.items()}

        s3.halt(kill=True)
        for name, read in reads.items():
            started = time.monotonic()
            with pytest.raises(UnavailableError) as caught:
                read()
            assert_fails_fast(caught.value, started, name)

        s3.start()
        assert {name: read() for name, read in reads.items()} == answers
    finally:
        stop_store(store)


def test_a_compress_cut_by_an_outage_is_unavailable_and_its_rerun_completes(
    s3: SeaweedS3, tmp_path: Path, pair: tuple[Path, Path]
) -> None:
    base_dir, tuned_dir = pair
    # Chunk writes: config.json, the embedding's two parts (lossless: the first tensor
    # stored), then down_proj's first part meets the outage.
    backend = OutageAt(s3_backend(s3), s3, nth=4)
    with ExitStack() as running:
        store = start_store(backend, tmp_path)
        running.callback(stop_store, store)
        compressor = start_compressor(store.target)
        running.callback(compressor.stop, grace=0)
        vault = running.enter_context(DeltaVault(store.target, f"127.0.0.1:{compressor.port}"))

        events: list[TensorReport] = []
        with pytest.raises(UnavailableError) as caught:
            vault.compress(
                base_dir,
                tuned_dir,
                ref="ns/toy",
                method="lossless",
                ratio=None,
                progress=events.append,
            )
        assert_fails_fast(caught.value, backend.stopped_at)
        stored_first = [event.name for event in events if event.new_chunk_bytes]
        assert stored_first == [EMBEDDING], "the outage must come after a tensor is stored"

        s3.start()
        with pytest.raises(NotFoundError):
            vault.store.resolve_ref("ns/toy")
        assert stored_keys(backend.inner, MANIFEST_PREFIX) == []
        report = vault.compress(base_dir, tuned_dir, ref="ns/toy", method="lossless", ratio=None)
        assert 0 < report.new_chunk_bytes < report.bytes_stored  # the first tensor reused
        rebuilt = Checkpoint(vault.reconstruct("ns/toy", base_dir, tmp_path / "rebuilt"))
        tuned = Checkpoint(tuned_dir)
        for name in tuned.names():
            assert torch.equal(rebuilt.get(name), tuned.get(name)), name
        assert vault.verify()["damaged"] == []


def test_a_ref_move_whose_answer_an_outage_lost_is_no_conflict_on_retry(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    """The client's retry finds the ref already at its manifest: its own unanswered write."""
    backend = AnswerLost(s3_backend(s3), s3, REF_PREFIX)
    store = start_store(backend, tmp_path)
    try:
        payload = os.urandom(2 * SMALL_CHUNK)
        refs, _ = store.client.upload(payload)
        info = store.client.commit_manifest(byte_tensor_manifest(refs), ref="ns/m")
        assert backend.lost == stored_keys(backend.inner, REF_PREFIX)  # one version, lost
        assert store.client.resolve_ref("ns/m") == info.digest
        assert store.client.verify(info.digest).damaged == []
    finally:
        stop_store(store)
