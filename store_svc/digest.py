"""Content addresses: a digest is a value carrying its algorithm.

Chunks are named by the hash of their raw bytes. Manifests are hashed with a domain
separation prefix, so a manifest's bytes can never be confused with a chunk's even when
someone uploads identical bytes as a chunk.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import blake3

from clients._generated.deltavault.common.v1 import common_pb2

DIGEST_SIZE = 32
MANIFEST_DOMAIN = b"deltavault.manifest.v1\x00"


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def digest(self) -> bytes: ...


class Algorithm(enum.Enum):
    """Hash functions a digest may use."""

    BLAKE3 = "blake3"
    """BLAKE3-256: the default, several times faster than SHA-256 on CPUs."""
    SHA256 = "sha256"
    """SHA-256: for environments that require a FIPS hash."""

    def new(self) -> _Hasher:
        if self is Algorithm.BLAKE3:
            hasher: _Hasher = blake3.blake3()
            return hasher
        return hashlib.sha256()

    def to_proto(self) -> common_pb2.DigestAlgorithm.ValueType:
        return _TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: common_pb2.DigestAlgorithm.ValueType) -> Algorithm:
        try:
            return _FROM_PROTO[value]
        except KeyError:
            raise ValueError(f"unknown digest algorithm {value}; use BLAKE3 or SHA256") from None


_TO_PROTO = {
    Algorithm.BLAKE3: common_pb2.DIGEST_ALGORITHM_BLAKE3,
    Algorithm.SHA256: common_pb2.DIGEST_ALGORITHM_SHA256,
}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}


@dataclass(frozen=True, order=True)
class Digest:
    """A content address: algorithm + 32 raw hash bytes. Text form ``blake3:<64 hex>``."""

    algorithm: Algorithm
    value: bytes

    def __post_init__(self) -> None:
        if len(self.value) != DIGEST_SIZE:
            raise ValueError(
                f"a {self.algorithm.value} digest has {DIGEST_SIZE} bytes, got {len(self.value)}"
            )

    @property
    def hex(self) -> str:
        return self.value.hex()

    def __str__(self) -> str:
        return f"{self.algorithm.value}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``algorithm:hex`` (as printed by ``str``)."""
        algorithm, sep, hex_value = text.partition(":")
        if not sep:
            raise ValueError(f"digest {text!r} is not of the form 'blake3:<hex>'")
        try:
            return cls(Algorithm(algorithm), bytes.fromhex(hex_value))
        except ValueError as exc:
            raise ValueError(f"invalid digest {text!r}: {exc}") from None

    @classmethod
    def of(cls, data: bytes | memoryview, algorithm: Algorithm = Algorithm.BLAKE3) -> Digest:
        return cls.of_pieces([data], algorithm)

    @classmethod
    def of_pieces(
        cls, pieces: Iterable[bytes | memoryview], algorithm: Algorithm = Algorithm.BLAKE3
    ) -> Digest:
        """The digest of the pieces' concatenation, without concatenating them."""
        hasher = algorithm.new()
        for piece in pieces:
            hasher.update(piece)
        return cls(algorithm, hasher.digest())

    @classmethod
    def of_manifest(cls, serialized: bytes, algorithm: Algorithm) -> Digest:
        """Digest of a manifest's deterministic serialization, domain-separated from chunks."""
        hasher = algorithm.new()
        hasher.update(MANIFEST_DOMAIN)
        hasher.update(serialized)
        return cls(algorithm, hasher.digest())

    def to_proto(self) -> common_pb2.Digest:
        return common_pb2.Digest(algorithm=self.algorithm.to_proto(), value=self.value)

    @classmethod
    def from_proto(cls, message: common_pb2.Digest) -> Digest:
        return cls(Algorithm.from_proto(message.algorithm), bytes(message.value))
