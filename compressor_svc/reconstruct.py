"""Reconstruct: stream a stored delta back, or the fine-tuned weights rebuilt from a base.

Without a base, every stored tensor's ΔŴ goes back as DELTA frames (tensors whose delta is
exactly zero are left out: the manifest says so). With ``add_base`` the client streams base
tensors in and gets ``apply_delta(base, ΔŴ)`` back for each as FINETUNED frames, one tensor
in memory at a time; base tensors the manifest does not name were not changed by the
fine-tune (a LoRA adapter names only the modules it adapts) and come back as they are.
With ``base_ref`` (or ``base_manifest``) the base is a registered one (``clients.bases``),
read from the store tensor by tensor, and the client sends nothing after the header.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Literal

import torch

from clients._generated.deltavault.common.v1 import common_pb2
from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.bases import StoredBase, check_same_base, is_base
from clients.encoding import (
    WIRE_DTYPES,
    FrameAssembler,
    FrameError,
    decode_entry,
    rebuild_tensor,
    serialized_frames,
)
from clients.sealing import ChunkSealer, SealingError
from clients.store_client import StoreClient
from clients.wire import WithBytes
from compressor_svc.errors import (
    InvalidInput,
    MissingBase,
    SealedWithoutKey,
    TensorTooLarge,
    Undecodable,
)
from compressor_svc.pipeline import check_frame_shape
from store_svc.digest import Digest
from store_svc.refs import RefName

DELTA = compressor_pb2.TENSOR_ROLE_DELTA
FINETUNED = compressor_pb2.TENSOR_ROLE_FINETUNED


def check_header(header: compressor_pb2.ReconstructHeader) -> None:
    """InvalidInput for what is wrong with a header by itself, before the store is asked
    anything (so a bad request is refused alike whatever the store holds): a manifest
    named both by ref and by digest, a ref that breaks the naming rule, a malformed
    digest, an ``out_dtype`` that is not a float dtype."""
    _naming(header.ref, header, "manifest")
    _naming(header.base_ref, header, "base_manifest")
    _out_dtype(header.out_dtype, None)


def resolve_manifest(
    store: StoreClient, header: compressor_pb2.ReconstructHeader
) -> common_pb2.Manifest:
    """The delta manifest a header names by ref or digest (NOT_FOUND passes through)."""
    manifest = _named_manifest(store, header.ref, header, "manifest")
    if manifest is None:
        raise InvalidInput("the header names neither a ref nor a manifest digest")
    if is_base(manifest):
        raise InvalidInput(f"{header.ref or 'the manifest'} is a registered base, not a delta")
    return manifest


def opening_store(
    store: StoreClient, header: compressor_pb2.ReconstructHeader, delta: common_pb2.Manifest
) -> StoreClient:
    """``store``, opening chunks with the header's data key when the delta is sealed;
    FAILED_PRECONDITION when that key is missing or is not the delta's."""
    if not delta.HasField("sealing"):
        return store
    wanted = delta.sealing.data_key_id
    if not header.data_key:
        raise SealedWithoutKey(f"the delta is sealed under data key {wanted}: send its data_key")
    try:
        sealer = ChunkSealer(header.data_key)
    except SealingError as exc:
        raise InvalidInput(f"data_key: {exc}") from None
    if sealer.data_key_id != wanted:
        raise SealedWithoutKey(
            f"the delta is sealed under data key {wanted}; data_key is {sealer.data_key_id}"
        )
    return store.sealed(sealer)


def resolve_base(
    store: StoreClient, header: compressor_pb2.ReconstructHeader, delta: common_pb2.Manifest
) -> StoredBase | None:
    """The registered base a header names (None: the base is streamed in), checked to be
    the one the delta was made against."""
    manifest = _named_manifest(store, header.base_ref, header, "base_manifest")
    if manifest is None:
        return None
    label = header.base_ref or str(Digest.from_proto(header.base_manifest))
    if manifest.sealing.data_key_id != (store.sealer.data_key_id if store.sealer else ""):
        raise SealedWithoutKey(
            f"the registered base {label} and the delta are not sealed under one data key "
            f"({manifest.sealing.data_key_id or 'plain'} vs "
            f"{store.sealer.data_key_id if store.sealer else 'plain'})"
        )
    try:
        base = StoredBase(store, manifest, label)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    check_same_base(
        delta, base.fingerprint, f"registered as {base.label}", header.ref or "the delta"
    )
    return base


DigestField = Literal["manifest", "base_manifest"]


def _naming(
    ref: str, header: compressor_pb2.ReconstructHeader, digest_field: DigestField
) -> Digest | None:
    """The digest in the header's ``digest_field`` (None: unset), once the header is
    checked to name that manifest at most once, by a well-formed ref or digest."""
    has_digest = header.HasField(digest_field)
    if ref and has_digest:
        raise InvalidInput(f"name a ref or a {digest_field} digest, not both")
    if ref:
        RefName.parse(ref)
    if not has_digest:
        return None
    try:
        return Digest.from_proto(getattr(header, digest_field))
    except ValueError as exc:
        raise InvalidInput(f"{digest_field} digest: {exc}") from None


def _named_manifest(
    store: StoreClient,
    ref: str,
    header: compressor_pb2.ReconstructHeader,
    digest_field: DigestField,
) -> common_pb2.Manifest | None:
    """The manifest named by ``ref`` or by the header's ``digest_field``; None if neither."""
    digest = _naming(ref, header, digest_field)
    if ref:
        return store.get_manifest(store.resolve_ref(ref))
    return None if digest is None else store.get_manifest(digest)


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
    *,
    frame_bytes: int,
    max_tensor_bytes: int,
) -> Iterator[bytes]:
    dtype = _out_dtype(out_dtype, torch.float32)
    assert dtype is not None
    for name, entry in entries.items():
        if entry.kind == common_pb2.STORAGE_KIND_ZERO:
            continue
        delta = _decoded(name, entry, max_tensor_bytes, partial(decode_entry, store, entry))
        yield from _response_frames(name, DELTA, delta.to(dtype), frame_bytes)


def stream_rebuilt(
    store: StoreClient,
    entries: dict[str, common_pb2.TensorEntry],
    requests: Iterator[WithBytes[compressor_pb2.ReconstructRequest]],
    out_dtype: str,
    *,
    frame_bytes: int,
    max_tensor_bytes: int,
    pass_through: bool,
) -> Iterator[bytes]:
    """Rebuilt tensors as base frames arrive; ``pass_through`` returns base tensors without
    an entry unchanged (off when the client asked for a subset)."""
    forced = _out_dtype(out_dtype, None)
    frames = FrameAssembler(max_tensor_bytes)
    remaining = dict(entries)
    for request, data in requests:
        if request.HasField("end"):
            break
        if not request.HasField("base"):
            raise InvalidInput("after the header, send base frames and then an End")
        check_frame_shape(request.base)
        try:
            base = frames.add(request.base, data)
        except FrameError as exc:
            raise InvalidInput(str(exc)) from None
        name = request.base.name
        if base is None:
            continue
        if name not in remaining and not pass_through:
            continue
        entry = remaining.pop(name, None)
        yield from _rebuilt_frames(
            store,
            name,
            entry,
            base,
            dtype=forced,
            frame_bytes=frame_bytes,
            max_tensor_bytes=max_tensor_bytes,
        )
    else:
        raise InvalidInput("the stream ended without End; the reconstruction is incomplete")
    unfinished = [name for _, name in frames.unfinished()]
    if unfinished:
        raise InvalidInput(f"the stream ended inside base tensor(s): {', '.join(unfinished[:5])}")
    _check_all_found(remaining)


def stream_rebuilt_from(
    store: StoreClient,
    entries: dict[str, common_pb2.TensorEntry],
    base: StoredBase,
    out_dtype: str,
    *,
    frame_bytes: int,
    max_tensor_bytes: int,
    pass_through: bool,
) -> Iterator[bytes]:
    """Rebuilt tensors of a registered base, one read at a time: every base tensor with
    ``pass_through``, else only those ``entries`` names (checked present before any read)."""
    forced = _out_dtype(out_dtype, None)
    _check_all_found({name: entry for name, entry in entries.items() if name not in base})
    names = base.names() if pass_through else list(entries)
    for name in names:
        tensor = base.get(name)
        yield from _rebuilt_frames(
            store,
            name,
            entries.get(name),
            tensor,
            dtype=forced,
            frame_bytes=frame_bytes,
            max_tensor_bytes=max_tensor_bytes,
        )


def _rebuilt_frames(
    store: StoreClient,
    name: str,
    entry: common_pb2.TensorEntry | None,
    base: torch.Tensor,
    *,
    dtype: torch.dtype | None,
    frame_bytes: int,
    max_tensor_bytes: int,
) -> Iterator[bytes]:
    if entry is None:  # not changed by the fine-tune: the base, cast if asked
        rebuilt = rebuild_tensor(store, entry, base, dtype)
    elif list(base.shape) != list(entry.shape):
        raise InvalidInput(
            f"tensor {name!r}: base shape {list(base.shape)} != stored {list(entry.shape)}"
        )
    else:
        rebuilt = _decoded(
            name, entry, max_tensor_bytes, partial(rebuild_tensor, store, entry, base, dtype)
        )
    yield from _response_frames(name, FINETUNED, rebuilt, frame_bytes)


_DECODE_ERRORS = (ValueError, LookupError, ArithmeticError, RuntimeError)
"""What decoding raises for an entry no compressor wrote: an unknown method or dtype
(ValueError, KeyError), parts or params missing (KeyError), sizes that disagree
(ValueError, torch's RuntimeError), a zero group size (ZeroDivisionError)."""


def _decoded(
    name: str,
    entry: common_pb2.TensorEntry,
    max_tensor_bytes: int,
    decode: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``decode()`` of a stored entry: TensorTooLarge, before any of it is read, when its
    fp32 delta would pass the server's limit per tensor; Undecodable when it is not an
    encoding any compressor writes (the store checks a manifest's sums, not its
    encodings)."""
    size = math.prod(entry.shape) * 4
    if size > max_tensor_bytes:
        raise TensorTooLarge(
            f"tensor {name!r} {list(entry.shape)} decodes to {size} bytes, above this "
            f"server's {max_tensor_bytes}-byte limit per tensor"
        )
    try:
        return decode()
    except _DECODE_ERRORS as exc:
        raise Undecodable(f"tensor {name!r} of the stored delta cannot be decoded: {exc}") from None


def _response_frames(
    name: str, role: compressor_pb2.TensorRole.ValueType, tensor: torch.Tensor, frame_bytes: int
) -> Iterator[bytes]:
    """The tensor as serialized ReconstructResponse frames (see :mod:`clients.wire`)."""
    return serialized_frames(
        compressor_pb2.ReconstructResponse, "frame", (name, role, tensor), frame_bytes
    )


def _check_all_found(missing: dict[str, common_pb2.TensorEntry]) -> None:
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise MissingBase(f"the base lacks {len(missing)} tensor(s) the delta needs: {shown}")
