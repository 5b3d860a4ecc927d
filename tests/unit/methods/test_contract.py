"""One contract for every lossy method: shape, exact bits, ratio window, monotone error,
bad input, byte round trip and use of calibration data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

from compressor_svc.methods import (
    RATIO_TOLERANCE,
    compress,
    get_method,
    paper_ratio,
    relative_activation_error,
    relative_weight_error,
)
from kernels.reference import EncodedTensor, decode


@dataclass(frozen=True)
class Case:
    method: str
    ratios: tuple[float, ...]
    """Reachable targets on a 128x256 delta, highest first."""
    unreachable: float
    options: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("bitdelta", (15.0, 7.9, 5.3), unreachable=40.0),
    Case("bitdelta", (14.0, 7.0), unreachable=10.0, options={"scale": "row"}),
    Case("dare", (32.0, 16.0, 8.0), unreachable=2.0),
    Case("dare", (16.0, 8.0), unreachable=1e6, options={"bits": 16}),
    Case("deltacome", (32.0, 16.0, 8.0), unreachable=2.0),
    Case("adamix", (32.0, 16.0, 8.0), unreachable=1.1),
    Case("deltadq", (128.0, 32.0, 16.0), unreachable=2000.0),
    Case("deltadq", (32.0, 8.0, 4.0), unreachable=2000.0, options={"parts": (4,)}),
]
IDS = [
    f"{c.method}-{'-'.join(f'{k}={v}' for k, v in c.options.items())}".rstrip("-") for c in CASES
]

PART_BITS = {f"uint{b}": b for b in range(1, 9)} | {"float16": 16, "bfloat16": 16, "float32": 32}

_cache: dict[tuple[str, float, bool, str], EncodedTensor] = {}


def encode(case: Case, delta: Tensor, ratio: float, gram: Tensor | None) -> EncodedTensor:
    key = (case.method, ratio, gram is not None, repr(case.options))
    if key not in _cache:
        _cache[key] = compress(delta, case.method, ratio=ratio, gram=gram, **case.options)
    return _cache[key]


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> Case:
    chosen: Case = request.param
    return chosen


def test_decode_shape_and_dtype(case: Case, delta: Tensor) -> None:
    out = decode(encode(case, delta, case.ratios[0], None))
    assert out.shape == delta.shape
    assert out.dtype == torch.float32


def test_nbits_recounted_from_bytes(case: Case, delta: Tensor) -> None:
    encoded = encode(case, delta, case.ratios[0], None)
    data = encoded.to_bytes()
    again = EncodedTensor.from_bytes(data)
    recount = sum(math.prod(p.shape) * PART_BITS[p.dtype.value] for p in again.parts)
    assert recount == encoded.nbits
    assert sum(len(p.data) for p in again.parts) == sum(math.ceil(p.nbits / 8) for p in again.parts)
    assert data.endswith(b"".join(p.data for p in again.parts))


def test_ratio_within_window(case: Case, delta: Tensor) -> None:
    for ratio in case.ratios:
        encoded = encode(case, delta, ratio, None)
        assert ratio <= encoded.ratio <= RATIO_TOLERANCE * ratio, (ratio, encoded.ratio)
        assert paper_ratio(encoded) >= encoded.ratio  # papers leave parts out, never add


def test_error_falls_as_ratio_falls(case: Case, delta: Tensor) -> None:
    errors = [
        relative_weight_error(delta, decode(encode(case, delta, r, None))) for r in case.ratios
    ]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < errors[0]


def test_bytes_round_trip_decodes_bit_identically(case: Case, delta: Tensor) -> None:
    encoded = encode(case, delta, case.ratios[1], None)
    again = EncodedTensor.from_bytes(encoded.to_bytes())
    assert again == encoded
    assert torch.equal(decode(again), decode(encoded))


BAD_INPUTS = [
    pytest.param(torch.ones(8), 16.0, "2-D", id="1-D"),
    pytest.param(torch.ones(2, 8, 8), 16.0, "2-D", id="3-D"),
    pytest.param(torch.ones(0, 8), 16.0, "at least one element", id="empty"),
    pytest.param(torch.full((8, 8), math.nan), 16.0, "finite", id="nan"),
    pytest.param(torch.full((8, 8), math.inf), 16.0, "finite", id="inf"),
    pytest.param(torch.ones(8, 8), 1.0, "ratio > 1", id="ratio-1"),
    pytest.param(torch.ones(8, 8), 0.5, "ratio > 1", id="ratio-below-1"),
    pytest.param(torch.ones(8, 8), math.inf, "ratio > 1", id="ratio-inf"),
]


@pytest.mark.parametrize(("bad", "ratio", "message"), BAD_INPUTS)
def test_bad_input_raises(case: Case, bad: Tensor, ratio: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compress(bad, case.method, ratio=ratio, **case.options)


def test_unreachable_ratio_names_the_limit(case: Case, delta: Tensor) -> None:
    with pytest.raises(ValueError, match=r"\d+(\.\d+)?x"):
        compress(delta, case.method, ratio=case.unreachable, **case.options)


def test_unknown_option_is_named(case: Case, delta: Tensor) -> None:
    with pytest.raises(ValueError, match="no option"):
        compress(delta, case.method, ratio=case.ratios[0], colour="red")


def test_gram_does_not_hurt_activation_error(
    case: Case, delta: Tensor, gram: Tensor, held_out_gram: Tensor
) -> None:
    if not get_method(case.method).uses_gram:
        pytest.skip(f"{case.method} is data-free")
    ratio = case.ratios[1]
    blind = relative_activation_error(
        delta, decode(encode(case, delta, ratio, None)), held_out_gram
    )
    informed = relative_activation_error(
        delta, decode(encode(case, delta, ratio, gram)), held_out_gram
    )
    assert informed <= blind * 1.01, (informed, blind)


# ---- lossless: exact, no target ratio ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lossless_is_exact(dtype: torch.dtype, delta: Tensor) -> None:
    source = delta.to(dtype)
    encoded = compress(source, "lossless", ratio=None)
    assert torch.equal(decode(EncodedTensor.from_bytes(encoded.to_bytes())), source.float())
    assert encoded.nbits == source.numel() * source.element_size() * 8
    assert encoded.dtype == str(dtype).removeprefix("torch.")


def test_lossless_refuses_a_target_ratio(delta: Tensor) -> None:
    with pytest.raises(ValueError, match="ratio=None"):
        compress(delta, "lossless", ratio=16.0)


def test_unknown_method_lists_known_ones(delta: Tensor) -> None:
    with pytest.raises(ValueError, match="adamix"):
        compress(delta, "zip", ratio=16.0)
