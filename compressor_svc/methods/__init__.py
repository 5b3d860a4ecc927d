"""Delta compression methods behind one entry point, :func:`compress`.

Importing this package registers every method: ``lossless``, ``bitdelta``, ``dare``,
``deltacome``, ``adamix`` and ``deltadq``.
"""

from compressor_svc.methods import adamix, bitdelta, dare, deltacome, deltadq, lossless
from compressor_svc.methods.base import (
    RATIO_TOLERANCE,
    available_methods,
    bit_budget,
    compress,
    get_method,
    paper_ratio,
    relative_activation_error,
    relative_weight_error,
)

__all__ = [
    "adamix",
    "bitdelta",
    "dare",
    "deltacome",
    "deltadq",
    "lossless",
    "RATIO_TOLERANCE",
    "available_methods",
    "bit_budget",
    "compress",
    "get_method",
    "paper_ratio",
    "relative_activation_error",
    "relative_weight_error",
]
