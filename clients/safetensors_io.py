"""Hugging Face safetensors checkpoints, read one tensor at a time.

A checkpoint is a directory holding ``model.safetensors``, or shards listed by
``model.safetensors.index.json``, or any other ``*.safetensors`` files (a PEFT adapter's
``adapter_model.safetensors``), or a single ``.safetensors`` file. Only the headers are
read up front; a tensor's bytes are read when it is asked for, so a checkpoint larger
than memory can be walked tensor by tensor.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
OTHER_WEIGHT_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf"}
)
"""Weights files that are not this checkpoint's shards: never side files."""


class CheckpointError(ValueError):
    """The path is not a readable safetensors checkpoint, or a tensor is missing."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    """safetensors dtype code: ``F32``, ``F16``, ``BF16``, ``I64``, ..."""
    shard: str
    """File name of the shard holding the tensor."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch_dtype(self.dtype).itemsize


class Checkpoint:
    """A lazily read checkpoint: names, shapes and dtypes now, bytes on demand."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._shard_paths = _shard_paths(self.path)
        self._infos = {info.name: info for info in self._read_headers()}

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def names(self) -> list[str]:
        """Tensor names, shard by shard, in each shard's stored order."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard (a copy in memory, independent of the file)."""
        info = self.info(name)
        with safe_open(self.directory / info.shard, framework="pt") as shard:
            tensor: torch.Tensor = shard.get_tensor(name)
        return tensor

    def shards(self) -> dict[str, list[str]]:
        """Shard file name -> the names it holds, to write another checkpoint alike."""
        layout: dict[str, list[str]] = {}
        for info in self._infos.values():
            layout.setdefault(info.shard, []).append(info.name)
        return layout

    @property
    def index_path(self) -> Path | None:
        """The shard index, if the checkpoint has one."""
        index = self.directory / INDEX_FILE
        return index if self.path.is_dir() and index.is_file() else None

    def side_files(self) -> list[Path]:
        """Files beside the weights (config, tokenizer, generation config, ...): not the
        shards, not their index, not weights in another format (``.bin``, ``.pt``, ...)."""
        if not self.path.is_dir():
            return []
        weights = {p.name for p in self._shard_paths} | {INDEX_FILE}
        return sorted(
            p
            for p in self.path.iterdir()
            if p.is_file() and p.name not in weights and p.suffix not in OTHER_WEIGHT_SUFFIXES
        )

    def write_side_files(self, out: Path) -> None:
        """Copy the side files and the shard index into ``out``."""
        for path in [*self.side_files(), *filter(None, [self.index_path])]:
            shutil.copy2(path, out / path.name)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, one at a time, each shard opened once."""
        for shard_name, names in self.shards().items():
            with safe_open(self.directory / shard_name, framework="pt") as shard:
                for name in names:
                    yield name, shard.get_tensor(name)

    def _read_headers(self) -> Iterator[TensorInfo]:
        for shard_path in self._shard_paths:
            try:
                with safe_open(shard_path, framework="pt") as shard:
                    for name in shard.keys():  # noqa: SIM118 - safe_open is not a mapping
                        view = shard.get_slice(name)
                        yield TensorInfo(
                            name, tuple(view.get_shape()), view.get_dtype(), shard_path.name
                        )
            except (OSError, SafetensorError) as exc:
                raise CheckpointError(f"cannot read {shard_path}: {exc}") from exc


def _shard_paths(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path} is not a .safetensors file")
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} has no valid weight_map: {exc}") from exc
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are absent: {missing}")
        return [path / s for s in shards]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path} holds no .safetensors files")
    return found


SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be, before its bytes exist: enough to lay out a file's header."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class StreamingWriter:
    """Writes one ``.safetensors`` file tensor by tensor, never holding more than one.

    The header (names, dtypes, shapes, offsets) is laid out from ``specs`` up front, so the
    tensors must then be written in that order, each matching its spec. The file is written
    to ``path.partial`` and renamed into place by :meth:`close` only when every tensor came.
    """

    def __init__(
        self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = path
        self._specs = specs
        self._next = 0
        self._partial = path.with_name(path.name + ".partial")
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for spec in specs:
            end = offset + spec.nbytes
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, end],
            }
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = self._partial.open("wb")
        self._file.write(len(blob).to_bytes(8, "little") + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: no tensor is expected after the last ({name!r})")
        spec = self._specs[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise ValueError(
                f"{self.path}: expected {spec.name!r} {spec.dtype} {list(spec.shape)}, got "
                f"{name!r} {tensor.dtype} {list(tensor.shape)}"
            )
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(flat.numpy().data)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._specs):
            self._partial.unlink()
            raise ValueError(
                f"{self.path}: {len(self._specs) - self._next} tensor(s) were never written"
            )
        self._partial.replace(self.path)

    def abort(self) -> None:
        self._file.close()
        self._partial.unlink(missing_ok=True)


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``F16``, ``BF16``, ...)."""
    for dtype, name in SAFETENSORS_DTYPES.items():
        if name == code:
            return dtype
    raise CheckpointError(f"safetensors dtype {code!r} is not supported")
