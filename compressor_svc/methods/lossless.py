"""``lossless``: the delta stored bit-exactly at its own dtype.

For tensors that must not be lossy (embeddings, LM head, norms; SCIENCE.md pitfall 8). The
choice: raw little-endian values at the delta's dtype, no entropy coding here. The store
already zstd-frames chunks where that pays (DESIGN.md, Formats), so compressing here too
would spend CPU twice for nothing. Its ratio is therefore 16 / dtype bits: 1.0 for a
float16 delta, 0.5 for float32 (a delta computed in fp32 from bf16 weights is generally not
representable in bf16, so it stays fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from typing_extensions import override

from compressor_svc.methods.base import Method, MethodConfig, Target, register_method
from kernels.reference import EncodedTensor, Part, PartDtype, apply_delta, encode_positions
from kernels.reference.positions import position_parts


@dataclass(frozen=True)
class LosslessConfig(MethodConfig):
    """No options: the dtype of the delta decides the stored width."""


@register_method
class Lossless(Method[LosslessConfig]):
    name = "lossless"
    config_type = LosslessConfig
    lossy = False

    @override
    def encode(self, target: Target, config: LosslessConfig) -> EncodedTensor:
        # fp16/bf16 → fp32 → the same dtype is exact, so the stored values are the input's.
        part = Part.from_floats("delta", target.delta, PartDtype(target.dtype))
        return EncodedTensor(self.name, self.version, target.shape, target.dtype, {}, (part,))

    @override
    def paper_bits(self, encoded: EncodedTensor) -> int:
        return encoded.nbits


def encode_exact(base: Tensor, finetuned: Tensor) -> EncodedTensor:
    """The delta of two float tensors of any shape, bit-exact under
    ``kernels.reference.rebuild``: stored at the fine-tuned dtype when that rebuilds every
    element, else at float32, plus the few elements float32 cannot round back (a weight far
    smaller than its base) as fix-ups: their positions and fine-tuned values. A mostly-zero
    delta is stored as its non-zero values and their Rice-coded positions."""
    delta = finetuned.float() - base.float()
    stored = delta.to(finetuned.dtype) if finetuned.element_size() == 2 else delta
    wrong = _mismatches(apply_delta(base, stored, finetuned.dtype), finetuned)
    if bool(wrong.any()) and stored.dtype != torch.float32:
        stored = delta
        wrong = _mismatches(apply_delta(base, stored, finetuned.dtype), finetuned)
    parts = _delta_parts(stored)
    positions = wrong.view(-1).nonzero().view(-1)
    if positions.numel():
        coded = encode_positions(positions, wrong.numel())
        values = finetuned.reshape(-1)[positions]
        parts += position_parts("fix.positions", coded)
        parts.append(Part.from_floats("fix.values", values, PartDtype.for_torch(values.dtype)))
    name = str(finetuned.dtype).removeprefix("torch.")
    return EncodedTensor(
        Lossless.name, Lossless.version, tuple(delta.shape), name, {}, tuple(parts)
    )


def _delta_parts(stored: Tensor) -> list[Part]:
    """The delta dense, or as its non-zero values and their positions when that is smaller
    (a fine-tune changes only the embedding rows of tokens it saw)."""
    dtype = PartDtype.for_torch(stored.dtype)
    flat = stored.reshape(-1)
    positions = flat.nonzero().view(-1)
    if positions.numel() < flat.numel():
        coded = encode_positions(positions, flat.numel())
        sparse_bits = coded.nbits + positions.numel() * dtype.bits
        if sparse_bits < flat.numel() * dtype.bits:
            values = Part.from_floats("delta.values", flat[positions], dtype)
            return [*position_parts("delta.positions", coded), values]
    return [Part.from_floats("delta", stored, dtype)]


def _mismatches(rebuilt: Tensor, finetuned: Tensor) -> Tensor:
    """Elementwise bit inequality (so -0.0 and 0.0 differ)."""
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[finetuned.element_size()]
    return rebuilt.contiguous().view(as_int) != finetuned.contiguous().view(as_int)
