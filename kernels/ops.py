"""The public kernels: each picks Triton or the torch reference (:mod:`kernels.dispatch`).

- :func:`delta_linear` ``= x·W_baseᵀ + x·ΔŴᵀ (+ bias)`` without materialising ΔŴ;
  :func:`delta_linear_batched` does it for several fine-tunes of one base at once, each
  delta applied to its own rows of ``x`` (one launch per format, two for low rank);
- :func:`decode`: the dense ΔŴ of an encoding, at fp16, bf16 or fp32, on any device;
- :func:`quantize`, :func:`quantize_packed`, :func:`pack`, :func:`unpack`,
  :func:`dequantize`, and the parts they make (:func:`code_part`,
  :func:`quantized_parts`): the group-wise codes of :mod:`kernels.reference`, what the
  compressor's methods call, so that on a GPU their quantize and pack steps are kernels.

The Triton backend is imported on first use: importing Triton and decorating the kernels
takes about a third of a second (0.28 s to import triton, 0.06 s for the kernels, measured
once) that CPU-only processes (the store, the CLI) need not pay.

On the Triton backend the base product is torch's (cuBLAS) and the delta products add
into its output; both round once to ``x``'s dtype, so fp16/bf16 results differ from the
reference's single fp32 rounding by about one unit in the last place of the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kernels import reference
from kernels.dispatch import Backend, backend_for
from kernels.layout import DeltaStack, stack
from kernels.reference import EncodedTensor, Part, QuantParams

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def delta_linear(
    x: Tensor, w_base: Tensor, encoded: EncodedTensor | DeltaStack, bias: Tensor | None = None
) -> Tensor:
    """``x·(W_base + ΔŴ)ᵀ + bias`` for ``x`` (..., d_in), ``w_base`` (d_out, d_in) of
    ``x``'s dtype; the result has ``x``'s dtype. Pass a :class:`DeltaStack` (from
    ``kernels.stack``) to reuse one device layout across calls."""
    flat = x.reshape(-1, x.shape[-1])
    out = delta_linear_batched(flat, w_base, encoded, [flat.shape[0]], bias)
    return out.view(*x.shape[:-1], w_base.shape[0])


def delta_linear_batched(
    x: Tensor,
    w_base: Tensor,
    deltas: DeltaStack | EncodedTensor | Sequence[EncodedTensor],
    rows: Sequence[int],
    bias: Tensor | None = None,
) -> Tensor:
    """Several fine-tunes of one base in one pass: ``x`` (M, d_in) holds ``rows[s]``
    consecutive rows for delta s, and row i of the result is ``x_i·(W_base + ΔŴ_s)ᵀ``."""
    if isinstance(deltas, DeltaStack):
        if deltas.device != x.device:
            raise ValueError(f"the delta stack is on {deltas.device}, x on {x.device}")
        encodings = deltas.encodings
    else:
        encodings = (deltas,) if isinstance(deltas, EncodedTensor) else tuple(deltas)
    _check_linear(x, w_base, bias, encodings, rows)
    if backend_for(x, w_base) is Backend.REFERENCE:
        return _reference_linear(x, w_base, encodings, rows, bias)
    from kernels.triton import backend

    layout = deltas if isinstance(deltas, DeltaStack) else stack(encodings, x.device)
    return backend.delta_linear(x.contiguous(), w_base, layout, rows, bias)


def decode(
    encoded: EncodedTensor | DeltaStack,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The dense ΔŴ of ``encoded`` at ``dtype`` on ``device`` (default CPU), or of a
    one-delta :class:`DeltaStack` on its own device."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"decode writes float16, bfloat16 or float32, not {dtype}")
    if isinstance(encoded, DeltaStack):
        if encoded.n_segments != 1:
            raise ValueError(f"decode takes one delta, the stack holds {encoded.n_segments}")
        layout: DeltaStack | None = encoded
        target, (encoding,) = encoded.device, encoded.encodings
    else:
        layout, target, encoding = None, torch.device(device or "cpu"), encoded
    if backend_for(torch.empty(0, device=target)) is Backend.REFERENCE:
        return reference.decode(encoding).to(device=target, dtype=dtype)
    from kernels.triton import backend

    return backend.decode(layout or stack([encoding], target), dtype)


def quantize(w: Tensor, params: QuantParams) -> Tensor:
    """(rows, cols) float → uint8 codes."""
    if backend_for(w) is Backend.REFERENCE:
        return reference.quantize(w.float(), params)
    from kernels.triton import codes

    return codes.quantize(w, params)


def quantize_packed(w: Tensor, params: QuantParams) -> Tensor:
    """(rows, cols) float → its codes packed (one pass on Triton)."""
    if backend_for(w) is Backend.REFERENCE:
        return reference.pack(reference.quantize(w.float(), params), params.bits)
    from kernels.triton import codes

    return codes.quantize_packed(w, params)


def pack(codes: Tensor, bits: int) -> Tensor:
    if backend_for(codes) is Backend.REFERENCE:
        return reference.pack(codes, bits)
    from kernels.triton import codes as triton_codes

    return triton_codes.pack(codes, bits)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    if backend_for(packed) is Backend.REFERENCE:
        return reference.unpack(packed, bits, n)
    from kernels.triton import codes

    return codes.unpack(packed, bits, n)


def code_part(name: str, codes: Tensor, bits: int) -> Part:
    """``Part.from_codes`` packed on the codes' device."""
    return Part.from_codes(name, codes, bits, pack)


def quantized_parts(prefix: str, codes: Tensor, params: QuantParams) -> list[Part]:
    """``kernels.reference.quantized_parts`` packed on the codes' device."""
    return reference.quantized_parts(prefix, codes, params, pack)


def dequantize(codes: Tensor, params: QuantParams) -> Tensor:
    """(rows, cols) uint8 codes → fp32."""
    if backend_for(codes) is Backend.REFERENCE:
        return reference.dequantize(codes, params)
    from kernels.triton import codes as triton_codes

    return triton_codes.dequantize(codes, params)


# ---- checks and the reference ----------------------------------------------------------


def _check_linear(
    x: Tensor,
    w_base: Tensor,
    bias: Tensor | None,
    encodings: Sequence[EncodedTensor],
    rows: Sequence[int],
) -> None:
    if x.dtype not in FLOAT_DTYPES or w_base.dtype != x.dtype:
        raise ValueError(
            f"x and w_base must share a float dtype (fp16, bf16, fp32), got {x.dtype} and "
            f"{w_base.dtype}"
        )
    if x.dim() != 2 or w_base.dim() != 2 or x.shape[1] != w_base.shape[1]:
        raise ValueError(
            f"x (M, d_in) and w_base (d_out, d_in) must agree, got {tuple(x.shape)} and "
            f"{tuple(w_base.shape)}"
        )
    shapes = sorted({tuple(e.shape) for e in encodings})
    if shapes != [tuple(w_base.shape)]:
        raise ValueError(f"w_base is {tuple(w_base.shape)}, the deltas are {shapes}")
    if bias is not None and tuple(bias.shape) != (w_base.shape[0],):
        raise ValueError(f"bias must be ({w_base.shape[0]},), got {tuple(bias.shape)}")
    if len(rows) != len(encodings) or sum(rows) != x.shape[0] or min(rows, default=0) < 0:
        raise ValueError(
            f"rows {list(rows)} must give each of the {len(encodings)} deltas its count of "
            f"x's {x.shape[0]} rows"
        )


def _reference_linear(
    x: Tensor,
    w_base: Tensor,
    encodings: Sequence[EncodedTensor],
    rows: Sequence[int],
    bias: Tensor | None,
) -> Tensor:
    """Each segment's rows times its materialised fine-tuned weight, fp32 throughout,
    rounded once to ``x``'s dtype."""
    out = torch.empty(x.shape[0], w_base.shape[0], dtype=torch.float32, device=x.device)
    start = 0
    for encoded, count in zip(encodings, rows, strict=True):
        part = slice(start, start + count)
        weight = w_base.float() + reference.decode(encoded).to(x.device)
        out[part] = x[part].float() @ weight.T
        start += count
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)
