"""Encryption at rest through a real store server: chunks, a manifest and a ref go in
through ``StoreClient`` and come back intact, while a reader without the key sees only
ciphertext.

- Local backend with SSE-C: no file under the root holds any of the plaintext; the store
  restarted with another key, or a file altered on disk, answers DATA_LOSS.
- SeaweedFS 4.48 with SSE-C, over HTTPS (a throwaway CA; MinIO and AWS refuse SSE-C over
  HTTP, and the store requires ``--secure`` with it): S3 GETs and HEADs without the
  customer key, or with another one, are refused; the server's data folder holds no
  plaintext.
- SeaweedFS with SSE-S3: any authorised S3 reader still gets plaintext (the server holds
  the keys), but the data folder holds none.

Every "no plaintext" check is first shown to find plaintext where it is stored unencrypted.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import urllib3
from minio import Minio
from minio.error import S3Error
from minio.sse import SseCustomerKey

from clients.key_files import write_key_file
from clients.store_client import RetryPolicy, StoreClient
from store_svc.backends.encrypted import OVERHEAD
from store_svc.cas import chunk_key
from store_svc.config import (
    NO_ENCRYPTION,
    BackendKind,
    S3Settings,
    ServerSideEncryption,
    SseMode,
    StoreConfig,
)
from store_svc.digest import Digest
from store_svc.server import build_server
from tests.integration.conftest import (
    SMALL_CHUNK,
    SMALL_FRAME,
    RunningStore,
    status_of,
    stop_store,
)
from tests.support.manifests import byte_tensor_manifest
from tests.support.pki import Authority
from tests.support.seaweedfs import SeaweedS3

TENSOR_NAME = b"layer.0.weight"
"""The tensor name ``byte_tensor_manifest`` writes: plaintext of the manifest object."""


def payload() -> bytes:
    """Three and a half chunks: fp16-like bytes of a ramp, then random bytes."""
    ramp = b"".join(i.to_bytes(2, "little") for i in range(SMALL_CHUNK))
    return ramp + os.urandom(SMALL_CHUNK + SMALL_CHUNK // 2)


def windows(data: bytes, width: int = 32) -> list[bytes]:
    """Slices of ``data``, start to end: a leak of any part of it shows one."""
    width = min(width, len(data))
    step = max(1, (len(data) - width) // 64)
    return [data[i : i + width] for i in range(0, len(data) - width + 1, step)]


def files_holding(folder: Path, plaintexts: list[bytes]) -> list[str]:
    """Files under ``folder`` that contain a 32-byte window of any of ``plaintexts``."""
    needles = [window for text in plaintexts for window in windows(text)]
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            stored = path.read_bytes()
            if any(needle in stored for needle in needles):
                found.append(str(path.relative_to(folder)))
    return found


def start(config: StoreConfig) -> RunningStore:
    """A store whose backend ``open_backend`` builds from ``config``, as in production."""
    server = build_server(config)
    server.start()
    client = StoreClient(
        f"127.0.0.1:{server.port}",
        chunk_bytes=SMALL_CHUNK,
        frame_bytes=SMALL_FRAME,
        timeout=30,
        retry=RetryPolicy(attempts=1),
    )
    return RunningStore(server, client, server.repo.backend)


def store_config(**settings: object) -> StoreConfig:
    defaults: dict[str, object] = {
        "port": 0,
        "metrics_port": -1,
        "max_frame_bytes": SMALL_FRAME * 4,
        "max_chunk_bytes": 1 << 20,
        "shutdown_grace_seconds": 1.0,
    }
    return StoreConfig(**(defaults | settings))  # type: ignore[arg-type]


def store_and_read_back(store: RunningStore, data: bytes) -> list[Digest]:
    """Upload ``data`` as chunks plus a manifest under a ref, read all of it back through
    the store, and return the chunks' digests."""
    refs, _ = store.client.upload(data)
    info = store.client.commit_manifest(byte_tensor_manifest(refs), ref="team/model")
    assert store.client.resolve_ref("team/model") == info.digest
    fetched = store.client.get_manifest(info.digest)
    assert TENSOR_NAME.decode() in {tensor.name for tensor in fetched.tensors}
    assert store.client.read(fetched.tensors[0].parts[0].chunks) == data
    return [Digest.from_proto(ref.digest) for ref in refs]


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "sse.key"
    write_key_file(path)
    return path


# --- local backend ----------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [True, False], ids=["sse-c", "plain-control"])
def test_local_store_keeps_only_ciphertext_on_disk(
    tmp_path: Path, key_file: Path, encrypted: bool
) -> None:
    root = tmp_path / "objects"
    encryption = ServerSideEncryption(SseMode.C, key_file) if encrypted else NO_ENCRYPTION
    store = start(store_config(root=root, encryption=encryption))
    try:
        data = payload()
        digests = store_and_read_back(store, data)
        sizes = {info.key: info.size for info in store.backend.list("chunks/")}
    finally:
        stop_store(store)
    leaks = files_holding(root, [data, TENSOR_NAME])
    if encrypted:
        assert leaks == []
        # stat/list report the stored chunk's size without the encryption's overhead.
        on_disk = (root / chunk_key(digests[0])).stat().st_size
        assert sizes[chunk_key(digests[0])] == on_disk - OVERHEAD
    else:
        assert chunk_key(digests[0]) in leaks  # the check finds plaintext where it is
        assert any(path.startswith("manifests/") for path in leaks)


def test_local_store_under_another_key_or_tampered_answers_data_loss(
    tmp_path: Path, key_file: Path
) -> None:
    root = tmp_path / "objects"
    sse = ServerSideEncryption(SseMode.C, key_file)
    store = start(store_config(root=root, encryption=sse))
    try:
        data = payload()
        store_and_read_back(store, data)
        refs, _ = store.client.upload(data)  # all present already: nothing sent
    finally:
        stop_store(store)

    other_key = tmp_path / "other.key"
    write_key_file(other_key)
    store = start(store_config(root=root, encryption=ServerSideEncryption(SseMode.C, other_key)))
    try:
        assert status_of(lambda: store.client.read(refs[:1])) == grpc.StatusCode.DATA_LOSS
        with pytest.raises(Exception, match="wrong key or tampered"):
            store.client.read(refs[:1])
    finally:
        stop_store(store)

    stored = root / chunk_key(Digest.from_proto(refs[1].digest))
    altered = bytearray(stored.read_bytes())
    altered[len(altered) // 2] ^= 0x40
    stored.write_bytes(bytes(altered))
    store = start(store_config(root=root, encryption=sse))  # the right key again
    try:
        assert store.client.read(refs[:1]) == data[:SMALL_CHUNK]
        assert status_of(lambda: store.client.read(refs[1:2])) == grpc.StatusCode.DATA_LOSS
        report = store.client.verify()
        assert [d.key for d in report.damaged] == [stored.relative_to(root).as_posix()]
    finally:
        stop_store(store)


# --- SeaweedFS over HTTPS -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SeaweedS3, Path]]:
    """A SeaweedFS of our own (its data folder is inspected) serving HTTPS with a
    certificate of a throwaway CA; (server, CA file)."""
    folder = tmp_path_factory.mktemp("s3-pki")
    authority = Authority.create(folder, "s3-ca")
    cert, key = authority.issue(folder / "s3-server", server=True)
    with SeaweedS3(tls=(cert, key)) as server:
        yield server, authority.path


@pytest.fixture
def bucket() -> str:
    """A fresh bucket name; the module's server, and every bucket with it, goes at its end."""
    return f"sse-{uuid.uuid4().hex[:16]}"


def s3_store(
    server: SeaweedS3, ca: Path, bucket: str, encryption: ServerSideEncryption, *, https: bool
) -> RunningStore:
    settings = S3Settings(
        server.https_endpoint if https else server.endpoint,
        bucket,
        server.access_key,
        server.secret_key,
        secure=https,
        ca_file=ca if https else None,
    )
    return start(store_config(backend=BackendKind.S3, s3=settings, encryption=encryption))


def https_reader(server: SeaweedS3, ca: Path) -> Minio:
    """A direct S3 client with the bucket's credentials: it may list and read everything."""
    http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(ca), retries=False)
    return Minio(
        server.https_endpoint, server.access_key, server.secret_key, secure=True, http_client=http
    )


def read_object(reader: Minio, bucket: str, name: str, ssec: SseCustomerKey | None) -> bytes:
    response = reader.get_object(bucket, name, ssec=ssec)
    try:
        return bytes(response.read())
    finally:
        response.close()
        response.release_conn()


def assert_data_folder_holds_no_plaintext(server: SeaweedS3, plaintexts: list[bytes]) -> None:
    """No plaintext on the server's disks, after showing that the same scan finds an
    unencrypted object stored beside them."""
    marker, client = os.urandom(4096), server.client()
    if not client.bucket_exists("control"):
        client.make_bucket("control")
    client._put_object("control", f"plain-{uuid.uuid4().hex}", marker, headers={})
    data_dir = server.data_dir
    assert data_dir is not None
    assert files_holding(data_dir, [marker]) != []
    assert files_holding(data_dir, plaintexts) == []


@pytest.mark.s3
def test_sse_c_objects_are_unreadable_through_s3_without_the_key(
    tls_s3: tuple[SeaweedS3, Path], bucket: str, key_file: Path
) -> None:
    server, ca = tls_s3
    sse = ServerSideEncryption(SseMode.C, key_file)
    store = s3_store(server, ca, bucket, sse, https=True)
    try:
        data = payload()
        store_and_read_back(store, data)
    finally:
        stop_store(store)

    reader = https_reader(server, ca)
    names = [str(item.object_name) for item in reader.list_objects(bucket, recursive=True)]
    assert any(name.startswith("chunks/") for name in names)
    assert any(name.startswith("manifests/") for name in names)
    assert any(name.startswith("refs/") for name in names)
    right, wrong = SseCustomerKey(sse.key()), SseCustomerKey(os.urandom(32))
    for name in names:
        with pytest.raises(S3Error) as without_key:
            read_object(reader, bucket, name, None)
        assert without_key.value.response.status == 400, name
        with pytest.raises(S3Error) as wrong_key:
            read_object(reader, bucket, name, wrong)
        assert wrong_key.value.response.status == 403, name
        with pytest.raises(S3Error):
            reader.stat_object(bucket, name)
        assert read_object(reader, bucket, name, right)  # the key opens every object
    assert_data_folder_holds_no_plaintext(server, [data, TENSOR_NAME])


@pytest.mark.s3
def test_sse_c_store_under_another_key_cannot_read(
    tls_s3: tuple[SeaweedS3, Path], bucket: str, key_file: Path, tmp_path: Path
) -> None:
    server, ca = tls_s3
    store = s3_store(server, ca, bucket, ServerSideEncryption(SseMode.C, key_file), https=True)
    try:
        refs, _ = store.client.upload(payload())
    finally:
        stop_store(store)
    other_key = tmp_path / "other.key"
    write_key_file(other_key)
    other = ServerSideEncryption(SseMode.C, other_key)
    store = s3_store(server, ca, bucket, other, https=True)
    try:
        with pytest.raises(Exception, match="SSE-C") as caught:
            store.client.read(refs[:1])
        assert "AccessDenied" in str(caught.value)
    finally:
        stop_store(store)


@pytest.mark.s3
def test_sse_s3_keeps_plaintext_off_the_servers_disks(
    tls_s3: tuple[SeaweedS3, Path], bucket: str
) -> None:
    server, ca = tls_s3
    store = s3_store(server, ca, bucket, ServerSideEncryption(SseMode.S3), https=False)
    try:
        data = payload()
        digests = store_and_read_back(store, data)
    finally:
        stop_store(store)
    # The server holds SSE-S3's keys: whoever may read the bucket reads plaintext.
    response = server.client().get_object(bucket, chunk_key(digests[0]))
    try:
        assert data[:SMALL_CHUNK] in response.read()
        assert response.headers["x-amz-server-side-encryption"] == "AES256"
    finally:
        response.close()
        response.release_conn()
    assert_data_folder_holds_no_plaintext(server, [data, TENSOR_NAME])
