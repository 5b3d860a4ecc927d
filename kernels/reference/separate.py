"""Separate quantization: a dense inner part at ``bits`` and a sparse outer part.

A sequence of values (DeltaDQ's survivors) is quantized group-wise on a *fine* grid of
``bits + extra`` bits (the usual min-max grid with fp16 scale and zero, :mod:`.quant`). In
each group, the window of ``2**bits`` consecutive fine levels that holds the most values is
the inner part: those values store only their offset in the window (``bits`` bits) and the
group stores the window's first level. The rest, the outer part, store their full fine code
plus their position in the sequence, Rice-coded (:mod:`.positions`). So the inner values get
the precision of ``bits + extra`` bits at the price of ``bits``, and the outer ones pay for
their membership explicitly: nothing about the split is left out of the count.

It pays where values concentrate: deltas are heavy-tailed, so a window of a quarter of the
range (``extra = 2``) typically holds most of a group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.reference.encoded import EncodedTensor, Part, PartDtype, read_qparams
from kernels.reference.positions import (
    CodedPositions,
    decode_positions,
    encode_positions,
    position_parts,
    read_position_parts,
)
from kernels.reference.quant import (
    QuantParams,
    choose_qparams,
    dequantize,
    n_groups,
    quantize,
)


@dataclass(frozen=True)
class SeparatedCodes:
    """A separately quantized sequence of ``length`` values.

    params: the fine grid, (1, n_groups) scale/zero at ``bits + extra`` bits.
    window: (n_groups,) uint8 first fine level of each group's inner window.
    inner: (n_inner,) uint8 offsets in the window, in sequence order, ``bits`` bits each.
    outer: (n_outer,) uint8 fine codes of the outer values, in sequence order.
    positions: where the outer values sit in the sequence.
    """

    bits: int
    length: int
    params: QuantParams
    window: Tensor
    inner: Tensor
    outer: Tensor
    positions: CodedPositions

    @property
    def fine_bits(self) -> int:
        return self.params.bits

    @property
    def nbits(self) -> int:
        """Exact payload bits: codes, window starts, fine scales and zeros, positions."""
        groups = self.window.numel()
        scale_zero = groups * (16 if self.params.zero is None else 32)
        return (
            self.inner.numel() * self.bits
            + (groups + self.outer.numel()) * self.fine_bits
            + scale_zero
            + self.positions.nbits
        )


def _best_windows(codes: Tensor, group_size: int, fine_bits: int, bits: int) -> Tensor:
    """(n_groups,) the window start holding the most codes of each group (first on ties)."""
    levels, width = 1 << fine_bits, 1 << bits
    groups = n_groups(codes.numel(), group_size)
    group_of = torch.arange(codes.numel()) // group_size
    histogram = torch.zeros(groups * levels, dtype=torch.int64)
    histogram.index_add_(0, group_of * levels + codes.to(torch.int64), torch.ones_like(group_of))
    cumulative = torch.cat(
        [torch.zeros(groups, 1, dtype=torch.int64), histogram.view(groups, levels).cumsum(1)],
        dim=1,
    )
    held = cumulative[:, width:] - cumulative[:, : levels - width + 1]
    return held.argmax(dim=1).to(torch.uint8)


def separate_quantize(values: Tensor, bits: int, extra: int, group_size: int) -> SeparatedCodes:
    """Quantize (n,) fp32 ``values`` into an inner part at ``bits`` and an outer part."""
    if extra < 1 or not 1 <= bits <= 8 - extra:
        raise ValueError(f"need 1 ≤ extra and bits + extra ≤ 8, got bits={bits}, extra={extra}")
    row = values.float().view(1, -1)
    params = choose_qparams(row, bits + extra, group_size, clip_search=True)
    codes = quantize(row, params).view(-1)
    window = _best_windows(codes, group_size, bits + extra, bits)
    start = window.to(torch.int64).repeat_interleave(group_size)[: codes.numel()]
    offset = codes.to(torch.int64) - start
    inside = (offset >= 0) & (offset < 1 << bits)
    outer_at = torch.nonzero(~inside).view(-1)
    return SeparatedCodes(
        bits,
        codes.numel(),
        params,
        window,
        offset[inside].to(torch.uint8),
        codes[outer_at],
        encode_positions(outer_at, codes.numel()),
    )


def separate_dequantize(separated: SeparatedCodes) -> Tensor:
    """(length,) fp32 values of a separately quantized sequence."""
    return dequantize(separate_codes(separated).view(1, -1), separated.params).view(-1)


def separate_codes(separated: SeparatedCodes) -> Tensor:
    """(length,) uint8 codes on the fine grid: each inner offset plus its group's window
    start, each outer code at its position."""
    length, group_size = separated.length, separated.params.group_size
    outer_at = decode_positions(separated.positions, length)
    if outer_at.numel() != separated.outer.numel():
        raise ValueError(
            f"{outer_at.numel()} outer positions for {separated.outer.numel()} outer codes"
        )
    inside = torch.ones(length, dtype=torch.bool)
    inside[outer_at] = False
    if int(inside.sum()) != separated.inner.numel():
        raise ValueError(
            f"{int(inside.sum())} inner positions for {separated.inner.numel()} inner codes"
        )
    start = separated.window.to(torch.int64).repeat_interleave(group_size)[:length]
    codes = torch.empty(length, dtype=torch.int64)
    codes[inside] = separated.inner.to(torch.int64) + start[inside]
    codes[outer_at] = separated.outer.to(torch.int64)
    if bool((codes >= 1 << separated.fine_bits).any()):
        raise ValueError(f"an inner code overflows the {separated.fine_bits}-bit fine grid")
    return codes.to(torch.uint8)


def separated_parts(prefix: str, separated: SeparatedCodes) -> list[Part]:
    """The parts of a separately quantized sequence under ``prefix``:

    ``.codes`` (n_inner,) uint{bits}; ``.scales``/``.zeros`` (1, n_groups) of the fine grid (as in
    :func:`quantized_parts`); ``.window`` (n_groups,) and ``.outer`` (n_outer,) uint{fine bits};
    ``.outer_unary`` (n_unary,) and ``.outer_remainders`` (n_outer, k) uint1.
    """
    fine, params = separated.fine_bits, separated.params
    parts = [
        Part.from_codes(f"{prefix}.codes", separated.inner, separated.bits),
        Part.from_floats(f"{prefix}.scales", params.scale, PartDtype.for_torch(params.scale.dtype)),
    ]
    if params.zero is not None:
        parts.append(Part.from_floats(f"{prefix}.zeros", params.zero, PartDtype.FLOAT16))
    return [
        *parts,
        Part.from_codes(f"{prefix}.window", separated.window, fine),
        Part.from_codes(f"{prefix}.outer", separated.outer, fine),
        *position_parts(f"{prefix}.outer", separated.positions),
    ]


def is_separated(encoded: EncodedTensor, prefix: str) -> bool:
    return any(p.name == f"{prefix}.window" for p in encoded.parts)


def read_separated(
    encoded: EncodedTensor, prefix: str, group_size: int, length: int
) -> SeparatedCodes:
    """Inverse of :func:`separated_parts` for a sequence of ``length`` values."""
    inner, window = encoded.part(f"{prefix}.codes"), encoded.part(f"{prefix}.window")
    params = read_qparams(encoded, prefix, window.dtype.bits, group_size)
    positions = read_position_parts(encoded, f"{prefix}.outer")
    return SeparatedCodes(
        inner.dtype.bits,
        length,
        params,
        window.codes(),
        inner.codes(),
        encoded.part(f"{prefix}.outer").codes(),
        positions,
    )
