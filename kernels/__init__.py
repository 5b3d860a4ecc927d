"""Numeric kernels of deltavault.

``kernels.reference`` is the pure-torch definition of every stored format; ``kernels.triton``
holds the Triton kernels, tested against it. The names here pick one of the two per call
(Triton on CUDA tensors, the reference elsewhere; ``DELTAVAULT_KERNELS`` forces either).
"""

from kernels.layout import DeltaStack, stack
from kernels.ops import (
    code_part,
    decode,
    delta_linear,
    delta_linear_batched,
    dequantize,
    pack,
    quantize,
    quantize_packed,
    quantized_parts,
    unpack,
)
from kernels.reference import EncodedTensor, Part, PartDtype, QuantParams, choose_qparams

__all__ = [
    "delta_linear",
    "delta_linear_batched",
    "decode",
    "stack",
    "DeltaStack",
    "quantize",
    "quantize_packed",
    "pack",
    "unpack",
    "dequantize",
    "code_part",
    "quantized_parts",
    "EncodedTensor",
    "Part",
    "PartDtype",
    "QuantParams",
    "choose_qparams",
]
