"""Lazy reading of single-file, sharded and odd checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clients.safetensors_io import INDEX_FILE, SAFETENSORS_DTYPES, Checkpoint, CheckpointError


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


def test_tensors_map_the_file_and_writes_stay_private(tmp_path: Path) -> None:
    data = tensors()
    path = tmp_path / "model.safetensors"
    save_file(data, path)
    before = path.read_bytes()
    checkpoint = Checkpoint(path)
    weight = checkpoint.get("embed.weight")
    assert torch.equal(weight, data["embed.weight"])
    weight.add_(1.0)
    assert path.read_bytes() == before
    assert torch.equal(checkpoint.get("layer.1.weight"), data["layer.1.weight"])


def write_by_hand(path: Path, data: dict[str, torch.Tensor]) -> None:
    """A ``.safetensors`` file with the tensors in the given order, unpadded (safetensors'
    own writer orders them so that none is misaligned; other writers need not)."""
    header: dict[str, object] = {}
    blobs, offset = [], 0
    for name, tensor in data.items():
        blob = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def test_misaligned_and_empty_tensors_read_exactly(tmp_path: Path) -> None:
    data = {
        "a.mask": torch.tensor([True, False, True]),  # 3 bytes: the next one is misaligned
        "b.weight": torch.randn(3, 5),
        "c.empty": torch.zeros(0, 4, dtype=torch.float16),
        "d.scalar": torch.tensor(7, dtype=torch.int64),
    }
    write_by_hand(tmp_path / "model.safetensors", data)
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.info("b.weight").byte_range[0] % 4 != 0
    for name, tensor in data.items():
        got = checkpoint.get(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got, tensor), name


def test_a_header_that_does_not_fit_its_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_by_hand(path, {"w": torch.randn(4, 4)})
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="do not fit"):
        Checkpoint(path)
