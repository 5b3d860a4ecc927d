"""Device layouts of encoded deltas: what the Triton delta products read.

:func:`stack` turns the encodings of one layer's deltas (one per fine-tune, all of the base
layer's shape) into a :class:`DeltaStack`: each format's payload moved to the device once,
the deltas' buffers back to back with per-delta offset tables, so one launch serves every
delta of a format. Codes stay packed as stored; only scales and zeros become fp32 (so that
deltas with fp16 and bf16 scales share a buffer) and a few derived index tables are added:

- low-rank (``adamix``, ``deltacome``): per code width, V̂ᵀ and Ûᵀ rows of every delta and
  their sigma; the product is (x·V̂ᵀ·diag(sigma))·Ûᵀ.
- sign (``bitdelta``): the sign bits and per-row scales of every level.
- sparse (``dare``, ``deltadq``): the seeded mask is regenerated here, once, as each row's
  kept columns (int32, padded to the longest row); kept values stay packed codes
  (DeltaDQ's separate quantization is rewritten to its fine codes, the same values).
- dense (``lossless``, or anything else decodable): the decoded delta.

A segment is one delta of the stack; rows of ``x`` are routed to segments at call time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kernels.reference import EncodedTensor, decode, pack
from kernels.reference.encoded import read_qparams
from kernels.reference.prng import check_prng, group_mask, threshold_mask
from kernels.reference.quant import QuantParams
from kernels.reference.separate import is_separated, read_separated, separate_codes

LOW_RANK_METHODS = frozenset({"adamix", "deltacome"})
SIGN_METHODS = frozenset({"bitdelta"})
SPARSE_METHODS = frozenset({"dare", "deltadq"})
FLOAT_VALUES = 0
"""The width key of a sparse stack whose kept values are stored as floats, not codes (the
sparse kernels read ``BITS == 0`` so)."""


def _int_table(values: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(list(values), dtype=dtype, device=device)


def _concat(pieces: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The pieces back to back on ``device`` (one element when empty, so that every kernel
    argument is a real buffer)."""
    flat = [p.reshape(-1).to(dtype) for p in pieces if p.numel()]
    joined = torch.cat(flat) if flat else torch.zeros(1, dtype=dtype)
    return joined.to(device)


def _offsets(pieces: Sequence[Tensor]) -> list[int]:
    starts, total = [], 0
    for p in pieces:
        starts.append(total)
        total += p.numel()
    return starts


def _packed_codes(encoded: EncodedTensor, name: str) -> Tensor:
    data = encoded.part(name).data
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0)


@dataclass(frozen=True)
class QuantSlab:
    """One quantized (rows, cols) matrix grouped along its rows: packed codes, fp32 grid."""

    bits: int
    rows: int
    codes: Tensor
    group_size: int
    scale: Tensor
    zero: Tensor

    @classmethod
    def read(cls, encoded: EncodedTensor, prefix: str, group_size: int) -> QuantSlab:
        codes_part = encoded.part(f"{prefix}.codes")
        params = read_qparams(encoded, prefix, codes_part.dtype.bits, group_size)
        return cls.of(_packed_codes(encoded, f"{prefix}.codes"), codes_part.shape[0], params)

    @classmethod
    def of(cls, packed: Tensor, rows: int, params: QuantParams) -> QuantSlab:
        scale = params.scale.float()
        mid = ((1 << params.bits) - 1) / 2
        zero = torch.full_like(scale, mid) if params.zero is None else params.zero.float()
        return cls(params.bits, rows, packed, params.group_size, scale, zero)


@dataclass(frozen=True)
class QuantRows:
    """Quantized matrices of several segments (``rows[s]`` x a shared width) back to back."""

    bits: int
    codes: Tensor
    code_offset: Tensor
    scale: Tensor
    zero: Tensor
    param_offset: Tensor
    rows: Tensor
    group_size: Tensor

    @classmethod
    def of(cls, bits: int, slabs: Sequence[QuantSlab], device: torch.device) -> QuantRows:
        return cls(
            bits,
            _concat([s.codes for s in slabs], torch.uint8, device),
            _int_table(_offsets([s.codes for s in slabs]), torch.int64, device),
            _concat([s.scale for s in slabs], torch.float32, device),
            _concat([s.zero for s in slabs], torch.float32, device),
            _int_table(_offsets([s.scale for s in slabs]), torch.int64, device),
            _int_table([s.rows for s in slabs], torch.int32, device),
            _int_table([s.group_size for s in slabs], torch.int32, device),
        )

    @property
    def max_rows(self) -> int:
        return int(self.rows.max()) if self.rows.numel() else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


@dataclass(frozen=True)
class LowRankStack:
    """Pairs of one code width b: segment s holds ``v.rows[s]`` pairs (0: none at b)."""

    segments: Tensor
    v: QuantRows
    u: QuantRows
    sigma: Tensor
    sigma_offset: Tensor


@dataclass(frozen=True)
class SignStack:
    """Sign bits (levels, d_out, d_in) of each segment back to back; scales (levels, d_out)."""

    segments: Tensor
    signs: Tensor
    sign_offset: Tensor
    levels: Tensor
    scale: Tensor
    scale_offset: Tensor

    @property
    def max_levels(self) -> int:
        return int(self.levels.max())


@dataclass(frozen=True)
class SparseStack:
    """Row-wise kept columns (``width[s]`` per row, padded, ``count`` valid) and the kept
    values in row-major mask order: ``bits``-bit codes on a fine grid, or fp32 floats."""

    segments: Tensor
    bits: int
    columns: Tensor
    column_offset: Tensor
    width: Tensor
    count: Tensor
    start: Tensor
    values: Tensor
    value_offset: Tensor
    scale: Tensor
    zero: Tensor
    param_offset: Tensor
    group_size: Tensor

    @property
    def max_width(self) -> int:
        return int(self.width.max())


@dataclass(frozen=True)
class DeltaStack:
    """One layer's deltas on ``device``, ready for ``kernels.delta_linear``."""

    shape: tuple[int, int]
    n_segments: int
    device: torch.device
    low_rank: dict[int, LowRankStack] = field(default_factory=dict)
    signs: SignStack | None = None
    sparse: dict[int, SparseStack] = field(default_factory=dict)
    dense: dict[int, Tensor] = field(default_factory=dict)
    encodings: tuple[EncodedTensor, ...] = ()
    """The encodings the stack was made from (what the reference backend decodes)."""

    @property
    def nbytes(self) -> int:
        """Bytes the delta products read from the stack (the payload the floor counts)."""
        total = sum(d.numel() * d.element_size() for d in self.dense.values())
        for s in self.low_rank.values():
            total += s.v.nbytes + s.u.nbytes + s.sigma.numel() * 4
        if self.signs is not None:
            total += self.signs.signs.numel() + self.signs.scale.numel() * 4
        for p in self.sparse.values():
            total += sum(t.numel() * t.element_size() for t in (p.columns, p.values))
            total += (p.scale.numel() + p.zero.numel()) * 4
        return total


def stack(deltas: Sequence[EncodedTensor], device: torch.device | str | None = None) -> DeltaStack:
    """The device layout of several deltas of one layer (segment s = ``deltas[s]``)."""
    if not deltas:
        raise ValueError("stack needs at least one encoded delta")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"deltas of one layer share one 2-D shape, got {sorted(shapes)}")
    d_out, d_in = deltas[0].shape
    dev = torch.device(device or "cpu")
    low_rank = [(s, d) for s, d in enumerate(deltas) if d.method in LOW_RANK_METHODS]
    signs = [(s, d) for s, d in enumerate(deltas) if d.method in SIGN_METHODS]
    sparse = [(s, d) for s, d in enumerate(deltas) if d.method in SPARSE_METHODS]
    chosen = {s for s, _ in [*low_rank, *signs, *sparse]}
    dense = {s: decode(d).to(dev) for s, d in enumerate(deltas) if s not in chosen}
    return DeltaStack(
        (d_out, d_in),
        len(deltas),
        dev,
        _low_rank_stacks(low_rank, dev),
        _sign_stack(signs, d_out, dev) if signs else None,
        _sparse_stacks(sparse, dev),
        dense,
        tuple(deltas),
    )


# ---- low-rank ----------------------------------------------------------------------------


def _widths(encoded: EncodedTensor) -> list[int]:
    return [int(b) for b in encoded.params["widths"].split(",") if b]


def _low_rank_stacks(
    deltas: Sequence[tuple[int, EncodedTensor]], device: torch.device
) -> dict[int, LowRankStack]:
    per_width: dict[int, list[tuple[int, QuantSlab, QuantSlab, Tensor]]] = {}
    for segment, encoded in deltas:
        group_size = int(encoded.params["group_size"])
        sigma = encoded.part("sigma").floats()
        start = 0
        for bits in _widths(encoded):
            v = QuantSlab.read(encoded, f"v{bits}", group_size)
            u = QuantSlab.read(encoded, f"u{bits}", group_size)
            if v.rows != u.rows:
                raise ValueError(f"{bits}-bit bucket: {v.rows} rows of V̂ᵀ, {u.rows} of Ûᵀ")
            per_width.setdefault(bits, []).append((segment, v, u, sigma[start : start + v.rows]))
            start += v.rows
        if start != sigma.numel():
            raise ValueError(f"{sigma.numel()} singular values stored for {start} pairs")
    return {
        bits: LowRankStack(
            _int_table([e[0] for e in entries], torch.int32, device),
            QuantRows.of(bits, [e[1] for e in entries], device),
            QuantRows.of(bits, [e[2] for e in entries], device),
            _concat([e[3] for e in entries], torch.float32, device),
            _int_table(_offsets([e[3] for e in entries]), torch.int64, device),
        )
        for bits, entries in sorted(per_width.items())
    }


# ---- signs -------------------------------------------------------------------------------


def _sign_stack(
    deltas: Sequence[tuple[int, EncodedTensor]], d_out: int, device: torch.device
) -> SignStack:
    signs, scales, levels = [], [], []
    for _, encoded in deltas:
        signs.append(_packed_codes(encoded, "signs"))
        scale = encoded.part("scales").floats()
        levels.append(scale.shape[0])
        scales.append(scale.expand(scale.shape[0], d_out))
    return SignStack(
        _int_table([s for s, _ in deltas], torch.int32, device),
        _concat(signs, torch.uint8, device),
        _int_table(_offsets(signs), torch.int64, device),
        _int_table(levels, torch.int32, device),
        _concat(scales, torch.float32, device),
        _int_table(_offsets(scales), torch.int64, device),
    )


# ---- sparse ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SparseSegment:
    """One delta's kept columns per row and its kept values: packed codes of ``slab``'s
    grid, or (``slab`` None) fp32 floats."""

    segment: int
    columns: Tensor
    count: Tensor
    start: Tensor
    values: Tensor
    slab: QuantSlab | None

    @property
    def bits(self) -> int:
        return FLOAT_VALUES if self.slab is None else self.slab.bits


def _kept_mask(encoded: EncodedTensor) -> Tensor:
    shape = (encoded.shape[0], encoded.shape[1])
    seed = check_prng(encoded.params)
    if encoded.method == "dare":
        return threshold_mask(shape, seed, int(encoded.params["threshold"]))
    group, keep = int(encoded.params["dropout_group"]), int(encoded.params["keep"])
    return group_mask(shape, seed, group, keep)


def _kept_values(encoded: EncodedTensor, n_kept: int) -> tuple[Tensor, QuantSlab | None]:
    if any(p.name == "values" for p in encoded.parts):
        values = encoded.part("values").floats().view(-1)
        if values.numel() != n_kept:
            raise ValueError(f"mask keeps {n_kept} elements, {values.numel()} values stored")
        return values, None
    group_size = int(encoded.params["group_size"])
    if is_separated(encoded, "values"):
        separated = read_separated(encoded, "values", group_size, n_kept)
        fine = QuantSlab.of(
            pack(separate_codes(separated), separated.fine_bits), 1, separated.params
        )
        return fine.codes, fine
    if encoded.part("values.codes").numel != n_kept:
        raise ValueError(
            f"mask keeps {n_kept} elements, {encoded.part('values.codes').numel} codes stored"
        )
    slab = QuantSlab.read(encoded, "values", group_size)
    return slab.codes, slab


def _sparse_segment(segment: int, encoded: EncodedTensor) -> _SparseSegment:
    mask = _kept_mask(encoded)
    count = mask.sum(dim=1, dtype=torch.int32)
    width = max(int(count.max()), 1)
    # Each row's kept columns first, in column order: a stable sort of the dropped flags.
    columns = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    start = torch.cumsum(count, 0, dtype=torch.int64) - count
    values, slab = _kept_values(encoded, int(count.sum()))
    return _SparseSegment(segment, columns.to(torch.int32), count, start, values, slab)


def _sparse_stacks(
    deltas: Sequence[tuple[int, EncodedTensor]], device: torch.device
) -> dict[int, SparseStack]:
    per_width: dict[int, list[_SparseSegment]] = {}
    for segment, encoded in deltas:
        entry = _sparse_segment(segment, encoded)
        per_width.setdefault(entry.bits, []).append(entry)
    return {
        bits: _sparse_stack(bits, entries, device) for bits, entries in sorted(per_width.items())
    }


def _sparse_stack(
    bits: int, entries: Sequence[_SparseSegment], device: torch.device
) -> SparseStack:
    slabs = [e.slab for e in entries if e.slab is not None]
    value_dtype = torch.float32 if bits == FLOAT_VALUES else torch.uint8
    return SparseStack(
        _int_table([e.segment for e in entries], torch.int32, device),
        bits,
        _concat([e.columns for e in entries], torch.int32, device),
        _int_table(_offsets([e.columns for e in entries]), torch.int64, device),
        _int_table([e.columns.shape[1] for e in entries], torch.int32, device),
        _concat([e.count for e in entries], torch.int32, device),
        _concat([e.start for e in entries], torch.int64, device),
        _concat([e.values for e in entries], value_dtype, device),
        _int_table(_offsets([e.values for e in entries]), torch.int64, device),
        _concat([s.scale for s in slabs], torch.float32, device),
        _concat([s.zero for s in slabs], torch.float32, device),
        _int_table(_offsets([s.scale for s in slabs]), torch.int64, device),
        _int_table([s.group_size for s in slabs] or [1], torch.int32, device),
    )
