"""Which implementation runs a kernel: Triton on CUDA tensors, the torch reference elsewhere.

``DELTAVAULT_KERNELS=triton`` or ``=reference`` forces a backend. Forcing Triton on CPU
tensors needs Triton's interpreter (``TRITON_INTERPRET=1``, set before ``triton`` is
imported), which is how the test suite runs every kernel on a machine without a GPU.
"""

from __future__ import annotations

import enum
import os

from torch import Tensor

BACKEND_ENV = "DELTAVAULT_KERNELS"
INTERPRET_ENV = "TRITON_INTERPRET"


class Backend(enum.StrEnum):
    TRITON = "triton"
    REFERENCE = "reference"


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter."""
    return os.environ.get(INTERPRET_ENV, "") not in ("", "0")


def forced_backend() -> Backend | None:
    """The backend ``DELTAVAULT_KERNELS`` names, or None when it is unset or empty."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value:
        return None
    try:
        return Backend(value)
    except ValueError:
        raise ValueError(
            f"{BACKEND_ENV}={value!r}: use {' or '.join(b.value for b in Backend)}"
        ) from None


def backend_for(*tensors: Tensor) -> Backend:
    """The backend for an operation on ``tensors`` (all on one device)."""
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"tensors are on several devices: {sorted(devices)}")
    on_cuda = devices == {"cuda"}
    forced = forced_backend()
    if forced is Backend.TRITON and not on_cuda and not interpreting():
        raise ValueError(
            f"{BACKEND_ENV}=triton on {sorted(devices) or ['no']} tensors needs CUDA tensors, "
            f"or {INTERPRET_ENV}=1 set before triton is imported"
        )
    if forced is not None:
        return forced
    return Backend.TRITON if on_cuda else Backend.REFERENCE
