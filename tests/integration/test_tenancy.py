"""Tenants over real gRPC: tokens confine callers to their namespace, one tenant can
neither read, list nor delete another's refs nor learn what it stored, quotas refuse
uploads past them, and the compressor acts for its caller's tenant, not its own."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from clients import cli
from clients.channel import TOKEN_ENV, TOKEN_FILE_ENV, open_channel
from clients.errors import DeltaVaultError, ResourceExhaustedError
from clients.sdk import DeltaVault
from clients.store_client import RetryPolicy, StoreClient
from store_svc.backends.local import LocalBackend
from store_svc.digest import Digest
from tests.integration.conftest import (
    SMALL_CHUNK,
    RunningStore,
    start_compressor,
    start_store,
    status_of,
)
from tests.integration.test_store_service import make_manifest

QUOTA = 3 * SMALL_CHUNK
TOKENS = {
    "admin": ("admin", None),
    "a-writer": ("writer", "team-a"),
    "a-admin": ("admin", "team-a"),
    "b-writer": ("writer", "team-b"),
    "b-admin": ("admin", "team-b"),
}


def token(name: str) -> str:
    return f"token-of-{name}-0123456789"


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    entries = []
    for name, (role, tenant) in TOKENS.items():
        entry = {"name": name, "role": role, "token": token(name)}
        if tenant is not None:
            entry["tenant"] = tenant
        entries.append(entry)
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tenants": {"team-a": {"quota_bytes": QUOTA}}, "tokens": entries}))
    return path


@pytest.fixture
def store(tokens_file: Path, tmp_path: Path) -> Iterator[RunningStore]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TOKEN_ENV, token("admin"))  # the fixture's own client
        running = start_store(LocalBackend(tmp_path / "objects"), tmp_path, auth_tokens=tokens_file)
    yield running
    running.client.close()
    running.server.stop(grace=0)


@pytest.fixture
def as_caller(store: RunningStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[AsCaller]:
    opened: list[StoreClient] = []

    def open_as(name: str) -> StoreClient:
        monkeypatch.setenv(TOKEN_ENV, token(name))
        client = StoreClient(
            store.target,
            channel=open_channel(store.target),
            chunk_bytes=SMALL_CHUNK,
            timeout=10,
            retry=RetryPolicy(attempts=1),
        )
        opened.append(client)
        return client

    yield open_as
    for client in opened:
        client.close()


AsCaller = Callable[[str], StoreClient]


def stored_keys(store: RunningStore) -> set[str]:
    return {info.key for info in store.backend.list("")}


def test_a_tenant_cannot_read_list_or_delete_another_tenants_refs(
    store: RunningStore, as_caller: AsCaller
) -> None:
    a, b, b_admin = as_caller("a-writer"), as_caller("b-writer"), as_caller("b-admin")
    manifest = make_manifest(a, os.urandom(2 * SMALL_CHUNK + 5))
    digest = a.commit_manifest(manifest, ref="team-a/model").digest
    b.commit_manifest(make_manifest(b, os.urandom(100)), ref="team-b/model")
    before = stored_keys(store)

    denied = grpc.StatusCode.PERMISSION_DENIED
    assert status_of(lambda: b.resolve_ref("team-a/model")) is denied
    assert status_of(lambda: b.list_refs("team-a/")) is denied
    assert status_of(lambda: b.list_refs("team")) is denied
    assert [ref for ref, _ in b.list_refs()] == ["team-b/model"]  # its own namespace only
    assert status_of(lambda: b_admin.delete_ref("team-a/model")) is denied
    assert status_of(lambda: b.update_ref("team-a/model", digest, force=True)) is denied
    # What A stored does not exist for B, whatever B knows of it.
    assert status_of(lambda: b.get_manifest(digest)) is grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: b.read(manifest.tensors[0].parts[0].chunks)) is (
        grpc.StatusCode.NOT_FOUND
    )
    assert status_of(lambda: b.update_ref("team-b/stolen", digest)) is (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert status_of(lambda: b.verify(digest)) is grpc.StatusCode.NOT_FOUND
    # Store-wide operations are for unconfined admins only.
    assert status_of(b_admin.verify) is denied
    assert status_of(b_admin.collect_garbage) is denied
    assert stored_keys(store) == before  # every refusal wrote nothing

    admin = as_caller("admin")
    assert [ref for ref, _ in admin.list_refs()] == ["team-a/model", "team-b/model"]
    assert as_caller("a-admin").delete_ref("team-a/model") == digest


def test_chunk_existence_is_not_revealed_across_tenants(
    store: RunningStore, as_caller: AsCaller
) -> None:
    payload = os.urandom(2 * SMALL_CHUNK)
    a, b = as_caller("a-writer"), as_caller("b-writer")
    _, first = a.upload(payload)
    chunk_objects = {k for k in stored_keys(store) if k.startswith("chunks/")}

    # B is told nothing is there, must send every byte, and is answered as for new chunks.
    _, second = b.upload(payload)
    assert (second.chunks_sent, second.bytes_written) == (first.chunks_sent, len(payload))
    # ... yet the bytes are stored once.
    assert {k for k in stored_keys(store) if k.startswith("chunks/")} == chunk_objects
    _, third = b.upload(payload)
    assert third.chunks_sent == 0  # now B holds them


def test_a_tenant_over_its_quota_is_refused_and_nothing_is_written(
    store: RunningStore, as_caller: AsCaller
) -> None:
    a = as_caller("a-writer")
    a.upload(os.urandom(2 * SMALL_CHUNK))
    before = stored_keys(store)
    with pytest.raises(ResourceExhaustedError, match=r"team-a.*quota") as refused:
        a.upload(os.urandom(2 * SMALL_CHUNK))
    assert refused.value.retry_after is None  # not worth retrying: unlike admission control
    # The chunk within the quota may land; nothing past it does, and no manifest or ref.
    added = stored_keys(store) - before
    assert len([k for k in added if k.startswith("chunks/")]) <= 1
    assert not [k for k in added if k.startswith(("manifests/", "refs/"))]
    # Another tenant's quota is its own.
    as_caller("b-writer").upload(os.urandom(4 * SMALL_CHUNK))


def test_the_compressor_acts_for_its_callers_tenant(
    *,
    store: RunningStore,
    as_caller: AsCaller,
    tokens_file: Path,
    pair: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    own_token = tmp_path / "compressor-token"
    own_token.write_text(token("admin") + "\n")  # unconfined: must not widen its callers
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(own_token))
    compressor = start_compressor(store.target, auth_tokens=tokens_file)
    base, tuned = pair

    def vault_of(name: str) -> DeltaVault:
        monkeypatch.setenv(TOKEN_ENV, token(name))
        return DeltaVault(store.target, f"127.0.0.1:{compressor.port}")

    try:
        with vault_of("a-writer") as a:
            a.compress(base, tuned, ref="team-a/tuned", method="adamix", ratio=8)
            with pytest.raises(DeltaVaultError) as outside:
                a.compress(base, tuned, ref="team-b/tuned", method="adamix", ratio=8)
            assert outside.value.code is grpc.StatusCode.PERMISSION_DENIED
            assert [ref for ref, _ in a.list()] == ["team-a/tuned"]
        with vault_of("b-writer") as b:
            with pytest.raises(DeltaVaultError) as other:
                b.reconstruct("team-a/tuned", base, tmp_path / "stolen")
            assert other.value.code is grpc.StatusCode.PERMISSION_DENIED
            assert b.list() == []
        # The compressed chunks were stored as A's: B is told none of them exists.
        manifest = as_caller("a-writer").get_manifest(
            as_caller("a-writer").resolve_ref("team-a/tuned")
        )
        chunks = [
            Digest.from_proto(c.digest) for t in manifest.tensors for p in t.parts for c in p.chunks
        ]
        assert chunks
        assert set(as_caller("b-writer").missing_chunks(chunks)) == set(chunks)
    finally:
        compressor.stop(grace=0)


def test_the_cli_exits_refused_for_another_tenants_refs(
    store: RunningStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(TOKEN_ENV, token("b-writer"))
    assert cli.main(["ls", "team-a/", "--store", store.target]) == cli.EXIT_REFUSED
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, "no-such-token")
    assert cli.main(["ls", "--store", store.target]) == cli.EXIT_REFUSED
