"""Garbage collection over the repository: mark from refs, sweep past the grace period."""

from __future__ import annotations

import os

from clients._generated.deltavault.common.v1 import common_pb2
from store_svc.backends.base import Backend
from store_svc.cas import chunk_key
from store_svc.digest import Algorithm, Digest
from store_svc.manifests import FORMAT_VERSION, manifest_key
from store_svc.refs import RefName
from store_svc.repository import RefMove, Repository


def put_manifest(repo: Repository, payload: bytes) -> tuple[Digest, Digest]:
    """Store one chunk and a manifest naming it; return (chunk digest, manifest digest)."""
    chunk = Digest.of(payload)
    repo.chunks.put(chunk, payload)
    part = common_pb2.EncodedPart(
        name="p",
        byte_length=len(payload),
        chunks=[common_pb2.ChunkRef(digest=chunk.to_proto(), size=len(payload))],
    )
    manifest = common_pb2.Manifest(
        format_version=FORMAT_VERSION,
        digest_algorithm=Algorithm.BLAKE3.to_proto(),
        tensors=[common_pb2.TensorEntry(name="t", parts=[part])],
    )
    return chunk, repo.commit(manifest)[0].digest


def test_sweeps_only_unreferenced_objects_past_grace(backend: Backend) -> None:
    repo = Repository(backend, max_chunk_bytes=1 << 20)
    live_chunk, live_manifest = put_manifest(repo, os.urandom(64))
    repo.refs.update(RefName("ns", "kept"), live_manifest, None)
    dead_chunk, dead_manifest = put_manifest(repo, os.urandom(64))
    loose = Digest.of(b"loose chunk")
    repo.chunks.put(loose, b"loose chunk")

    young = repo.collect_garbage(grace_seconds=3600, dry_run=False)
    assert (young.chunks_swept, young.manifests_swept) == (0, 0)
    assert young.chunks_in_grace == 1  # the loose chunk; dead_manifest is young, so live

    dry = repo.collect_garbage(grace_seconds=0, dry_run=True)
    assert (dry.chunks_swept, dry.manifests_swept, dry.dry_run) == (2, 1, True)
    assert backend.exists(chunk_key(loose))

    swept = repo.collect_garbage(grace_seconds=0, dry_run=False)
    assert (swept.refs_scanned, swept.manifests_live, swept.chunks_live) == (1, 1, 1)
    assert (swept.chunks_swept, swept.manifests_swept) == (2, 1)
    assert swept.bytes_freed == dry.bytes_freed > 0
    assert backend.exists(chunk_key(live_chunk)) and backend.exists(manifest_key(live_manifest))
    for gone in (chunk_key(dead_chunk), chunk_key(loose), manifest_key(dead_manifest)):
        assert not backend.exists(gone)


def test_deleted_ref_releases_its_objects(backend: Backend) -> None:
    repo = Repository(backend, max_chunk_bytes=1 << 20)
    chunk, manifest = put_manifest(repo, os.urandom(64))
    ref = RefName("ns", "temp")
    repo.commit(repo.manifests.get(manifest), RefMove(ref, None))
    repo.refs.delete(ref, manifest)
    stats = repo.collect_garbage(grace_seconds=0, dry_run=False)
    assert (stats.refs_scanned, stats.chunks_swept, stats.manifests_swept) == (0, 1, 1)
    assert not backend.exists(chunk_key(chunk))


def test_a_manifests_side_files_are_live(backend: Backend) -> None:
    repo = Repository(backend, max_chunk_bytes=1 << 20)
    tensor_chunk, _ = put_manifest(repo, os.urandom(64))
    config = b'{"model_type": "toy"}'
    file_chunk = Digest.of(config)
    repo.chunks.put(file_chunk, config)
    part = common_pb2.EncodedPart(
        name="p",
        byte_length=64,
        chunks=[common_pb2.ChunkRef(digest=tensor_chunk.to_proto(), size=64)],
    )
    manifest = common_pb2.Manifest(
        format_version=FORMAT_VERSION,
        digest_algorithm=Algorithm.BLAKE3.to_proto(),
        tensors=[common_pb2.TensorEntry(name="t", parts=[part])],
        files=[
            common_pb2.FileEntry(
                name="config.json",
                size=len(config),
                chunks=[common_pb2.ChunkRef(digest=file_chunk.to_proto(), size=len(config))],
            )
        ],
    )
    digest = repo.commit(manifest)[0].digest
    repo.refs.update(RefName("ns", "with-files"), digest, None)

    swept = repo.collect_garbage(grace_seconds=0, dry_run=False)
    assert swept.chunks_live == 2
    assert backend.exists(chunk_key(file_chunk)) and backend.exists(chunk_key(tensor_chunk))
