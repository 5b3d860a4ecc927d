"""Registered bases and side files, over real gRPC on each backend: a base kept in the
store rebuilds a fine-tune with no local copy (SDK and Reconstruct RPC), bit for bit the
same as from the checkpoint; deltas carry the fine-tune's config; a wrong or mistaken base
is refused with the right status."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import pytest
import torch

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.compressor_client import CompressorClient
from clients.errors import ConflictError, DeltaVaultError, PreconditionError
from clients.safetensors_io import Checkpoint
from clients.sdk import DeltaVault
from compressor_svc.server import CompressorServer
from tests.integration.conftest import LINEAR, model_tensors
from tests.support.checkpoints import write_checkpoint

TUNED_CONFIG = {"model_type": "toy", "id2label": {"0": "sport", "1": "tech"}}


@pytest.fixture
def compressed(vault: DeltaVault, pair: tuple[Path, Path]) -> tuple[Path, Path]:
    """The pair, with a tokenizer beside the base and the fine-tune's own config, compressed
    to ``team/toy``."""
    base_dir, tuned_dir = pair
    (base_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    (base_dir / "pytorch_model.bin").write_bytes(b"weights in another format: not a side file")
    (tuned_dir / "config.json").write_text(json.dumps(TUNED_CONFIG))
    vault.compress(base_dir, tuned_dir, ref="team/toy", method="adamix", ratio=8)
    return base_dir, tuned_dir


def same_checkpoints(a: Path, b: Path) -> None:
    left, right = Checkpoint(a), Checkpoint(b)
    assert left.shards() == right.shards()
    for name in left.names():
        x, y = left.get(name), right.get(name)
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name


def test_a_registered_base_rebuilds_without_a_local_copy(
    vault: DeltaVault, compressed: tuple[Path, Path], tmp_path: Path
) -> None:
    base_dir, _ = compressed
    from_checkpoint = vault.reconstruct("team/toy", base_dir, tmp_path / "from-checkpoint")
    report = vault.register_base(base_dir, ref="bases/toy")
    assert report.tensor_count == len(Checkpoint(base_dir).names())
    kept = tmp_path / "kept-base"
    shutil.copytree(base_dir, kept)
    shutil.rmtree(base_dir)

    out = vault.reconstruct("team/toy", None, tmp_path / "from-store", base_ref="bases/toy")
    same_checkpoints(out, from_checkpoint)
    assert json.loads((out / "config.json").read_text()) == TUNED_CONFIG  # the fine-tune's
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'  # the base's
    assert (out / "model.safetensors.index.json").read_bytes() == (
        kept / "model.safetensors.index.json"
    ).read_bytes()
    assert not (out / "pytorch_model.bin").exists()
    assert torch.equal(Checkpoint(out).get("model.position_ids"), torch.arange(16))


def test_registering_again_stores_nothing_new_and_needs_force_to_move(
    vault: DeltaVault, pair: tuple[Path, Path]
) -> None:
    base_dir, _ = pair
    first = vault.register_base(base_dir, ref="bases/toy")
    assert first.new_chunk_bytes == first.bytes_stored > 0
    with pytest.raises(ConflictError):
        vault.register_base(base_dir, ref="bases/toy")
    again = vault.register_base(base_dir, ref="bases/toy", force=True)
    assert again.new_chunk_bytes == 0
    assert again.fingerprint == first.fingerprint


def test_reconstruct_rpc_reads_a_registered_base(
    vault: DeltaVault, compressor: CompressorServer, compressed: tuple[Path, Path]
) -> None:
    base_dir, _ = compressed
    vault.register_base(base_dir, ref="bases/toy")
    streamed_header = compressor_pb2.ReconstructHeader(ref="team/toy", add_base=True)
    stored_header = compressor_pb2.ReconstructHeader(ref="team/toy", base_ref="bases/toy")
    with CompressorClient(f"127.0.0.1:{compressor.port}") as client:
        streamed = dict(client.reconstruct(streamed_header, Checkpoint(base_dir).iter_tensors()))
        stored = dict(client.reconstruct(stored_header))
        stored_header.names.append(LINEAR)
        subset = dict(client.reconstruct(stored_header))
    assert list(stored) == list(Checkpoint(base_dir).names())
    for name, tensor in streamed.items():
        assert torch.equal(stored[name], tensor), name
    assert list(subset) == [LINEAR] and torch.equal(subset[LINEAR], streamed[LINEAR])


def test_a_base_other_than_the_deltas_is_failed_precondition(
    vault: DeltaVault,
    compressor: CompressorServer,
    compressed: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    other = model_tensors(0)
    other["model.extra.weight"] = torch.zeros(4, 4, dtype=torch.float16)
    vault.register_base(write_checkpoint(tmp_path / "other", other), ref="bases/other")
    with pytest.raises(PreconditionError, match="made against base"):
        vault.reconstruct("team/toy", None, tmp_path / "out", base_ref="bases/other")
    assert not (tmp_path / "out").exists()
    header = compressor_pb2.ReconstructHeader(ref="team/toy", base_ref="bases/other")
    with (
        CompressorClient(f"127.0.0.1:{compressor.port}") as client,
        pytest.raises(DeltaVaultError, match="made against base") as caught,
    ):
        list(client.reconstruct(header))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_base_is_not_a_delta_nor_a_delta_a_base(
    vault: DeltaVault,
    compressor: CompressorServer,
    compressed: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    base_dir, _ = compressed
    vault.register_base(base_dir, ref="bases/toy")
    with pytest.raises(ValueError, match="registered base, not a delta"):
        vault.reconstruct("bases/toy", base_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="is a delta, not a registered base"):
        vault.reconstruct("team/toy", None, tmp_path / "out", base_ref="team/toy")
    with pytest.raises(ValueError, match="exactly one"):
        vault.reconstruct("team/toy", base_dir, tmp_path / "out", base_ref="bases/toy")
    with pytest.raises(ValueError, match="exactly one"):
        vault.reconstruct("team/toy", None, tmp_path / "out")
    with CompressorClient(f"127.0.0.1:{compressor.port}") as client:
        for header in (
            compressor_pb2.ReconstructHeader(ref="bases/toy"),
            compressor_pb2.ReconstructHeader(ref="team/toy", base_ref="team/toy"),
        ):
            with pytest.raises(DeltaVaultError) as caught:
                list(client.reconstruct(header))
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_side_files_survive_garbage_collection(
    vault: DeltaVault, compressed: tuple[Path, Path], tmp_path: Path
) -> None:
    base_dir, _ = compressed
    vault.store.upload(b"an unreferenced chunk")
    time.sleep(1.1)
    assert vault.gc(grace_seconds=1)["chunks_swept"] == 1
    out = vault.reconstruct("team/toy", base_dir, tmp_path / "out")
    assert json.loads((out / "config.json").read_text()) == TUNED_CONFIG
    assert vault.verify("team/toy")["damaged"] == []
