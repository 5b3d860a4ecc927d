"""Tenants: which chunks and manifests each one stored, and how many bytes it holds.

Content is stored once, whoever uploads it. A tenant-confined caller must still not learn
whether anyone else stored some content (the confirmation-of-file attack: ask whether
the chunks of a known document exist), so for such a caller the store behaves as if it
held only what that tenant uploaded itself:

- each chunk a tenant uploads, new to the store or not, gets a marker object
  ``tenants/<tenant>/chunks/<algorithm>/<2 hex>/<64 hex>`` whose body is the chunk's raw
  size in decimal; each manifest it commits gets ``tenants/<tenant>/manifests/...``;
- what has no marker of the tenant's is absent for it (MissingChunks lists it, reads
  answer NOT_FOUND exactly as for content nobody stored), and uploading it again, which
  proves the caller holds the bytes, is always accepted;
- a tenant's usage is the raw size of the chunks it has markers for; an upload that would
  take it past its quota is refused with RESOURCE_EXHAUSTED before anything is written.

Markers are written after the object they vouch for (under the commit lock, like commits)
and deleted by GC before it, so a marker always names stored content. Usage is counted in
memory from one scan of the tenant's markers on first use: the store runs as one process
per bucket (the chart's ``Recreate`` single replica). GC drops the markers a tenant's refs
no longer need and then has the counts re-scanned. What remains observable is timing (a
chunk already stored is not written again), which the proof of possession keeps from
revealing content.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from store_svc.backends.base import Backend, ObjectInfo, ObjectNotFound
from store_svc.cas import ChunkStore, PutResult, check_digest
from store_svc.digest import Algorithm, Digest
from store_svc.errors import QuotaExceeded
from store_svc.identity import Tenant
from store_svc.locking import SharedExclusiveLock

TENANT_PREFIX = "tenants/"
_PROBE_PARALLELISM = 16


class Kind(enum.Enum):
    CHUNK = "chunks"
    MANIFEST = "manifests"


def marker_key(tenant: str, kind: Kind, digest: Digest) -> str:
    return (
        f"{TENANT_PREFIX}{tenant}/{kind.value}/{digest.algorithm.value}/"
        f"{digest.hex[:2]}/{digest.hex}"
    )


@dataclass(frozen=True)
class Marker:
    """One tenant's claim on one stored object."""

    tenant: str
    kind: Kind
    digest: Digest
    info: ObjectInfo


def parse_marker(info: ObjectInfo) -> Marker:
    _, tenant, kind, algorithm, _, hex_value = info.key.split("/")
    return Marker(tenant, Kind(kind), Digest(Algorithm(algorithm), bytes.fromhex(hex_value)), info)


class TenantLedger:
    """Markers on a backend, and each tenant's chunk bytes against its quota."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        # Ownership probes are latency-bound (a HEAD each on S3): run them side by side.
        self._probes = ThreadPoolExecutor(_PROBE_PARALLELISM, thread_name_prefix="tenant-probe")
        self._lock = threading.Lock()
        self._usage: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        # Bumped when the counts are dropped: an upload reserved under an older generation
        # is already in the re-scan, so settling it must not count it again.
        self._generation = 0

    def close(self) -> None:
        self._probes.shutdown(wait=True)

    def owns(self, tenant: str, kind: Kind, digest: Digest) -> bool:
        return self._backend.exists(marker_key(tenant, kind, digest))

    def unowned(self, tenant: str, kind: Kind, digests: Iterable[Digest]) -> list[Digest]:
        """The subset of ``digests`` the tenant has no marker for, in order, without repeats."""
        unique = list(dict.fromkeys(digests))
        owned = list(self._probes.map(lambda d: self.owns(tenant, kind, d), unique))
        return [d for d, here in zip(unique, owned, strict=True) if not here]

    def claim_manifest(self, tenant: str, digest: Digest) -> bool:
        """Mark a manifest the tenant committed (after it is stored); True if new to it."""
        return self._backend.put_if_absent(marker_key(tenant, Kind.MANIFEST, digest), b"")

    def put_chunk(
        self, tenant: Tenant, digest: Digest, size: int, write: Callable[[], object]
    ) -> bool:
        """Store a chunk for ``tenant`` within its quota: ``write()`` stores the chunk
        itself, then the tenant's marker is written. True if the chunk is new to the
        tenant; QuotaExceeded (nothing written) if it would take the tenant past its quota.
        """
        if self.owns(tenant.name, Kind.CHUNK, digest):
            return False
        generation = self._reserve(tenant, size)
        new = False
        try:
            write()
            key = marker_key(tenant.name, Kind.CHUNK, digest)
            new = self._backend.put_if_absent(key, str(size).encode())
        finally:
            self._settle(tenant.name, size, new, generation)
        return new

    def usage(self, tenant: str) -> int:
        """Raw bytes of the chunks the tenant holds markers for."""
        with self._lock:
            return self._usage_locked(tenant)

    def markers(self) -> Iterator[Marker]:
        """Every tenant's markers, in key order (for GC)."""
        for info in self._backend.list(TENANT_PREFIX):
            yield parse_marker(info)

    def forget_usage(self) -> None:
        """Markers were deleted: count every tenant's usage afresh on next use."""
        with self._lock:
            self._usage.clear()
            self._generation += 1

    def _reserve(self, tenant: Tenant, size: int) -> int:
        with self._lock:
            held = self._usage_locked(tenant.name) + self._pending.get(tenant.name, 0)
            if tenant.quota_bytes is not None and held + size > tenant.quota_bytes:
                raise QuotaExceeded(tenant.name, held, size, tenant.quota_bytes)
            self._pending[tenant.name] = self._pending.get(tenant.name, 0) + size
            return self._generation

    def _settle(self, tenant: str, size: int, new: bool, generation: int) -> None:
        with self._lock:
            self._pending[tenant] -= size
            if new and generation == self._generation:
                self._usage[tenant] += size

    def _usage_locked(self, tenant: str) -> int:
        if tenant not in self._usage:
            self._usage[tenant] = self._scan(tenant)
        return self._usage[tenant]

    def _scan(self, tenant: str) -> int:
        keys = [
            info.key for info in self._backend.list(f"{TENANT_PREFIX}{tenant}/{Kind.CHUNK.value}/")
        ]
        return sum(self._probes.map(self._marker_size, keys))

    def _marker_size(self, key: str) -> int:
        try:
            return int(self._backend.get(key))
        except ObjectNotFound:  # swept between the listing and the read
            return 0


class TenantChunks:
    """The chunk store as one tenant uploads to it (a ``ChunkSink``): every chunk is
    marked for the tenant, within its quota; "written" means new to the tenant.

    The chunk write and its marker hold the commit lock's shared side, as commits do: GC
    sweeps under the exclusive side, so it either sees the new marker (and keeps the
    chunk) or runs before the write (which then stores the chunk again). Without it, a
    sweep could delete a chunk that was deduplicated an instant before its marker was
    written, and the marker would vouch for a chunk that is gone.
    """

    def __init__(
        self, chunks: ChunkStore, ledger: TenantLedger, tenant: Tenant, lock: SharedExclusiveLock
    ) -> None:
        self._chunks, self._ledger, self._tenant, self._lock = chunks, ledger, tenant, lock

    @property
    def max_chunk_bytes(self) -> int:
        return self._chunks.max_chunk_bytes

    def put(self, digest: Digest, data: bytes, *, verified: bool = False) -> PutResult:
        if not verified:
            check_digest(digest, data)
        with self._lock.shared():
            new = self._ledger.put_chunk(
                self._tenant,
                digest,
                len(data),
                lambda: self._chunks.put(digest, data, verified=True),
            )
        return PutResult(new)
