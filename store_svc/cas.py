"""Content-addressed chunks: write once under their digest, verify on every read.

A stored chunk object is a 5-byte header then the payload (see ``store_svc/FORMAT.md``):
``b"DVK"``, a format version byte, and a codec byte (raw or zstd). The digest always names
the *raw* bytes, so the same content deduplicates whether or not it was compressed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import zstandard

from store_svc.backends.base import Backend, ObjectNotFound
from store_svc.digest import Algorithm, Digest
from store_svc.errors import ChunkDigestMismatch, ChunkNotFound, CorruptObject

CHUNK_PREFIX = "chunks/"
_MAGIC = b"DVK"
_FORMAT_VERSION = 1
_HEADER_SIZE = len(_MAGIC) + 2
# zstd is kept only when it saves at least this fraction: packed low-bit codes are close to
# uniform and gain nothing, so most chunks are stored raw and read back without a decode.
_MIN_ZSTD_SAVING = 0.03
# `auto` first compresses this much of a chunk and skips zstd if the sample does not shrink.
_ZSTD_PROBE_BYTES = 256 * 1024
# Level 1 stores deltas as small as level 3 at twice the speed (a synthetic fp16 weight
# delta: 0.398 vs 0.399 of its size, 215 vs 98 MiB/s; the MiniLM embedding delta: 0.134
# both, 2037 vs 1036 MiB/s; ``python -m tests.bench.bench_codec``, 2026-12-01). zstd was
# the largest cost of a lossless compress through ``deltavault serve`` (py-spy, ad hoc).
DEFAULT_ZSTD_LEVEL = 1
_EXISTS_PARALLELISM = 16


class Codec(enum.IntEnum):
    """How a chunk's payload is stored."""

    RAW = 0
    """Payload is the raw bytes."""
    ZSTD = 1
    """Payload is one zstd frame of the raw bytes."""


class CompressionPolicy(enum.Enum):
    NONE = "none"
    """Always store raw."""
    ZSTD = "zstd"
    """Always store zstd."""
    AUTO = "auto"
    """zstd when it saves at least 3%, else raw."""


def check_digest(digest: Digest, data: bytes) -> None:
    """``ChunkDigestMismatch`` unless ``data`` hashes to ``digest``."""
    actual = Digest.of(data, digest.algorithm)
    if actual != digest:
        raise ChunkDigestMismatch(digest, actual)


def chunk_key(digest: Digest) -> str:
    """Object key of a chunk: ``chunks/<algorithm>/<2 hex>/<64 hex>``."""
    return f"{CHUNK_PREFIX}{digest.algorithm.value}/{digest.hex[:2]}/{digest.hex}"


def digest_from_chunk_key(key: str) -> Digest:
    _, algorithm, _, hex_value = key.split("/")
    return Digest(Algorithm(algorithm), bytes.fromhex(hex_value))


@dataclass(frozen=True)
class PutResult:
    written: bool
    """False when the chunk was already stored (deduplicated)."""


class ChunkSink(Protocol):
    """Where an upload stores verified chunks: the ``ChunkStore`` itself, or a tenant's
    view of it (``store_svc.repository``)."""

    @property
    def max_chunk_bytes(self) -> int: ...

    def put(self, digest: Digest, data: bytes, *, verified: bool = False) -> PutResult: ...


class ChunkStore:
    """Chunks on a backend: verified writes, verified reads, existence probes."""

    def __init__(
        self,
        backend: Backend,
        *,
        policy: CompressionPolicy = CompressionPolicy.AUTO,
        max_chunk_bytes: int,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
    ) -> None:
        self._backend = backend
        # Existence probes are latency-bound (a HEAD each on S3): run them side by side.
        self._probes = ThreadPoolExecutor(_EXISTS_PARALLELISM, thread_name_prefix="chunk-probe")
        self._policy = policy
        self._max_chunk_bytes = max_chunk_bytes
        self._zstd_level = zstd_level

    def close(self) -> None:
        self._probes.shutdown(wait=True)

    @property
    def max_chunk_bytes(self) -> int:
        return self._max_chunk_bytes

    def put(self, digest: Digest, data: bytes, *, verified: bool = False) -> PutResult:
        """Store ``data`` under ``digest`` unless present.

        Raises ``ChunkDigestMismatch`` (nothing written) if the bytes hash elsewhere. Pass
        ``verified=True`` only when the caller has just hashed ``data`` itself.
        """
        if not verified:
            check_digest(digest, data)
        return PutResult(self._backend.put_if_absent(chunk_key(digest), self._encode(data)))

    def get(self, digest: Digest) -> memoryview:
        """The chunk's raw bytes, verified, as a read-only view (chunks are megabytes: the
        view saves a copy). ``ChunkNotFound`` or ``CorruptObject``."""
        try:
            stored = self._backend.get(chunk_key(digest))
        except ObjectNotFound:
            raise ChunkNotFound([digest], context="read") from None
        raw = self._decode(digest, stored)
        if Digest.of(raw, digest.algorithm) != digest:
            raise CorruptObject(digest, "digest mismatch")
        return raw

    def missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The subset of ``digests`` not stored, in input order, duplicates dropped."""
        unique = list(dict.fromkeys(digests))
        present = list(self._probes.map(lambda d: self._backend.exists(chunk_key(d)), unique))
        return [d for d, here in zip(unique, present, strict=True) if not here]

    def iter_digests(self) -> Iterator[Digest]:
        """Every stored chunk's digest, in key order."""
        for info in self._backend.list(CHUNK_PREFIX):
            yield digest_from_chunk_key(info.key)

    def _encode(self, raw: bytes) -> bytes:
        codec, payload = Codec.RAW, raw
        if self._policy is CompressionPolicy.ZSTD or (
            self._policy is CompressionPolicy.AUTO and self._compresses(raw[:_ZSTD_PROBE_BYTES])
        ):
            packed = zstandard.ZstdCompressor(level=self._zstd_level).compress(raw)
            if self._policy is CompressionPolicy.ZSTD or self._saves(len(raw), len(packed)):
                codec, payload = Codec.ZSTD, packed
        return _MAGIC + bytes((_FORMAT_VERSION, codec)) + payload

    def _compresses(self, sample: bytes) -> bool:
        packed = zstandard.ZstdCompressor(level=self._zstd_level).compress(sample)
        return bool(sample) and self._saves(len(sample), len(packed))

    @staticmethod
    def _saves(raw_size: int, packed_size: int) -> bool:
        return packed_size <= raw_size * (1 - _MIN_ZSTD_SAVING)

    def _decode(self, digest: Digest, stored: bytes) -> memoryview:
        if len(stored) < _HEADER_SIZE or stored[:3] != _MAGIC:
            raise CorruptObject(digest, "bad header")
        if stored[3] != _FORMAT_VERSION:
            raise CorruptObject(digest, f"unknown chunk format version {stored[3]}")
        payload = memoryview(stored)[_HEADER_SIZE:]
        if stored[4] == Codec.RAW:
            return payload
        if stored[4] != Codec.ZSTD:
            raise CorruptObject(digest, f"unknown codec {stored[4]}")
        try:
            # The bound refuses a corrupt frame that claims a huge output size.
            return memoryview(
                zstandard.ZstdDecompressor().decompress(
                    payload, max_output_size=self._max_chunk_bytes
                )
            )
        except zstandard.ZstdError as exc:
            raise CorruptObject(digest, f"zstd frame does not decode: {exc}") from None
