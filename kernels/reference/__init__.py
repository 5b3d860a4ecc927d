"""Pure-torch ground truth for every numeric format deltavault stores.

Bit packing (:mod:`.packing`), group-wise quantization (:mod:`.quant`), seeded masks
(:mod:`.prng`), sparse index coding (:mod:`.positions`), separate quantization
(:mod:`.separate`), the encoded-tensor container (:mod:`.encoded`) and each method's decoder
(:mod:`.decode`). Triton kernels are tested against these functions.
"""

from kernels.reference.decode import apply_delta, decode, rebuild
from kernels.reference.encoded import (
    FORMAT_VERSION,
    EncodedTensor,
    Part,
    PartDtype,
    quantized_parts,
    read_qparams,
    read_quantized,
)
from kernels.reference.packing import BIT_TO_PACKING, pack, packed_nbytes, unpack
from kernels.reference.positions import CodedPositions, decode_positions, encode_positions
from kernels.reference.prng import (
    PRNG_NAME,
    PRNG_VERSION,
    group_keep_counts,
    group_mask,
    group_mask_from_keys,
    hash_keys,
    prng_params,
    ranked_keys,
    threshold_for_count,
    threshold_mask,
)
from kernels.reference.quant import (
    QuantParams,
    choose_qparams,
    dequantize,
    dequantize_values,
    n_groups,
    quantize,
    quantize_values,
)
from kernels.reference.separate import (
    SeparatedCodes,
    separate_codes,
    separate_dequantize,
    separate_quantize,
    separated_parts,
)

__all__ = [
    "decode",
    "apply_delta",
    "rebuild",
    "EncodedTensor",
    "Part",
    "PartDtype",
    "FORMAT_VERSION",
    "quantized_parts",
    "read_quantized",
    "read_qparams",
    "CodedPositions",
    "encode_positions",
    "decode_positions",
    "SeparatedCodes",
    "separate_quantize",
    "separate_codes",
    "separate_dequantize",
    "separated_parts",
    "BIT_TO_PACKING",
    "pack",
    "unpack",
    "packed_nbytes",
    "PRNG_NAME",
    "PRNG_VERSION",
    "hash_keys",
    "ranked_keys",
    "prng_params",
    "threshold_mask",
    "threshold_for_count",
    "group_mask",
    "group_mask_from_keys",
    "group_keep_counts",
    "QuantParams",
    "choose_qparams",
    "quantize",
    "dequantize",
    "quantize_values",
    "dequantize_values",
    "n_groups",
]
