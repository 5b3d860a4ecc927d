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
        # A copy: the encoding keeps the tensor it is given, and the target is the caller's.
        return encode_delta(target.delta.to(PartDtype(target.dtype).torch_dtype, copy=True))

    @override
    def paper_bits(self, encoded: EncodedTensor) -> int:
        return encoded.nbits


BLOCK_ELEMENTS = 1 << 20
"""Elements per pass of :func:`encode_exact`: its float32 temporaries stay ~4 MiB each, so
a tensor costs little more than its own bytes however large it is (an LLM's embedding)."""


def encode_exact(base: Tensor, finetuned: Tensor, *, overwrite: bool = False) -> EncodedTensor:
    """The delta of two float tensors of any shape, bit-exact under
    ``kernels.reference.rebuild``.

    The delta is stored at the fine-tuned dtype when that is 16-bit, else at float32; the
    elements whose stored delta does not round back to the fine-tuned value (a delta a
    16-bit float cannot hold, a weight far smaller than its base) are fix-ups: their
    Rice-coded positions and fine-tuned values. In the rare case where fix-ups would cost
    more than a float32 delta, the delta is stored at float32 instead. A delta whose rows
    are mostly all-zero is stored as its changed rows and their Rice-coded indices.

    One pass, block by block: the delta and its misses together. With ``overwrite`` the
    caller gives ``finetuned`` up and a 16-bit delta is written over it, so encoding needs
    no memory beyond its inputs (should it then fall back to float32, the fine-tune is first
    rebuilt in place from that delta and its fix-ups, exactly).
    """
    flat_base, flat_tuned = base.reshape(-1), finetuned.reshape(-1)
    if finetuned.element_size() == 2:
        in_place = overwrite and finetuned.is_contiguous()
        out = flat_tuned if in_place else torch.empty_like(flat_tuned)
        wrong, values = _delta_with_misses(flat_base, flat_tuned, out)
        fixes = _fix_parts(wrong, values, flat_tuned.numel())
        if sum(p.nbits for p in fixes) <= flat_tuned.numel() * 16:  # bits float32 would add
            return _encoding(_delta_parts(out.view(finetuned.shape)) + fixes, finetuned)
        if in_place:
            _rebuild_in_place(flat_base, out, wrong, values)
    out = torch.empty(flat_tuned.numel(), dtype=torch.float32)
    wrong, values = _delta_with_misses(flat_base, flat_tuned, out)
    fixes = _fix_parts(wrong, values, flat_tuned.numel())
    return _encoding(_delta_parts(out.view(finetuned.shape)) + fixes, finetuned)


def _fix_parts(wrong: Tensor, values: Tensor, numel: int) -> list[Part]:
    """The fix-ups: flat positions ``wrong`` (of ``numel``) and the fine-tuned ``values``
    there."""
    if not wrong.numel():
        return []
    coded = encode_positions(wrong, numel)
    value_part = Part.from_floats("fix.values", values, PartDtype.for_torch(values.dtype))
    return [*position_parts("fix.positions", coded), value_part]


def encode_delta(delta: Tensor) -> EncodedTensor:
    """A delta of any shape stored as it is, at its own dtype (dense or row-sparse). The
    encoding may view ``delta``'s memory: it must not change afterwards."""
    return _encoding(_delta_parts(delta), delta)


def _encoding(parts: list[Part], like: Tensor) -> EncodedTensor:
    """The lossless encoding of ``parts`` for a tensor shaped and typed like ``like``."""
    dtype = str(like.dtype).removeprefix("torch.")
    return EncodedTensor(
        Lossless.name, Lossless.version, tuple(like.shape), dtype, {}, tuple(parts)
    )


def _blocks(numel: int) -> range:
    return range(0, numel, BLOCK_ELEMENTS)


def _delta(base: Tensor, finetuned: Tensor, dtype: torch.dtype) -> Tensor:
    """One block's delta, computed in float32 and rounded once to ``dtype``."""
    return (finetuned.float() - base.float()).to(dtype)


def _delta_with_misses(base: Tensor, finetuned: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """Write the flat delta at ``out``'s dtype into ``out`` (which may be ``finetuned``
    itself: each block is read before it is written); (the flat positions where it does not
    rebuild ``finetuned``, the fine-tuned values there)."""
    wrong, values = [torch.zeros(0, dtype=torch.int64)], [finetuned[:0].clone()]
    for start in _blocks(finetuned.numel()):
        stop = start + BLOCK_ELEMENTS
        tuned, below = finetuned[start:stop], base[start:stop]
        delta = _delta(below, tuned, out.dtype)
        missed = _mismatches(apply_delta(below, delta, tuned.dtype), tuned).nonzero().view(-1)
        wrong.append(missed + start)
        values.append(tuned[missed])  # a copy, taken before ``out`` may overwrite ``tuned``
        out[start:stop] = delta
    return torch.cat(wrong), torch.cat(values)


def _rebuild_in_place(base: Tensor, delta: Tensor, wrong: Tensor, values: Tensor) -> None:
    """Turn ``delta`` back into the fine-tune it came from: base + delta rounds to it
    everywhere but at the fix-ups, whose values are set."""
    for start in _blocks(delta.numel()):
        stop = start + BLOCK_ELEMENTS
        delta[start:stop] = apply_delta(base[start:stop], delta[start:stop], delta.dtype)
    delta[wrong] = values


def _delta_parts(stored: Tensor) -> list[Part]:
    """The delta dense, or only its rows that are not all zero, with their Rice-coded row
    indices, when that is smaller: a fine-tune moves only the embedding rows of the tokens
    it saw. Memory stays O(changed rows), not O(elements)."""
    dtype = PartDtype.for_torch(stored.dtype)
    if stored.dim() == 0 or stored.numel() == 0:
        return [Part.from_floats("delta", stored, dtype)]
    rows = stored.reshape(stored.shape[0], -1)
    changed = _changed_rows(rows)
    dense_bits = stored.numel() * dtype.bits
    if changed.numel() * (rows.shape[1] * dtype.bits + 1) < dense_bits:  # a row index >= 1 bit
        coded = encode_positions(changed, rows.shape[0])
        if coded.nbits + changed.numel() * rows.shape[1] * dtype.bits < dense_bits:
            values = Part.taking_floats("delta.rows", rows[changed], dtype)
            return [*position_parts("delta.row_positions", coded), values]
    return [Part.taking_floats("delta", stored, dtype)]


def _changed_rows(rows: Tensor) -> Tensor:
    """Indices of the rows that are not all zero, found a block of rows at a time (``any``
    over the whole matrix would take a temporary as large as it)."""
    step = max(1, BLOCK_ELEMENTS // max(1, rows.shape[1]))
    found = [
        rows[i : i + step].any(dim=1).nonzero().view(-1) + i for i in range(0, len(rows), step)
    ]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.int64)


def _mismatches(rebuilt: Tensor, finetuned: Tensor) -> Tensor:
    """Elementwise bit inequality (so -0.0 and 0.0 differ)."""
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[finetuned.element_size()]
    return rebuilt.contiguous().view(as_int) != finetuned.contiguous().view(as_int)
