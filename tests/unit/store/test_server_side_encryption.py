"""Server-side encryption at rest: the encrypted wrapper backend (what the local backend
does for SSE-C), the configuration's rules, the command-line flags, how ``open_backend``
wires both, and the SSE headers the S3 backend sends (to a recording fake endpoint; the
real S3 server is exercised in tests/integration/test_server_side_encryption.py)."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from minio.sse import SseCustomerKey

from clients.key_files import KeyFileError, write_key_file
from store_svc import __main__ as store_main
from store_svc.backends.base import Backend, BackendError, ObjectNotFound
from store_svc.backends.encrypted import (
    HEADER_BYTES,
    OVERHEAD,
    EncryptedBackend,
    ObjectNotAuthentic,
)
from store_svc.backends.local import LocalBackend
from store_svc.backends.s3 import S3Backend
from store_svc.config import (
    BackendKind,
    S3Settings,
    ServerSideEncryption,
    SseMode,
    StoreConfig,
)
from store_svc.server import open_backend

MiB = 1 << 20
KEY = bytes(range(32))
NOT_AUTHENTIC = "does not authenticate under the store's encryption key: wrong key or tampered"
# Something tensor-like: fp16 bytes of a ramp, repetitive enough to spot anywhere.
PLAINTEXT = b"".join(i.to_bytes(2, "little") for i in range(4096)) * 4


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def sealed(root: Path) -> EncryptedBackend:
    return EncryptedBackend(LocalBackend(root), KEY)


def stored_files(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}


def windows(data: bytes, width: int = 32) -> list[bytes]:
    """Slices of ``data`` a leak of any part of it would show, start to end."""
    step = max(1, (len(data) - width) // 16)
    return [data[i : i + width] for i in range(0, max(1, len(data) - width + 1), step)]


def leaked(root: Path, plaintexts: list[bytes]) -> list[Path]:
    files = stored_files(root)
    return sorted(
        path
        for path, stored in files.items()
        for text in plaintexts
        if any(window in stored for window in windows(text))
    )


# --- the encrypted backend -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3 * MiB + 7], ids=["empty", "one-byte", "3MiB"])
def test_round_trip_reports_plaintext_sizes(
    sealed: EncryptedBackend, root: Path, size: int
) -> None:
    data = os.urandom(size)
    assert sealed.put_if_absent("chunks/ab/x", data)
    assert sealed.get("chunks/ab/x") == data
    assert sealed.stat("chunks/ab/x").size == size
    assert [(i.key, i.size) for i in sealed.list("chunks/")] == [("chunks/ab/x", size)]
    assert (root / "chunks" / "ab" / "x").stat().st_size == size + OVERHEAD


def test_no_plaintext_reaches_the_disk(sealed: EncryptedBackend, root: Path) -> None:
    random_bytes = os.urandom(64 * 1024)
    sealed.put_if_absent("chunks/aa/tensor", PLAINTEXT)
    sealed.put_if_absent("chunks/bb/random", random_bytes)
    sealed.put_if_absent("refs/team/model", b"manifest digest text")
    assert len(stored_files(root)) == 3
    assert leaked(root, [PLAINTEXT, random_bytes, b"manifest digest text"]) == []
    # The check can fail: the same objects stored unsealed are found.
    plain_root = root.parent / "plain"
    plain = LocalBackend(plain_root)
    plain.put_if_absent("chunks/aa/tensor", PLAINTEXT)
    plain.put_if_absent("chunks/bb/random", random_bytes)
    assert len(leaked(plain_root, [PLAINTEXT, random_bytes])) == 2


def test_identical_objects_encrypt_differently(sealed: EncryptedBackend, root: Path) -> None:
    sealed.put_if_absent("a", PLAINTEXT)
    sealed.put_if_absent("b", PLAINTEXT)
    first, second = (root / "a").read_bytes(), (root / "b").read_bytes()
    assert first[:HEADER_BYTES] != second[:HEADER_BYTES]  # a fresh nonce each
    assert first[HEADER_BYTES:] != second[HEADER_BYTES:]


@pytest.mark.parametrize(
    "where",
    [0, 4, 5, HEADER_BYTES, HEADER_BYTES + 1000, -1],
    ids=["magic", "version", "nonce", "first-ciphertext-byte", "ciphertext", "tag"],
)
def test_a_flipped_byte_on_disk_is_a_clear_error(
    sealed: EncryptedBackend, root: Path, where: int
) -> None:
    sealed.put_if_absent("chunks/ab/x", PLAINTEXT)
    path = root / "chunks" / "ab" / "x"
    stored = bytearray(path.read_bytes())
    stored[where] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(stored))
    with pytest.raises(ObjectNotAuthentic, match="'chunks/ab/x'") as caught:
        sealed.get("chunks/ab/x")
    assert isinstance(caught.value, BackendError)
    assert caught.value.key == "chunks/ab/x"
    expected = {0: "not encrypted by the store", 4: "unknown encryption format"}
    assert expected.get(where, NOT_AUTHENTIC) in str(caught.value)


def test_the_wrong_key_is_a_clear_error(root: Path) -> None:
    EncryptedBackend(LocalBackend(root), KEY).put_if_absent("chunks/ab/x", PLAINTEXT)
    other = EncryptedBackend(LocalBackend(root), bytes(reversed(KEY)))
    with pytest.raises(ObjectNotAuthentic, match=NOT_AUTHENTIC):
        other.get("chunks/ab/x")
    assert other.stat("chunks/ab/x").size == len(PLAINTEXT)  # metadata needs no key


def test_an_object_moved_to_another_key_does_not_authenticate(
    sealed: EncryptedBackend, root: Path
) -> None:
    """The key is associated data: swapping two chunks' files is caught, not served."""
    sealed.put_if_absent("refs/model/v1", b"digest of manifest one")
    sealed.put_if_absent("refs/model/v2", b"digest of manifest two")
    v1, v2 = root / "refs" / "model" / "v1", root / "refs" / "model" / "v2"
    one, two = v1.read_bytes(), v2.read_bytes()
    v1.write_bytes(two)
    v2.write_bytes(one)
    for key in ("refs/model/v1", "refs/model/v2"):
        with pytest.raises(ObjectNotAuthentic, match=NOT_AUTHENTIC):
            sealed.get(key)


@pytest.mark.parametrize(
    "stored", [b"", b"plain bytes", b"DVE1" + bytes(20)], ids=["empty", "plain", "truncated"]
)
def test_an_unencrypted_or_truncated_object_is_refused(
    sealed: EncryptedBackend, root: Path, stored: bytes
) -> None:
    LocalBackend(root).put_if_absent("legacy", stored)
    with pytest.raises(ObjectNotAuthentic, match="'legacy'"):
        sealed.get("legacy")
    assert sealed.stat("legacy").size == 0


def test_absent_objects_and_bad_keys_keep_the_contract(
    sealed: EncryptedBackend, root: Path
) -> None:
    with pytest.raises(ObjectNotFound):
        sealed.get("no/such")
    with pytest.raises(ValueError, match="invalid object key"):
        sealed.put_if_absent("../escape", b"x")
    with pytest.raises(ValueError, match="32 bytes"):
        EncryptedBackend(LocalBackend(root), b"short")


# --- configuration --------------------------------------------------------------------------


def s3_settings(*, secure: bool) -> S3Settings:
    return S3Settings("127.0.0.1:9000", "bucket", "access", "secret", secure=secure)


def test_sse_s3_on_the_local_backend_is_refused_and_names_the_fix(root: Path) -> None:
    with pytest.raises(ValueError, match=r"needs the s3 backend.*--sse c with --sse-key-file"):
        StoreConfig(root=root, encryption=ServerSideEncryption(SseMode.S3))


def test_sse_c_needs_a_key_file() -> None:
    with pytest.raises(ValueError, match="needs --sse-key-file PATH"):
        ServerSideEncryption(SseMode.C)


@pytest.mark.parametrize("mode", [SseMode.NONE, SseMode.S3], ids=lambda m: m.value)
def test_a_key_file_without_sse_c_is_refused(mode: SseMode, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only with --sse c"):
        ServerSideEncryption(mode, tmp_path / "key")


def test_sse_c_on_s3_needs_https(tmp_path: Path) -> None:
    sse_c = ServerSideEncryption(SseMode.C, tmp_path / "key")
    with pytest.raises(ValueError, match="needs --secure"):
        StoreConfig(backend=BackendKind.S3, s3=s3_settings(secure=False), encryption=sse_c)
    StoreConfig(backend=BackendKind.S3, s3=s3_settings(secure=True), encryption=sse_c)
    sse_s3 = ServerSideEncryption(SseMode.S3)  # the server's own keys never travel
    StoreConfig(backend=BackendKind.S3, s3=s3_settings(secure=False), encryption=sse_s3)


@pytest.mark.parametrize("form", ["raw", "hex", "base64"])
def test_the_key_file_is_read_in_every_form(tmp_path: Path, form: str) -> None:
    encoded = {"raw": KEY, "hex": KEY.hex().encode(), "base64": base64.b64encode(KEY)}[form]
    (tmp_path / "key").write_bytes(encoded + (b"" if form == "raw" else b"\n"))
    assert ServerSideEncryption(SseMode.C, tmp_path / "key").key() == KEY


def test_a_bad_key_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("not a key")
    with pytest.raises(KeyFileError, match=str(tmp_path / "key")):
        ServerSideEncryption(SseMode.C, tmp_path / "key").key()
    with pytest.raises(KeyFileError, match="cannot read key file"):
        ServerSideEncryption(SseMode.C, tmp_path / "absent").key()


# --- flags and wiring -----------------------------------------------------------------------


def config_of(argv: list[str]) -> StoreConfig:
    return store_main.config_from_args(store_main.build_parser().parse_args(argv))


def test_flags_choose_the_encryption(tmp_path: Path, root: Path) -> None:
    key_file = tmp_path / "key"
    write_key_file(key_file, KEY)
    assert config_of(["--root", str(root)]).encryption.mode is SseMode.NONE
    config = config_of(["--root", str(root), "--sse", "c", "--sse-key-file", str(key_file)])
    assert config.encryption == ServerSideEncryption(SseMode.C, key_file)
    s3_flags = ["--backend", "s3", "--endpoint", "h:1", "--access-key", "a", "--secret-key", "s"]
    config = config_of([*s3_flags, "--sse", "s3", "--s3-ca-file", str(tmp_path / "ca.pem")])
    assert config.encryption == ServerSideEncryption(SseMode.S3)
    assert config.s3 is not None and config.s3.ca_file == tmp_path / "ca.pem"


def test_environment_chooses_the_encryption(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "key"
    write_key_file(key_file, KEY)
    monkeypatch.setenv("DELTAVAULT_STORE_SSE", "c")
    monkeypatch.setenv("DELTAVAULT_STORE_SSE_KEY_FILE", str(key_file))
    assert config_of(["--root", str(root)]).encryption == ServerSideEncryption(SseMode.C, key_file)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sse", "c"], "needs --sse-key-file"),
        (["--sse", "s3"], "needs the s3 backend"),
        (["--sse", "c", "--sse-key-file", "/no/such/key"], "cannot read key file /no/such/key"),
    ],
    ids=["c-without-key", "s3-on-local", "unreadable-key"],
)
def test_bad_encryption_flags_are_usage_errors(
    root: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        store_main.main(["--root", str(root), *argv])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_open_backend_seals_a_local_store_with_sse_c(tmp_path: Path, root: Path) -> None:
    key_file = tmp_path / "key"
    write_key_file(key_file, KEY)
    plain = open_backend(StoreConfig(root=root))
    assert isinstance(plain, LocalBackend)
    backend = open_backend(
        StoreConfig(root=root, encryption=ServerSideEncryption(SseMode.C, key_file))
    )
    assert isinstance(backend, EncryptedBackend)
    backend.put_if_absent("k", PLAINTEXT)
    assert EncryptedBackend(LocalBackend(root), KEY).get("k") == PLAINTEXT  # the file's key
    assert leaked(root, [PLAINTEXT]) == []


# --- the S3 backend's headers ---------------------------------------------------------------


class Recorder(BaseHTTPRequestHandler):
    """A fake S3 endpoint that accepts every request and records its headers by method."""

    seen: ClassVar[dict[str, list[dict[str, str]]]]
    body: ClassVar[bytes] = b"stored"

    def _answer(self) -> None:
        self.seen.setdefault(self.command, []).append(
            {name.lower(): value for name, value in self.headers.items()}
        )
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("ETag", '"0123"')
        self.send_header("Last-Modified", "Mon, 01 Dec 2025 00:00:00 GMT")
        self.send_header("Content-Length", str(len(self.body) if self.command != "PUT" else 0))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(self.body)

    def do_PUT(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def log_message(self, format_: str, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def recorder() -> Iterator[tuple[str, type[Recorder]]]:
    class Handler(Recorder):
        seen: ClassVar[dict[str, list[dict[str, str]]]] = {}

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", Handler
    server.shutdown()
    server.server_close()


def recorded_backend(endpoint: str, mode: SseMode) -> Backend:
    """What ``open_backend`` builds for ``mode`` against the fake endpoint. SSE-C needs
    HTTPS by configuration and the fake speaks HTTP, so that backend is built by hand."""
    if mode is SseMode.C:
        return S3Backend(
            endpoint, "bucket", "k", "s", region="us-east-1", create_bucket=False,
            sse=SseCustomerKey(KEY),
        )  # fmt: skip
    settings = S3Settings(endpoint, "bucket", "k", "s", region="us-east-1", create_bucket=False)
    config = StoreConfig(backend=BackendKind.S3, s3=settings, encryption=ServerSideEncryption(mode))
    return open_backend(config)


SSE_C_HEADERS = {
    "x-amz-server-side-encryption-customer-algorithm": "AES256",
    "x-amz-server-side-encryption-customer-key": base64.b64encode(KEY).decode(),
    "x-amz-server-side-encryption-customer-key-md5": base64.b64encode(
        hashlib.md5(KEY).digest()
    ).decode(),
}


@pytest.mark.parametrize("mode", list(SseMode), ids=lambda m: m.value)
def test_s3_backend_sends_the_sse_headers(
    recorder: tuple[str, type[Recorder]], mode: SseMode
) -> None:
    endpoint, handler = recorder
    backend = recorded_backend(endpoint, mode)
    assert backend.put_if_absent("k", b"data")
    assert backend.get("k") == b"stored"
    backend.stat("k")
    (put,), (get,), (head,) = handler.seen["PUT"], handler.seen["GET"], handler.seen["HEAD"]
    assert put["if-none-match"] == "*"  # write-once survives the merge
    sse_headers = {name for request in (put, get, head) for name in request if "encryption" in name}
    if mode is SseMode.NONE:
        assert sse_headers == set()
    elif mode is SseMode.S3:
        assert put["x-amz-server-side-encryption"] == "AES256"
        assert sse_headers == {"x-amz-server-side-encryption"}  # on the write only
        assert not {n for n in (*get, *head) if "encryption" in n}
    else:
        for request in (put, get, head):
            assert SSE_C_HEADERS.items() <= request.items()
