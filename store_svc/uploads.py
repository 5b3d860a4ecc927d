"""Assemble uploaded chunk frames into whole chunks, verify and store each."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from store_svc.cas import ChunkSink, PutResult
from store_svc.digest import Digest
from store_svc.errors import ChunkDigestMismatch, FrameTooLarge, InvalidArgument
from store_svc.limits import ByteLease


@dataclass
class UploadStats:
    chunks_written: int = 0
    chunks_deduplicated: int = 0
    bytes_written: int = 0
    bytes_received: int = 0


class ChunkAssembler:
    """Feed frames in order; each chunk is hashed as it arrives and stored when complete.

    Frames of one chunk carry the same digest and total size and contiguous offsets; a
    chunk's frames must not interleave with another's. Nothing of a chunk is written until
    all of it has arrived and hashes to its digest. Verified chunks are written on
    ``executor`` while the next ones arrive, at most ``max_in_flight`` at a time. The bytes
    held (the chunk being assembled, the chunks being written) are taken from ``lease`` as
    frames arrive and given back as writes land.
    """

    def __init__(
        self,
        chunks: ChunkSink,
        max_frame_bytes: int,
        executor: Executor,
        max_in_flight: int,
        lease: ByteLease,
    ) -> None:
        self._chunks = chunks
        self._lease = lease
        self._max_frame_bytes = max_frame_bytes
        self._executor = executor
        self._max_in_flight = max_in_flight
        self._writes: deque[tuple[int, Future[PutResult]]] = deque()
        self.stats = UploadStats()
        self._digest: Digest | None = None
        self._total = 0
        self._buffer = bytearray()

    def feed(self, digest: Digest, total_size: int, offset: int, data: bytes | memoryview) -> None:
        """Add one frame; a chunk it completes is verified and queued for writing."""
        if len(data) > self._max_frame_bytes:
            raise FrameTooLarge(
                f"frame of {len(data)} bytes exceeds the limit of {self._max_frame_bytes}"
            )
        self.stats.bytes_received += len(data)
        if self._digest is None:
            self._start(digest, total_size)
        elif digest != self._digest:
            raise InvalidArgument(
                f"frame for {digest} arrived before chunk {self._digest} was complete "
                "(frames of different chunks must not interleave)"
            )
        elif total_size != self._total:
            raise InvalidArgument(
                f"chunk {digest}: a frame says total_size {total_size}, earlier frames "
                f"said {self._total}"
            )
        if offset != len(self._buffer):
            raise InvalidArgument(
                f"chunk {digest}: frame at offset {offset}, expected {len(self._buffer)}"
            )
        if offset + len(data) > total_size:
            raise InvalidArgument(f"chunk {digest}: frames run past total_size {total_size}")
        self._lease.acquire(len(data))
        self._buffer += data
        if len(self._buffer) == total_size:
            self._finish()

    def close(self) -> UploadStats:
        """End of stream: refuse a half-sent chunk, wait for every write to land."""
        if self._digest is not None:
            raise InvalidArgument(
                f"stream ended with chunk {self._digest} incomplete "
                f"({len(self._buffer)} of {self._total} bytes); nothing of it was written"
            )
        while self._writes:
            self._collect()
        return self.stats

    def _start(self, digest: Digest, total_size: int) -> None:
        if total_size > self._chunks.max_chunk_bytes:
            raise FrameTooLarge(
                f"chunk {digest}: total_size {total_size} exceeds the limit of "
                f"{self._chunks.max_chunk_bytes} bytes per chunk"
            )
        self._digest, self._total = digest, total_size
        self._buffer = bytearray()

    def _finish(self) -> None:
        digest, data = self._digest, bytes(self._buffer)
        assert digest is not None
        self._digest, self._buffer = None, bytearray()
        actual = Digest.of(data, digest.algorithm)
        if actual != digest:
            raise ChunkDigestMismatch(digest, actual)
        write = self._executor.submit(self._chunks.put, digest, data, verified=True)
        self._writes.append((len(data), write))
        while len(self._writes) > self._max_in_flight:
            self._collect()

    def _collect(self) -> None:
        """Wait for the oldest write; its failure fails the upload."""
        size, write = self._writes.popleft()
        result = write.result()
        self._lease.release(size)
        if result.written:
            self.stats.chunks_written += 1
            self.stats.bytes_written += size
        else:
            self.stats.chunks_deduplicated += 1
