"""Synthetic encodings of every lossy format, built from fresh random values with the
reference encoders: what the kernel tests feed both backends."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kernels.reference import (
    EncodedTensor,
    Part,
    PartDtype,
    choose_qparams,
    group_mask,
    prng_params,
    quantize,
    quantized_parts,
    separate_quantize,
    separated_parts,
    threshold_for_count,
    threshold_mask,
)


def _randn(shape: tuple[int, ...], generator: torch.Generator, scale: float = 1.0) -> Tensor:
    return torch.randn(shape, generator=generator) * scale


def _quantized(
    prefix: str, values: Tensor, bits: int, group_size: int, symmetric: bool
) -> list[Part]:
    params = choose_qparams(values, bits, group_size, symmetric=symmetric)
    return quantized_parts(prefix, quantize(values, params), params)


def low_rank(
    shape: tuple[int, int],
    pairs: Sequence[tuple[int, int]],
    *,
    group_size: int,
    seed: int,
    symmetric: bool = False,
    method: str = "adamix",
) -> EncodedTensor:
    """``pairs`` = (width, count) buckets in storage order."""
    d_out, d_in = shape
    generator = torch.Generator().manual_seed(seed)
    rank = sum(count for _, count in pairs)
    sigma = torch.sort(torch.rand(rank, generator=generator) + 0.1, descending=True).values
    parts = [Part.from_floats("sigma", sigma * 0.05, PartDtype.FLOAT16)]
    for bits, count in pairs:
        v = _randn((count, d_in), generator, d_in**-0.5)
        u = _randn((count, d_out), generator, d_out**-0.5)
        parts += _quantized(f"v{bits}", v, bits, group_size, symmetric)
        parts += _quantized(f"u{bits}", u, bits, group_size, symmetric)
    params = {"group_size": str(group_size), "widths": ",".join(str(b) for b, _ in pairs)}
    return EncodedTensor(method, 1, shape, "float16", params, tuple(parts))


def signs(shape: tuple[int, int], levels: int, *, per_row: bool, seed: int) -> EncodedTensor:
    d_out, d_in = shape
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (levels, d_out, d_in), generator=generator, dtype=torch.uint8)
    scales = torch.rand(levels, d_out if per_row else 1, generator=generator) * 1e-2 + 1e-3
    parts = (
        Part.from_codes("signs", bits, 1),
        Part.from_floats("scales", scales, PartDtype.FLOAT32),
    )
    return EncodedTensor("bitdelta", 1, shape, "float16", {}, parts)


def _values_parts(values: Tensor, bits: int, group_size: int, extra: int) -> list[Part]:
    """Kept values as float16 (``bits`` 16), plain codes, or separated (``extra`` > 0)."""
    if bits == 16:
        return [Part.from_floats("values", values, PartDtype.FLOAT16)]
    if extra:
        return separated_parts("values", separate_quantize(values, bits, extra, group_size))
    return _quantized("values", values.view(1, -1), bits, group_size, symmetric=False)


def dare(
    shape: tuple[int, int], keep: float, *, bits: int, group_size: int, seed: int
) -> EncodedTensor:
    numel = shape[0] * shape[1]
    threshold = threshold_for_count(numel, seed, max(1, round(keep * numel)))
    n_kept = int(threshold_mask(shape, seed, threshold).sum())
    generator = torch.Generator().manual_seed(seed + 1)
    values = _randn((n_kept,), generator, 1e-2)
    params = {**prng_params(seed), "threshold": str(threshold), "group_size": str(group_size)}
    parts = _values_parts(values, bits, group_size, 0)
    return EncodedTensor("dare", 1, shape, "float16", params, tuple(parts))


def deltadq(
    shape: tuple[int, int],
    dropout_group: int,
    keep: int,
    *,
    bits: int,
    group_size: int,
    seed: int,
    extra: int = 0,
) -> EncodedTensor:
    n_kept = int(group_mask(shape, seed, dropout_group, keep).sum())
    generator = torch.Generator().manual_seed(seed + 1)
    values = _randn((n_kept,), generator, 1e-2)
    params = {
        **prng_params(seed),
        "dropout_group": str(dropout_group),
        "keep": str(keep),
        "group_size": str(group_size),
    }
    parts = _values_parts(values, bits, group_size, extra)
    return EncodedTensor("deltadq", 1, shape, "float16", params, tuple(parts))
