"""Immutable manifests stored by the digest of their deterministic serialization.

A manifest is committed only when every chunk it names is present, so a reader that can
see a manifest can read all of it. Callers hold the shared side of the repository's commit
lock around the check and the write (and the ref move that may follow); garbage
collection sweeps under the exclusive side.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from clients._generated.deltavault.common.v1 import common_pb2
from store_svc.backends.base import Backend, ObjectNotFound
from store_svc.cas import ChunkStore
from store_svc.digest import Algorithm, Digest
from store_svc.errors import CorruptObject, InvalidArgument, MissingChunks, NotFound

MANIFEST_PREFIX = "manifests/"
FORMAT_VERSION = 1
_FILE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def manifest_key(digest: Digest) -> str:
    """Object key of a manifest: ``manifests/<algorithm>/<2 hex>/<64 hex>``."""
    return f"{MANIFEST_PREFIX}{digest.algorithm.value}/{digest.hex[:2]}/{digest.hex}"


def digest_from_manifest_key(key: str) -> Digest:
    _, algorithm, _, hex_value = key.split("/")
    return Digest(Algorithm(algorithm), bytes.fromhex(hex_value))


def chunk_refs(manifest: common_pb2.Manifest) -> Iterator[common_pb2.ChunkRef]:
    """Every chunk a manifest names, tensors' parts first, then its files (repeats kept)."""
    for tensor in manifest.tensors:
        for part in tensor.parts:
            yield from part.chunks
    for file in manifest.files:
        yield from file.chunks


def chunk_digests(manifest: common_pb2.Manifest) -> list[Digest]:
    """Every chunk digest a manifest names, in order, without duplicates."""
    return list(dict.fromkeys(Digest.from_proto(chunk.digest) for chunk in chunk_refs(manifest)))


def serialize(manifest: common_pb2.Manifest) -> bytes:
    return manifest.SerializeToString(deterministic=True)


def manifest_digest(manifest: common_pb2.Manifest) -> Digest:
    """The digest a manifest is stored under (ValueError for an unknown digest algorithm)."""
    return Digest.of_manifest(serialize(manifest), Algorithm.from_proto(manifest.digest_algorithm))


@dataclass(frozen=True)
class CommitResult:
    digest: Digest
    already_present: bool
    chunk_count: int
    total_bytes: int


class ManifestStore:
    def __init__(self, backend: Backend, chunks: ChunkStore) -> None:
        self._backend = backend
        self._chunks = chunks

    def commit(
        self,
        manifest: common_pb2.Manifest,
        *,
        find_missing: Callable[[list[Digest]], list[Digest]] | None = None,
        before_write: Callable[[Digest], None] | None = None,
    ) -> CommitResult:
        """Validate, check every chunk is present (``find_missing`` says which of them are not:
        by default those the store lacks), run ``before_write`` on the manifest's digest (a
        check that may still refuse the commit: its signatures, a ref's compare-and-swap),
        and store. Idempotent. The caller holds the commit lock's shared side."""
        algorithm = validate(manifest)
        data = serialize(manifest)
        digest = Digest.of_manifest(data, algorithm)
        digests = chunk_digests(manifest)
        missing = (find_missing or self._chunks.missing)(digests)
        if missing:
            raise MissingChunks(missing, context="manifest not committed")
        if before_write is not None:
            before_write(digest)
        written = self._backend.put_if_absent(manifest_key(digest), data)
        total = sum(chunk.size for chunk in chunk_refs(manifest))
        return CommitResult(digest, not written, len(digests), total)

    def get(self, digest: Digest) -> common_pb2.Manifest:
        """The manifest, verified against its digest. ``NotFound`` or ``CorruptObject``."""
        try:
            data = self._backend.get(manifest_key(digest))
        except ObjectNotFound:
            raise NotFound(f"no manifest {digest}") from None
        if Digest.of_manifest(data, digest.algorithm) != digest:
            raise CorruptObject(digest, "manifest digest mismatch")
        manifest = common_pb2.Manifest()
        try:
            manifest.ParseFromString(data)
        except DecodeError:
            raise CorruptObject(digest, "manifest does not parse") from None
        return manifest

    def exists(self, digest: Digest) -> bool:
        return self._backend.exists(manifest_key(digest))

    def iter_digests(self) -> Iterator[Digest]:
        for info in self._backend.list(MANIFEST_PREFIX):
            yield digest_from_manifest_key(info.key)


def validate(manifest: common_pb2.Manifest) -> Algorithm:
    """Check a manifest's internal consistency; return its digest algorithm."""
    if manifest.format_version != FORMAT_VERSION:
        raise InvalidArgument(
            f"manifest format_version {manifest.format_version} unsupported; use {FORMAT_VERSION}"
        )
    try:
        algorithm = Algorithm.from_proto(manifest.digest_algorithm)
    except ValueError as exc:
        raise InvalidArgument(f"manifest digest_algorithm: {exc}") from None
    names: set[str] = set()
    for tensor in manifest.tensors:
        if not tensor.name or tensor.name in names:
            raise InvalidArgument(f"tensor name {tensor.name!r} is empty or repeated")
        names.add(tensor.name)
        _validate_tensor(tensor, algorithm)
    snapshots = sum(t.kind == common_pb2.STORAGE_KIND_SNAPSHOT for t in manifest.tensors)
    if 0 < snapshots < len(manifest.tensors):
        raise InvalidArgument(
            "a manifest is a registered base (every tensor a snapshot) or a delta (none)"
        )
    files: set[str] = set()
    for file in manifest.files:
        if file.name in files:
            raise InvalidArgument(f"file {file.name!r} is named twice")
        files.add(file.name)
        _validate_file(file, algorithm)
    return algorithm


def is_plain_file_name(name: str) -> bool:
    """Whether a side file's name is one file in one folder: ``[A-Za-z0-9._-]``, not ``.``
    or ``..`` (so a manifest can never write outside the folder it is rebuilt into)."""
    return bool(_FILE_NAME.fullmatch(name)) and name not in (".", "..")


def _validate_file(file: common_pb2.FileEntry, algorithm: Algorithm) -> None:
    if not is_plain_file_name(file.name):
        raise InvalidArgument(
            f"file name {file.name!r} must be a plain name of [A-Za-z0-9._-], no directories"
        )
    if file.size != sum(chunk.size for chunk in file.chunks):
        raise InvalidArgument(f"file {file.name!r}: size is not the sum of its chunk sizes")
    _validate_chunks(f"file {file.name!r}", file.chunks, algorithm)


def _validate_tensor(tensor: common_pb2.TensorEntry, algorithm: Algorithm) -> None:
    if any(dim < 0 for dim in tensor.shape):
        raise InvalidArgument(f"tensor {tensor.name!r} has a negative dimension")
    if tensor.nbits != sum(part.nbits for part in tensor.parts):
        raise InvalidArgument(f"tensor {tensor.name!r}: nbits is not the sum of its parts' nbits")
    for part in tensor.parts:
        if part.byte_length != sum(chunk.size for chunk in part.chunks):
            raise InvalidArgument(
                f"tensor {tensor.name!r} part {part.name!r}: byte_length is not the sum of "
                "its chunk sizes"
            )
        _validate_chunks(f"tensor {tensor.name!r}", part.chunks, algorithm)


def _validate_chunks(
    owner: str, chunks: Iterable[common_pb2.ChunkRef], algorithm: Algorithm
) -> None:
    for chunk in chunks:
        try:
            digest = Digest.from_proto(chunk.digest)
        except ValueError as exc:
            raise InvalidArgument(f"{owner}: {exc}") from None
        if digest.algorithm is not algorithm:
            raise InvalidArgument(
                f"{owner}: chunk {digest} is not {algorithm.value} like the manifest's "
                "digest_algorithm"
            )
