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

from typing_extensions import override

from compressor_svc.methods.base import Method, MethodConfig, Target, register_method
from kernels.reference import EncodedTensor, Part, PartDtype


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
