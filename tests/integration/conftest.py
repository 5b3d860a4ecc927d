"""A real store server on a loopback port over each backend, and a client for it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients.store_client import RetryPolicy, StoreClient
from store_svc.backends.base import Backend
from store_svc.config import StoreConfig
from store_svc.server import StoreServer, build_server

SMALL_CHUNK = 64 * 1024
SMALL_FRAME = 16 * 1024


@dataclass
class RunningStore:
    server: StoreServer
    client: StoreClient
    backend: Backend

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


def start_store(backend: Backend, tmp_path: Path, **overrides: object) -> RunningStore:
    settings: dict[str, object] = {
        "root": tmp_path,
        "port": 0,
        "metrics_port": -1,
        "max_frame_bytes": SMALL_FRAME * 4,
        "max_chunk_bytes": 1 << 20,
        "shutdown_grace_seconds": 1.0,
    }
    settings.update(overrides)
    server = build_server(StoreConfig(**settings), backend)  # type: ignore[arg-type]
    server.start()
    client = StoreClient(
        f"127.0.0.1:{server.port}",
        chunk_bytes=SMALL_CHUNK,
        frame_bytes=SMALL_FRAME,
        timeout=30,
        retry=RetryPolicy(attempts=2, initial_backoff=0.01),
    )
    return RunningStore(server, client, backend)


def stop_store(running: RunningStore) -> None:
    running.client.close()
    running.server.stop(grace=0)


@pytest.fixture
def store(backend: Backend, tmp_path: Path) -> Iterator[RunningStore]:
    """A store without a metrics endpoint (its HTTP server takes 0.5 s to stop)."""
    running = start_store(backend, tmp_path)
    yield running
    stop_store(running)
