"""Lazy reading of single-file, sharded and odd checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clients.safetensors_io import INDEX_FILE, Checkpoint, CheckpointError


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 4, generator=g),
        "layer.0.weight": torch.randn(4, 4, generator=g).half(),
        "layer.0.bias": torch.randn(4, generator=g).bfloat16(),
        "layer.1.weight": torch.randn(3, 4, generator=g),
    }


def write_sharded(folder: Path, data: dict[str, torch.Tensor]) -> None:
    names = list(data)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    for shard, members in shards.items():
        save_file({n: data[n] for n in members}, folder / shard)
    weight_map = {n: s for s, members in shards.items() for n in members}
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")


def test_single_file_and_folder(tmp_path: Path) -> None:
    data = tensors()
    save_file(data, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    for path in (tmp_path, tmp_path / "model.safetensors"):
        checkpoint = Checkpoint(path)
        assert sorted(checkpoint.names()) == sorted(data)
        for name, tensor in data.items():
            assert torch.equal(checkpoint.get(name), tensor)
            assert checkpoint.info(name).shape == tuple(tensor.shape)
    assert Checkpoint(tmp_path).side_files() == [tmp_path / "config.json"]
    assert Checkpoint(tmp_path).info("layer.0.bias").dtype == "BF16"


def test_sharded_checkpoint(tmp_path: Path) -> None:
    data = tensors()
    write_sharded(tmp_path, data)
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.shards() == {
        "model-00001-of-00002.safetensors": ["embed.weight", "layer.0.weight"],
        "model-00002-of-00002.safetensors": ["layer.0.bias", "layer.1.weight"],
    }
    streamed = dict(checkpoint.iter_tensors())
    assert streamed.keys() == data.keys()
    assert all(torch.equal(streamed[n], t) for n, t in data.items())
    assert checkpoint.side_files() == [tmp_path / "config.json"]


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"no \.safetensors"):
        Checkpoint(tmp_path)
    write_sharded(tmp_path, tensors())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="absent"):
        Checkpoint(tmp_path)
    (tmp_path / INDEX_FILE).unlink()
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(CheckpointError, match="cannot read"):
        Checkpoint(tmp_path)
    save_file(tensors(), tmp_path / "ok.safetensors")
    (tmp_path / "broken.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        Checkpoint(tmp_path).get("nope")
