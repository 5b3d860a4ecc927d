"""Kernel tests: every buffer torch allocates uninitialised is poisoned (NaN for floats, the
largest value for integers), so an output element a kernel fails to write fails the test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kernels.dispatch import BACKEND_ENV


@pytest.fixture(autouse=True)
def poisoned_allocations() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the Triton kernels, on CPU tensors through the interpreter."""
    monkeypatch.setenv(BACKEND_ENV, "triton")
