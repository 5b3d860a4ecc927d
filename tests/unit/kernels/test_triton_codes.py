"""Triton quantize/pack/unpack/dequantize against the reference, bit for bit, on the CPU
through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.triton import codes as triton_codes
from kernels.triton import masks as triton_masks

WIDTHS = list(range(1, 9))
SHAPES_AND_GROUPS = [((1, 1), 1), ((1, 37), 8), ((5, 130), 128), ((33, 67), 7), ((3, 45), 45)]
INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random_matrix(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.02 + 0.001).to(dtype)


def _params(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> reference.QuantParams:
    return reference.choose_qparams(w.float(), bits, group_size, symmetric=symmetric)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize(("shape", "group_size"), SHAPES_AND_GROUPS)
def test_quantize_matches_reference(
    bits: int, symmetric: bool, shape: tuple[int, int], group_size: int
) -> None:
    w = _random_matrix(shape, torch.float32, seed=bits * 31 + group_size)
    params = _params(w, bits, group_size, symmetric)
    expected = reference.quantize(w, params)
    assert torch.equal(triton_codes.quantize(w, params), expected)
    assert torch.equal(triton_codes.quantize_packed(w, params), reference.pack(expected, bits))


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_quantize_reads_every_float_dtype(dtype: torch.dtype, bits: int) -> None:
    w = _random_matrix((9, 70), dtype, seed=7)
    params = _params(w, bits, 16, symmetric=False)
    assert torch.equal(triton_codes.quantize(w, params), reference.quantize(w.float(), params))


def test_quantize_rounds_ties_to_even() -> None:
    # Scale 1 and zero 0.5 put w = k exactly on k + 0.5: ties, which torch.round sends to even.
    w = torch.arange(-4.0, 4.0).view(1, 8)
    params = reference.QuantParams(
        8, 8, torch.ones(1, 1, dtype=torch.float16), torch.full((1, 1), 4.5, dtype=torch.float16)
    )
    assert torch.equal(triton_codes.quantize(w, params), reference.quantize(w, params))


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001, 9000])
def test_pack_and_unpack_match_reference(bits: int, n: int) -> None:
    generator = torch.Generator().manual_seed(n * 8 + bits)
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, generator=generator)
    packed = triton_codes.pack(codes, bits)
    assert torch.equal(packed, reference.pack(codes, bits))
    assert torch.equal(triton_codes.unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize(("shape", "group_size"), SHAPES_AND_GROUPS)
def test_dequantize_matches_reference(
    bits: int, symmetric: bool, shape: tuple[int, int], group_size: int
) -> None:
    w = _random_matrix(shape, torch.float32, seed=bits + 100 * group_size)
    params = _params(w, bits, group_size, symmetric)
    codes = reference.quantize(w, params)
    expected = reference.dequantize(codes, params)
    assert torch.equal(triton_codes.dequantize(codes, params), expected)
    packed = reference.pack(codes, bits)
    for dtype in INPUT_DTYPES:
        out = triton_codes.dequantize_packed(packed, shape, params, dtype)
        assert out.dtype == dtype
        assert torch.equal(out, expected.to(dtype))


def test_bfloat16_scales_are_read_as_stored() -> None:
    w = _random_matrix((4, 64), torch.float32, seed=3) * 1e-5  # fp16 cannot hold the scales
    params = _params(w, 4, 32, symmetric=False)
    assert params.scale.dtype == torch.bfloat16
    codes = triton_codes.quantize(w, params)
    assert torch.equal(codes, reference.quantize(w, params))
    assert torch.equal(triton_codes.dequantize(codes, params), reference.dequantize(codes, params))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        triton_codes.pack(torch.tensor([0, 4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="need 2 bytes"):
        triton_codes.unpack(torch.zeros(3, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match=r"1\.\.8"):
        triton_codes.pack(torch.zeros(3, dtype=torch.uint8), 9)
    w = _random_matrix((4, 64), torch.float32, seed=5)
    with pytest.raises(ValueError, match="do not fit"):
        triton_codes.quantize(w, _params(w[:, :32], 4, 32, symmetric=False))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1])
@pytest.mark.parametrize("numel", [1, 1000, 70001])
def test_mask_keys_match_reference(seed: int, numel: int) -> None:
    keys = triton_masks.hash_keys(numel, seed, torch.device("cpu"))
    assert torch.equal(keys, reference.hash_keys(numel, seed))
