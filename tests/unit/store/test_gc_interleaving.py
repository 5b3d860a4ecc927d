"""Garbage collection racing uploads, commits and ref moves, in randomized interleavings:
no committed, referenced manifest ever loses a chunk; within the grace period no upload
in flight does either; past it an upload may lose its chunks, and its commit is then
refused (FAILED_PRECONDITION), never accepted with a chunk missing. With tenants, the same
holds for each tenant's own view: its refs' manifests and chunks stay its own."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from clients._generated.deltavault.common.v1 import common_pb2
from store_svc.backends.local import LocalBackend
from store_svc.digest import Algorithm, Digest
from store_svc.errors import MissingChunks
from store_svc.identity import Tenant
from store_svc.manifests import FORMAT_VERSION
from store_svc.refs import RefName
from store_svc.repository import RefMove, Repository

WRITERS, COMMITS_EACH = 3, 12


def _manifest(chunks: list[tuple[Digest, int]]) -> common_pb2.Manifest:
    part = common_pb2.EncodedPart(
        name="p",
        byte_length=sum(size for _, size in chunks),
        chunks=[common_pb2.ChunkRef(digest=d.to_proto(), size=size) for d, size in chunks],
    )
    return common_pb2.Manifest(
        format_version=FORMAT_VERSION,
        digest_algorithm=Algorithm.BLAKE3.to_proto(),
        tensors=[common_pb2.TensorEntry(name="t", parts=[part])],
    )


def _writer(
    repo: Repository,
    seed: int,
    tenant: Tenant | None,
    refused: list[int],
    errors: list[BaseException],
) -> None:
    rng = random.Random(seed)
    sink = repo.chunk_sink(tenant)
    try:
        for i in range(COMMITS_EACH):
            chunks = []
            for _ in range(rng.randint(1, 3)):
                # Some chunks are shared with other writers' manifests, as deduplication does.
                payload = os.urandom(32) if rng.random() < 0.7 else bytes([rng.randrange(4)]) * 32
                digest = Digest.of(payload)
                sink.put(digest, payload)
                chunks.append((digest, len(payload)))
                threading.Event().wait(rng.random() * 0.002)
            ref = RefName(_namespace(seed), f"m{i % 4}")
            try:
                repo.commit(_manifest(chunks), RefMove(ref, None, force=True), tenant)
            except MissingChunks:
                refused.append(i)
    except BaseException as exc:
        errors.append(exc)


def _namespace(seed: int) -> str:
    return f"w{seed}"


@pytest.mark.parametrize("tenanted", [False, True], ids=["unconfined", "tenants"])
@pytest.mark.parametrize("grace_seconds", [3600.0, 0.0], ids=["in-grace", "past-grace"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_gc_never_takes_a_chunk_from_a_committed_manifest(
    tmp_path: Path, grace_seconds: float, seed: int, tenanted: bool
) -> None:
    repo = Repository(LocalBackend(tmp_path / "store"), max_chunk_bytes=1 << 20)
    refused: list[int] = []
    errors: list[BaseException] = []
    seeds = [seed * 10 + w for w in range(WRITERS)]
    tenants = {n: Tenant(_namespace(n)) if tenanted else None for n in seeds}
    writers = [
        threading.Thread(target=_writer, args=(repo, n, tenants[n], refused, errors)) for n in seeds
    ]
    stop = threading.Event()

    def collect() -> None:
        while not stop.is_set():
            repo.collect_garbage(grace_seconds=grace_seconds, dry_run=False)

    collector = threading.Thread(target=collect)
    collector.start()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stop.set()
    collector.join()

    assert errors == []
    if grace_seconds > 0:
        assert refused == []  # nothing in flight is swept within the grace period
    report = repo.verify()
    assert report.damaged == []
    assert report.manifests_checked >= 1
    refs = list(repo.refs.list(""))
    assert refs
    by_namespace = {_namespace(n): tenant for n, tenant in tenants.items()}
    for name, digest in refs:
        tenant = by_namespace[name.namespace]
        named = repo.get_manifest(digest, tenant).tensors[0].parts[0].chunks
        digests = [Digest.from_proto(c.digest) for c in named]
        assert repo.chunks.missing(digests) == [], name
        assert repo.missing_chunks(digests, tenant) == [], name  # still the tenant's own
