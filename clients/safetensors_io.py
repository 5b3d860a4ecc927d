"""Hugging Face safetensors checkpoints, read one tensor at a time.

A checkpoint is a directory holding ``model.safetensors``, or shards listed by
``model.safetensors.index.json``, or any other ``*.safetensors`` files (a PEFT adapter's
``adapter_model.safetensors``), or a single ``.safetensors`` file. Only the headers are
read up front; a tensor is a copy-on-write map of its bytes in the file, read from the
page cache as it is touched, so a checkpoint larger than memory can be walked tensor by
tensor and streaming a tensor out never copies it whole first.
"""

from __future__ import annotations

import json
import math
import mmap
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

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
    byte_range: tuple[int, int] = (0, 0)
    """Where its bytes are in the shard file (absolute offsets; unset outside a file)."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch_dtype(self.dtype).itemsize


class Checkpoint:
    """A lazily read checkpoint: names, shapes and dtypes now, bytes on demand."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._shard_paths = _shard_paths(self.path)
        self._infos = {info.name: info for info in self._read_headers()}
        self._maps: dict[str, mmap.mmap] = {}

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
        """One tensor, mapped from its shard: its pages are read as they are touched, and
        writes to it stay private to this process (the file never changes)."""
        info = self.info(name)
        dtype = torch_dtype(info.dtype)
        start, end = info.byte_range
        if start == end:
            return torch.empty(info.shape, dtype=dtype)
        mapped = self._map(info.shard)
        if start % dtype.itemsize:  # torch needs aligned elements: copy this rare one
            raw = torch.frombuffer(bytearray(mapped[start:end]), dtype=torch.uint8)
            return raw.view(dtype).reshape(info.shape)
        count = (end - start) // dtype.itemsize
        return torch.frombuffer(mapped, dtype=dtype, count=count, offset=start).reshape(info.shape)

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

    def kept_files(self) -> list[Path]:
        """The side files and the shard index: what a copy of the checkpoint keeps besides
        its weights."""
        return [*self.side_files(), *filter(None, [self.index_path])]

    def write_side_files(self, out: Path) -> None:
        """Copy :meth:`kept_files` into ``out``."""
        for path in self.kept_files():
            shutil.copy2(path, out / path.name)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, one at a time, shard by shard."""
        for names in self.shards().values():
            for name in names:
                yield name, self.get(name)

    def _map(self, shard: str) -> mmap.mmap:
        if shard not in self._maps:
            with (self.directory / shard).open("rb") as file:
                self._maps[shard] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[shard]

    def _read_headers(self) -> Iterator[TensorInfo]:
        for shard_path in self._shard_paths:
            try:
                yield from _shard_header(shard_path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"cannot read {shard_path}: {exc}") from exc


def _shard_header(path: Path) -> list[TensorInfo]:
    """The tensors a ``.safetensors`` file holds, by name, from its header: an 8-byte
    little-endian length, then that many bytes of JSON giving each tensor's dtype, shape
    and byte range relative to the end of the header."""
    size = path.stat().st_size
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if not 0 < length <= size - 8:
            raise ValueError(f"header length {length} does not fit a {size}-byte file")
        header = json.loads(file.read(length))
    data_start = 8 + length
    infos = []
    for name, entry in sorted(header.items()):
        if name == "__metadata__":
            continue
        begin, end = (data_start + offset for offset in entry["data_offsets"])
        shape = tuple(int(d) for d in entry["shape"])
        nbytes = math.prod(shape) * torch_dtype(entry["dtype"]).itemsize
        if not data_start <= begin <= end <= size or end - begin != nbytes:
            raise ValueError(f"tensor {name!r}: bytes {begin}..{end} do not fit its header")
        infos.append(TensorInfo(name, shape, entry["dtype"], path.name, (begin, end)))
    return infos


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
