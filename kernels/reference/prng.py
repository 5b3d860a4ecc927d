"""Counter-based pseudo-random numbers that regenerate bit-identically on any machine.

A seeded mask costs no index bits only if every decoder, on any CPU or GPU and any torch
version, rebuilds exactly the same positions. Library generators (torch's Mersenne Twister,
``randperm``) give no such promise across versions or devices, so masks come from a hash of
the element's linear index instead: ``key(i) = H(H(i) XOR H(seed XOR φ))`` with ``H`` the
"lowbias32" integer finaliser (C. Wellons, 2018; xor-shift-multiply on 32-bit words).

All arithmetic is on non-negative int64 holding 32-bit values; products are split into 16-bit
halves so that no intermediate exceeds 2**49 (no signed overflow, which C++ leaves undefined).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

PRNG_NAME = "lowbias32-hash"
PRNG_VERSION = 1
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
"""φ·2**32: keeps seed 0 from salting with H(0) = 0, which would pin key(0) to 0."""


def _mul_u32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32) and a 32-bit constant ``c``."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * (c & 0xFFFF)) & 0xFFFF) << 16)) & _MASK32


def lowbias32(x: Tensor) -> Tensor:
    """The lowbias32 finaliser, elementwise on int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul_u32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_u32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mask_salt(seed: int) -> int:
    """``H(seed XOR φ)``: the word every key of a seed's mask is salted with."""
    if not 0 <= seed <= _MASK32:
        raise ValueError(f"seed must be a 32-bit unsigned integer, got {seed}")
    return int(lowbias32(torch.tensor([seed ^ _GOLDEN], dtype=torch.int64))[0])


def check_mask_size(numel: int) -> None:
    if numel >= 1 << 32:
        raise ValueError(f"masks address at most 2**32 elements, got {numel}")


_INT32_SHIFT = 1 << 31
_BUCKET_SHIFT = 16
_BUCKETS = 1 << (32 - _BUCKET_SHIFT)
_KEY_BLOCK = 1 << 20
"""Keys hashed per step: the finaliser's int64 temporaries stay a few MiB whatever the
tensor (hashing 8M keys at once held ~300 MiB of them)."""


def hash_keys(numel: int, seed: int) -> Tensor:
    """(numel,) int64 keys, uniform on [0, 2**32), one per linear index 0..numel-1."""
    check_mask_size(numel)
    keys = torch.empty(numel, dtype=torch.int64)
    for start, block in _key_blocks(numel, seed):
        keys[start : start + len(block)] = block
    return keys


def _key_blocks(numel: int, seed: int) -> Iterator[tuple[int, Tensor]]:
    """(first index, keys) of consecutive blocks of at most ``_KEY_BLOCK`` keys."""
    salt = mask_salt(seed)
    for start in range(0, numel, _KEY_BLOCK):
        index = torch.arange(start, min(start + _KEY_BLOCK, numel), dtype=torch.int64)
        yield start, lowbias32(lowbias32(index) ^ salt)


def prng_params(seed: int) -> dict[str, str]:
    """The decode parameters that name a seeded mask's generator."""
    return {"prng": PRNG_NAME, "prng_version": str(PRNG_VERSION), "seed": str(seed)}


def check_prng(params: dict[str, str]) -> int:
    """The seed of a mask written by this generator; ValueError for any other generator."""
    name, version = params.get("prng"), params.get("prng_version")
    if name != PRNG_NAME or version != str(PRNG_VERSION):
        raise ValueError(
            f"mask generator {name} v{version} is not supported; this build decodes "
            f"{PRNG_NAME} v{PRNG_VERSION}"
        )
    return int(params["seed"])


def threshold_mask(shape: tuple[int, int], seed: int, threshold: int) -> Tensor:
    """(rows, cols) bool: elements whose key is below ``threshold`` (DARE's drop mask).

    Every element is kept independently with probability threshold / 2**32, as a Bernoulli
    draw; choosing ``threshold`` from the keys themselves fixes the kept count exactly.
    """
    rows, cols = shape
    check_mask_size(rows * cols)
    mask = torch.empty(rows * cols, dtype=torch.bool)
    for start, block in _key_blocks(rows * cols, seed):
        mask[start : start + len(block)] = block < threshold
    return mask.view(rows, cols)


def threshold_for_count(numel: int, seed: int, count: int) -> int:
    """The largest threshold keeping at most ``count`` of ``numel`` keys (ties dropped)."""
    if count >= numel:
        return 1 << 32
    # The count-th smallest key (0-based) without sorting them all (a sort holds two more
    # copies): a histogram of the keys' top 16 bits finds the bucket holding the answer,
    # and only that bucket's keys (about numel / 65536) are sorted.
    ranked = ranked_keys(numel, seed)
    histogram = torch.zeros(_BUCKETS, dtype=torch.int64)
    for start in range(0, numel, _KEY_BLOCK):
        top = (ranked[start : start + _KEY_BLOCK] >> _BUCKET_SHIFT) + _BUCKETS // 2
        histogram += torch.bincount(top, minlength=_BUCKETS)
    cumulative = histogram.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, count, right=True))
    below = int(cumulative[bucket - 1]) if bucket else 0
    members = ranked[(ranked >> _BUCKET_SHIFT) == bucket - _BUCKETS // 2]
    return int(torch.sort(members).values[count - below]) + _INT32_SHIFT


def ranked_keys(numel: int, seed: int) -> Tensor:
    """(numel,) int32: :func:`hash_keys` minus 2**31, which orders (and ties) the elements
    exactly as the keys do, in half the bytes. For masks that rank keys, not read them."""
    check_mask_size(numel)
    ranked = torch.empty(numel, dtype=torch.int32)
    for start, block in _key_blocks(numel, seed):
        ranked[start : start + len(block)] = block - _INT32_SHIFT
    return ranked


def group_keep_counts(cols: int, group_size: int, keep: int) -> list[int]:
    """Kept count per group along a row: ``keep`` per full group; the tail keeps its share.

    A tail of t < group_size columns keeps max(1, round(t·keep/group_size)) so no tail is
    dropped whole (that would bias the row sum, since there is nothing to rescale).
    """
    n_full, tail = divmod(cols, group_size)
    counts = [keep] * n_full
    if tail:
        counts.append(min(tail, max(1, round(tail * keep / group_size))))
    return counts


def group_mask(shape: tuple[int, int], seed: int, group_size: int, keep: int) -> Tensor:
    """(rows, cols) bool: in each row, each group of ``group_size`` columns keeps exactly
    ``keep`` elements (the tail group its share), chosen uniformly without replacement as the
    ones with the smallest keys (DeltaDQ's group-wise dropout)."""
    rows, cols = shape
    return group_mask_from_keys(hash_keys(rows * cols, seed).view(rows, cols), group_size, keep)


def group_mask_from_keys(keys: Tensor, group_size: int, keep: int) -> Tensor:
    """:func:`group_mask` for (rows, cols) keys already drawn with :func:`hash_keys` (or
    :func:`ranked_keys`: the same mask), so that an encoder trying many group sizes hashes
    each element once."""
    rows, cols = keys.shape
    if not 1 <= keep <= group_size:
        raise ValueError(f"keep must be in 1..group_size={group_size}, got {keep}")
    # Rows are independent: ranking a block of them at a time bounds the sort's int64
    # indices and copies to a few MiB whatever the matrix.
    mask = torch.empty(keys.shape, dtype=torch.bool)
    step = max(1, _KEY_BLOCK // max(cols, 1))
    for first in range(0, rows, step):
        mask[first : first + step] = _row_group_mask(keys[first : first + step], group_size, keep)
    return mask


def _row_group_mask(keys: Tensor, group_size: int, keep: int) -> Tensor:
    """:func:`group_mask_from_keys` of a block of rows."""
    rows, cols = keys.shape
    n_full = cols // group_size
    full = keys[:, : n_full * group_size].reshape(rows, n_full, group_size)
    chosen = torch.argsort(full, dim=2, stable=True)[:, :, :keep]
    full_mask = torch.zeros_like(full, dtype=torch.bool).scatter_(2, chosen, True)
    parts = [full_mask.reshape(rows, n_full * group_size)]
    tail_counts = group_keep_counts(cols, group_size, keep)[n_full:]
    if tail_counts:
        tail = keys[:, n_full * group_size :]
        tail_chosen = torch.argsort(tail, dim=1, stable=True)[:, : tail_counts[0]]
        parts.append(torch.zeros_like(tail, dtype=torch.bool).scatter_(1, tail_chosen, True))
    return torch.cat(parts, dim=1)
