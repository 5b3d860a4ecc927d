"""Device layouts of encoded deltas: what the Triton delta products read.

:func:`stack` turns the encodings of one layer's deltas (one per fine-tune, all of the base
layer's shape) into a :class:`DeltaStack`: each format's payload moved to the device once,
the deltas' buffers back to back with per-delta offset tables, so one launch serves every
delta of a format, whatever its code widths. Codes stay packed as stored; only scales and
zeros become fp32 (so that deltas with fp16 and bf16 scales share a buffer) and a few
derived index tables are added:

- low-rank (``adamix``, ``deltacome``): V̂ᵀ and Ûᵀ rows of every delta's every code width
  (a bucket each) and their sigma; the product is (x·V̂ᵀ·diag(sigma))·Ûᵀ.
- sign (``bitdelta``): the sign bits and per-row scales of every level.
- sparse (``dare``, ``deltadq``): the seeded mask as a bitmap, or left for the kernels
  to regenerate from its hash (:class:`SparseMasks`), and each row's first value index.
  Kept values stay packed codes (DeltaDQ's separate quantization is rewritten to its fine
  codes: the same values, at the fine width).
- dense (``lossless``, or anything else decodable): the decoded delta.

A segment is one delta of the stack; rows of ``x`` are routed to segments at call time.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.reference import EncodedTensor, PartDtype, decode, pack
from kernels.reference.encoded import read_qparams
from kernels.reference.prng import check_prng, group_keep_counts, hash_keys, mask_salt
from kernels.reference.quant import QuantParams
from kernels.reference.separate import is_separated, read_separated, separate_codes


class SparseMasks(enum.StrEnum):
    """How the sparse kernels learn which elements a seeded mask keeps."""

    BITMAP = "bitmap"
    """Read one bit per element, packed (the layout's default): the delta's device
    footprint grows by 1 bit per weight, 1/16 of an fp16 weight."""
    HASH = "hash"
    """Regenerate each key from the seed and hold it to its bound: no bytes for DARE,
    32 bits per dropout group for DeltaDQ (less than the bitmap for groups over 32), and
    about 30 integer operations per weight, which on a GPU may cost more time than the
    bytes save (``tests.bench.bench_kernels --masks hash`` measures it)."""


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
    """Quantized matrices, one per bucket (``rows[e]`` x a shared width, ``bits[e]``-bit
    codes), back to back."""

    codes: Tensor
    code_offset: Tensor
    scale: Tensor
    zero: Tensor
    param_offset: Tensor
    rows: Tensor
    group_size: Tensor
    bits: Tensor
    widths: tuple[int, ...]
    """``bits`` on the host, for launches and decodes that need them without a sync."""

    @classmethod
    def of(cls, slabs: Sequence[QuantSlab], device: torch.device) -> QuantRows:
        return cls(
            _concat([s.codes for s in slabs], torch.uint8, device),
            _int_table(_offsets([s.codes for s in slabs]), torch.int64, device),
            _concat([s.scale for s in slabs], torch.float32, device),
            _concat([s.zero for s in slabs], torch.float32, device),
            _int_table(_offsets([s.scale for s in slabs]), torch.int64, device),
            _int_table([s.rows for s in slabs], torch.int32, device),
            _int_table([s.group_size for s in slabs], torch.int32, device),
            _int_table([s.bits for s in slabs], torch.int32, device),
            tuple(s.bits for s in slabs),
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


@dataclass(frozen=True)
class LowRankStack:
    """Every low-rank delta's pairs as buckets: bucket e holds ``v.rows[e]`` pairs of one
    code width of segment ``bucket_segment[e]``, their T columns from ``t_column[e]``.

    The first product runs one bucket per program group; the second one segment per group
    (``segments``, its buckets ``bucket_first[g]`` to ``bucket_first[g + 1]``), so that all
    of a segment's widths add into its rows of y in one program, in one launch.
    """

    bucket_segment: Tensor
    t_column: Tensor
    v: QuantRows
    u: QuantRows
    sigma: Tensor
    sigma_offset: Tensor
    segments: Tensor
    bucket_first: Tensor
    max_bucket_rank: int
    max_rank: int
    """Host-side sizes of the grids and of T, the most pairs of any bucket and delta."""

    @property
    def nbytes(self) -> int:
        return self.v.nbytes + self.u.nbytes + self.sigma.numel() * 4


@dataclass(frozen=True)
class SignStack:
    """Sign bits (levels, d_out, d_in) of each segment back to back; scales (levels, d_out)."""

    segments: Tensor
    signs: Tensor
    sign_offset: Tensor
    levels: Tensor
    scale: Tensor
    scale_offset: Tensor


@dataclass(frozen=True)
class SparseStack:
    """Seeded-mask deltas of one kind (``grouped``: DeltaDQ) and one value width.

    With ``masks`` BITMAP the kept elements of entry e are the set bits of its packed
    (d_out, d_in) bitmap at byte ``bitmap_offset[e]``. With HASH an element is kept when its
    key (``salt[e]``, ``kernels.triton.masks``) is at most its bound: ``bound[e]`` (DARE:
    threshold - 1) or, for DeltaDQ, the int32 bit pattern of its group's ``keep``-th
    smallest key, (d_out, n_groups) per entry at ``bound_offset[e]``, groups of
    ``dropout_group[e]`` columns. Kept values are stored in row-major mask order, row n's
    first at ``start[e * d_out + n]``: ``bits``-bit codes of a fine grid (``scale`` and
    ``zero`` per ``group_size[e]`` values) or floats (``bits`` 0).
    """

    segments: Tensor
    masks: SparseMasks
    grouped: bool
    bits: int
    bitmap: Tensor
    bitmap_offset: Tensor
    salt: Tensor
    bound: Tensor
    bound_offset: Tensor
    dropout_group: Tensor
    start: Tensor
    values: Tensor
    value_offset: Tensor
    scale: Tensor
    zero: Tensor
    param_offset: Tensor
    group_size: Tensor

    @property
    def nbytes(self) -> int:
        mask = self.bitmap if self.masks is SparseMasks.BITMAP else self.bound
        tables = (mask, self.start, self.values, self.scale, self.zero)
        return sum(t.numel() * t.element_size() for t in tables)


@dataclass(frozen=True)
class DeltaStack:
    """One layer's deltas on ``device``, ready for ``kernels.delta_linear``."""

    shape: tuple[int, int]
    n_segments: int
    device: torch.device
    low_rank: LowRankStack | None
    signs: SignStack | None
    sparse: dict[tuple[bool, int], SparseStack]
    """Keyed by (grouped, value width)."""
    dense: dict[int, Tensor]
    """Decoded deltas by segment."""
    encodings: tuple[EncodedTensor, ...]
    """The encodings the stack was made from (what the reference backend decodes)."""

    @property
    def nbytes(self) -> int:
        """Bytes the delta products read from the stack (the payload the floor counts)."""
        total = sum(d.numel() * d.element_size() for d in self.dense.values())
        if self.low_rank is not None:
            total += self.low_rank.nbytes
        if self.signs is not None:
            total += self.signs.signs.numel() + self.signs.scale.numel() * 4
        return total + sum(p.nbytes for p in self.sparse.values())


def stack(
    deltas: Sequence[EncodedTensor],
    device: torch.device | str | None = None,
    *,
    sparse_masks: SparseMasks = SparseMasks.BITMAP,
) -> DeltaStack:
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
        _low_rank_stack(low_rank, dev) if low_rank else None,
        _sign_stack(signs, d_out, dev) if signs else None,
        _sparse_stacks(sparse, dev, SparseMasks(sparse_masks)),
        dense,
        tuple(deltas),
    )


# ---- low-rank ----------------------------------------------------------------------------


def _widths(encoded: EncodedTensor) -> list[int]:
    return [int(b) for b in encoded.params["widths"].split(",") if b]


def _low_rank_stack(
    deltas: Sequence[tuple[int, EncodedTensor]], device: torch.device
) -> LowRankStack:
    buckets: list[tuple[int, int, QuantSlab, QuantSlab, Tensor]] = []
    bucket_first, ranks = [0], []
    for segment, encoded in deltas:
        group_size = int(encoded.params["group_size"])
        sigma = encoded.part("sigma").floats()
        start = 0
        for bits in _widths(encoded):
            v = QuantSlab.read(encoded, f"v{bits}", group_size)
            u = QuantSlab.read(encoded, f"u{bits}", group_size)
            if v.rows != u.rows:
                raise ValueError(f"{bits}-bit bucket: {v.rows} rows of V̂ᵀ, {u.rows} of Ûᵀ")
            buckets.append((segment, start, v, u, sigma[start : start + v.rows]))
            start += v.rows
        if start != sigma.numel():
            raise ValueError(f"{sigma.numel()} singular values stored for {start} pairs")
        bucket_first.append(len(buckets))
        ranks.append(start)
    return LowRankStack(
        _int_table([b[0] for b in buckets], torch.int32, device),
        _int_table([b[1] for b in buckets], torch.int32, device),
        QuantRows.of([b[2] for b in buckets], device),
        QuantRows.of([b[3] for b in buckets], device),
        _concat([b[4] for b in buckets], torch.float32, device),
        _int_table(_offsets([b[4] for b in buckets]), torch.int64, device),
        _int_table([segment for segment, _ in deltas], torch.int32, device),
        _int_table(bucket_first, torch.int32, device),
        max((b[2].rows for b in buckets), default=0),
        max(ranks, default=0),
    )


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
    """One delta's mask bounds, row starts and kept values: packed codes of ``slab``'s grid,
    or (``slab`` None) floats."""

    segment: int
    grouped: bool
    bitmap: Tensor
    salt: int
    bound: Tensor
    dropout_group: int
    start: Tensor
    values: Tensor
    slab: QuantSlab | None

    @property
    def key(self) -> tuple[bool, int]:
        return self.grouped, FLOAT_VALUES if self.slab is None else self.slab.bits


def _keys(shape: tuple[int, int], seed: int, device: torch.device) -> Tensor:
    """(rows, cols) int64 mask keys, hashed on ``device`` when it is a GPU."""
    if device.type == "cuda":
        from kernels.triton.masks import hash_keys as device_hash_keys

        return device_hash_keys(shape[0] * shape[1], seed, device).view(shape)
    return hash_keys(shape[0] * shape[1], seed).view(shape)


def _group_bounds(keys: Tensor, group: int, keep: int) -> Tensor:
    """(rows, n_groups) int64: the ``keep``-th smallest key of each group (the tail: of
    its share)."""
    rows, cols = keys.shape
    n_full = cols // group
    counts = group_keep_counts(cols, group, keep)
    pieces = []
    if n_full:
        full = keys[:, : n_full * group].reshape(rows, n_full, group)
        pieces.append(torch.kthvalue(full, keep, dim=2).values)
    if len(counts) > n_full:
        tail = keys[:, n_full * group :]
        pieces.append(torch.kthvalue(tail, counts[-1], dim=1).values.unsqueeze(1))
    return torch.cat(pieces, dim=1)


def _as_int32_bits(words: Tensor) -> Tensor:
    """uint32 values held in int64 → int32 tensors of the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


@dataclass(frozen=True)
class _Mask:
    """A seeded mask: the kept elements, and the bounds its keys are held to."""

    kept: Tensor
    grouped: bool
    bound: Tensor
    dropout_group: int


def _mask(encoded: EncodedTensor, device: torch.device) -> _Mask:
    shape = (encoded.shape[0], encoded.shape[1])
    keys = _keys(shape, check_prng(encoded.params), device)
    if encoded.method == "dare":
        threshold = int(encoded.params["threshold"])
        return _Mask(keys < threshold, False, torch.tensor([threshold - 1]), 1)
    group, keep = int(encoded.params["dropout_group"]), int(encoded.params["keep"])
    bounds = _group_bounds(keys, group, keep)
    kept = keys <= bounds.repeat_interleave(group, dim=1)[:, : shape[1]]
    return _Mask(kept, True, _as_int32_bits(bounds), group)


def _pack_bits(kept: Tensor) -> Tensor:
    """A bool mask packed one bit per element, on its own device."""
    if kept.device.type == "cuda":
        from kernels.triton.codes import pack as device_pack

        return device_pack(kept.to(torch.uint8), 1)
    return pack(kept.to(torch.uint8), 1)


def _kept_values(encoded: EncodedTensor, n_kept: int) -> tuple[Tensor, QuantSlab | None]:
    if any(p.name == "values" for p in encoded.parts):
        part = encoded.part("values")
        if part.numel != n_kept:
            raise ValueError(f"mask keeps {n_kept} elements, {part.numel} values stored")
        dtype = torch.float16 if part.dtype is PartDtype.FLOAT16 else torch.float32
        return part.floats().view(-1).to(dtype), None
    group_size = int(encoded.params["group_size"])
    if is_separated(encoded, "values"):
        separated = read_separated(encoded, "values", group_size, n_kept)
        packed = pack(separate_codes(separated), separated.fine_bits)
        fine = QuantSlab.of(packed, 1, separated.params)
        return fine.codes, fine
    codes = encoded.part("values.codes")
    if codes.numel != n_kept:
        raise ValueError(f"mask keeps {n_kept} elements, {codes.numel} codes stored")
    slab = QuantSlab.read(encoded, "values", group_size)
    return slab.codes, slab


def _sparse_segment(
    segment: int, encoded: EncodedTensor, device: torch.device, masks: SparseMasks
) -> _SparseSegment:
    mask = _mask(encoded, device)
    counts = mask.kept.sum(dim=1).cpu()
    start = torch.cumsum(counts, 0) - counts
    values, slab = _kept_values(encoded, int(counts.sum()))
    if masks is SparseMasks.BITMAP:
        bitmap, bound = _pack_bits(mask.kept), torch.zeros(0, dtype=mask.bound.dtype)
    else:
        bitmap, bound = torch.zeros(0, dtype=torch.uint8), mask.bound
    salt = mask_salt(check_prng(encoded.params))
    return _SparseSegment(
        segment, mask.grouped, bitmap, salt, bound, mask.dropout_group, start, values, slab
    )


def _sparse_stacks(
    deltas: Sequence[tuple[int, EncodedTensor]], device: torch.device, masks: SparseMasks
) -> dict[tuple[bool, int], SparseStack]:
    per_kind: dict[tuple[bool, int], list[_SparseSegment]] = {}
    for segment, encoded in deltas:
        entry = _sparse_segment(segment, encoded, device, masks)
        per_kind.setdefault(entry.key, []).append(entry)
    return {
        key: _sparse_stack(key, entries, device, masks) for key, entries in sorted(per_kind.items())
    }


def _sparse_stack(
    key: tuple[bool, int],
    entries: Sequence[_SparseSegment],
    device: torch.device,
    masks: SparseMasks,
) -> SparseStack:
    grouped, bits = key
    slabs = [e.slab for e in entries if e.slab is not None]
    value_dtype = entries[0].values.dtype if bits == FLOAT_VALUES else torch.uint8
    if any(e.values.dtype != value_dtype for e in entries):
        value_dtype = torch.float32
    bounds = [e.bound for e in entries]
    bitmaps = [e.bitmap for e in entries]
    return SparseStack(
        _int_table([e.segment for e in entries], torch.int32, device),
        masks,
        grouped,
        bits,
        _concat(bitmaps, torch.uint8, device),
        _int_table(_offsets(bitmaps), torch.int64, device),
        _int_table([e.salt for e in entries], torch.int64, device),
        _concat(bounds, torch.int32 if grouped else torch.int64, device),
        _int_table(_offsets(bounds), torch.int64, device),
        _int_table([e.dropout_group for e in entries], torch.int32, device),
        _concat([e.start for e in entries], torch.int64, device),
        _concat([e.values for e in entries], value_dtype, device),
        _int_table(_offsets([e.values for e in entries]), torch.int64, device),
        _concat([s.scale for s in slabs], torch.float32, device),
        _concat([s.zero for s in slabs], torch.float32, device),
        _int_table(_offsets([s.scale for s in slabs]), torch.int64, device),
        _int_table([s.group_size for s in slabs] or [1], torch.int32, device),
    )
