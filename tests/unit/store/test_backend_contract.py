"""One contract, every backend: the local folder, a real S3 server on loopback, and the
encryption-at-rest wrapper over each (``store_svc.backends.encrypted``).

Backend-specific behaviour (error classification, shared buckets, crash leftovers) is
tested after the shared suite.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from store_svc.backends.base import Backend, BackendError, BackendUnavailable, ObjectNotFound
from store_svc.backends.encrypted import EncryptedBackend
from store_svc.backends.local import LocalBackend
from store_svc.backends.s3 import S3Backend
from tests.support.children import free_port
from tests.support.seaweedfs import SeaweedS3

MiB = 1 << 20

# Names whose byte order differs from a folder-by-folder walk ('-' < '.' < '/' < '0'),
# and prefixes that end inside a segment.
TRICKY_KEYS = ["a-b", "a.b", "a/b", "a/b-c", "a/b.c", "a/bc/d", "a0", "ab", "b/a"]


def keys(backend: Backend, prefix: str) -> list[str]:
    return [info.key for info in backend.list(prefix)]


@pytest.fixture(
    params=[
        "local",
        pytest.param("s3", marks=pytest.mark.s3),
        "encrypted-local",
        pytest.param("encrypted-s3", marks=pytest.mark.s3),
    ]
)
def backend(request: pytest.FixtureRequest) -> Backend:
    """The shared suite runs on each backend, and on each sealed by ``EncryptedBackend``
    (this overrides the conftest fixture of the same name for this module only)."""
    kind = str(request.param)
    inner: Backend = request.getfixturevalue(f"{kind.removeprefix('encrypted-')}_backend")
    return EncryptedBackend(inner, os.urandom(32)) if kind.startswith("encrypted-") else inner


# --- the shared contract --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 5 * MiB + 3], ids=["empty", "one-byte", "5MiB"])
def test_round_trip(backend: Backend, size: int) -> None:
    data = os.urandom(size)
    assert backend.put_if_absent("objects/x", data)
    assert backend.get("objects/x") == data
    info = backend.stat("objects/x")
    assert (info.key, info.size) == ("objects/x", size)
    assert abs(info.modified - time.time()) < 120
    assert backend.exists("objects/x")
    assert [(i.key, i.size) for i in backend.list("objects/")] == [("objects/x", size)]


def test_put_if_absent_never_overwrites(backend: Backend) -> None:
    assert backend.put_if_absent("k", b"first")
    assert not backend.put_if_absent("k", b"second")
    assert not backend.put_if_absent("k", b"")
    assert backend.get("k") == b"first"


def test_racing_creators_leave_exactly_one_winner(backend: Backend) -> None:
    writers = 8
    barrier = threading.Barrier(writers)
    key = "contested/key"

    def create(i: int) -> bool:
        barrier.wait()
        return backend.put_if_absent(key, f"writer {i}".encode())

    with ThreadPoolExecutor(writers) as pool:
        results = list(pool.map(create, range(writers)))  # re-raises any writer's error
    winners = [i for i, won in enumerate(results) if won]
    assert len(winners) == 1
    assert backend.get(key) == f"writer {winners[0]}".encode()


def test_absent_key(backend: Backend) -> None:
    for read in (backend.get, backend.stat):
        with pytest.raises(ObjectNotFound) as caught:
            read("no/such/key")
        assert caught.value.key == "no/such/key"
    assert not backend.exists("no/such/key")


def test_list_matches_prefixes_inside_segments(backend: Backend) -> None:
    for key in TRICKY_KEYS:
        assert backend.put_if_absent(key, key.encode())
    listed = [(info.key, info.size) for info in backend.list("")]
    assert sorted(listed) == sorted((key, len(key)) for key in TRICKY_KEYS)  # each once
    assert sorted(keys(backend, "a")) == [k for k in sorted(TRICKY_KEYS) if k.startswith("a")]
    assert sorted(keys(backend, "a/")) == ["a/b", "a/b-c", "a/b.c", "a/bc/d"]
    assert sorted(keys(backend, "a/b")) == ["a/b", "a/b-c", "a/b.c", "a/bc/d"]
    assert sorted(keys(backend, "a/bc")) == ["a/bc/d"]
    assert keys(backend, "a/b/") == []
    assert keys(backend, "zzz") == []


@pytest.mark.parametrize("prefix", ["../", "..", "/", "//", "a//", "./a", "a/../"])
def test_list_of_a_prefix_no_key_has_is_empty(backend: Backend, prefix: str) -> None:
    backend.put_if_absent("a/b", b"1")
    assert keys(backend, prefix) == []


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put_if_absent("d/x", b"1")
    backend.delete("d/x")
    backend.delete("d/x")
    backend.delete("never/written")
    assert not backend.exists("d/x")
    assert keys(backend, "d/") == []
    assert backend.put_if_absent("d/x", b"2")  # a deleted key can be created again
    assert backend.get("d/x") == b"2"


INVALID_KEYS = ["", "../x", "/abs", "a//b", "a/./b", "a/../b", "..", "a b", "a\nb", "a\tb"]
INVALID_KEYS += ["a\x00b", "a/", "ü", "a\\b", "a?b", "a\n"]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_refused_and_nothing_written(backend: Backend, key: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        backend.put_if_absent(key, b"x")
    for call in (backend.get, backend.stat, backend.exists, backend.delete):
        with pytest.raises(ValueError, match="invalid object key"):
            call(key)
    assert keys(backend, "") == []


# --- S3 ---------------------------------------------------------------------------------------


def s3(server: SeaweedS3, bucket: str, *, prefix: str = "", create: bool = True) -> S3Backend:
    return S3Backend(
        server.endpoint,
        bucket,
        server.access_key,
        server.secret_key,
        prefix=prefix,
        create_bucket=create,
    )


@pytest.mark.s3
def test_s3_creates_its_bucket(s3_server: SeaweedS3, s3_bucket: str) -> None:
    assert not s3_server.client().bucket_exists(s3_bucket)
    s3(s3_server, s3_bucket).close()
    assert s3_server.client().bucket_exists(s3_bucket)
    s3(s3_server, s3_bucket).close()  # an existing bucket is fine


@pytest.mark.s3
def test_s3_missing_bucket_is_permanent(s3_server: SeaweedS3, s3_bucket: str) -> None:
    backend = s3(s3_server, s3_bucket, create=False)
    with pytest.raises(BackendError, match="NoSuchBucket") as caught:
        backend.put_if_absent("k", b"1")
    assert type(caught.value) is BackendError
    assert not s3_server.client().bucket_exists(s3_bucket)


@pytest.mark.s3
def test_s3_wrong_secret_is_permanent(s3_server: SeaweedS3, s3_bucket: str) -> None:
    with pytest.raises(BackendError, match="SignatureDoesNotMatch") as caught:
        S3Backend(s3_server.endpoint, s3_bucket, s3_server.access_key, "not the secret")
    assert type(caught.value) is BackendError


@pytest.mark.s3
def test_s3_prefixes_share_a_bucket(s3_server: SeaweedS3, s3_bucket: str) -> None:
    one, two = s3(s3_server, s3_bucket, prefix="one"), s3(s3_server, s3_bucket, prefix="two/")
    assert one.put_if_absent("k", b"1")
    assert two.put_if_absent("k", b"2")
    assert (one.get("k"), two.get("k")) == (b"1", b"2")
    assert keys(one, "") == keys(two, "") == ["k"]
    one.delete("k")
    assert two.get("k") == b"2"


def test_s3_dead_endpoint_is_unavailable_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(BackendUnavailable):
        S3Backend(f"127.0.0.1:{free_port()}", "bucket", "key", "secret")
    quiet = S3Backend(f"127.0.0.1:{free_port()}", "bucket", "key", "secret", create_bucket=False)
    for call in (quiet.get, quiet.stat, lambda key: quiet.put_if_absent(key, b"1")):
        with pytest.raises(BackendUnavailable):
            call("x")
    with pytest.raises(BackendUnavailable):
        keys(quiet, "")
    assert time.monotonic() - start < 10


class FixedAnswer(BaseHTTPRequestHandler):
    """Answers every request with ``status`` and ``body``, counting requests by method."""

    endpoint = ""
    status = 500
    content_type = "application/xml"
    body = b""
    seen: ClassVar[Counter[str]]

    def _answer(self) -> None:
        self.seen[self.command] += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    def do_GET(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def log_message(self, format_: str, *args: object) -> None:
        """Quiet: the tests read ``seen``, not a log."""


def s3_error(code: str) -> bytes:
    return f"<Error><Code>{code}</Code><Message>m</Message></Error>".encode()


@pytest.fixture
def fixed_answer() -> Iterator[type[FixedAnswer]]:
    """A fake S3 endpoint; the test sets the handler's status, content type and body."""

    class Handler(FixedAnswer):
        seen: ClassVar[Counter[str]] = Counter()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    Handler.endpoint = f"127.0.0.1:{server.server_address[1]}"
    yield Handler
    server.shutdown()
    server.server_close()


def fake_s3(answer: type[FixedAnswer]) -> S3Backend:
    return S3Backend(answer.endpoint, "bucket", "k", "s", region="us-east-1", create_bucket=False)


@pytest.mark.parametrize(
    ("status", "content_type", "body", "expected"),
    [
        (500, "application/xml", s3_error("InternalError"), BackendUnavailable),
        (503, "application/xml", s3_error("SlowDown"), BackendUnavailable),
        (502, "text/html", b"<html>bad gateway</html>", BackendUnavailable),
        (403, "application/xml", s3_error("AccessDenied"), BackendError),
        (400, "text/html", b"<html>no</html>", BackendError),
    ],
    ids=["500", "503-slowdown", "502-proxy-page", "403", "400-html"],
)
def test_s3_errors_are_classified_and_never_resent(
    fixed_answer: type[FixedAnswer],
    status: int,
    content_type: str,
    body: bytes,
    expected: type[BackendError],
) -> None:
    fixed_answer.status, fixed_answer.content_type, fixed_answer.body = status, content_type, body
    backend = fake_s3(fixed_answer)
    for call in (backend.get, backend.stat, lambda key: backend.put_if_absent(key, b"1")):
        with pytest.raises(BackendError) as caught:
            call("x")
        assert type(caught.value) is expected
    assert fixed_answer.seen == {"GET": 1, "HEAD": 1, "PUT": 1}  # the conditional PUT above all


def test_s3_error_code_beats_status(fixed_answer: type[FixedAnswer]) -> None:
    """AWS answers a slow upload 400 RequestTimeout: transient, though a 4xx. Only a body
    names the code, and HEAD answers have none, so get and put only."""
    fixed_answer.status, fixed_answer.body = 400, s3_error("RequestTimeout")
    backend = fake_s3(fixed_answer)
    for call in (backend.get, lambda key: backend.put_if_absent(key, b"1")):
        with pytest.raises(BackendUnavailable, match="RequestTimeout"):
            call("x")


# --- local --------------------------------------------------------------------------------


def test_local_lists_in_key_byte_order(local_backend: LocalBackend) -> None:
    for key in reversed(TRICKY_KEYS):
        local_backend.put_if_absent(key, b"")
    assert keys(local_backend, "") == sorted(TRICKY_KEYS)
    assert keys(local_backend, "a/b") == ["a/b", "a/b-c", "a/b.c", "a/bc/d"]


def test_local_crash_leftovers_are_invisible_and_swept(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    backend.put_if_absent("dir/real", b"1")
    fresh, stale = tmp_path / "dir" / ".tmp-fresh", tmp_path / "dir" / ".tmp-stale"
    fresh.write_bytes(b"partial write")
    stale.write_bytes(b"partial write")
    os.utime(stale, (time.time() - 7200,) * 2)
    assert keys(backend, "") == ["dir/real"]
    with pytest.raises(ValueError, match="reserved"):
        backend.get("dir/.tmp-fresh")
    LocalBackend(tmp_path)  # start-up sweeps temporaries older than an hour
    assert (fresh.exists(), stale.exists()) == (True, False)


def test_local_key_cannot_be_object_and_folder(local_backend: LocalBackend) -> None:
    assert local_backend.put_if_absent("a/b", b"1")
    with pytest.raises(BackendError, match="a/b/c"):
        local_backend.put_if_absent("a/b/c", b"2")
    assert local_backend.put_if_absent("x/y/z", b"3")
    with pytest.raises(BackendError, match="folder"):
        local_backend.put_if_absent("x/y", b"4")  # not False: no object x/y exists
    assert not local_backend.exists("x/y")
    with pytest.raises(ObjectNotFound):
        local_backend.get("x/y")
    local_backend.delete("x/y")  # absent: succeeds, the folder stays
    assert keys(local_backend, "") == ["a/b", "x/y/z"]


def test_local_writes_leave_no_temporaries(local_backend: LocalBackend, tmp_path: Path) -> None:
    local_backend.put_if_absent("p/q", b"1")
    local_backend.put_if_absent("p/q", b"2")
    with pytest.raises(BackendError):
        local_backend.put_if_absent("p/q/r", b"3")
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == ["p", "q"]
