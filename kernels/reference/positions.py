"""Sparse index coding: sorted positions in ``[0, length)`` as Rice-coded gaps.

A sparse set of positions (the outliers of a quantized sequence, say) is stored as the gaps
between consecutive positions, ``gap_0 = pos_0`` and ``gap_i = pos_i - pos_{i-1} - 1``, each
split by a Rice parameter ``k`` into a quotient ``gap >> k`` and a remainder ``gap & (2**k-1)``.
Two bit streams hold them, so that both directions are vectorised:

- ``unary`` (uint1, Σ quotients + count bits): each quotient as that many 1 bits, then a 0;
- ``remainders`` (uint1, count x k bits): each remainder's k bits, least significant first.

For positions spread uniformly at density f the best k is about log2(1/f), and a position then
costs about ``k + 2`` bits, within 0.1 bit of the entropy of a Bernoulli(f) membership at the
densities that matter here (f ≤ 1/4). :func:`rice_parameter` picks the exact best k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.reference.encoded import EncodedTensor, Part

MAX_RICE_PARAMETER = 31


@dataclass(frozen=True)
class CodedPositions:
    """Rice-coded positions: ``unary`` (n_unary,) and ``remainders`` (count, k) uint8 bits."""

    rice_parameter: int
    unary: Tensor
    remainders: Tensor

    @property
    def count(self) -> int:
        return int(self.remainders.shape[0])

    @property
    def nbits(self) -> int:
        return self.unary.numel() + self.remainders.numel()


def _gaps(positions: Tensor, length: int) -> Tensor:
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1-D, got shape {tuple(positions.shape)}")
    pos = positions.to(torch.int64)
    if pos.numel() and (int(pos[0]) < 0 or int(pos[-1]) >= length):
        raise ValueError(f"positions must lie in [0, {length}), got {int(pos[0])}..{int(pos[-1])}")
    gaps = torch.diff(pos, prepend=torch.tensor([-1])) - 1
    if bool((gaps < 0).any()):
        raise ValueError("positions must be strictly increasing")
    return gaps


def coded_bits(gaps: Tensor, k: int) -> int:
    """Exact bits of ``gaps`` Rice-coded with parameter ``k``."""
    return int((gaps >> k).sum()) + gaps.numel() * (k + 1)


def rice_parameter(gaps: Tensor) -> int:
    """The k in 0..31 that codes ``gaps`` in the fewest bits (the smallest such k)."""
    if gaps.numel() == 0:
        return 0
    costs = [coded_bits(gaps, k) for k in range(MAX_RICE_PARAMETER + 1)]
    return min(range(len(costs)), key=costs.__getitem__)


def encode_positions(positions: Tensor, length: int) -> CodedPositions:
    """Code strictly increasing ``positions`` (int, 1-D) in ``[0, length)``."""
    gaps = _gaps(positions, length)
    k = rice_parameter(gaps)
    quotients = gaps >> k
    # Each gap's terminating 0 sits after its quotient's 1s: at cumsum(q + 1) - 1.
    unary = torch.ones(int(quotients.sum()) + gaps.numel(), dtype=torch.uint8)
    unary[torch.cumsum(quotients + 1, dim=0) - 1] = 0
    shifts = torch.arange(k, dtype=torch.int64)
    remainders = ((gaps.unsqueeze(1) >> shifts) & 1).to(torch.uint8)
    return CodedPositions(k, unary, remainders)


def decode_positions(coded: CodedPositions, length: int) -> Tensor:
    """(count,) int64 positions; ValueError if the streams are inconsistent or overrun."""
    k, count = coded.rice_parameter, coded.count
    if not 0 <= k <= MAX_RICE_PARAMETER or tuple(coded.remainders.shape) != (count, k):
        raise ValueError(f"remainders {tuple(coded.remainders.shape)} do not fit count and k={k}")
    terminators = torch.nonzero(coded.unary == 0).view(-1)
    if terminators.numel() != count or (count and int(terminators[-1]) != coded.unary.numel() - 1):
        raise ValueError(f"unary stream holds {terminators.numel()} gaps, expected {count}")
    quotients = torch.diff(terminators, prepend=torch.tensor([-1])) - 1
    weights = torch.ones(k, dtype=torch.int64) << torch.arange(k, dtype=torch.int64)
    gaps = (quotients << k) + (coded.remainders.to(torch.int64) * weights).sum(dim=1)
    positions = torch.cumsum(gaps + 1, dim=0) - 1
    if count and int(positions[-1]) >= length:
        raise ValueError(f"decoded position {int(positions[-1])} is outside [0, {length})")
    return positions


def position_parts(prefix: str, coded: CodedPositions) -> list[Part]:
    """Parts ``{prefix}_unary`` (n_unary,) and ``{prefix}_remainders`` (count, k), uint1."""
    return [
        Part.from_codes(f"{prefix}_unary", coded.unary, 1),
        Part.from_codes(f"{prefix}_remainders", coded.remainders, 1),
    ]


def read_position_parts(encoded: EncodedTensor, prefix: str) -> CodedPositions:
    """Inverse of :func:`position_parts`."""
    remainders = encoded.part(f"{prefix}_remainders").codes()
    if remainders.dim() != 2:
        raise ValueError(f"{prefix}_remainders must be 2-D, got {tuple(remainders.shape)}")
    unary = encoded.part(f"{prefix}_unary").codes()
    return CodedPositions(int(remainders.shape[1]), unary, remainders)
