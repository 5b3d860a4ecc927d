"""Bearer tokens with roles on both services: no token or a wrong one is UNAUTHENTICATED, a
role below the call's is PERMISSION_DENIED and writes nothing, the health service stays
open, tokens rotate with their file, and a writer compresses end to end through a
compressor that holds its own token for the store."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channel import TOKEN_ENV, TOKEN_FILE_ENV, open_channel
from clients.errors import DeltaVaultError
from clients.sdk import DeltaVault
from clients.store_client import RetryPolicy, StoreClient
from store_svc.auth import parse_tokens
from store_svc.backends.local import LocalBackend
from store_svc.digest import Digest
from tests.integration.conftest import RunningStore, start_compressor, start_store, status_of

TOKENS = {"reader": "r-0123456789", "writer": "w-0123456789", "admin": "a-0123456789"}


def _write_tokens(path: Path, tokens: dict[str, str]) -> None:
    entries = [
        # The writer's entry holds only the token's digest.
        {"name": f"{role}-bot", "role": role, "sha256": hashlib.sha256(t.encode()).hexdigest()}
        if role == "writer"
        else {"name": f"{role}-bot", "role": role, "token": t}
        for role, t in tokens.items()
    ]
    path.write_text(json.dumps({"tokens": entries}))


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    _write_tokens(path, TOKENS)
    return path


@pytest.fixture
def auth_store(tokens_file: Path, tmp_path: Path) -> Iterator[RunningStore]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TOKEN_ENV, TOKENS["admin"])  # the fixture's own client
        running = start_store(LocalBackend(tmp_path / "objects"), tmp_path, auth_tokens=tokens_file)
    yield running
    running.client.close()
    running.server.stop(grace=0)


def _client(target: str, token: str | None, monkeypatch: pytest.MonkeyPatch) -> StoreClient:
    if token is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, token)
    return StoreClient(
        target,
        channel=open_channel(target),
        timeout=5,
        retry=RetryPolicy(attempts=1, initial_backoff=0.01),
    )


def test_calls_without_a_valid_token_are_unauthenticated(
    auth_store: RunningStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for token in (None, "not-a-token", TOKENS["reader"] + "x"):
        with _client(auth_store.target, token, monkeypatch) as client:
            assert status_of(client.list_refs) is grpc.StatusCode.UNAUTHENTICATED


def test_roles_nest_and_refusals_write_nothing(
    auth_store: RunningStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"weights" * 100
    with _client(auth_store.target, TOKENS["reader"], monkeypatch) as reader:
        assert list(reader.list_refs()) == []
        assert status_of(lambda: reader.upload(payload)) is grpc.StatusCode.PERMISSION_DENIED
        assert reader.missing_chunks([Digest.of(payload)]) == [Digest.of(payload)]
    with _client(auth_store.target, TOKENS["writer"], monkeypatch) as writer:
        chunks, _ = writer.upload(payload)
        assert writer.missing_chunks([Digest.from_proto(c.digest) for c in chunks]) == []
        assert status_of(writer.collect_garbage) is grpc.StatusCode.PERMISSION_DENIED
    with _client(auth_store.target, TOKENS["admin"], monkeypatch) as admin:
        admin.collect_garbage()


def test_health_needs_no_token(auth_store: RunningStore) -> None:
    with grpc.insecure_channel(auth_store.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tokens_rotate_with_their_file(
    auth_store: RunningStore, tokens_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_tokens(tokens_file, {**TOKENS, "reader": "r-rotated-99"})
    stamp = tokens_file.stat().st_mtime + 5
    os.utime(tokens_file, (stamp, stamp))
    with _client(auth_store.target, TOKENS["reader"], monkeypatch) as old:
        assert status_of(old.list_refs) is grpc.StatusCode.UNAUTHENTICATED
    with _client(auth_store.target, "r-rotated-99", monkeypatch) as new:
        assert list(new.list_refs()) == []


def test_a_writer_compresses_through_a_compressor_with_its_own_token(
    auth_store: RunningStore,
    tokens_file: Path,
    pair: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compressor_token = tmp_path / "compressor-token"
    compressor_token.write_text(TOKENS["writer"] + "\n")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(compressor_token))  # the compressor's store client
    compressor = start_compressor(auth_store.target, auth_tokens=tokens_file)
    try:
        monkeypatch.setenv(TOKEN_ENV, TOKENS["reader"])  # wins over the file
        with DeltaVault(auth_store.target, f"127.0.0.1:{compressor.port}") as vault:
            base, tuned = pair
            with pytest.raises(DeltaVaultError) as refused:
                vault.compress(base, tuned, ref="team/auth", method="adamix", ratio=8)
            assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED
        monkeypatch.setenv(TOKEN_ENV, TOKENS["writer"])
        with DeltaVault(auth_store.target, f"127.0.0.1:{compressor.port}") as vault:
            vault.compress(base, tuned, ref="team/auth", method="adamix", ratio=8)
            assert [name for name, _ in vault.list()] == ["team/auth"]
    finally:
        compressor.stop(grace=0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}", "tokens"),
        ('{"tokens": []}', "names no tokens"),
        ('{"tokens": [{"name": "x", "role": "root", "token": "t"}]}', "role"),
        ('{"tokens": [{"name": "x", "role": "reader"}]}', "exactly one of"),
        ('{"tokens": [{"name": "x", "role": "reader", "sha256": "abcd"}]}', "32 bytes"),
    ],
)
def test_malformed_tokens_files_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_tokens(text, "tokens.json")
