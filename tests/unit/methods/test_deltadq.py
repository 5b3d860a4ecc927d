"""DeltaDQ's separate quantization and its one-group-size-per-model mode."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from compressor_svc.methods import compress, paper_ratio, relative_activation_error
from compressor_svc.methods.deltadq import compress_model
from kernels.reference import EncodedTensor, decode


def heavy_tailed(d_out: int, d_in: int, seed: int) -> Tensor:
    """Student-t (3 degrees of freedom) entries: the heavy tails fine-tuning deltas have."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((d_out, d_in)) * 1e-3


def parts_of(encoded: EncodedTensor) -> int:
    return int(encoded.params["parts"])


def test_separate_parts_beat_plain_codes_on_heavy_tails() -> None:
    """At 4x plain codes must drop survivors; the split keeps them all at a finer grid."""
    delta = heavy_tailed(64, 256, seed=0)
    plain = compress(delta, "deltadq", ratio=4.0, parts=(1,))
    chosen = compress(delta, "deltadq", ratio=4.0)  # default parts (1, 2, 4)
    assert parts_of(plain) == 1 and parts_of(chosen) > 1
    assert 4.0 <= chosen.ratio <= 1.1 * 4.0
    gram = torch.eye(256) + torch.ones(256, 256)
    assert relative_activation_error(delta, decode(chosen), gram) < relative_activation_error(
        delta, decode(plain), gram
    )
    # The paper counts every survivor at the inner width: membership and positions are free.
    assert paper_ratio(chosen) > chosen.ratio


def test_bad_parts_rejected() -> None:
    with pytest.raises(ValueError, match="powers of two"):
        compress(torch.ones(8, 8), "deltadq", ratio=4.0, parts=(3,))


def test_model_mode_uses_one_group_size_chosen_by_the_probe() -> None:
    deltas = {"a": heavy_tailed(64, 256, seed=2), "b": heavy_tailed(32, 128, seed=3)}
    scores: list[float] = []

    def probe(approx: Mapping[str, Tensor]) -> float:
        # Rewards the *worst* reconstruction of "a": a choice the method's own proxy would
        # never make, so the winner can only be the probe's.
        error = float(torch.linalg.norm(approx["a"] - deltas["a"]))
        scores.append(-error)
        return -error

    out = compress_model(deltas, 16.0, probe=probe, dropout_groups=(16, 32, 64, 128), parts=(1,))
    assert len(scores) >= 2
    assert -float(torch.linalg.norm(decode(out["a"]) - deltas["a"])) == min(scores)
    assert out["a"].params["dropout_group"] == out["b"].params["dropout_group"]
    for name, encoded in out.items():
        assert 16.0 <= encoded.ratio <= 1.1 * 16.0, name


def test_model_mode_without_probe_caps_groups_at_each_width() -> None:
    deltas = {"wide": heavy_tailed(16, 512, seed=4), "narrow": heavy_tailed(16, 64, seed=5)}
    out = compress_model(deltas, 16.0, dropout_groups=(256,), parts=(1,))
    assert out["wide"].params["dropout_group"] == "256"
    assert out["narrow"].params["dropout_group"] == "64"


def test_model_mode_unreachable_ratio() -> None:
    with pytest.raises(ValueError, match="reaches"):
        compress_model({"a": heavy_tailed(8, 8, seed=6)}, 5000.0)


@pytest.mark.parametrize("parts", [(1,), (4,)])
def test_debias_removes_the_shrinkage_of_low_bit_codes(parts: tuple[int, ...]) -> None:
    delta = heavy_tailed(64, 256, seed=7)
    gram = torch.eye(256) + torch.ones(256, 256)

    def projection(encoded: EncodedTensor) -> float:
        approx = decode(encoded)
        return float(((delta @ gram) * approx).sum() / ((delta @ gram) * delta).sum())

    ratio = 8.0 if parts == (4,) else 16.0
    shrunk = compress(delta, "deltadq", ratio=ratio, gram=gram, parts=parts)
    unbiased = compress(delta, "deltadq", ratio=ratio, gram=gram, parts=parts, debias=True)
    assert projection(shrunk) < 0.95
    assert abs(projection(unbiased) - 1) < 2e-3  # fp16 rounding of the rescaled scales
    assert ratio <= unbiased.ratio  # the gain is folded into stored scales
