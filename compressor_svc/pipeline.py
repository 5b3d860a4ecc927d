"""Stream → ΔW → method → parts → store: one Compress call, one tensor in memory at a time.

:class:`InputPairer` turns frames into whole tensors and pairs each fine-tuned tensor with
its base (or takes a precomputed delta), holding at most the tensors still waiting for their
other side. :func:`encode_tensor` decides how a tensor is kept (compressed, lossless or
zero) and encodes it. :class:`CompressSession` uploads each encoding as it is made, streams a
:class:`TensorEvent` per tensor, and commits one manifest at the end, so a stream that fails
or stops early commits nothing.

Model-wide allocation (ADAMIX only) needs every matrix's error table before it can choose
widths: the first pass builds each table as its tensor arrives and spills the factors to
local disk; ``finish`` solves one allocation over all tables and encodes from the spill.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from torch import Tensor

from clients._generated.deltavault.common.v1 import common_pb2
from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.encoding import (
    FLOAT_DTYPES,
    FrameAssembler,
    FrameError,
    UploadedTensor,
    dtype_name,
    upload_encoded,
    zero_entry,
)
from clients.errors import NotFoundError
from clients.store_client import StoreClient
from compressor_svc.errors import InvalidInput, TooMuchInFlight
from compressor_svc.methods import adamix, compress, get_method, paper_ratio
from compressor_svc.methods.base import (
    bit_budget,
    check_gram,
    make_target,
    relative_activation_error,
    relative_weight_error,
)
from compressor_svc.methods.bit_allocation import allocate_bits
from compressor_svc.methods.lossless import encode_delta, encode_exact
from compressor_svc.metrics import CompressorMetrics
from compressor_svc.requests import CompressSpec, Scope
from kernels.reference import EncodedTensor, decode
from store_svc.digest import Digest
from store_svc.errors import RefConflict
from store_svc.limits import ByteLease
from store_svc.manifests import FORMAT_VERSION
from store_svc.signatures import Signer

PRODUCER = "deltavault-compressor 0.1.0"

BASE = compressor_pb2.TENSOR_ROLE_BASE
FINETUNED = compressor_pb2.TENSOR_ROLE_FINETUNED
DELTA = compressor_pb2.TENSOR_ROLE_DELTA
CALIBRATION = compressor_pb2.TENSOR_ROLE_CALIBRATION
_ROLE_NAMES: dict[int, str] = {
    BASE: "base",
    FINETUNED: "fine-tuned",
    DELTA: "delta",
    CALIBRATION: "calibration",
}


# --- frames → tensors ------------------------------------------------------------------

_MAX_ELEMENTS = 2**63
"""torch indexes a tensor's elements with int64, even those of an empty tensor."""


def check_frame_shape(frame: compressor_pb2.TensorFrame) -> None:
    """InvalidInput for a shape no tensor can have, even an empty one: ``[0, 2**40,
    2**40]`` holds no bytes, so it passes every size limit, but torch cannot lay it out
    (its strides overflow int64)."""
    if math.prod(dim for dim in frame.shape if dim > 0) >= _MAX_ELEMENTS:
        raise InvalidInput(
            f"tensor {frame.name!r}: shape {list(frame.shape)} has 2^63 elements or more "
            "(without its zero dimensions)"
        )


@dataclass(frozen=True)
class TensorInput:
    """One tensor's sides, complete: base and fine-tuned, or a precomputed delta."""

    name: str
    base: Tensor | None
    finetuned: Tensor | None
    delta: Tensor | None
    gram: Tensor | None

    @property
    def tuned(self) -> Tensor:
        """What stands for the fine-tuned tensor: the sent delta, or the fine-tuned weights."""
        tensor = self.delta if self.delta is not None else self.finetuned
        assert tensor is not None  # InputPairer completes one or the other
        return tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tuned.shape)


@dataclass
class InputPairer:
    """Frames in, :class:`TensorInput` out as soon as a tensor's sides are all there.

    Calibration Gram matrices must arrive before the weights they belong to (the SDK sends
    them so); a tensor is complete when its base and fine-tuned frames, or its delta frames,
    have all arrived. Memory held for waiting tensors is capped by ``max_inflight_bytes``,
    and held as ``lease`` (the admission budget shared with other streams).
    """

    max_tensor_bytes: int
    max_inflight_bytes: int
    lease: ByteLease
    _frames: FrameAssembler = field(init=False)
    _waiting: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._frames = FrameAssembler(self.max_tensor_bytes)

    def add(
        self, frame: compressor_pb2.TensorFrame, data: bytes | memoryview
    ) -> TensorInput | None:
        if frame.role not in _ROLE_NAMES:
            raise InvalidInput(f"tensor {frame.name!r}: frame without a valid role")
        if frame.name in self._done:
            raise InvalidInput(f"tensor {frame.name!r} was already sent complete")
        check_frame_shape(frame)
        try:
            tensor = self._frames.add(frame, data)
        except FrameError as exc:
            raise InvalidInput(str(exc)) from None
        if tensor is None:
            self._check_memory(frame.name)
            return None
        key = (int(frame.role), frame.name)
        if key in self._waiting:
            raise InvalidInput(f"tensor {frame.name!r}: its {_ROLE_NAMES[frame.role]} came twice")
        self._waiting[key] = tensor
        item = self._complete(frame.name)
        if item is None:
            self._check_memory(frame.name)
        return item

    def finish(self) -> None:
        """InvalidInput naming what the stream left incomplete."""
        unfinished = [f"{name} ({_ROLE_NAMES[role]})" for role, name in self._frames.unfinished()]
        if unfinished:
            raise InvalidInput(f"stream ended inside tensor(s): {', '.join(unfinished[:5])}")
        orphans = {(role, name) for role, name in self._waiting}
        if orphans:
            lines = []
            for role, name in sorted(orphans, key=lambda k: k[1]):
                if role == CALIBRATION:
                    lines.append(f"{name}: calibration sent but no weights")
                else:
                    other = "fine-tuned" if role == BASE else "base"
                    lines.append(f"{name}: {_ROLE_NAMES[role]} sent, {other} missing")
            raise InvalidInput("missing tensor(s): " + "; ".join(lines[:5]))

    def _complete(self, name: str) -> TensorInput | None:
        has = {role for role, n in self._waiting if n == name}
        if DELTA in has and has & {BASE, FINETUNED}:
            raise InvalidInput(f"tensor {name!r}: send a delta or base and fine-tuned, not both")
        if not ({BASE, FINETUNED} <= has or DELTA in has):
            return None
        self._done.add(name)
        take = self._waiting.pop
        return TensorInput(
            name,
            take((BASE, name), None),
            take((FINETUNED, name), None),
            take((DELTA, name), None),
            take((CALIBRATION, name), None),
        )

    def _check_memory(self, name: str) -> None:
        held = self._frames.pending_bytes + sum(
            t.numel() * t.element_size() for t in self._waiting.values()
        )
        if held > self.max_inflight_bytes:
            raise TooMuchInFlight(
                f"the stream holds {held} bytes of unfinished tensors (limit "
                f"{self.max_inflight_bytes}) at {name!r}: send each tensor's base and "
                "fine-tuned frames together, tensor by tensor"
            )
        if held > self.lease.held:
            self.lease.acquire(held - self.lease.held)
        else:
            self.lease.release(self.lease.held - held)


# --- one tensor → its encoding -----------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """How one tensor is kept: ``encoded`` is None for a zero delta."""

    name: str
    kind: common_pb2.StorageKind.ValueType
    shape: tuple[int, ...]
    dtype: str
    encoded: EncodedTensor | None
    error: common_pb2.ErrorStats
    seconds: float


def check_inputs(item: TensorInput) -> tuple[bool, str]:
    """(whether the delta is exactly zero, the fine-tuned dtype name); InvalidInput for a
    shape or dtype mismatch, non-finite values, a changed non-float tensor, or a Gram
    matrix that does not fit the tensor."""
    _check_calibration(item)
    if item.delta is not None:
        _check_finite(item.name, "delta", item.delta)
        return not bool(item.delta.any()), dtype_name(item.delta.dtype)
    base, finetuned = item.base, item.finetuned
    assert base is not None  # InputPairer pairs them
    assert finetuned is not None
    if base.shape != finetuned.shape:
        raise InvalidInput(
            f"tensor {item.name!r}: base shape {list(base.shape)} != fine-tuned shape "
            f"{list(finetuned.shape)}"
        )
    if base.dtype != finetuned.dtype:
        raise InvalidInput(
            f"tensor {item.name!r}: base dtype {dtype_name(base.dtype)} != fine-tuned dtype "
            f"{dtype_name(finetuned.dtype)}"
        )
    dtype = dtype_name(finetuned.dtype)
    same = bitwise_equal(base, finetuned)
    if dtype not in FLOAT_DTYPES:
        if not same:
            raise InvalidInput(
                f"tensor {item.name!r}: {dtype} tensors must be equal in base and fine-tune "
                "(a delta of integers is not stored)"
            )
        return True, dtype
    _check_finite(item.name, "base", base)
    if not same:
        _check_finite(item.name, "fine-tuned", finetuned)
    return same, dtype


def _check_calibration(item: TensorInput) -> None:
    """A calibration Gram matrix must be a finite float (d_in, d_in) matrix of a 2-D
    tensor: checked for every tensor, so Compress and Plan refuse one alike, whether or
    not a method would read it."""
    gram = item.gram
    if gram is None:
        return
    if len(item.shape) != 2 or not gram.is_floating_point():
        raise InvalidInput(
            f"tensor {item.name!r}: a calibration Gram matrix is a float (d_in, d_in) "
            f"matrix of a 2-D weight; got {dtype_name(gram.dtype)} {list(gram.shape)} for "
            f"shape {list(item.shape)}"
        )
    try:
        check_gram(gram, item.shape[1])
    except ValueError as exc:
        raise InvalidInput(f"tensor {item.name!r}: calibration {exc}") from None


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one shape and dtype hold the same bits (so -0.0 differs from
    0.0: a zero delta must rebuild the fine-tune exactly), compared as the widest integers
    their size allows (~10x faster than ``torch.equal`` on fp16)."""
    x = a.contiguous().reshape(-1).view(torch.uint8)
    y = b.contiguous().reshape(-1).view(torch.uint8)
    for wide in (torch.int64, torch.int32, torch.int16):
        size = wide.itemsize
        if x.numel() % size == 0 and x.storage_offset() % size == y.storage_offset() % size == 0:
            return torch.equal(x.view(wide), y.view(wide))
    return torch.equal(x, y)


def delta_of(item: TensorInput) -> Tensor:
    """ΔW in fp32, in one new buffer (the inputs are left as they are)."""
    if item.delta is not None:
        return item.delta.to(torch.float32, copy=True)
    assert item.base is not None
    assert item.finetuned is not None
    delta = item.finetuned.to(torch.float32, copy=True)
    return delta.sub_(item.base)


_FINITE_BLOCK = 1 << 22


def _check_finite(name: str, side: str, tensor: Tensor) -> None:
    """InvalidInput naming the tensor if it holds NaN/Inf.

    A NaN or Inf makes the sum NaN or Inf, so a finite sum proves every element finite in
    one vectorised pass; only a non-finite sum (bad values, or finite ones overflowing the
    sum) is followed by the exact count, in blocks of a few MiB whatever the tensor's size.
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return
    flat = tensor.reshape(-1)
    bad = sum(
        int((~torch.isfinite(flat[i : i + _FINITE_BLOCK])).sum())
        for i in range(0, flat.numel(), _FINITE_BLOCK)
    )
    if bad:
        raise InvalidInput(f"tensor {name!r}: {side} has {bad} NaN/Inf value(s)")


def error_stats(delta: Tensor, approx: Tensor, gram: Tensor | None) -> common_pb2.ErrorStats:
    stats = common_pb2.ErrorStats(relative_weight_error=relative_weight_error(delta, approx))
    if gram is not None and delta.dim() == 2:
        stats.relative_activation_error = relative_activation_error(delta, approx, gram.float())
        stats.has_activation_error = True
    else:
        stats.relative_activation_error = math.nan
    return stats


def lossless_encoding(item: TensorInput) -> EncodedTensor:
    """The exact delta: rebuilding the fine-tune bit for bit, or a sent delta as it is.
    Consumes ``item``: the delta may be written over its fine-tuned buffer (the stream's
    own), so that tensor is not the fine-tune afterwards."""
    if item.delta is not None:
        return encode_delta(item.delta)
    assert item.base is not None
    assert item.finetuned is not None
    return encode_exact(item.base, item.finetuned, overwrite=True)


EXACT = common_pb2.ErrorStats(relative_weight_error=0.0, relative_activation_error=math.nan)


def encode_tensor(
    item: TensorInput, spec: CompressSpec, device: torch.device
) -> tuple[Encoding | None, Tensor | None]:
    """Encode ``item`` per ``spec``: (the encoding, None), or for a lossy tensor in a model-
    wide allocation (None, its delta), which the caller encodes after the first pass."""
    started = time.perf_counter()
    zero, dtype = check_inputs(item)
    shape = item.shape

    def done(
        kind: common_pb2.StorageKind.ValueType,
        encoded: EncodedTensor | None,
        error: common_pb2.ErrorStats,
    ) -> Encoding:
        seconds = time.perf_counter() - started
        return Encoding(item.name, kind, shape, dtype, encoded, error, seconds)

    if zero:
        return done(common_pb2.STORAGE_KIND_ZERO, None, common_pb2.ErrorStats()), None
    if not (spec.selector.is_lossy(item.name, shape) and get_method(spec.method).lossy):
        return done(common_pb2.STORAGE_KIND_LOSSLESS, lossless_encoding(item), EXACT), None
    delta = delta_of(item)
    if spec.scope is Scope.MODEL:
        return None, delta
    gram = None if item.gram is None else item.gram.to(device)
    try:
        encoded = compress(
            delta.to(device), spec.method, ratio=spec.ratio, gram=gram, **spec.options
        )
    except ValueError as exc:
        raise InvalidInput(f"tensor {item.name!r}: {exc}") from None
    error = error_stats(delta, decode(encoded), item.gram)
    return done(common_pb2.STORAGE_KIND_COMPRESSED, encoded, error), None


# --- model-wide allocation ---------------------------------------------------------------


@dataclass(frozen=True)
class _Spilled:
    name: str
    dtype: str
    path: Path
    errors: np.ndarray[Any, np.dtype[np.float64]]
    costs: np.ndarray[Any, np.dtype[np.int64]]
    numel: int
    seconds: float


class ModelAllocation:
    """ADAMIX with one budget over every lossy matrix of a stream: error tables are built
    as tensors arrive, factors spilled under ``spill_dir``, widths chosen at ``finish``."""

    def __init__(self, spec: CompressSpec, spill_dir: Path | None, device: torch.device) -> None:
        assert spec.ratio is not None
        self._spec, self._ratio, self._device = spec, spec.ratio, device
        self._config: adamix.AdamixConfig = get_method("adamix").make_config(spec.options)
        self._dir = tempfile.TemporaryDirectory(prefix="deltavault-spill-", dir=spill_dir)
        self._spilled: list[_Spilled] = []

    def add(self, item: TensorInput, delta: Tensor) -> None:
        started = time.perf_counter()
        gram = None if item.gram is None else item.gram.to(self._device)
        try:
            target = make_target(delta.to(self._device), self._ratio, gram)
        except ValueError as exc:
            raise InvalidInput(f"tensor {item.name!r}: {exc}") from None
        table = adamix.error_table(target, self._config)
        path = Path(self._dir.name) / f"{len(self._spilled)}.pt"
        torch.save({"target": target, "table": table}, path)
        dtype = dtype_name(item.tuned.dtype)
        self._spilled.append(
            _Spilled(
                item.name,
                dtype,
                path,
                table.errors,
                table.costs,
                delta.numel(),
                time.perf_counter() - started,
            )
        )

    def finish(self) -> Iterator[Encoding]:
        """Solve the allocation, then encode each matrix from its spilled factors."""
        try:
            if not self._spilled:
                return
            budget = bit_budget((sum(s.numel for s in self._spilled),), self._ratio)
            choice = allocate_bits(
                np.concatenate([s.errors for s in self._spilled]),
                np.concatenate([s.costs for s in self._spilled]),
                budget,
                max_distinct_widths=self._config.max_distinct_widths,
            )
            start = 0
            for spilled in self._spilled:
                stop = start + spilled.errors.shape[0]
                yield self._encode(spilled, choice[start:stop])
                start = stop
        finally:
            self.close()

    def close(self) -> None:
        self._dir.cleanup()

    def _encode(self, spilled: _Spilled, choice: np.ndarray[Any, np.dtype[np.int64]]) -> Encoding:
        started = time.perf_counter()
        saved = torch.load(spilled.path, weights_only=False)  # our own spill file
        spilled.path.unlink()
        target, table = saved["target"], saved["table"]
        encoded = adamix.encode_choice(target, table, choice, self._config)
        error = error_stats(target.delta.cpu(), decode(encoded), target.gram)
        return Encoding(
            spilled.name,
            common_pb2.STORAGE_KIND_COMPRESSED,
            tuple(target.delta.shape),
            spilled.dtype,
            encoded,
            error,
            spilled.seconds + time.perf_counter() - started,
        )


# --- the session -------------------------------------------------------------------------


@dataclass
class _Totals:
    numel: int = 0
    nbits: int = 0
    lossy_numel: int = 0
    lossy_nbits: int = 0
    bytes_stored: int = 0
    new_chunk_bytes: int = 0


class CompressSession:
    """One Compress stream's state: what is uploaded, and the manifest being built."""

    def __init__(
        self,
        spec: CompressSpec,
        store: StoreClient,
        metrics: CompressorMetrics,
        *,
        device: torch.device,
        spill_dir: Path | None,
        signer: Signer | None = None,
    ) -> None:
        self.spec, self._metrics, self._device = spec, metrics, device
        self._store, self._signer = store.sealed(spec.sealer()), signer
        self._entries: dict[str, common_pb2.TensorEntry | None] = {}
        self._totals = _Totals()
        self._started = time.perf_counter()
        self._check_ref()
        self._model = (
            ModelAllocation(spec, spill_dir, device) if spec.scope is Scope.MODEL else None
        )

    def _check_ref(self) -> None:
        """Fail before any work if the commit's compare-and-swap is already bound to lose
        (it is checked again, atomically, at the commit)."""
        if not self.spec.ref or self.spec.force_ref:
            return
        try:
            current: Digest | None = self._store.resolve_ref(self.spec.ref)
        except NotFoundError:
            current = None
        if current != self.spec.expected_ref:
            raise RefConflict(self.spec.ref, self.spec.expected_ref, current)

    def encode(self, item: TensorInput) -> Encoding | None:
        """Encode one tensor; None when a model-wide allocation defers it to ``finish``.
        The caller drops ``item`` before :meth:`upload`, so its weights are freed first."""
        encoding, deferred = encode_tensor(item, self.spec, self._device)
        self._entries[item.name] = None
        if encoding is None:
            assert self._model is not None
            assert deferred is not None
            self._model.add(item, deferred)
        return encoding

    def upload(self, encoding: Encoding) -> compressor_pb2.TensorEvent:
        """Store an encoding's chunks; its event."""
        return self._store_encoding(encoding)

    def finish(self) -> Iterator[compressor_pb2.CompressResponse]:
        """Second pass (if any), then commit the manifest and report totals."""
        if self._model is not None:
            for encoding in self._model.finish():
                yield compressor_pb2.CompressResponse(tensor=self._store_encoding(encoding))
        if not self._entries:
            raise InvalidInput("the stream sent no tensors; nothing to commit")
        manifest = self._manifest()
        info = self._store.commit_manifest(
            manifest,
            ref=self.spec.ref,
            expected=self.spec.expected_ref,
            force=self.spec.force_ref,
            signer=self._signer,
        )
        totals = self._totals
        yield compressor_pb2.CompressResponse(
            result=compressor_pb2.CompressResult(
                manifest=info.digest.to_proto(),
                ref=self.spec.ref,
                tensor_count=len(manifest.tensors),
                ratio=_ratio(totals.numel, totals.nbits),
                lossy_ratio=_ratio(totals.lossy_numel, totals.lossy_nbits),
                bytes_stored=totals.bytes_stored,
                new_chunk_bytes=totals.new_chunk_bytes,
                seconds=time.perf_counter() - self._started,
            )
        )

    def close(self) -> None:
        """Drop spilled factors of an unfinished stream."""
        if self._model is not None:
            self._model.close()

    def _store_encoding(self, encoding: Encoding) -> compressor_pb2.TensorEvent:
        if encoding.encoded is None:
            entry = zero_entry(encoding.name, encoding.shape, encoding.dtype)
            uploaded = UploadedTensor(entry, 0, 0)
        else:
            uploaded = upload_encoded(
                self._store,
                encoding.name,
                encoding.encoded,
                kind=encoding.kind,
                algorithm=self.spec.algorithm,
            )
            uploaded.entry.dtype = encoding.dtype
        uploaded.entry.error.CopyFrom(encoding.error)
        self._entries[encoding.name] = uploaded.entry
        return self._account(encoding, uploaded)

    def _account(self, encoding: Encoding, uploaded: UploadedTensor) -> compressor_pb2.TensorEvent:
        numel, nbits = math.prod(encoding.shape), uploaded.entry.nbits
        totals = self._totals
        totals.numel += numel
        totals.nbits += nbits
        totals.bytes_stored += uploaded.bytes_stored
        totals.new_chunk_bytes += uploaded.new_chunk_bytes
        kind = common_pb2.StorageKind.Name(encoding.kind).removeprefix("STORAGE_KIND_").lower()
        self._metrics.tensors.labels(kind).inc()
        self._metrics.stored_bytes.inc(uploaded.new_chunk_bytes)
        event = compressor_pb2.TensorEvent(
            name=encoding.name,
            kind=encoding.kind,
            method=uploaded.entry.method,
            numel=numel,
            nbits=nbits,
            ratio=_ratio(numel, nbits),
            paper_ratio=_ratio(numel, nbits),
            error=encoding.error,
            seconds=encoding.seconds,
            new_chunk_bytes=uploaded.new_chunk_bytes,
        )
        if encoding.kind == common_pb2.STORAGE_KIND_COMPRESSED and encoding.encoded is not None:
            totals.lossy_numel += numel
            totals.lossy_nbits += nbits
            event.paper_ratio = paper_ratio(encoding.encoded)
            self._metrics.bits_per_weight.observe(nbits / numel)
            self._metrics.ratio.observe(event.ratio)
            self._metrics.method_seconds.labels(encoding.encoded.method).observe(encoding.seconds)
        return event

    def _manifest(self) -> common_pb2.Manifest:
        created = Timestamp()
        created.GetCurrentTime()
        entries = [e for e in self._entries.values() if e is not None]
        assert len(entries) == len(self._entries)  # the second pass filled every deferred one
        return common_pb2.Manifest(
            sealing=self.spec.sealing,
            format_version=FORMAT_VERSION,
            digest_algorithm=self.spec.algorithm.to_proto(),
            base_fingerprint=self.spec.base_fingerprint,
            tensors=entries,
            labels=self.spec.labels,
            created_at=created,
            producer=PRODUCER,
            files=self.spec.files,
        )


def _ratio(numel: int, nbits: int) -> float:
    return numel * 16 / nbits if nbits else math.inf
