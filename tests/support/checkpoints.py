"""Synthetic Hugging Face style checkpoints for tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def write_checkpoint(directory: Path, tensors: dict[str, Tensor], shards: int = 1) -> Path:
    """``directory`` with config.json and the tensors, sharded with an index when
    ``shards`` > 1 (tensor i goes to shard i mod ``shards``)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "toy"}))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors")
        return directory
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def write_adapter(folder: Path, tensors: dict[str, Tensor], config: dict[str, object]) -> Path:
    """A PEFT adapter folder as ``save_pretrained`` writes it (created if absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
