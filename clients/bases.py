"""Registered bases: a base checkpoint kept in the store, so a fine-tune can be rebuilt
where no copy of its base is at hand (a serving pod, a CI job).

A registered base is a manifest like a delta's, but every entry is a SNAPSHOT: the
tensor itself, its little-endian bytes at its own dtype in one part ``values`` (exact for
every dtype, integers and bools included), with the shard file it came from in
``params["shard"]``. Its ``base_fingerprint`` is the base's own identity, the one a delta
made against that base records, so a delta is never applied to a different base by
mistake. Its side files (config, tokenizer, shard index) are in the manifest's ``files``.
The chunks are content-addressed like every other: registering the same base twice, or
two bases sharing tensors, stores each tensor once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

import blake3
import grpc
import torch
from torch import Tensor

from clients._generated.deltavault.common.v1 import common_pb2
from clients.encoding import WIRE_DTYPES, UploadedTensor, dtype_name, tensor_bytes
from clients.errors import PreconditionError
from clients.safetensors_io import SAFETENSORS_DTYPES, CheckpointError, TensorInfo
from clients.side_files import write_files
from clients.store_client import StoreClient
from store_svc.digest import Algorithm, Digest

SNAPSHOT = common_pb2.STORAGE_KIND_SNAPSHOT
SNAPSHOT_METHOD = "snapshot"
SHARD_PARAM = "shard"


def is_base(manifest: common_pb2.Manifest) -> bool:
    """Whether a manifest is a registered base (the store keeps kinds unmixed)."""
    return bool(manifest.tensors) and manifest.tensors[0].kind == SNAPSHOT


def upload_snapshot(
    store: StoreClient,
    name: str,
    tensor: Tensor,
    *,
    shard: str,
    algorithm: Algorithm = Algorithm.BLAKE3,
) -> UploadedTensor:
    """Store one base tensor as it is (only the chunks the store lacks) and describe it."""
    data = tensor_bytes(tensor)
    dtype = dtype_name(tensor.dtype)
    chunks, stats = store.upload(data, algorithm)
    entry = common_pb2.TensorEntry(
        name=name,
        kind=SNAPSHOT,
        method=SNAPSHOT_METHOD,
        method_version=1,
        shape=list(tensor.shape),
        dtype=dtype,
        params={SHARD_PARAM: shard},
        nbits=len(data) * 8,
    )
    entry.parts.add(
        name="values",
        dtype=dtype,
        shape=list(tensor.shape),
        nbits=len(data) * 8,
        byte_length=sum(chunk.size for chunk in chunks),
        chunks=chunks,
    )
    return UploadedTensor(entry, len(data), stats.bytes_sent)


class StoredBase:
    """A registered base, read like a :class:`~clients.safetensors_io.Checkpoint`: names,
    shapes and dtypes from the manifest, each tensor's bytes fetched when asked for."""

    def __init__(self, store: StoreClient, manifest: common_pb2.Manifest, label: str) -> None:
        if not is_base(manifest):
            raise ValueError(f"{label} is a delta, not a registered base")
        self._store = store
        self._manifest = manifest
        self._entries = {entry.name: entry for entry in manifest.tensors}
        self.label = label

    @property
    def fingerprint(self) -> str:
        return self._manifest.base_fingerprint

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def info(self, name: str) -> TensorInfo:
        entry = self._entry(name)
        code = SAFETENSORS_DTYPES[WIRE_DTYPES[entry.dtype]]
        return TensorInfo(name, tuple(entry.shape), code, entry.params[SHARD_PARAM])

    def get(self, name: str) -> Tensor:
        """One tensor, read and verified chunk by chunk into its own buffer."""
        entry = self._entry(name)
        dtype = WIRE_DTYPES[entry.dtype]
        (part,) = entry.parts
        buffer = torch.empty(math.prod(entry.shape) * dtype.itemsize, dtype=torch.uint8)
        array: Any = buffer.numpy()
        self._store.read_into(part.chunks, memoryview(array))
        return buffer.view(dtype).reshape(tuple(entry.shape))

    def shards(self) -> dict[str, list[str]]:
        layout: dict[str, list[str]] = {}
        for entry in self._entries.values():
            layout.setdefault(entry.params[SHARD_PARAM], []).append(entry.name)
        return layout

    def write_side_files(self, out: Path) -> None:
        write_files(self._store, self._manifest.files, out)

    def _entry(self, name: str) -> common_pb2.TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(
                f"the registered base {self.label} has no tensor {name!r}"
            ) from None


class BaseWeights(Protocol):
    """A base's tensors: a local checkpoint or a registered base."""

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def get(self, name: str) -> Tensor: ...


WEIGHTS_FINGERPRINT = "weights:"
LAYOUT_FINGERPRINT = "layout:"


def fingerprint(weights: BaseWeights) -> str:
    """A base's identity: BLAKE3 over every tensor's name, dtype, shape and bytes, in name
    order (one tensor read at a time). Two checkpoints of one architecture differ."""
    outer = blake3.blake3()
    for name in sorted(weights.names()):
        info = weights.info(name)
        outer.update(json.dumps([name, info.dtype, list(info.shape)]).encode() + b"\n")
        outer.update(Digest.of(tensor_bytes(weights.get(name))).value)
    return WEIGHTS_FINGERPRINT + outer.hexdigest()[:32]


def layout_fingerprint(weights: BaseWeights) -> str:
    """The identity deltas made before content fingerprints record: names, shapes and
    dtypes only."""
    listing = [(n, list(weights.info(n).shape), weights.info(n).dtype) for n in weights.names()]
    blob = json.dumps(sorted(listing), separators=(",", ":")).encode()
    return LAYOUT_FINGERPRINT + Digest.of(blob).hex[:32]


def fingerprint_as(recorded: str, weights: BaseWeights) -> str | None:
    """``weights``' fingerprint of the kind ``recorded`` is; None for a fingerprint the
    producer chose itself (nothing here can recompute it)."""
    if recorded.startswith(WEIGHTS_FINGERPRINT):
        return fingerprint(weights)
    if recorded.startswith(LAYOUT_FINGERPRINT):
        return layout_fingerprint(weights)
    return None


def check_same_base(
    delta: common_pb2.Manifest, base_fingerprint: str | None, base_label: str, delta_label: str
) -> None:
    """FAILED_PRECONDITION unless ``delta`` was made against the base whose fingerprint is
    ``base_fingerprint`` (as far as both are known), naming both fingerprints."""
    if delta.base_fingerprint and base_fingerprint and delta.base_fingerprint != base_fingerprint:
        raise PreconditionError(
            f"{delta_label} was made against base {delta.base_fingerprint}; the base "
            f"{base_label} is {base_fingerprint}: refusing to apply it to another base",
            grpc.StatusCode.FAILED_PRECONDITION,
        )
