"""Tenants over the repository: each sees only what it stored, within its quota, and GC
keeps each tenant's claims exactly as long as its own refs (or an upload in flight) need
them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from clients._generated.deltavault.common.v1 import common_pb2
from store_svc.backends.base import Backend
from store_svc.backends.local import LocalBackend
from store_svc.cas import chunk_key
from store_svc.digest import Algorithm, Digest
from store_svc.errors import (
    ChunkNotFound,
    FailedPrecondition,
    MissingChunks,
    NotFound,
    QuotaExceeded,
)
from store_svc.identity import Tenant
from store_svc.manifests import FORMAT_VERSION
from store_svc.refs import RefName
from store_svc.repository import RefMove, Repository
from store_svc.tenancy import TENANT_PREFIX

A, B = Tenant("team-a"), Tenant("team-b")


def manifest_of(*payloads: bytes) -> common_pb2.Manifest:
    parts = [
        common_pb2.EncodedPart(
            name=f"p{i}",
            byte_length=len(data),
            chunks=[common_pb2.ChunkRef(digest=Digest.of(data).to_proto(), size=len(data))],
        )
        for i, data in enumerate(payloads)
    ]
    return common_pb2.Manifest(
        format_version=FORMAT_VERSION,
        digest_algorithm=Algorithm.BLAKE3.to_proto(),
        tensors=[common_pb2.TensorEntry(name="t", parts=parts)],
    )


def upload(repo: Repository, tenant: Tenant | None, data: bytes) -> bool:
    """Put one chunk as ``tenant``; True if it was new to it."""
    return repo.chunk_sink(tenant).put(Digest.of(data), data).written


def objects(backend: Backend) -> set[str]:
    return {info.key for info in backend.list("")}


@pytest.fixture
def repo(backend: Backend) -> Repository:
    return Repository(backend, max_chunk_bytes=1 << 20)


def test_a_tenant_sees_only_the_chunks_it_uploaded(repo: Repository) -> None:
    secret = os.urandom(300)
    digest = Digest.of(secret)
    assert upload(repo, A, secret)
    assert repo.missing_chunks([digest], B) == [digest]  # as if nobody had stored it
    with pytest.raises(ChunkNotFound):
        repo.get_chunk(digest, B)
    assert repo.missing_chunks([digest], A) == []
    assert bytes(repo.get_chunk(digest, A)) == secret
    assert repo.missing_chunks([digest], None) == []  # unconfined callers see everything

    # B proves it holds the bytes by sending them: accepted, new *to B*, stored once.
    chunks_before = {k for k in objects(repo.backend) if k.startswith("chunks/")}
    assert upload(repo, B, secret)
    assert {k for k in objects(repo.backend) if k.startswith("chunks/")} == chunks_before
    assert bytes(repo.get_chunk(digest, B)) == secret
    assert not upload(repo, B, secret)  # a second upload is deduplicated for B


def test_a_tenant_commits_only_its_own_chunks_and_learns_only_its_own_commits(
    repo: Repository,
) -> None:
    data = os.urandom(100)
    manifest = manifest_of(data)
    upload(repo, A, data)
    result, _ = repo.commit(manifest, RefMove(RefName("team-a", "m"), None), tenant=A)
    assert not result.already_present

    with pytest.raises(MissingChunks) as refused:
        repo.commit(manifest, tenant=B)
    assert refused.value.digests == [Digest.of(data)]
    with pytest.raises(NotFound):
        repo.get_manifest(result.digest, B)
    with pytest.raises(NotFound):
        repo.verify(result.digest, B)

    upload(repo, B, data)
    again, _ = repo.commit(manifest, tenant=B)
    # The manifest was stored already (by A), but B must not learn that.
    assert again.digest == result.digest and not again.already_present
    assert repo.commit(manifest, tenant=B)[0].already_present
    assert repo.get_manifest(result.digest, B) == manifest
    assert repo.verify(result.digest, B).damaged == []


def test_a_ref_may_point_only_at_the_tenants_own_manifests(repo: Repository) -> None:
    data = os.urandom(50)
    upload(repo, A, data)
    digest = repo.commit(manifest_of(data), tenant=A)[0].digest
    with pytest.raises(FailedPrecondition, match="no manifest"):
        repo.update_ref(digest, RefMove(RefName("team-b", "stolen"), None), tenant=B)
    assert repo.refs.resolve(RefName("team-b", "stolen")) is None
    repo.update_ref(digest, RefMove(RefName("team-a", "mine"), None), tenant=A)


def test_quota_refuses_an_upload_that_would_exceed_it_and_writes_nothing(
    repo: Repository,
) -> None:
    small = Tenant("team-a", quota_bytes=1000)
    first = os.urandom(600)
    assert upload(repo, small, first)
    assert repo.tenants.usage("team-a") == 600
    before = objects(repo.backend)
    with pytest.raises(QuotaExceeded, match="600 of its 1000"):
        upload(repo, small, os.urandom(401))
    assert objects(repo.backend) == before
    assert upload(repo, small, os.urandom(400))  # exactly up to the quota
    assert not upload(repo, small, first)  # re-sending what it holds costs nothing
    assert upload(repo, Tenant("team-b", quota_bytes=1000), os.urandom(1000))  # its own quota


def test_usage_survives_a_restart(backend: Backend) -> None:
    first = Repository(backend, max_chunk_bytes=1 << 20)
    upload(first, A, os.urandom(700))
    upload(first, A, os.urandom(300))
    first.close()
    again = Repository(backend, max_chunk_bytes=1 << 20)
    assert again.tenants.usage("team-a") == 1000
    with pytest.raises(QuotaExceeded):
        upload(again, Tenant("team-a", quota_bytes=1100), os.urandom(101))


def test_gc_keeps_a_tenants_claims_while_its_refs_need_them(repo: Repository) -> None:
    shared, own = os.urandom(400), os.urandom(100)
    for tenant in (A, B):
        upload(repo, tenant, shared)
    upload(repo, A, own)
    kept = repo.commit(manifest_of(shared, own), RefMove(RefName("team-a", "m"), None), A)
    stats = repo.collect_garbage(grace_seconds=0, dry_run=False)
    assert stats.chunks_swept == 0
    # B has no ref reaching the shared chunk: its claim (and usage) is gone, A's stays.
    assert repo.missing_chunks([Digest.of(shared)], B) == [Digest.of(shared)]
    assert repo.missing_chunks([Digest.of(shared), Digest.of(own)], A) == []
    assert (repo.tenants.usage("team-a"), repo.tenants.usage("team-b")) == (500, 0)

    repo.refs.delete(RefName("team-a", "m"), kept[0].digest)
    repo.collect_garbage(grace_seconds=0, dry_run=False)
    assert not [k for k in objects(repo.backend) if k.startswith((TENANT_PREFIX, "chunks/"))]
    assert repo.tenants.usage("team-a") == 0


def test_a_young_claim_keeps_an_old_chunk_for_the_upload_in_flight(tmp_path: Path) -> None:
    repo = Repository(LocalBackend(tmp_path / "store"), max_chunk_bytes=1 << 20)
    data = os.urandom(64)
    upload(repo, None, data)  # stored long ago by someone, referenced by nothing
    long_ago = time.time() - 7200
    os.utime(tmp_path / "store" / chunk_key(Digest.of(data)), (long_ago, long_ago))
    upload(repo, A, data)  # A uploads it now (deduplicated) and will commit in a moment
    stats = repo.collect_garbage(grace_seconds=3600, dry_run=False)
    assert (stats.chunks_swept, stats.chunks_in_grace) == (0, 1)
    repo.commit(manifest_of(data), RefMove(RefName("team-a", "m"), None), A)

    # Without the claim the same old chunk is swept.
    other = os.urandom(64)
    upload(repo, None, other)
    os.utime(tmp_path / "store" / chunk_key(Digest.of(other)), (long_ago, long_ago))
    assert repo.collect_garbage(grace_seconds=3600, dry_run=False).chunks_swept == 1
