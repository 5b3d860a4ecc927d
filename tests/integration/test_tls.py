"""TLS on both services with a throwaway CA: mutual TLS from the SDK to both and from the
compressor to the store, plaintext and certificate-less clients refused, the plaintext
health port for probes, and a rotated certificate served without a restart."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channel import open_channel
from clients.errors import DeltaVaultError
from clients.sdk import DeltaVault
from clients.store_client import RetryPolicy, StoreClient
from clients.tls import CLIENT_ENV_PREFIX, ClientTls, ServerTls
from store_svc.backends.local import LocalBackend
from tests.integration.conftest import RunningStore, start_compressor, start_store
from tests.support.pki import Authority


@dataclass(frozen=True)
class Pki:
    authority: Authority
    server: ServerTls
    client: ClientTls


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    authority = Authority.create(tmp_path, "test-ca")
    server_cert, server_key = authority.issue(tmp_path / "server", server=True)
    client_cert, client_key = authority.issue(tmp_path / "client", server=False)
    return Pki(
        authority,
        ServerTls(server_cert, server_key, authority.path),
        ClientTls(authority.path, client_cert, client_key),
    )


@pytest.fixture
def tls_store(pki: Pki, tmp_path: Path) -> Iterator[RunningStore]:
    backend = LocalBackend(tmp_path / "objects")
    with pytest.MonkeyPatch.context() as env:
        _set_client_env(env, pki.client)  # the fixture's own client speaks mutual TLS
        running = start_store(backend, tmp_path, tls=pki.server, health_port=0)
    yield running
    running.client.close()
    running.server.stop(grace=0)


def _set_client_env(env: pytest.MonkeyPatch, tls: ClientTls) -> None:
    for name, path in (("CA", tls.ca), ("CERT", tls.cert), ("KEY", tls.key)):
        env.setenv(CLIENT_ENV_PREFIX + name, str(path))


def _client(target: str, channel: grpc.Channel) -> StoreClient:
    return StoreClient(
        target, channel=channel, timeout=5, retry=RetryPolicy(attempts=1, initial_backoff=0.01)
    )


def _tls_client(target: str, tls: ClientTls) -> StoreClient:
    return _client(target, open_channel(target, tls=tls))


def test_mutual_tls_admits_only_certified_clients(tls_store: RunningStore, pki: Pki) -> None:
    with _tls_client(tls_store.target, pki.client) as client:
        assert list(client.list_refs()) == []
    refused = [
        _client(tls_store.target, grpc.insecure_channel(tls_store.target)),
        _tls_client(tls_store.target, ClientTls(pki.authority.path)),  # TLS, no certificate
    ]
    for client in refused:
        with client, pytest.raises(DeltaVaultError):
            list(client.list_refs())


def test_health_port_answers_in_plaintext(tls_store: RunningStore) -> None:
    health_port = tls_store.server.health_port
    assert health_port is not None
    with grpc.insecure_channel(f"127.0.0.1:{health_port.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    health_target = f"127.0.0.1:{health_port.port}"
    with _client(health_target, grpc.insecure_channel(health_target)) as client:
        with pytest.raises(DeltaVaultError) as other_service:
            list(client.list_refs())
        assert other_service.value.code is grpc.StatusCode.UNIMPLEMENTED


def test_the_expected_server_name_can_differ_from_the_address(
    tls_store: RunningStore, pki: Pki
) -> None:
    named = ClientTls(pki.client.ca, pki.client.cert, pki.client.key, server_name="localhost")
    with _tls_client(tls_store.target, named) as client:
        assert list(client.list_refs()) == []
    wrong = ClientTls(pki.client.ca, pki.client.cert, pki.client.key, server_name="elsewhere")
    with _tls_client(tls_store.target, wrong) as client, pytest.raises(DeltaVaultError):
        list(client.list_refs())


def test_a_rotated_certificate_is_served_without_a_restart(
    tls_store: RunningStore, pki: Pki, tmp_path: Path
) -> None:
    successor = Authority.create(tmp_path, "next-ca")
    cert, key = successor.issue(tmp_path / "next-server", server=True)
    pki.server.cert.write_bytes(cert.read_bytes())
    pki.server.key.write_bytes(key.read_bytes())
    stamp = pki.server.cert.stat().st_mtime + 5
    for path in (pki.server.cert, pki.server.key):
        os.utime(path, (stamp, stamp))
    trusting_successor = ClientTls(successor.path, pki.client.cert, pki.client.key)
    with _tls_client(tls_store.target, trusting_successor) as client:
        assert list(client.list_refs()) == []


def test_sdk_compresses_over_mutual_tls_end_to_end(
    tls_store: RunningStore, pki: Pki, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_client_env(monkeypatch, pki.client)  # the SDK's and the compressor's store client
    compressor = start_compressor(tls_store.target, tls=pki.server)
    try:
        with DeltaVault(tls_store.target, f"localhost:{compressor.port}") as vault:
            base, tuned = pair
            vault.compress(base, tuned, ref="team/tls", method="adamix", ratio=8)
            assert [name for name, _ in vault.list()] == ["team/tls"]
    finally:
        compressor.stop(grace=0)
