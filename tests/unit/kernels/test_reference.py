"""Reference formats: bit packing, group quantization, seeded masks, encoded-tensor bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.reference import (
    BIT_TO_PACKING,
    EncodedTensor,
    Part,
    PartDtype,
    apply_delta,
    choose_qparams,
    dequantize,
    group_keep_counts,
    group_mask,
    hash_keys,
    pack,
    quantize,
    quantized_parts,
    read_quantized,
    threshold_for_count,
    threshold_mask,
    unpack,
)
from kernels.reference.prng import lowbias32

WIDTHS = list(range(1, 9))
FLOAT_DTYPES = [PartDtype.FLOAT16, PartDtype.BFLOAT16, PartDtype.FLOAT32]


def naive_bitstream(codes: list[int], bits: int) -> bytes:
    """The documented layout, built one bit at a time: code i at stream bits [i·b, (i+1)·b)."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, code in enumerate(codes):
        for k in range(bits):
            if code >> k & 1:
                pos = i * bits + k
                out[pos // 8] |= 1 << pos % 8
    return bytes(out)


# ---- packing -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", WIDTHS, ids=[f"{b}bit" for b in WIDTHS])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_pack_round_trip_and_layout(bits: int, data: st.DataObject) -> None:
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=67))
    tensor = torch.tensor(codes, dtype=torch.uint8)
    packed = pack(tensor, bits)
    assert packed.dtype == torch.uint8
    assert packed.numpy().tobytes() == naive_bitstream(codes, bits)
    assert torch.equal(unpack(packed, bits, len(codes)), tensor)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_lengths_every_width(n: int) -> None:
    for bits, (packer, unpacker) in BIT_TO_PACKING.items():
        codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8)
        packed = packer(codes)
        assert packed.numel() == (n * bits + 7) // 8
        assert torch.equal(unpacker(packed, n), codes)


def test_pack_rejects_out_of_range_and_bad_width() -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 3\]"):
        pack(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match=r"1\.\.8 bits"):
        pack(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 3, 5)


# ---- quantization --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 300),
    bits=st.integers(1, 8),
    group=st.sampled_from([1, 7, 32, 128]),
    scale=st.floats(1e-4, 10.0),
    seed=st.integers(0, 2**16),
)
def test_asymmetric_error_within_half_step(
    rows: int, cols: int, bits: int, group: int, *, scale: float, seed: int
) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    params = choose_qparams(w, bits, group)
    codes = quantize(w, params)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 1 << bits
    step, zero = params.expand(cols)
    # Half a step, plus the clamp the fp16 rounding of the zero point can cause: half an ulp
    # of z, i.e. at most |z| · 2**-11 steps (the scale is rounded up, so it never clamps).
    bound = step * (0.5 + zero.abs() * 2**-11) * (1 + 1e-5)
    assert bool(((dequantize(codes, params) - w).abs() <= bound).all())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_grid_is_symmetric_and_bounded(bits: int) -> None:
    w = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
    params = choose_qparams(w, bits, 64, symmetric=True)
    assert params.zero is None
    approx = dequantize(quantize(w, params), params)
    step, _ = params.expand(200)
    assert bool(((approx - w).abs() <= step * 0.5 * (1 + 1e-5)).all())
    assert torch.equal(dequantize(quantize(-w, params), params), -approx)


def test_constant_and_zero_groups_are_exact() -> None:
    w = torch.tensor([[0.25] * 5, [-3.0] * 5, [0.0] * 5])
    params = choose_qparams(w, 2, 5)
    assert torch.allclose(dequantize(quantize(w, params), params), w, rtol=1e-3)


def test_clip_search_never_worse_than_min_max() -> None:
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(2))
    for bits in (1, 2, 3):
        plain = choose_qparams(w, bits, 128)
        clipped = choose_qparams(w, bits, 128, clip_search=True)
        err_plain = (dequantize(quantize(w, plain), plain) - w).pow(2).sum()
        err_clip = (dequantize(quantize(w, clipped), clipped) - w).pow(2).sum()
        assert err_clip <= err_plain
    assert err_clip < 0.8 * err_plain  # at 3 bits and below clipping pays on Gaussians


def test_scale_overflow_names_the_fp16_limit() -> None:
    with pytest.raises(ValueError, match=r"torch.float16 limit 65504"):
        choose_qparams(torch.tensor([[-1e6, 1e6]]), 1, 2, scale_dtype=torch.float16)


@pytest.mark.parametrize("magnitude", [1e-7, 1e6])
def test_scales_outside_fp16_become_bfloat16_and_keep_precision(magnitude: float) -> None:
    """A tiny (or huge) delta quantizes as well as a unit one: bf16 scales, rounded up."""
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    unit = choose_qparams(w, 3, 128, clip_search=True)
    scaled = choose_qparams(w * magnitude, 3, 128, clip_search=True)
    assert unit.scale.dtype == torch.float16 and scaled.scale.dtype == torch.bfloat16
    err_unit = (dequantize(quantize(w, unit), unit) - w).norm() / w.norm()
    approx = dequantize(quantize(w * magnitude, scaled), scaled)
    err_scaled = (approx - w * magnitude).norm() / (w * magnitude).norm()
    assert float(err_scaled) <= 1.02 * float(err_unit)


def test_bfloat16_scales_round_trip_through_parts() -> None:
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 1e-7
    params = choose_qparams(w, 2, 32)
    encoded = EncodedTensor(
        "x", 1, (4, 64), "float32", {}, tuple(quantized_parts("w", quantize(w, params), params))
    )
    again = EncodedTensor.from_bytes(encoded.to_bytes())
    codes, read = read_quantized(again, "w", 32)
    assert again.part("w.scales").dtype is PartDtype.BFLOAT16
    assert torch.equal(read.scale, params.scale) and read.scale.dtype == torch.bfloat16
    assert torch.equal(dequantize(codes, read), dequantize(quantize(w, params), params))


# ---- seeded masks --------------------------------------------------------------------


def lowbias32_int(x: int) -> int:
    """Independent pure-int implementation of the generator, for cross-checking."""
    x ^= x >> 16
    x = x * 0x7FEB352D & 0xFFFFFFFF
    x ^= x >> 15
    x = x * 0x846CA68B & 0xFFFFFFFF
    return x ^ x >> 16


def test_hash_keys_match_integer_reference() -> None:
    seed = 0xDEADBEEF
    salt = lowbias32_int(seed ^ 0x9E3779B9)
    expected = [lowbias32_int(lowbias32_int(i) ^ salt) for i in range(300)]
    assert hash_keys(300, seed).tolist() == expected


def test_seeded_masks_are_pinned() -> None:
    # Regression pins: any change here breaks decoding of every stored dare/deltadq delta.
    assert hash_keys(8, 0).tolist() == [
        2926543089, 3818772927, 1864879796, 3485096659,
        2158521450, 392224323, 809497579, 2618145668,
    ]  # fmt: skip
    assert group_mask((2, 10), 1, 4, 2).int().tolist() == [
        [1, 0, 0, 1, 0, 1, 1, 0, 1, 0],
        [0, 0, 1, 1, 1, 0, 0, 1, 0, 1],
    ]


@pytest.mark.parametrize(
    ("cols", "group", "keep"), [(64, 8, 3), (70, 16, 5), (5, 8, 8), (33, 32, 1)]
)
def test_group_mask_keeps_exact_counts(cols: int, group: int, keep: int) -> None:
    mask = group_mask((6, cols), 7, group, keep)
    counts = group_keep_counts(cols, group, keep)
    for g, k in enumerate(counts):
        assert mask[:, g * group : (g + 1) * group].sum(dim=1).tolist() == [k] * 6
    if keep < group:
        assert not torch.equal(mask[0], mask[1])  # rows draw independently


def test_keys_and_masks_hashed_in_blocks_equal_one_pass() -> None:
    """Hashing in blocks (to bound memory) changes nothing, across a block boundary too."""
    numel, seed = (1 << 20) + 77, 0xFEED
    salt = lowbias32(torch.tensor([seed ^ 0x9E3779B9], dtype=torch.int64))
    one_pass = lowbias32(lowbias32(torch.arange(numel, dtype=torch.int64)) ^ salt)
    assert torch.equal(hash_keys(numel, seed), one_pass)
    ranked = torch.sort(one_pass).values
    for count in (0, 1, numel // 2, numel - 1):
        assert threshold_for_count(numel, seed, count) == int(ranked[count])
    threshold = int(ranked[numel // 3])
    assert torch.equal(threshold_mask((1, numel), seed, threshold)[0], one_pass < threshold)


def test_threshold_mask_keeps_requested_count() -> None:
    t = threshold_for_count(40 * 50, 3, 500)
    mask = threshold_mask((40, 50), 3, t)
    assert 495 <= int(mask.sum()) <= 500
    assert threshold_for_count(10, 3, 10) == 1 << 32


# ---- encoded tensor ------------------------------------------------------------------


@st.composite
def parts(draw: st.DrawFn) -> list[Part]:
    out = []
    for i in range(draw(st.integers(0, 4))):
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)))
        n = 1
        for d in shape:
            n *= d
        if draw(st.booleans()):
            bits = draw(st.integers(1, 8))
            codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8)
            out.append(Part.from_codes(f"p{i}", codes, bits))
        else:
            dtype = draw(st.sampled_from(FLOAT_DTYPES))
            out.append(Part.from_floats(f"p{i}", torch.randn(shape), dtype))
    return out


@settings(max_examples=60, deadline=None)
@given(
    parts=parts(),
    shape=st.lists(st.integers(1, 50), min_size=1, max_size=3),
    dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    params=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
def test_bytes_round_trip(
    parts: list[Part], shape: list[int], dtype: str, params: dict[str, str]
) -> None:
    encoded = EncodedTensor("m", 3, tuple(shape), dtype, params, tuple(parts))
    again = EncodedTensor.from_bytes(encoded.to_bytes())
    assert again == encoded
    assert again.nbits == sum(p.numel * p.dtype.bits for p in parts)
    for p, q in zip(parts, again.parts, strict=True):
        if p.dtype.is_code:
            assert torch.equal(p.codes(), q.codes())
        else:
            assert torch.equal(p.floats(), q.floats())


def test_float_part_is_exact_at_its_dtype() -> None:
    values = torch.randn(17).to(torch.bfloat16)
    part = Part.from_floats("x", values, PartDtype.BFLOAT16)
    assert torch.equal(part.floats(), values.float())
    assert part.nbits == 17 * 16


def test_from_bytes_rejects_damage() -> None:
    encoded = EncodedTensor("m", 1, (2,), "float32", {}, (Part.from_codes("c", torch.ones(5), 3),))
    data = encoded.to_bytes()
    with pytest.raises(ValueError, match="magic"):
        EncodedTensor.from_bytes(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="trailing"):
        EncodedTensor.from_bytes(data + b"\0")
    with pytest.raises(ValueError, match="needs 2 bytes"):
        EncodedTensor.from_bytes(data[:-1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_apply_delta_in_blocks_is_the_one_pass_sum_bit_for_bit(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1500, 1001, generator=generator).to(dtype).t()  # strided, > one block
    delta = 1e-2 * torch.randn(1001, 1500, generator=generator)
    one_pass = (base.float() + delta).to(dtype)
    blocked = apply_delta(base, delta, dtype)
    assert torch.equal(blocked.view(torch.uint8), one_pass.contiguous().view(torch.uint8))
