"""Synthetic deltas: low rank plus noise, with a non-isotropic calibration Gram matrix."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor


def low_rank_plus_noise(d_out: int, d_in: int, seed: int, scale: float = 1e-2) -> Tensor:
    """A (d_out, d_in) delta: rank-8 signal with a decaying spectrum plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(d_out, 8, generator=g) * torch.logspace(0, -1, 8)
    signal = signal @ torch.randn(8, d_in, generator=g) * 0.3
    return (signal + 0.1 * torch.randn(d_out, d_in, generator=g)) * scale


def calibration_inputs(d_in: int, n: int, seed: int) -> Tensor:
    """(d_in, n) inputs: channel scales spread over two decades and a shared mean, as LLM
    activations have (outlier channels, non-zero mean after the norm)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_in, n, generator=g) * torch.logspace(-1, 1, d_in).unsqueeze(1) + 0.5


def gram_of(x: Tensor) -> Tensor:
    return x @ x.T / x.shape[1]


@pytest.fixture(scope="session")
def delta() -> Tensor:
    return low_rank_plus_noise(128, 256, seed=0)


@pytest.fixture(scope="session")
def gram() -> Tensor:
    return gram_of(calibration_inputs(256, 1024, seed=1))


@pytest.fixture(scope="session")
def held_out_gram() -> Tensor:
    """Disjoint inputs for reporting (SCIENCE.md pitfall 16)."""
    return gram_of(calibration_inputs(256, 1024, seed=2))
