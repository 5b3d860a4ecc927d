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
        return encode_delta(target.delta.to(PartDtype(target.dtype).torch_dtype))

    @override
    def paper_bits(self, encoded: EncodedTensor) -> int:
        return encoded.nbits


BLOCK_ELEMENTS = 1 << 22
"""Elements per pass of :func:`encode_exact`: its float32 temporaries stay ~16 MiB each, so
a tensor costs little more than its own bytes however large it is (an LLM's embedding)."""


def encode_exact(base: Tensor, finetuned: Tensor) -> EncodedTensor:
    """The delta of two float tensors of any shape, bit-exact under
    ``kernels.reference.rebuild``: stored at the fine-tuned dtype when that rebuilds every
    element, else at float32, plus the few elements float32 cannot round back (a weight far
    smaller than its base) as fix-ups: their positions and fine-tuned values. A delta whose
    rows are mostly all-zero is stored as its changed rows and their Rice-coded indices."""
    flat_base, flat_tuned = base.reshape(-1), finetuned.reshape(-1)
    narrow = finetuned.dtype if finetuned.element_size() == 2 else torch.float32
    stored, wrong = _exact_pass(flat_base, flat_tuned, narrow)
    if wrong.numel() and narrow != torch.float32:
        del stored
        stored, wrong = _exact_pass(flat_base, flat_tuned, torch.float32)
    parts = _delta_parts(stored.view(finetuned.shape))
    if wrong.numel():
        coded = encode_positions(wrong, flat_tuned.numel())
        values = flat_tuned[wrong]
        parts += position_parts("fix.positions", coded)
        parts.append(Part.from_floats("fix.values", values, PartDtype.for_torch(values.dtype)))
    return _encoding(parts, finetuned)


def encode_delta(delta: Tensor) -> EncodedTensor:
    """A delta of any shape stored as it is, at its own dtype (dense or row-sparse)."""
    return _encoding(_delta_parts(delta), delta)


def _encoding(parts: list[Part], like: Tensor) -> EncodedTensor:
    """The lossless encoding of ``parts`` for a tensor shaped and typed like ``like``."""
    dtype = str(like.dtype).removeprefix("torch.")
    return EncodedTensor(
        Lossless.name, Lossless.version, tuple(like.shape), dtype, {}, tuple(parts)
    )


def _exact_pass(base: Tensor, finetuned: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(the flat delta at ``dtype``, flat positions where it does not rebuild ``finetuned``),
    block by block."""
    stored = torch.empty(finetuned.numel(), dtype=dtype)
    wrong = []
    for start in range(0, finetuned.numel(), BLOCK_ELEMENTS):
        stop = start + BLOCK_ELEMENTS
        block = (finetuned[start:stop].float() - base[start:stop].float()).to(dtype)
        stored[start:stop] = block
        rebuilt = apply_delta(base[start:stop], block, finetuned.dtype)
        bad = _mismatches(rebuilt, finetuned[start:stop]).nonzero().view(-1)
        wrong.append(bad + start)
    return stored, torch.cat(wrong) if wrong else torch.zeros(0, dtype=torch.int64)


def _delta_parts(stored: Tensor) -> list[Part]:
    """The delta dense, or only its rows that are not all zero, with their Rice-coded row
    indices, when that is smaller: a fine-tune moves only the embedding rows of the tokens
    it saw. Memory stays O(changed rows), not O(elements)."""
    dtype = PartDtype.for_torch(stored.dtype)
    if stored.dim() == 0 or stored.numel() == 0:
        return [Part.from_floats("delta", stored, dtype)]
    rows = stored.reshape(stored.shape[0], -1)
    changed = rows.any(dim=1).nonzero().view(-1)
    dense_bits = stored.numel() * dtype.bits
    if changed.numel() * (rows.shape[1] * dtype.bits + 1) < dense_bits:  # a row index >= 1 bit
        coded = encode_positions(changed, rows.shape[0])
        if coded.nbits + changed.numel() * rows.shape[1] * dtype.bits < dense_bits:
            values = Part.from_floats("delta.rows", rows[changed], dtype)
            return [*position_parts("delta.row_positions", coded), values]
    return [Part.from_floats("delta", stored, dtype)]


def _mismatches(rebuilt: Tensor, finetuned: Tensor) -> Tensor:
    """Elementwise bit inequality (so -0.0 and 0.0 differ)."""
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[finetuned.element_size()]
    return rebuilt.contiguous().view(as_int) != finetuned.contiguous().view(as_int)
