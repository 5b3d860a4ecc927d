"""``StoreClient``: the delta store from Python, used by the compressor and the SDK.

It cuts byte strings into fixed-size chunks, uploads only the chunks the store lacks,
streams chunks back verified, and retries with exponential backoff when the store is
UNAVAILABLE or sheds the call (RESOURCE_EXHAUSTED with a retry delay). Every call has a
deadline, so a dead server is an error, never a hang.

A client :meth:`~StoreClient.sealed` with a ``ChunkSealer`` seals every chunk it uploads
and opens every chunk it reads (``clients.sealing``): chunk refs then name and size the
sealed bytes, which are all the store ever sees. Manifests are checked against their
digest on every read, and can be signed on commit (``store_svc.signatures``).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc

from clients._generated.deltavault.common.v1 import common_pb2
from clients._generated.deltavault.store.v1 import store_pb2, store_pb2_grpc
from clients.channel import Closing, MiB, open_channel
from clients.errors import (
    ConflictError,
    DataLossError,
    from_rpc_error,
    retry_delay,
)
from clients.sealing import ChunkSealer, SealingError, plain_size
from clients.wire import (
    HEAP_FRAME_BYTES,
    bytes_field_parser,
    method_path,
    serialize_with_bytes,
)
from store_svc.digest import Algorithm, Digest
from store_svc.manifests import manifest_digest
from store_svc.signatures import Signer

T = TypeVar("T")

DEFAULT_CHUNK_BYTES = 4 * MiB
DEFAULT_FRAME_BYTES = HEAP_FRAME_BYTES
"""PutChunks frame size (see ``clients.wire``)."""
_MISSING_BATCH = 1000
_METHOD_PUT_CHUNKS = method_path(store_pb2, "DeltaStore", "PutChunks")
_METHOD_GET_CHUNKS = method_path(store_pb2, "DeltaStore", "GetChunks")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    """Tries of a call while the store is UNAVAILABLE."""
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    shed_seconds: float = 120.0
    """How long a call the store sheds (admission control) keeps being retried, each time
    after the delay the store asks for: load beyond capacity waits its turn."""

    def delays(self) -> Iterator[float]:
        """Sleep before each retry: exponential, with full jitter."""
        backoff = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield random.uniform(0, backoff)
            backoff = min(backoff * self.multiplier, self.max_backoff)


class _Retries:
    """One call's retry state: the policy's backoff for UNAVAILABLE, the store's own delay
    (jittered, so shed callers do not return in step) for shed calls."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._delays = policy.delays()
        self._started = time.monotonic()

    def pause(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before retrying after ``error``; None: give up."""
        wait = retry_delay(error)
        if wait is None:
            return None
        if wait > 0:  # shed: retry within the shed budget
            pause = wait * random.uniform(1, 2)
            elapsed = time.monotonic() - self._started
            return pause if elapsed + pause <= self._policy.shed_seconds else None
        return next(self._delays, None)


@dataclass(frozen=True)
class UploadStats:
    chunks: int
    chunks_sent: int
    bytes_sent: int
    bytes_written: int


@dataclass(frozen=True)
class SignedManifest:
    manifest: common_pb2.Manifest
    digest: Digest
    """What the manifest's bytes hash to: checked here, not taken from the store."""
    signatures: list[common_pb2.ManifestSignature]


@dataclass(frozen=True)
class CommitInfo:
    digest: Digest
    already_present: bool
    chunk_count: int
    total_bytes: int


def cut_chunks(
    data: bytes | memoryview, chunk_bytes: int, algorithm: Algorithm
) -> list[tuple[Digest, memoryview]]:
    """Fixed-size chunks of ``data`` with their digests (the last may be shorter)."""
    view = memoryview(data)
    pieces = [view[i : i + chunk_bytes] for i in range(0, len(view), chunk_bytes)]
    return [(Digest.of(piece, algorithm), piece) for piece in pieces]


class StoreClient(Closing):
    def __init__(
        self,
        target: str,
        *,
        channel: grpc.Channel | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        frame_bytes: int = DEFAULT_FRAME_BYTES,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._channel = channel or open_channel(target)
        self._stub = store_pb2_grpc.DeltaStoreStub(self._channel)
        self._put_chunks: Any = self._channel.stream_unary(  # requests arrive serialized
            _METHOD_PUT_CHUNKS,
            request_serializer=None,
            response_deserializer=store_pb2.PutChunksResponse.FromString,
        )
        self._get_chunks: Any = self._channel.unary_stream(  # frames' bytes come apart
            _METHOD_GET_CHUNKS,
            request_serializer=store_pb2.GetChunksRequest.SerializeToString,
            response_deserializer=bytes_field_parser(store_pb2.GetChunksResponse, "data"),
        )
        self.chunk_bytes = chunk_bytes
        self._frame_bytes = frame_bytes
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self.sealer: ChunkSealer | None = None
        self._owns_channel = True

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def sealed(self, sealer: ChunkSealer | None) -> StoreClient:
        """This client, sealing what it uploads and opening what it reads with ``sealer``
        (None: plain). Shares the channel; closing the view leaves the channel open."""
        view = copy.copy(self)
        view.sealer, view._owns_channel = sealer, False
        return view

    def content_size(self, refs: Iterable[common_pb2.ChunkRef]) -> int:
        """Bytes the chunks hold once read (opened, for a sealed client)."""
        sizes = [ref.size for ref in refs]
        return sum(sizes) if self.sealer is None else sum(plain_size(size) for size in sizes)

    # --- chunks -------------------------------------------------------------------------

    def missing_chunks(self, digests: Sequence[Digest]) -> list[Digest]:
        missing: list[Digest] = []
        for start in range(0, len(digests), _MISSING_BATCH):
            batch = [d.to_proto() for d in digests[start : start + _MISSING_BATCH]]
            request = store_pb2.MissingChunksRequest(digests=batch)
            response = self._call(partial(self._stub.MissingChunks, request, timeout=self._timeout))
            missing += [Digest.from_proto(d) for d in response.missing]
        return missing

    def put_chunks(self, chunks: Sequence[tuple[Digest, bytes | memoryview]]) -> int:
        """Upload these chunks (whether or not present); returns bytes newly written."""
        if not chunks:
            return 0
        response = self._call(lambda: self._put_chunks(self._frames(chunks), timeout=self._timeout))
        return int(response.bytes_written)

    def upload(
        self, data: bytes | memoryview, algorithm: Algorithm = Algorithm.BLAKE3
    ) -> tuple[list[common_pb2.ChunkRef], UploadStats]:
        """Store ``data`` as chunks (sealed, by a sealed client), sending only those the
        store lacks."""
        chunks = cut_chunks(data, self.chunk_bytes, algorithm)
        if self.sealer is not None:
            sealed = [self.sealer.seal(piece) for _, piece in chunks]
            chunks = [(Digest.of(piece, algorithm), piece) for piece in sealed]
        missing = set(self.missing_chunks([d for d, _ in chunks]))
        to_send = list({d: piece for d, piece in chunks if d in missing}.items())
        written = self.put_chunks(to_send)
        refs = [common_pb2.ChunkRef(digest=d.to_proto(), size=len(p)) for d, p in chunks]
        stats = UploadStats(len(chunks), len(to_send), sum(len(p) for _, p in to_send), written)
        return refs, stats

    def get_chunks(
        self, ranges: Sequence[tuple[Digest, int, int]]
    ) -> Iterator[tuple[Digest, bytes]]:
        """Yield ``(digest, bytes)`` per requested ``(digest, offset, length)`` range,
        in order; length 0 reads to the end. Interrupted streams resume where they were."""
        for digest, pieces in self._chunk_pieces(ranges):
            yield digest, b"".join(pieces)

    def read(self, refs: Iterable[common_pb2.ChunkRef]) -> bytes:
        """Concatenated bytes of whole chunks, each verified by the server and here (and
        opened, by a sealed client), joined once from the frames as they arrived."""
        return b"".join(piece for pieces in self._contents(refs) for piece in pieces)

    def read_into(self, refs: Iterable[common_pb2.ChunkRef], out: memoryview) -> None:
        """:meth:`read` into ``out``, a writable byte buffer of exactly
        :meth:`content_size` bytes."""
        refs = list(refs)
        size = self.content_size(refs)
        if len(out) != size:
            raise ValueError(f"{len(out)}-byte buffer for {size} bytes")
        offset = 0
        for pieces in self._contents(refs):
            for piece in pieces:
                out[offset : offset + len(piece)] = piece
                offset += len(piece)

    def check_chunks(self, refs: Iterable[common_pb2.ChunkRef]) -> int:
        """Fetch and check every chunk (digest, size and, sealed, authentication), keeping
        none; returns the bytes checked. ``DataLossError`` at the first bad one."""
        return sum(len(piece) for pieces in self._contents(refs) for piece in pieces)

    def _contents(self, refs: Iterable[common_pb2.ChunkRef]) -> Iterator[list[memoryview]]:
        """Each chunk's content: its verified frames, or for a sealed client its opened
        plaintext (one piece)."""
        refs = list(refs)
        if self.sealer is None:
            yield from self._verified(refs)
            return
        for ref, pieces in zip(refs, self._verified(refs), strict=True):
            sealed = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            digest = Digest.from_proto(ref.digest)
            try:
                plain = self.sealer.open(sealed, f"chunk {digest}")
            except SealingError as exc:
                raise DataLossError(str(exc), grpc.StatusCode.DATA_LOSS) from None
            yield [memoryview(plain)]

    def _verified(self, refs: Iterable[common_pb2.ChunkRef]) -> Iterator[list[memoryview]]:
        """Each chunk's frames in order, the chunk checked against its digest and size."""
        refs = list(refs)
        for want, (digest, pieces) in zip(
            refs,
            self._chunk_pieces([(Digest.from_proto(r.digest), 0, 0) for r in refs]),
            strict=True,
        ):
            size = sum(len(piece) for piece in pieces)
            if Digest.of_pieces(pieces, digest.algorithm) != digest or size != want.size:
                raise DataLossError(f"chunk {digest} arrived damaged", grpc.StatusCode.DATA_LOSS)
            yield pieces

    def _chunk_pieces(
        self, ranges: Sequence[tuple[Digest, int, int]]
    ) -> Iterator[tuple[Digest, list[memoryview]]]:
        """:meth:`get_chunks` as each range's frames, views of the received messages."""
        done, retries = 0, _Retries(self._retry)
        while True:
            try:
                for item in self._stream_ranges(ranges[done:]):
                    done += 1
                    yield item
                return
            except grpc.RpcError as error:
                pause = retries.pause(error)
                if pause is None:
                    raise from_rpc_error(error) from None
            time.sleep(pause)

    # --- manifests and refs -----------------------------------------------------------

    def commit_manifest(
        self,
        manifest: common_pb2.Manifest,
        *,
        ref: str = "",
        expected: Digest | None = None,
        force: bool = False,
        signer: Signer | None = None,
    ) -> CommitInfo:
        """Store ``manifest`` (signed by ``signer``, if given) and, with ``ref``, move the
        ref to it (compare-and-swap from ``expected``, None: absent; or always with
        ``force``)."""
        request = store_pb2.CommitManifestRequest(manifest=manifest, ref=ref, force_ref=force)
        if signer is not None:
            request.signatures.append(signer.sign(manifest_digest(manifest)))
        if expected is not None:
            request.expected_ref_target.CopyFrom(expected.to_proto())
        attempts = 0

        def once() -> store_pb2.CommitManifestResponse:
            nonlocal attempts
            attempts += 1
            return self._stub.CommitManifest(request, timeout=self._timeout)

        try:
            response = self._call(once)
        except ConflictError as exc:
            # The ref moved since an attempt the store did not answer (the object store
            # went down after the move): if it moved to this manifest, that attempt landed.
            if attempts > 1 and exc.actual is not None:
                stored = self.commit_manifest(manifest, signer=signer)
                if stored.digest == exc.actual:
                    return stored
            raise
        return CommitInfo(
            Digest.from_proto(response.digest),
            response.already_present,
            response.chunk_count,
            response.total_bytes,
        )

    def get_manifest(self, digest: Digest) -> common_pb2.Manifest:
        return self.get_signed_manifest(digest).manifest

    def get_signed_manifest(self, digest: Digest) -> SignedManifest:
        """The manifest ``digest`` names, checked to hash to it (``DataLossError`` if the
        store answered another), with the signatures stored beside it."""
        request = store_pb2.GetManifestRequest(digest=digest.to_proto())
        response = self._call(lambda: self._stub.GetManifest(request, timeout=self._timeout))
        try:
            actual = manifest_digest(response.manifest)
        except ValueError:
            actual = None
        if actual != digest:
            raise DataLossError(
                f"the store answered manifest {actual} for {digest}", grpc.StatusCode.DATA_LOSS
            )
        return SignedManifest(response.manifest, digest, list(response.signatures))

    def update_ref(
        self, ref: str, target: Digest, *, expected: Digest | None = None, force: bool = False
    ) -> Digest | None:
        """Compare-and-swap ``ref`` to ``target``; returns the previous target."""
        request = store_pb2.UpdateRefRequest(ref=ref, target=target.to_proto(), force=force)
        if expected is not None:
            request.expected.CopyFrom(expected.to_proto())
        attempts = 0

        def once() -> store_pb2.UpdateRefResponse:
            nonlocal attempts
            attempts += 1
            return self._stub.UpdateRef(request, timeout=self._timeout)

        try:
            response = self._call(once)
        except ConflictError as exc:
            if attempts > 1 and exc.actual == target:  # an earlier, unanswered attempt landed
                return expected
            raise
        return Digest.from_proto(response.previous) if response.HasField("previous") else None

    def resolve_ref(self, ref: str) -> Digest:
        request = store_pb2.ResolveRefRequest(ref=ref)
        response = self._call(lambda: self._stub.ResolveRef(request, timeout=self._timeout))
        return Digest.from_proto(response.target)

    def list_refs(self, prefix: str = "", page_size: int = 0) -> Iterator[tuple[str, Digest]]:
        """Every ref under ``prefix``, following pages."""
        token = ""
        while True:
            request = store_pb2.ListRefsRequest(
                prefix=prefix, page_size=page_size, page_token=token
            )
            response = self._call(partial(self._stub.ListRefs, request, timeout=self._timeout))
            for info in response.refs:
                yield info.ref, Digest.from_proto(info.target)
            token = response.next_page_token
            if not token:
                return

    def delete_ref(self, ref: str, *, expected: Digest | None = None) -> Digest:
        request = store_pb2.DeleteRefRequest(ref=ref)
        if expected is not None:
            request.expected.CopyFrom(expected.to_proto())
        response = self._call(lambda: self._stub.DeleteRef(request, timeout=self._timeout))
        return Digest.from_proto(response.previous)

    def collect_garbage(
        self, *, dry_run: bool = False, grace_seconds: int = 0
    ) -> store_pb2.CollectGarbageResponse:
        request = store_pb2.CollectGarbageRequest(
            dry_run=dry_run, grace_period_seconds=grace_seconds
        )
        return self._call(lambda: self._stub.CollectGarbage(request, timeout=self._timeout))

    def verify(self, manifest: Digest | None = None) -> store_pb2.VerifyResponse:
        request = store_pb2.VerifyRequest()
        if manifest is not None:
            request.manifest.CopyFrom(manifest.to_proto())
        return self._call(lambda: self._stub.Verify(request, timeout=self._timeout))

    # --- plumbing -----------------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        """Run one RPC, retrying UNAVAILABLE with backoff and shed calls after the delay
        the store asks for (``RetryPolicy``); raise a ``DeltaVaultError``."""
        retries = _Retries(self._retry)
        while True:
            try:
                return fn()
            except grpc.RpcError as error:
                # Raised, never bound to a local: a frame holding its own exception is a
                # reference cycle, and the cycle would keep every frame of the traceback
                # alive (a server's stream with its tensors) until the cycle collector runs.
                pause = retries.pause(error)
                if pause is None:
                    raise from_rpc_error(error) from None
            time.sleep(pause)

    def _frames(self, chunks: Sequence[tuple[Digest, bytes | memoryview]]) -> Iterator[bytes]:
        """PutChunks requests, serialized around their data (see :mod:`clients.wire`)."""
        for digest, data in chunks:
            proto, view = digest.to_proto(), memoryview(data).cast("B")
            for offset in range(0, max(len(view), 1), self._frame_bytes):
                request = store_pb2.PutChunksRequest(
                    digest=proto, total_size=len(view), offset=offset
                )
                yield serialize_with_bytes(
                    request, "data", view[offset : offset + self._frame_bytes]
                )

    def _stream_ranges(
        self, ranges: Sequence[tuple[Digest, int, int]]
    ) -> Iterator[tuple[Digest, list[memoryview]]]:
        request = store_pb2.GetChunksRequest(
            ranges=[
                store_pb2.ChunkRange(digest=d.to_proto(), offset=o, length=n) for d, o, n in ranges
            ]
        )
        pieces: list[memoryview] = []
        for frame, data in self._get_chunks(request, timeout=self._timeout):
            pieces.append(data)
            if frame.last:
                yield Digest.from_proto(frame.digest), pieces
                pieces = []
