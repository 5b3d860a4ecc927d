"""Numeric primitives of deltavault: quantize, pack, unpack, dequantize, decode.

``kernels.reference`` is the pure-torch definition of every stored format; accelerated
kernels must match it.
"""

from kernels.reference import (
    EncodedTensor,
    Part,
    PartDtype,
    QuantParams,
    choose_qparams,
    decode,
    dequantize,
    pack,
    quantize,
    unpack,
)

__all__ = [
    "EncodedTensor",
    "Part",
    "PartDtype",
    "QuantParams",
    "choose_qparams",
    "decode",
    "dequantize",
    "pack",
    "quantize",
    "unpack",
]
