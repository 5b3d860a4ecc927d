"""A real store server on a loopback port over each backend, and a client for it; a
compressor in front of it with an SDK facade; a small sharded toy model and its fine-tune."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from torch import Tensor

from clients.errors import DeltaVaultError
from clients.sdk import DeltaVault
from clients.store_client import RetryPolicy, StoreClient
from compressor_svc.config import CompressorConfig
from compressor_svc.server import CompressorServer
from compressor_svc.server import build_server as build_compressor
from store_svc.backends.base import Backend
from store_svc.config import StoreConfig
from store_svc.server import StoreServer, build_server
from tests.support.checkpoints import write_checkpoint

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


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code ``call`` fails with (a stream it returns is read to the end);
    AssertionError if it succeeds."""
    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    except DeltaVaultError as exc:
        return exc.code
    raise AssertionError("the call succeeded")


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


# --- a compressor, the SDK, a toy model pair ----------------------------------------------

LINEAR = "model.layers.0.mlp.up_proj.weight"
EMBEDDING = "model.embed_tokens.weight"


def start_compressor(store_target: str, **overrides: object) -> CompressorServer:
    settings: dict[str, object] = {
        "store": store_target,
        "port": 0,
        "metrics_port": -1,
        "max_frame_bytes": 64 * 1024,
        "shutdown_grace_seconds": 1.0,
        "torch_threads": 1,
    }
    settings.update(overrides)
    server = build_compressor(CompressorConfig(**settings))  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture
def compressor(store: RunningStore) -> Iterator[CompressorServer]:
    server = start_compressor(store.target)
    yield server
    server.stop(grace=0)


@pytest.fixture
def vault(store: RunningStore, compressor: CompressorServer) -> Iterator[DeltaVault]:
    with DeltaVault(store.target, f"127.0.0.1:{compressor.port}", frame_bytes=16 * 1024) as v:
        yield v


def model_tensors(seed: int, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "model.embed_tokens.weight": randn(50, 32).to(dtype),
        LINEAR: (randn(96, 32) * 0.1).to(dtype),
        "model.layers.0.mlp.down_proj.weight": (randn(32, 96) * 0.1).to(dtype),
        "model.layers.0.input_layernorm.weight": torch.ones(32, dtype=dtype),
        "model.layers.0.mlp.down_proj.bias": randn(32).to(dtype),
        "model.position_ids": torch.arange(16),
    }


def finetune_of(base: dict[str, Tensor], seed: int = 1) -> dict[str, Tensor]:
    """Low-rank updates of the linear weights, a few changed embedding rows, the rest kept."""
    generator = torch.Generator().manual_seed(seed)
    tuned = {name: t.clone() for name, t in base.items()}
    for name in (LINEAR, "model.layers.0.mlp.down_proj.weight"):
        d_out, d_in = base[name].shape
        a, b = torch.randn(d_out, 4, generator=generator), torch.randn(4, d_in, generator=generator)
        tuned[name] = (base[name].float() + 0.01 * a @ b).to(base[name].dtype)
    tuned["model.embed_tokens.weight"][:3] += 0.05
    return tuned


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    base = model_tensors(0)
    return (
        write_checkpoint(tmp_path / "base", base, shards=2),
        write_checkpoint(tmp_path / "tuned", finetune_of(base), shards=2),
    )
