"""One contract, every backend: the local folder and a real S3 server on loopback."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from store_svc.backends.base import Backend, BackendError, BackendUnavailable, ObjectNotFound
from store_svc.backends.local import LocalBackend
from store_svc.backends.s3 import S3Backend
from tests.support.seaweedfs import SeaweedS3, free_port

MiB = 1 << 20


@pytest.mark.parametrize("size", [0, 1, 5 * MiB + 3], ids=["empty", "one-byte", "5MiB"])
def test_round_trip(backend: Backend, size: int) -> None:
    data = os.urandom(size)
    assert backend.put_if_absent("objects/x", data)
    assert backend.get("objects/x") == data
    info = backend.stat("objects/x")
    assert (info.key, info.size) == ("objects/x", size)
    assert abs(info.modified - time.time()) < 120
    assert backend.exists("objects/x")


def test_put_if_absent_never_overwrites(backend: Backend) -> None:
    assert backend.put_if_absent("k", b"first")
    assert not backend.put_if_absent("k", b"second")
    assert backend.get("k") == b"first"


def test_racing_creators_leave_exactly_one_winner(backend: Backend) -> None:
    results: dict[int, bool] = {}
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        results[i] = backend.put_if_absent("contested", f"writer {i}".encode())

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert backend.get("contested") == f"writer {winners[0]}".encode()


def test_absent_key(backend: Backend) -> None:
    for read in (backend.get, backend.stat):
        with pytest.raises(ObjectNotFound) as caught:
            read("no/such/key")
        assert caught.value.key == "no/such/key"
    assert not backend.exists("no/such/key")


def test_list_matches_prefix_not_just_folders(backend: Backend) -> None:
    keys = ["a-b", "a.b", "a/b", "a/c/d", "ab", "b/a", "a/cd"]
    for key in keys:
        backend.put_if_absent(key, key.encode())
    listed = {info.key: info.size for info in backend.list("")}
    assert listed == {key: len(key) for key in keys}
    assert sorted(i.key for i in backend.list("a")) == sorted(k for k in keys if k[0] == "a")
    assert sorted(i.key for i in backend.list("a/")) == ["a/b", "a/c/d", "a/cd"]
    assert sorted(i.key for i in backend.list("a/c")) == ["a/c/d", "a/cd"]
    assert list(backend.list("zzz")) == []


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put_if_absent("d/x", b"1")
    backend.delete("d/x")
    backend.delete("d/x")
    assert not backend.exists("d/x")
    assert list(backend.list("d/")) == []
    assert backend.put_if_absent("d/x", b"2")  # a deleted key can be created again


@pytest.mark.parametrize(
    "key", ["", "../x", "/abs", "a//b", "a/./b", "a/../b", "a b", "a\nb", "a/", "ü", "a\\b"]
)
def test_invalid_keys_are_refused_and_nothing_written(backend: Backend, key: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        backend.put_if_absent(key, b"x")
    with pytest.raises(ValueError, match="invalid object key"):
        backend.get(key)
    assert list(backend.list("")) == []


def test_local_temp_leftovers_are_invisible(local_backend: LocalBackend, tmp_path: Path) -> None:
    local_backend.put_if_absent("dir/real", b"1")
    (tmp_path / "store" / "dir" / ".tmp-crashed").write_bytes(b"partial write")
    assert [info.key for info in local_backend.list("")] == ["dir/real"]
    with pytest.raises(ValueError, match="reserved"):
        local_backend.get("dir/.tmp-crashed")


@pytest.mark.s3
def test_s3_wrong_secret_is_permanent(s3_server: SeaweedS3) -> None:
    with pytest.raises(BackendError) as caught:
        S3Backend(s3_server.endpoint, "wrong-secret", s3_server.access_key, "not the secret")
    assert not isinstance(caught.value, BackendUnavailable)
    assert "SignatureDoesNotMatch" in str(caught.value)


@pytest.mark.s3
def test_s3_creates_its_bucket(s3_server: SeaweedS3) -> None:
    S3Backend(s3_server.endpoint, "made-by-backend", s3_server.access_key, s3_server.secret_key)
    assert s3_server.client().bucket_exists("made-by-backend")


def test_s3_dead_endpoint_is_unavailable_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(BackendUnavailable):
        S3Backend(f"127.0.0.1:{free_port()}", "bucket", "key", "secret")
    assert time.monotonic() - start < 10
    quiet = S3Backend(f"127.0.0.1:{free_port()}", "bucket", "key", "secret", create_bucket=False)
    with pytest.raises(BackendUnavailable):
        quiet.get("x")
