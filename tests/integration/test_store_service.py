"""The store service over real gRPC on loopback, against each backend.

Every status code the API promises is provoked here, and every failure is checked to
leave nothing written.
"""

from __future__ import annotations

import gc
import os
import threading
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients._generated.deltavault.common.v1 import common_pb2
from clients._generated.deltavault.store.v1 import store_pb2, store_pb2_grpc
from clients.errors import (
    ConflictError,
    DataLossError,
    DeltaVaultError,
    InvalidArgumentError,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
    UnavailableError,
)
from clients.store_client import RetryPolicy, StoreClient
from store_svc.backends.base import Backend
from store_svc.cas import chunk_key
from store_svc.digest import Algorithm, Digest
from tests.integration.conftest import SMALL_CHUNK, RunningStore, start_store, stop_store
from tests.support.children import free_port
from tests.support.manifests import byte_tensor_manifest


def make_manifest(
    client: StoreClient, payload: bytes, algorithm: Algorithm = Algorithm.BLAKE3
) -> common_pb2.Manifest:
    refs, _ = client.upload(payload, algorithm)
    return byte_tensor_manifest(refs, algorithm)


@pytest.mark.parametrize("algorithm", list(Algorithm), ids=lambda a: a.value)
def test_upload_commit_resolve_read_round_trip(store: RunningStore, algorithm: Algorithm) -> None:
    payload = os.urandom(3 * SMALL_CHUNK + 123)
    manifest = make_manifest(store.client, payload, algorithm)
    info = store.client.commit_manifest(manifest, ref="team-a/model-1")
    assert info.chunk_count == 4 and info.total_bytes == len(payload)
    assert store.client.resolve_ref("team-a/model-1") == info.digest
    fetched = store.client.get_manifest(info.digest)
    assert fetched == manifest
    assert store.client.read(fetched.tensors[0].parts[0].chunks) == payload


def test_second_upload_sends_nothing_and_commit_is_idempotent(store: RunningStore) -> None:
    payload = os.urandom(2 * SMALL_CHUNK)
    refs, first = store.client.upload(payload)
    again, second = store.client.upload(payload)
    assert (first.chunks_sent, first.bytes_written) == (2, len(payload))
    assert (second.chunks_sent, second.bytes_sent) == (0, 0)
    assert refs == again
    manifest = make_manifest(store.client, payload)
    assert not store.client.commit_manifest(manifest).already_present
    assert store.client.commit_manifest(manifest).already_present


def test_ranged_read(store: RunningStore) -> None:
    payload = os.urandom(SMALL_CHUNK)
    refs, _ = store.client.upload(payload)
    digest = Digest.from_proto(refs[0].digest)
    ranges = [(digest, 10, 100), (digest, SMALL_CHUNK - 5, 0), (digest, 0, 0)]
    got = [data for _, data in store.client.get_chunks(ranges)]
    assert got == [payload[10:110], payload[-5:], payload]
    with pytest.raises(InvalidArgumentError, match="outside chunk"):
        list(store.client.get_chunks([(digest, SMALL_CHUNK - 1, 2)]))


def test_unknown_digest_is_not_found(store: RunningStore) -> None:
    unknown = Digest.of(b"never stored")
    assert store.client.missing_chunks([unknown]) == [unknown]
    with pytest.raises(NotFoundError):
        list(store.client.get_chunks([(unknown, 0, 0)]))
    with pytest.raises(NotFoundError):
        store.client.get_manifest(unknown)
    with pytest.raises(NotFoundError):
        store.client.resolve_ref("team-a/absent")


def test_wrong_digest_is_data_loss_and_nothing_written(store: RunningStore) -> None:
    claimed = Digest.of(b"the bytes the client claims")
    with pytest.raises(DataLossError, match="nothing was written"):
        store.client.put_chunks([(claimed, b"other bytes")])
    assert store.client.missing_chunks([claimed]) == [claimed]
    assert not store.backend.exists(chunk_key(claimed))


def test_oversized_frame_and_chunk_are_refused(store: RunningStore) -> None:
    stub = store_pb2_grpc.DeltaStoreStub(grpc.insecure_channel(store.target))
    big = os.urandom(store.server.config.max_message_bytes + 1)
    frame = store_pb2.PutChunksRequest(
        digest=Digest.of(big).to_proto(), total_size=len(big), data=big
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.PutChunks(iter([frame]), timeout=10)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

    huge = store.server.config.max_chunk_bytes + 1
    header = store_pb2.PutChunksRequest(
        digest=Digest.of(b"x").to_proto(), total_size=huge, data=b"x"
    )
    with pytest.raises(ResourceExhaustedError, match="exceeds the limit"):
        store.client._call(lambda: stub.PutChunks(iter([header]), timeout=10))


def test_truncated_and_misordered_frames_are_invalid(store: RunningStore) -> None:
    data = os.urandom(1000)
    digest = Digest.of(data)
    stub = store_pb2_grpc.DeltaStoreStub(grpc.insecure_channel(store.target))

    def frame(offset: int, piece: bytes) -> store_pb2.PutChunksRequest:
        return store_pb2.PutChunksRequest(
            digest=digest.to_proto(), total_size=len(data), offset=offset, data=piece
        )

    for frames, message in [
        ([frame(0, data[:500])], "incomplete"),
        ([frame(0, data[:500]), frame(600, data[600:])], "expected 500"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message):
            store.client._call(partial(stub.PutChunks, iter(frames), timeout=10))
    assert store.client.missing_chunks([digest]) == [digest]


def test_manifest_with_missing_chunk_is_refused(store: RunningStore) -> None:
    manifest = make_manifest(store.client, os.urandom(100))
    absent = Digest.of(b"not uploaded")
    manifest.tensors[0].parts[0].chunks.add(digest=absent.to_proto(), size=12)
    manifest.tensors[0].parts[0].byte_length += 12
    with pytest.raises(PreconditionError) as caught:
        store.client.commit_manifest(manifest, ref="team-a/partial")
    assert caught.value.missing == [absent]
    with pytest.raises(NotFoundError):
        store.client.resolve_ref("team-a/partial")
    assert list(store.backend.list("manifests/")) == []


def test_inconsistent_manifest_is_invalid(store: RunningStore) -> None:
    manifest = make_manifest(store.client, os.urandom(100))
    manifest.tensors[0].nbits += 1
    with pytest.raises(InvalidArgumentError, match="nbits"):
        store.client.commit_manifest(manifest)
    manifest = make_manifest(store.client, os.urandom(100))
    manifest.format_version = 99
    with pytest.raises(InvalidArgumentError, match="format_version"):
        store.client.commit_manifest(manifest)


def with_file(
    client: StoreClient, manifest: common_pb2.Manifest, name: str, data: bytes
) -> common_pb2.Manifest:
    refs, _ = client.upload(data)
    manifest.files.add(name=name, size=len(data), chunks=refs)
    return manifest


def test_side_files_are_committed_checked_and_read_back(store: RunningStore) -> None:
    config = b'{"model_type": "toy", "id2label": {"0": "sport"}}'
    manifest = with_file(store.client, make_manifest(store.client, b"w"), "config.json", config)
    info = store.client.commit_manifest(manifest, ref="ns/with-files")
    assert info.chunk_count == 2 and info.total_bytes == 1 + len(config)
    (stored,) = store.client.get_manifest(info.digest).files
    assert store.client.read(stored.chunks) == config

    absent = Digest.of(b"never uploaded")
    manifest = make_manifest(store.client, b"w")
    manifest.files.add(
        name="tokenizer.json",
        size=3,
        chunks=[common_pb2.ChunkRef(digest=absent.to_proto(), size=3)],
    )
    with pytest.raises(PreconditionError) as caught:
        store.client.commit_manifest(manifest)
    assert caught.value.missing == [absent]


@pytest.mark.parametrize(
    ("name", "message"),
    [("../config.json", "plain name"), ("sub/config.json", "plain name"), ("..", "plain name")],
)
def test_a_side_file_must_have_a_plain_name(store: RunningStore, name: str, message: str) -> None:
    manifest = with_file(store.client, make_manifest(store.client, b"w"), name, b"{}")
    with pytest.raises(InvalidArgumentError, match=message):
        store.client.commit_manifest(manifest)


def test_side_file_sizes_and_names_are_consistent(store: RunningStore) -> None:
    manifest = with_file(store.client, make_manifest(store.client, b"w"), "a.json", b"{}")
    manifest.files[0].size += 1
    with pytest.raises(InvalidArgumentError, match="size"):
        store.client.commit_manifest(manifest)
    manifest = with_file(store.client, make_manifest(store.client, b"w"), "a.json", b"{}")
    with pytest.raises(InvalidArgumentError, match="named twice"):
        store.client.commit_manifest(with_file(store.client, manifest, "a.json", b"[]"))


def test_a_manifest_is_a_base_or_a_delta_never_both(store: RunningStore) -> None:
    manifest = make_manifest(store.client, b"w")
    snapshot = manifest.tensors.add()
    snapshot.CopyFrom(manifest.tensors[0])
    snapshot.name, snapshot.kind = "other.weight", common_pb2.STORAGE_KIND_SNAPSHOT
    with pytest.raises(InvalidArgumentError, match="registered base"):
        store.client.commit_manifest(manifest)


def _raised_by(call: Callable[[], object]) -> weakref.ref[BaseException]:
    try:
        call()
    except DeltaVaultError as exc:
        return weakref.ref(exc)
    raise AssertionError("the call did not fail")


def test_a_failed_call_leaves_no_reference_cycle(store: RunningStore) -> None:
    """A cycle through a failed call's traceback would keep the caller's frames, and the
    tensors in them, alive until the cycle collector happens to run."""
    gc.collect()
    gc.disable()
    try:
        for call in (
            partial(store.client.resolve_ref, "ns/absent"),
            partial(store.client.read, [common_pb2.ChunkRef(digest=Digest.of(b"x").to_proto())]),
        ):
            assert _raised_by(call)() is None
    finally:
        gc.enable()


def test_ref_compare_and_swap(store: RunningStore) -> None:
    first = store.client.commit_manifest(make_manifest(store.client, b"one")).digest
    second = store.client.commit_manifest(make_manifest(store.client, b"two")).digest
    assert store.client.update_ref("ns/r", first) is None
    with pytest.raises(ConflictError) as caught:
        store.client.update_ref("ns/r", second)  # expects absent
    assert (caught.value.expected, caught.value.actual) == (None, first)
    with pytest.raises(ConflictError):
        store.client.update_ref("ns/r", second, expected=second)
    assert store.client.update_ref("ns/r", second, expected=first) == first
    assert store.client.update_ref("ns/r", first, force=True) == second
    assert store.client.resolve_ref("ns/r") == first


def test_ref_to_unknown_manifest_is_refused(store: RunningStore) -> None:
    with pytest.raises(PreconditionError, match="commit it before"):
        store.client.update_ref("ns/r", Digest.of(b"no such manifest"))


def test_racing_writers_leave_one_winner(store: RunningStore) -> None:
    base = store.client.commit_manifest(make_manifest(store.client, b"base")).digest
    store.client.update_ref("ns/race", base)
    targets = [
        store.client.commit_manifest(make_manifest(store.client, bytes([i]))).digest
        for i in range(8)
    ]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(targets))

    def write(target: Digest) -> None:
        barrier.wait()
        try:
            store.client.update_ref("ns/race", target, expected=base)
            outcomes.append("won")
        except ConflictError:
            outcomes.append("aborted")

    threads = [threading.Thread(target=write, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["aborted"] * 7 + ["won"]
    assert store.client.resolve_ref("ns/race") in targets


@pytest.mark.parametrize(
    "name", ["noslash", "a/b/c", "../etc", "ns/..", "ns/.hidden", "ns/a b", "ns/", "/x", "ns/a\nb"]
)
def test_bad_ref_names_are_invalid(store: RunningStore, name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="namespace/name"):
        store.client.resolve_ref(name)


def test_list_refs_with_prefix_and_pages(store: RunningStore) -> None:
    target = store.client.commit_manifest(make_manifest(store.client, b"m")).digest
    names = ["a/x", "a/x-2", "a/x.3", "a/y", "ab/x", "b/x"]
    for name in names:
        store.client.update_ref(name, target)
    listed = [ref for ref, _ in store.client.list_refs("a/", page_size=2)]
    assert sorted(listed) == ["a/x", "a/x-2", "a/x.3", "a/y"]
    assert len(listed) == len(set(listed))
    assert sorted(r for r, _ in store.client.list_refs("a")) == sorted(names[:5])
    assert sorted(r for r, _ in store.client.list_refs()) == sorted(names)


def test_delete_ref(store: RunningStore) -> None:
    target = store.client.commit_manifest(make_manifest(store.client, b"m")).digest
    store.client.update_ref("ns/gone", target)
    with pytest.raises(ConflictError):
        store.client.delete_ref("ns/gone", expected=Digest.of(b"other"))
    assert store.client.delete_ref("ns/gone") == target
    with pytest.raises(NotFoundError):
        store.client.resolve_ref("ns/gone")
    with pytest.raises(NotFoundError):
        store.client.delete_ref("ns/gone")
    assert store.client.update_ref("ns/gone", target) is None  # can be created again
    assert [r for r, _ in store.client.list_refs("ns/")] == ["ns/gone"]


def test_corrupt_chunk_is_data_loss_and_verify_reports_it(store: RunningStore) -> None:
    payload = os.urandom(5000)
    info = store.client.commit_manifest(make_manifest(store.client, payload), ref="ns/c")
    digest = Digest.from_proto(
        store.client.get_manifest(info.digest).tensors[0].parts[0].chunks[0].digest
    )
    assert store.client.verify().damaged == []
    key = chunk_key(digest)
    stored = bytearray(store.backend.get(key))
    stored[-1] ^= 0x01
    store.backend.delete(key)
    store.backend.put_if_absent(key, bytes(stored))
    with pytest.raises(DataLossError) as caught:
        list(store.client.get_chunks([(digest, 0, 0)]))
    assert caught.value.digest == digest
    for report in (store.client.verify(), store.client.verify(info.digest)):
        assert [(d.key, d.problem) for d in report.damaged] == [(key, "digest mismatch")]


def test_garbage_collection_dry_run_and_grace(store: RunningStore) -> None:
    kept = store.client.commit_manifest(make_manifest(store.client, b"kept"), ref="ns/kept")
    store.client.upload(os.urandom(100))  # unreferenced, but within the grace period
    stats = store.client.collect_garbage(dry_run=True)
    assert stats.dry_run and stats.chunks_swept == 0 and stats.chunks_in_grace == 1
    assert stats.refs_scanned == 1 and stats.manifests_live == 1 and stats.chunks_live == 1
    assert store.client.get_manifest(kept.digest)


@pytest.fixture
def store_with_metrics(backend: Backend, tmp_path: Path) -> Iterator[RunningStore]:
    running = start_store(backend, tmp_path, metrics_port=0)
    yield running
    stop_store(running)


def test_health_reflection_and_metrics(store_with_metrics: RunningStore) -> None:
    store = store_with_metrics
    channel = grpc.insecure_channel(store.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "deltavault.store.v1.DeltaStore"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = reflect.ServerReflectionInfo(iter([request]), timeout=5)
    services = {s.name for s in answer.list_services_response.service}
    assert {"deltavault.store.v1.DeltaStore", "grpc.health.v1.Health"} <= services

    store.client.upload(os.urandom(10))
    with pytest.raises(NotFoundError):
        store.client.resolve_ref("ns/absent")
    url = f"http://127.0.0.1:{store.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    assert (
        'deltavault_store_rpc_requests_total{grpc_code="NOT_FOUND",grpc_method="ResolveRef"}'
        in text
    )
    assert "deltavault_store_chunks_written_total 1.0" in text
    assert "deltavault_store_received_bytes_total 10.0" in text


def test_backend_down_is_unavailable(tmp_path: Path) -> None:
    from store_svc.backends.s3 import S3Backend  # noqa: PLC0415

    dead = S3Backend("127.0.0.1:9", "bucket", "key", "secret", create_bucket=False)
    running = start_store(dead, tmp_path)
    client = StoreClient(running.target, retry=RetryPolicy(attempts=1), timeout=30)
    try:
        with pytest.raises(UnavailableError, match="object store unavailable"):
            client.missing_chunks([Digest.of(b"x")])
        with pytest.raises(UnavailableError):
            client.resolve_ref("ns/x")
    finally:
        client.close()
        stop_store(running)


def test_client_retries_until_the_store_comes_up(local_backend: Backend, tmp_path: Path) -> None:
    """UNAVAILABLE is retried with backoff: a store that starts late is still reached."""
    port = free_port()
    client = StoreClient(
        f"127.0.0.1:{port}",
        timeout=10,
        retry=RetryPolicy(attempts=8, initial_backoff=0.2, max_backoff=1.0),
    )
    late: list[RunningStore] = []
    starter = threading.Timer(
        0.5, lambda: late.append(start_store(local_backend, tmp_path, port=port))
    )
    starter.start()
    try:
        assert client.missing_chunks([Digest.of(b"x")]) == [Digest.of(b"x")]
    finally:
        starter.join()
        client.close()
        for running in late:
            stop_store(running)


def test_the_client_rehashes_what_arrives(
    store: RunningStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames damaged between the store's check and the caller are caught here too."""
    payload = os.urandom(3 * SMALL_CHUNK + 17)
    refs, _ = store.client.upload(payload)
    assert store.client.read(refs) == payload
    assert Digest.of_pieces([payload[:5], memoryview(payload)[5:]]) == Digest.of(payload)
    real = store.client._stream_ranges

    def flipped(ranges: list[tuple[Digest, int, int]]) -> Iterator[tuple[Digest, list[memoryview]]]:
        for digest, pieces in real(ranges):
            damaged = bytearray(pieces[0])
            damaged[0] ^= 1
            yield digest, [memoryview(damaged), *pieces[1:]]

    monkeypatch.setattr(store.client, "_stream_ranges", flipped)
    with pytest.raises(DataLossError, match="arrived damaged"):
        store.client.read(refs)
