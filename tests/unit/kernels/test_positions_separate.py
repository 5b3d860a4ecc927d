"""Sparse index coding (Rice-coded gaps) and separate quantization: round trips, exact bits,
and the case where the split pays."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.reference import (
    CodedPositions,
    EncodedTensor,
    choose_qparams,
    decode_positions,
    dequantize,
    encode_positions,
    quantize,
    separate_dequantize,
    separate_quantize,
    separated_parts,
)
from kernels.reference.separate import read_separated


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_positions_round_trip(data: st.DataObject) -> None:
    length = data.draw(st.integers(1, 5000))
    chosen = data.draw(st.sets(st.integers(0, length - 1), max_size=200))
    positions = torch.tensor(sorted(chosen), dtype=torch.int64)
    coded = encode_positions(positions, length)
    assert coded.count == len(chosen)
    assert torch.equal(decode_positions(coded, length), positions)


def test_positions_bits_are_the_rice_count() -> None:
    positions = torch.tensor([3, 4, 20, 100])
    coded = encode_positions(positions, 128)
    gaps = [3, 0, 15, 79]
    k = coded.rice_parameter
    assert coded.nbits == sum((g >> k) + 1 + k for g in gaps)
    assert all(
        coded.nbits <= sum((g >> j) + 1 + j for g in gaps) for j in range(8)
    )  # k is the best


def test_positions_near_entropy_at_low_density() -> None:
    g = torch.Generator().manual_seed(0)
    length, density = 100_000, 0.05
    positions = torch.nonzero(torch.rand(length, generator=g) < density).view(-1)
    entropy = -(density * torch.log2(torch.tensor(density))) - (1 - density) * torch.log2(
        torch.tensor(1 - density)
    )
    assert encode_positions(positions, length).nbits <= 1.05 * float(entropy) * length


@pytest.mark.parametrize(
    ("positions", "message"),
    [([3, 3], "strictly increasing"), ([5, 2], "strictly increasing"), ([0, 10], r"\[0, 10\)")],
)
def test_positions_bad_input(positions: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_positions(torch.tensor(positions), 10)


def test_positions_corrupt_stream_is_refused() -> None:
    coded = encode_positions(torch.tensor([1, 5, 9]), 10)
    short = CodedPositions(coded.rice_parameter, coded.unary[:-1], coded.remainders)
    with pytest.raises(ValueError, match="gaps"):
        decode_positions(short, 10)
    with pytest.raises(ValueError, match="outside"):
        decode_positions(coded, 9)


def laplace(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs()) * 1e-3


@pytest.mark.parametrize(("bits", "extra"), [(1, 1), (2, 1), (2, 2), (3, 1), (1, 3), (4, 4)])
@pytest.mark.parametrize("n", [1, 127, 1000])
def test_separate_equals_the_fine_grid(bits: int, extra: int, n: int) -> None:
    values = laplace(n, seed=n)
    separated = separate_quantize(values, bits, extra, group_size=128)
    fine = choose_qparams(values.view(1, -1), bits + extra, 128, clip_search=True)
    expected = dequantize(quantize(values.view(1, -1), fine), fine).view(-1)
    assert torch.equal(separate_dequantize(separated), expected)
    assert separated.inner.numel() + separated.outer.numel() == n
    assert int(separated.inner.max()) < 1 << bits


def test_separate_parts_round_trip_and_exact_bits() -> None:
    values = laplace(3000, seed=1)
    separated = separate_quantize(values, 2, 2, group_size=256)
    parts = tuple(separated_parts("values", separated))
    encoded = EncodedTensor("deltadq", 1, (1, 3000), "float32", {}, parts)
    again = EncodedTensor.from_bytes(encoded.to_bytes())
    assert again.nbits == separated.nbits
    read = read_separated(again, "values", 256, 3000)
    assert torch.equal(separate_dequantize(read), separate_dequantize(separated))


def test_separate_pays_on_heavy_tails() -> None:
    """Laplacian values: 2-bit inner codes on a 3-bit grid cost under 3 bits per value and
    give exactly the 3-bit grid's error."""
    values = laplace(100_000, seed=2)
    separated = separate_quantize(values, 2, 1, group_size=128)
    assert separated.nbits / values.numel() < 3.0
    plain3 = choose_qparams(values.view(1, -1), 3, 128, clip_search=True)
    assert plain3.scale.numel() * 32 / values.numel() + 3 > separated.nbits / values.numel()


@pytest.mark.parametrize(("bits", "extra"), [(1, 0), (8, 1), (5, 4)])
def test_separate_rejects_bad_widths(bits: int, extra: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        separate_quantize(torch.ones(4), bits, extra, 4)
