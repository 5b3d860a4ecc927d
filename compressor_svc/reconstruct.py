"""Reconstruct: stream a stored delta back, or the fine-tuned weights rebuilt from a base.

Without a base, every stored tensor's ΔŴ goes back as DELTA frames (tensors whose delta is
exactly zero are left out: the manifest says so). With ``add_base`` the client streams base
tensors in and gets ``apply_delta(base, ΔŴ)`` back for each as FINETUNED frames, one tensor
in memory at a time; base tensors the manifest does not name were not changed by the
fine-tune (a LoRA adapter names only the modules it adapts) and come back as they are.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from clients._generated.deltavault.common.v1 import common_pb2
from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.encoding import (
    WIRE_DTYPES,
    FrameAssembler,
    FrameError,
    decode_entry,
    rebuild_tensor,
    tensor_frames,
)
from clients.store_client import StoreClient
from compressor_svc.errors import InvalidInput, MissingBase
from store_svc.digest import Digest

DELTA = compressor_pb2.TENSOR_ROLE_DELTA
FINETUNED = compressor_pb2.TENSOR_ROLE_FINETUNED


def resolve_manifest(
    store: StoreClient, header: compressor_pb2.ReconstructHeader
) -> common_pb2.Manifest:
    """The manifest a header names by ref or digest (NOT_FOUND passes through)."""
    if header.ref and header.HasField("manifest"):
        raise InvalidInput("name a ref or a manifest digest, not both")
    if header.ref:
        return store.get_manifest(store.resolve_ref(header.ref))
    if not header.HasField("manifest"):
        raise InvalidInput("the header names neither a ref nor a manifest digest")
    try:
        digest = Digest.from_proto(header.manifest)
    except ValueError as exc:
        raise InvalidInput(f"manifest digest: {exc}") from None
    return store.get_manifest(digest)


def _out_dtype(name: str, default: torch.dtype | None) -> torch.dtype | None:
    if not name:
        return default
    if name not in WIRE_DTYPES or not WIRE_DTYPES[name].is_floating_point:
        raise InvalidInput(f"out_dtype {name!r} must be a float dtype: float32, float16, ...")
    return WIRE_DTYPES[name]


def selected_entries(
    manifest: common_pb2.Manifest, names: list[str]
) -> dict[str, common_pb2.TensorEntry]:
    entries = {entry.name: entry for entry in manifest.tensors}
    if not names:
        return entries
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise InvalidInput(f"the manifest has no tensor(s) {unknown[:5]}")
    return {n: entries[n] for n in names}


def stream_deltas(
    store: StoreClient,
    entries: dict[str, common_pb2.TensorEntry],
    out_dtype: str,
    frame_bytes: int,
) -> Iterator[compressor_pb2.ReconstructResponse]:
    dtype = _out_dtype(out_dtype, torch.float32)
    assert dtype is not None
    for name, entry in entries.items():
        if entry.kind == common_pb2.STORAGE_KIND_ZERO:
            continue
        delta = decode_entry(store, entry).to(dtype)
        for frame in tensor_frames(name, DELTA, delta, frame_bytes):
            yield compressor_pb2.ReconstructResponse(frame=frame)


def stream_rebuilt(
    store: StoreClient,
    entries: dict[str, common_pb2.TensorEntry],
    requests: Iterator[compressor_pb2.ReconstructRequest],
    out_dtype: str,
    *,
    frame_bytes: int,
    max_tensor_bytes: int,
    pass_through: bool,
) -> Iterator[compressor_pb2.ReconstructResponse]:
    """Rebuilt tensors as base frames arrive; ``pass_through`` returns base tensors without
    an entry unchanged (off when the client asked for a subset)."""
    forced = _out_dtype(out_dtype, None)
    frames = FrameAssembler(max_tensor_bytes)
    remaining = dict(entries)
    for request in requests:
        if request.HasField("end"):
            break
        if not request.HasField("base"):
            raise InvalidInput("after the header, send base frames and then an End")
        try:
            base = frames.add(request.base)
        except FrameError as exc:
            raise InvalidInput(str(exc)) from None
        name = request.base.name
        if base is None:
            continue
        if name not in remaining and not pass_through:
            continue
        try:
            rebuilt = rebuild_tensor(store, remaining.pop(name, None), base, forced)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        for frame in tensor_frames(name, FINETUNED, rebuilt, frame_bytes):
            yield compressor_pb2.ReconstructResponse(frame=frame)
    else:
        raise InvalidInput("the stream ended without End; the reconstruction is incomplete")
    if remaining:
        shown = ", ".join(sorted(remaining)[:5])
        raise MissingBase(f"the base lacks {len(remaining)} tensor(s) the delta needs: {shown}")
