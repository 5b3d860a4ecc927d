"""Garbage collection: mark from refs, sweep what nothing references.

Live = every manifest a ref points at, every manifest younger than the grace period (its
ref may be about to be set), and every chunk those manifests name. Unreferenced objects
younger than the grace period are kept too: they may belong to an upload in flight.

Candidates are found without blocking writers. The final re-mark (refs and manifests
again, for what moved or was committed since the mark began) and the deletes run under the
exclusive side of the commit lock, which every manifest commit and ref move holds the
shared side of: a manifest can never be committed against a chunk being swept, nor a ref
moved to a manifest being swept.

Tenants' markers (``store_svc.tenancy``) are swept in the same pass: a marker survives
while the tenant's own refs reach what it names, or while it is younger than the grace
period (and then it keeps what it names alive too: an upload in flight). Markers are
deleted before the objects they name, so a marker never names a swept object.

A manifest's signatures (``store_svc.signatures``) live and die with it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from store_svc.backends.base import Backend, ObjectInfo
from store_svc.cas import CHUNK_PREFIX, digest_from_chunk_key
from store_svc.digest import Digest
from store_svc.errors import StoreError
from store_svc.locking import SharedExclusiveLock
from store_svc.manifests import (
    MANIFEST_PREFIX,
    ManifestStore,
    chunk_digests,
    digest_from_manifest_key,
)
from store_svc.refs import RefStore
from store_svc.signatures import SIGNATURE_PREFIX, manifest_of_signature_key
from store_svc.tenancy import Kind, Marker, TenantLedger


@dataclass
class GcStats:
    refs_scanned: int = 0
    manifests_live: int = 0
    chunks_live: int = 0
    chunks_swept: int = 0
    manifests_swept: int = 0
    bytes_freed: int = 0
    chunks_in_grace: int = 0
    dry_run: bool = False


@dataclass
class _Mark:
    manifests: set[Digest] = field(default_factory=set)
    chunks: set[Digest] = field(default_factory=set)
    chunks_of: dict[Digest, list[Digest]] = field(default_factory=dict)
    """Each live manifest's chunks."""
    reach: defaultdict[str, set[Digest]] = field(default_factory=lambda: defaultdict(set))
    """Per ref namespace (= tenant): the manifests and chunks its refs keep alive."""

    def reach_from(self, namespace: str, manifest: Digest) -> None:
        if manifest in self.manifests:
            self.reach[namespace].add(manifest)
            self.reach[namespace].update(self.chunks_of[manifest])


@dataclass(frozen=True)
class _Doomed:
    """What a sweep deletes: (key, size) of chunks, manifests and their signatures, and
    marker keys."""

    chunks: list[tuple[str, int]]
    manifests: list[tuple[str, int]]
    signatures: list[tuple[str, int]]
    markers: list[str]

    def objects(self) -> list[tuple[str, int]]:
        """Every swept object but markers, signatures before the manifests they sign."""
        return self.signatures + self.chunks + self.manifests


class GarbageCollector:
    def __init__(
        self,
        backend: Backend,
        manifests: ManifestStore,
        refs: RefStore,
        tenants: TenantLedger,
        lock: SharedExclusiveLock,
    ) -> None:
        self._backend = backend
        self._manifests = manifests
        self._refs = refs
        self._tenants = tenants
        self._lock = lock

    def collect(self, *, grace_seconds: float, dry_run: bool = False) -> GcStats:
        cutoff = time.time() - grace_seconds
        stats = GcStats(dry_run=dry_run)
        mark = _Mark()
        for target in self._refs.all_targets():
            stats.refs_scanned += 1
            self._mark_manifest(mark, target)
        self._mark_young_manifests(mark, self._backend.list(MANIFEST_PREFIX), cutoff)
        chunk_candidates = self._chunk_candidates(mark, cutoff, stats)
        with self._lock.exclusive():
            doomed = self._remark_and_judge(mark, chunk_candidates, cutoff, stats)
            if not dry_run:
                # Markers first: a marker never names a swept object.
                for key in doomed.markers + [k for k, _ in doomed.objects()]:
                    self._backend.delete(key)
                if doomed.markers:
                    self._tenants.forget_usage()
        stats.manifests_live, stats.chunks_live = len(mark.manifests), len(mark.chunks)
        stats.chunks_swept, stats.manifests_swept = len(doomed.chunks), len(doomed.manifests)
        stats.bytes_freed = sum(size for _, size in doomed.objects())
        return stats

    def _remark_and_judge(
        self,
        mark: _Mark,
        chunk_candidates: list[tuple[str, Digest, int]],
        cutoff: float,
        stats: GcStats,
    ) -> _Doomed:
        """Under the exclusive lock: no commit or ref move is in flight, so mark what refs
        moved to and what was committed since the first pass (a manifest older than the
        grace period that a ref moved to meanwhile would otherwise be swept from under it)
        and what young tenant markers name; then what to delete."""
        for ref, target in self._refs.list():
            self._mark_manifest(mark, target)
            mark.reach_from(ref.namespace, target)
        manifests = list(self._backend.list(MANIFEST_PREFIX))
        self._mark_young_manifests(mark, manifests, cutoff)
        markers = list(self._tenants.markers())
        claimed = self._mark_young_claims(mark, markers, cutoff)
        kept, claimed_only = mark.chunks | claimed, claimed - mark.chunks
        stats.chunks_in_grace += sum(d in claimed_only for _, d, _ in chunk_candidates)
        return _Doomed(
            chunks=[(k, size) for k, d, size in chunk_candidates if d not in kept],
            manifests=[
                (info.key, info.size)
                for info in manifests
                if digest_from_manifest_key(info.key) not in mark.manifests
            ],
            signatures=[
                (info.key, info.size)
                for info in self._backend.list(SIGNATURE_PREFIX)
                if manifest_of_signature_key(info.key) not in mark.manifests
            ],
            markers=[m.info.key for m in markers if not _keeps(mark, m, cutoff)],
        )

    def _mark_young_claims(self, mark: _Mark, markers: list[Marker], cutoff: float) -> set[Digest]:
        """Keep what young markers name (a tenant's upload or commit in flight, perhaps of
        content already stored long ago); returns the chunks young chunk markers name."""
        claimed = set()
        for marker in markers:
            if marker.info.modified < cutoff:
                continue
            if marker.kind is Kind.CHUNK:
                claimed.add(marker.digest)
            else:
                self._mark_manifest(mark, marker.digest)
                mark.reach_from(marker.tenant, marker.digest)
        return claimed

    def _mark_manifest(self, mark: _Mark, digest: Digest) -> None:
        if digest in mark.manifests:
            return
        try:
            manifest = self._manifests.get(digest)
        except StoreError:  # absent or corrupt: nothing of it can be kept alive
            return
        mark.manifests.add(digest)
        mark.chunks_of[digest] = chunk_digests(manifest)
        mark.chunks.update(mark.chunks_of[digest])

    def _mark_young_manifests(
        self, mark: _Mark, manifests: Iterable[ObjectInfo], cutoff: float
    ) -> None:
        for info in manifests:
            if info.modified >= cutoff:
                self._mark_manifest(mark, digest_from_manifest_key(info.key))

    def _chunk_candidates(
        self, mark: _Mark, cutoff: float, stats: GcStats
    ) -> list[tuple[str, Digest, int]]:
        candidates = []
        for info in self._backend.list(CHUNK_PREFIX):
            digest = digest_from_chunk_key(info.key)
            if digest in mark.chunks:
                continue
            if info.modified >= cutoff:
                stats.chunks_in_grace += 1
            else:
                candidates.append((info.key, digest, info.size))
        return candidates


def _keeps(mark: _Mark, marker: Marker, cutoff: float) -> bool:
    """Whether a tenant's marker survives: young, or naming what its own refs reach."""
    return marker.info.modified >= cutoff or marker.digest in mark.reach[marker.tenant]
