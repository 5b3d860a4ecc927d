"""``decode(encoded)``: the reference decoder of every method's format, keyed by method name.

Formats (shapes for a delta of d_out x d_in; all decoders return fp32 d_out x d_in):

- ``lossless``: part ``delta`` (any shape) at float16, bfloat16 or float32, or, when smaller,
  its rows that are not all zero, ``delta.rows`` (n_changed, numel / shape[0]), at the row
  indices ``delta.row_positions_*`` (Rice-coded); when
  some elements' delta does not rebuild the fine-tuned value exactly, ``fix.positions_*``
  and ``fix.values`` (the fine-tuned values there, at their dtype): see :func:`rebuild`.
- ``bitdelta``: ``signs`` uint1 (levels, d_out, d_in), 1 → +1 and 0 → -1; ``scales`` float32
  (levels, d_out) per row or (levels, 1) per matrix. ΔŴ = Σ_l scales_l ⊙ (2·signs_l - 1).
- ``dare`` / ``deltadq``: kept values, already rescaled, in row-major order of a seeded mask
  (params ``prng``, ``prng_version``, ``seed``). DARE's mask keeps keys below ``threshold``;
  DeltaDQ's keeps ``keep`` of every ``dropout_group`` columns. Values are ``values.*``
  group-quantized (1, n_kept) with ``group_size``, or a float16 ``values`` part, or (DeltaDQ's
  separate quantization, ``kernels.reference.separate``) an inner and an outer part.
- ``deltacome`` / ``adamix``: sigma as float16 ``sigma`` (r,), pairs ordered by bucket; for each
  width b in params ``widths`` (bucket order), ``v{b}.*`` quantizes V̂ᵀ rows (n_b, d_in) and
  ``u{b}.*`` quantizes Ûᵀ rows (n_b, d_out), both grouped along their last dim by
  ``group_size``. ΔŴ = Σ_b Û_b diag(sigma_b) V̂_bᵀ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kernels.reference.encoded import EncodedTensor, read_quantized
from kernels.reference.positions import decode_positions, read_position_parts
from kernels.reference.prng import check_prng, group_mask, threshold_mask
from kernels.reference.quant import dequantize
from kernels.reference.separate import is_separated, read_separated, separate_dequantize

Decoder = Callable[[EncodedTensor], Tensor]
_DECODERS: dict[str, Decoder] = {}


def register_decoder(*methods: str) -> Callable[[Decoder], Decoder]:
    def add(fn: Decoder) -> Decoder:
        for name in methods:
            _DECODERS[name] = fn
        return fn

    return add


def decode(encoded: EncodedTensor) -> Tensor:
    """The fp32 delta an encoding stands for, shaped ``encoded.shape``."""
    try:
        decoder = _DECODERS[encoded.method]
    except KeyError:
        raise ValueError(
            f"no decoder for method {encoded.method!r}; known: {sorted(_DECODERS)}"
        ) from None
    out = decoder(encoded)
    if tuple(out.shape) != tuple(encoded.shape):
        raise ValueError(
            f"{encoded.method} decoded {tuple(out.shape)}, header says {encoded.shape}"
        )
    return out


def _matrix_shape(encoded: EncodedTensor) -> tuple[int, int]:
    if len(encoded.shape) != 2:
        raise ValueError(f"{encoded.method} decodes 2-D deltas, header says {encoded.shape}")
    return encoded.shape[0], encoded.shape[1]


@register_decoder("lossless")
def _decode_lossless(encoded: EncodedTensor) -> Tensor:
    if not any(p.name == "delta.rows" for p in encoded.parts):
        return encoded.part("delta").floats()
    n_rows = encoded.shape[0]  # row-sparse: see compressor_svc.methods.lossless
    rows = decode_positions(read_position_parts(encoded, "delta.row_positions"), n_rows)
    values = encoded.part("delta.rows").floats()
    out = torch.zeros(n_rows, values.shape[1] if values.dim() == 2 else 1)
    out[rows] = values.view(len(rows), -1)
    return out.view(encoded.shape)


@register_decoder("bitdelta")
def _decode_bitdelta(encoded: EncodedTensor) -> Tensor:
    signs = encoded.part("signs").codes().float() * 2 - 1
    scales = encoded.part("scales").floats()
    return (scales.unsqueeze(2) * signs).sum(dim=0)


def _kept_values(encoded: EncodedTensor, n_kept: int) -> Tensor:
    """(n_kept,) fp32 values of a sparse format, in row-major mask order."""
    if any(p.name == "values" for p in encoded.parts):
        return encoded.part("values").floats()
    group_size = int(encoded.params["group_size"])
    if is_separated(encoded, "values"):
        return separate_dequantize(read_separated(encoded, "values", group_size, n_kept))
    codes, params = read_quantized(encoded, "values", group_size)
    return dequantize(codes, params).view(-1)


def _scatter(mask: Tensor, values: Tensor) -> Tensor:
    if int(mask.sum()) != values.numel():
        raise ValueError(
            f"mask keeps {int(mask.sum())} elements but {values.numel()} values are stored"
        )
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out[mask] = values
    return out


@register_decoder("dare")
def _decode_dare(encoded: EncodedTensor) -> Tensor:
    seed = check_prng(encoded.params)
    mask = threshold_mask(_matrix_shape(encoded), seed, int(encoded.params["threshold"]))
    return _scatter(mask, _kept_values(encoded, int(mask.sum())))


@register_decoder("deltadq")
def _decode_deltadq(encoded: EncodedTensor) -> Tensor:
    seed = check_prng(encoded.params)
    group, keep = int(encoded.params["dropout_group"]), int(encoded.params["keep"])
    mask = group_mask(_matrix_shape(encoded), seed, group, keep)
    return _scatter(mask, _kept_values(encoded, int(mask.sum())))


@register_decoder("deltacome", "adamix")
def _decode_svd(encoded: EncodedTensor) -> Tensor:
    d_out, d_in = _matrix_shape(encoded)
    group_size = int(encoded.params["group_size"])
    sigma = encoded.part("sigma").floats()
    out = torch.zeros(d_out, d_in)
    start = 0
    for bits in filter(None, encoded.params["widths"].split(",")):
        v_codes, v_params = read_quantized(encoded, f"v{bits}", group_size)
        u_codes, u_params = read_quantized(encoded, f"u{bits}", group_size)
        v_hat, u_hat_t = dequantize(v_codes, v_params), dequantize(u_codes, u_params)
        stop = start + v_hat.shape[0]
        out += (u_hat_t.T * sigma[start:stop]) @ v_hat
        start = stop
    if start != sigma.numel():
        raise ValueError(f"{sigma.numel()} singular values stored for {start} quantized pairs")
    return out


def rebuild(base: Tensor, encoded: EncodedTensor, dtype: torch.dtype) -> Tensor:
    """The fine-tuned tensor from its base: ``apply_delta(base, decode(encoded), dtype)``, then
    a lossless encoding's ``fix.values`` written at ``fix.positions`` (the elements whose
    float32 delta does not round back to the fine-tuned value), so lossless is bit-exact."""
    out = apply_delta(base, decode(encoded), dtype)
    if encoded.method == "lossless" and any(p.name == "fix.values" for p in encoded.parts):
        coded = read_position_parts(encoded, "fix.positions")
        positions = decode_positions(coded, out.numel())
        out.view(-1)[positions] = encoded.part("fix.values").floats().to(dtype)
    return out


def apply_delta(base: Tensor, delta: Tensor, dtype: torch.dtype) -> Tensor:
    """W_base + ΔŴ added in fp32 and rounded once to ``dtype``: how every reader rebuilds a
    fine-tuned tensor, and the rule a lossless delta is checked against."""
    if tuple(base.shape) != tuple(delta.shape):
        raise ValueError(f"base {tuple(base.shape)} and delta {tuple(delta.shape)} differ")
    out = torch.empty(base.shape, dtype=dtype)
    flat_out, flat_base, flat_delta = out.view(-1), base.reshape(-1), delta.reshape(-1)
    # A float32 delta promotes a 16- or 32-bit base exactly inside the add, without a float32
    # copy of it; a float64 base is rounded to float32 first, as the rule says.
    promoted = base.element_size() <= 4
    for start in range(0, base.numel(), _APPLY_BLOCK):
        stop = start + _APPLY_BLOCK
        below = flat_base[start:stop] if promoted else flat_base[start:stop].float()
        flat_out[start:stop] = torch.add(flat_delta[start:stop].float(), below)
    return out


_APPLY_BLOCK = 1 << 20
"""Elements :func:`apply_delta` adds at a time: elementwise, so the result is the same bits
as one pass, without float32 temporaries the size of the tensor."""
