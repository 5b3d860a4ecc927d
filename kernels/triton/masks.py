"""The seeded masks of DARE and DeltaDQ, regenerated inside the kernels.

``key(i) = H(H(i) XOR salt)`` with ``H`` the lowbias32 finaliser and ``salt = H(seed XOR
φ·2**32)`` (:mod:`kernels.reference.prng`), on uint32 lanes whose products wrap mod 2**32.
H is a bijection of the 32-bit words, so the keys of distinct elements differ: an element
is kept exactly when its key is at most a bound (DARE: threshold - 1 for the whole matrix;
DeltaDQ: the ``keep``-th smallest key of its group), with no ties to break.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.reference.prng import check_mask_size, mask_salt

KEYS_BLOCK = 4096


@triton.jit
def lowbias32(x):
    """The lowbias32 finaliser of uint32 ``x``."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def keys_at(index, salt):
    """int64 keys in [0, 2**32) of int64 linear indices ``index`` (< 2**32)."""
    return lowbias32(lowbias32(index.to(tl.uint32)) ^ salt).to(tl.int64)


@triton.jit
def _keys_kernel(out, n, salt, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + index, keys_at(index, salt.to(tl.uint32)), mask=index < n)


def hash_keys(numel: int, seed: int, device: torch.device) -> Tensor:
    """(numel,) int64 keys: ``kernels.reference.hash_keys`` computed on ``device``."""
    salt = mask_salt(seed)
    check_mask_size(numel)
    out = torch.empty(numel, dtype=torch.int64, device=device)
    _keys_kernel[(max(1, int(triton.cdiv(numel, KEYS_BLOCK))),)](out, numel, salt, BLOCK=KEYS_BLOCK)
    return out
