"""``encode_exact``: bit-exact rebuilds at the narrowest width that pays, and an encoding
that keeps no second copy of the delta."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from compressor_svc.methods.lossless import encode_exact
from kernels.reference import EncodedTensor, PartDtype, rebuild

INT_OF = {2: torch.int16, 4: torch.int32}


def same_bits(a: Tensor, b: Tensor) -> bool:
    width = INT_OF[a.element_size()]
    return torch.equal(a.contiguous().view(width), b.contiguous().view(width))


def fine_tune(base: Tensor, scale: float, seed: int = 1) -> Tensor:
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(seed))
    return (base.float() + scale * noise).to(base.dtype)


def stored_bytes(encoded: EncodedTensor) -> int:
    return sum(len(p.data) for p in encoded.parts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rebuilds_the_fine_tune_bit_for_bit(dtype: torch.dtype) -> None:
    base = torch.randn(300, 70, generator=torch.Generator().manual_seed(0)).to(dtype)
    base[0, :5] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 65504.0]).to(dtype)
    tuned = fine_tune(base, 1e-3)
    tuned[0, 0], tuned[1, 1] = -0.0, 0.0  # a sign of zero flips; tiny values move
    encoded = encode_exact(base, tuned)
    assert same_bits(rebuild(base, encoded, dtype), tuned)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_delta_stays_half_with_its_few_misses_as_fix_ups(
    dtype: torch.dtype,
) -> None:
    base = torch.randn(512, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    tuned = fine_tune(base, 1e-3)
    encoded = encode_exact(base, tuned)
    parts = {p.name: p for p in encoded.parts}
    assert parts["delta"].dtype is PartDtype.for_torch(dtype)
    assert "fix.values" in parts  # some deltas do not fit a 16-bit float: kept exactly
    assert parts["fix.values"].numel < base.numel() // 100
    assert stored_bytes(encoded) < base.numel() * 2 * 1.02
    assert same_bits(rebuild(base, encoded, dtype), tuned)


def test_float32_is_kept_when_fix_ups_would_cost_more() -> None:
    # Weights far smaller than their base: a 16-bit delta lands on the base's grid, so
    # nearly every element would need a fix-up.
    base = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)).half()
    tuned = fine_tune(torch.zeros_like(base), 1e-3)
    encoded = encode_exact(base, tuned)
    assert {p.name: p for p in encoded.parts}["delta"].dtype is PartDtype.FLOAT32
    assert same_bits(rebuild(base, encoded, torch.float16), tuned)


def test_the_stored_delta_is_not_copied_into_bytes() -> None:
    base = torch.randn(64, 64).half()
    encoded = encode_exact(base, fine_tune(base, 1e-2))
    delta = {p.name: p for p in encoded.parts}["delta"]
    assert isinstance(delta.data, memoryview) and delta.data.readonly
    assert delta.data.nbytes == base.numel() * 2


def test_overwrite_writes_the_delta_over_the_fine_tune_and_still_rebuilds_it() -> None:
    base = torch.randn(128, 96, generator=torch.Generator().manual_seed(0)).bfloat16()
    tuned = fine_tune(base, 1e-2)
    expected = tuned.clone()
    encoded = encode_exact(base, tuned, overwrite=True)
    delta = {p.name: p for p in encoded.parts}["delta"]
    assert delta.dtype is PartDtype.BFLOAT16
    assert not same_bits(tuned, expected)  # the buffer now holds the delta
    assert same_bits(rebuild(base, encoded, torch.bfloat16), expected)


def test_without_overwrite_the_inputs_are_left_alone() -> None:
    base = torch.randn(64, 64).half()
    tuned = fine_tune(base, 1e-2)
    expected = tuned.clone()
    encode_exact(base, tuned)
    assert same_bits(tuned, expected)


def test_overwrite_falling_back_to_float32_restores_the_fine_tune_first() -> None:
    base = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)).half()
    tuned = fine_tune(torch.zeros_like(base), 1e-3)  # as above: float32 pays
    expected = tuned.clone()
    encoded = encode_exact(base, tuned, overwrite=True)
    assert {p.name: p for p in encoded.parts}["delta"].dtype is PartDtype.FLOAT32
    assert same_bits(tuned, expected)  # written over, then rebuilt bit for bit
    assert same_bits(rebuild(base, encoded, torch.float16), expected)


def test_blocks_of_a_large_tensor_encode_like_one() -> None:
    elements = (1 << 20) + 4099  # more than one block, the last a partial one
    base = torch.randn(elements, generator=torch.Generator().manual_seed(0)).half()
    tuned = fine_tune(base, 1e-3)
    expected = tuned.clone()
    encoded = encode_exact(base, tuned, overwrite=True)
    assert same_bits(rebuild(base, encoded, torch.float16), expected)
