"""Garbage collection: mark from refs, sweep what nothing references.

Live = every manifest a ref points at, every manifest younger than the grace period (its
ref may be about to be set), and every chunk those manifests name. Unreferenced objects
younger than the grace period are kept too: they may belong to an upload in flight.

Candidates are found without blocking writers. The final re-mark (refs and manifests
again, for what moved or was committed since the mark began) and the deletes run under the
exclusive side of the commit lock, which every manifest commit and ref move holds the
shared side of: a manifest can never be committed against a chunk being swept, nor a ref
moved to a manifest being swept.
"""

from __future__ import annotations

import time
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


class GarbageCollector:
    def __init__(
        self,
        backend: Backend,
        manifests: ManifestStore,
        refs: RefStore,
        lock: SharedExclusiveLock,
    ) -> None:
        self._backend = backend
        self._manifests = manifests
        self._refs = refs
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
            # No commit or ref move is in flight now: mark what refs moved to and what was
            # committed since the first pass (a manifest older than the grace period that a
            # ref moved to meanwhile would otherwise be swept from under it).
            for target in self._refs.all_targets():
                self._mark_manifest(mark, target)
            manifests = list(self._backend.list(MANIFEST_PREFIX))
            self._mark_young_manifests(mark, manifests, cutoff)
            doomed_chunks = [(k, s) for k, d, s in chunk_candidates if d not in mark.chunks]
            doomed_manifests = [
                (info.key, info.size)
                for info in manifests
                if digest_from_manifest_key(info.key) not in mark.manifests
            ]
            if not dry_run:
                for key, _ in doomed_chunks + doomed_manifests:
                    self._backend.delete(key)
        stats.manifests_live, stats.chunks_live = len(mark.manifests), len(mark.chunks)
        stats.chunks_swept, stats.manifests_swept = len(doomed_chunks), len(doomed_manifests)
        stats.bytes_freed = sum(size for _, size in doomed_chunks + doomed_manifests)
        return stats

    def _mark_manifest(self, mark: _Mark, digest: Digest) -> None:
        if digest in mark.manifests:
            return
        try:
            manifest = self._manifests.get(digest)
        except StoreError:  # absent or corrupt: nothing of it can be kept alive
            return
        mark.manifests.add(digest)
        mark.chunks.update(chunk_digests(manifest))

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
