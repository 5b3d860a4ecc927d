"""The input checks every tensor passes before it is encoded: exact zero deltas, NaN/Inf."""

from __future__ import annotations

import pytest
import torch

from compressor_svc.errors import InvalidInput
from compressor_svc.pipeline import TensorInput, bitwise_equal, check_inputs


def pair(base: torch.Tensor, finetuned: torch.Tensor) -> TensorInput:
    return TensorInput("w", base, finetuned, None, None)


def test_equal_tensors_are_a_zero_delta_but_a_sign_of_zero_is_not() -> None:
    base = torch.tensor([0.0, 1.5, -2.0]).half()
    assert check_inputs(pair(base, base.clone())) == (True, "float16")
    negative_zero = base.clone()
    negative_zero[0] = -0.0
    assert torch.equal(base, negative_zero)  # numerically equal, yet not the same bits
    assert check_inputs(pair(base, negative_zero)) == (False, "float16")


@pytest.mark.parametrize("numel", [1, 3, 6, 8, 4099])
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_bitwise_equal_at_any_size_and_offset(numel: int, offset: int) -> None:
    data = torch.randn(numel + offset).half()[offset:]
    changed = data.clone()
    changed[-1] = changed[-1] + 1
    assert bitwise_equal(data, data.clone())
    assert not bitwise_equal(data, changed)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_non_finite_values_are_refused_naming_the_side(bad: float, dtype: torch.dtype) -> None:
    base = torch.randn(64, 64).to(dtype)
    tuned = base.clone()
    tuned[3, 5] = bad
    with pytest.raises(InvalidInput, match=r"'w': fine-tuned has 1 NaN/Inf"):
        check_inputs(pair(base, tuned))


def test_finite_values_whose_sum_overflows_are_accepted() -> None:
    base = torch.full((4096,), 60000.0, dtype=torch.float16)  # sums to Inf in fp16
    tuned = base.clone()
    tuned[0] = 50000.0
    assert check_inputs(pair(base, tuned)) == (False, "float16")
