"""SVD of a delta and the mixed-precision factor format shared by Delta-CoMe and ADAMIX.

ΔW = U diag(sigma) Vᵀ with U (d_out, r), V (d_in, r), computed in fp32 and sigma kept separate
(SCIENCE.md pitfall 2). Each singular-vector pair i gets one width b_i ∈ {0, 2, 3, 4, 8, …};
0 drops it. The methods differ only in how they choose the widths and whether U is corrected.

Quantization order (pitfall 3): V first — the rows of Vᵀ by GPTQ with the layer's Gram H,
groups of 128 along d_in, one GPTQ pass per width — then U, by GPTQ over its columns with
H_U = Σ V̂ᵀ H V̂ Σ built from the *quantized* V̂. U's scales are per column (per singular
vector), grouped along d_out: the same 32 bits per 128 elements as Delta-CoMe's per-row
groups, but a pair's cost no longer depends on which other pairs share its group, so
per-pair costs add up exactly and mixed widths need no shared scale.

Exact cost of a kept pair at b bits: b·(d_out + d_in) code bits, 32 bits of fp16 scale+zero
per 128-element group of v_i and of u_i, and 16 bits for sigma_i in fp16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from compressor_svc.methods.base import Target
from compressor_svc.methods.quantizer import (
    FACTOR_SCALES,
    GPTQConfig,
    QuantizedMatrix,
    damped_hessian,
    gptq_columns,
    gptq_rows,
)
from kernels import dequantize, quantize, quantized_parts
from kernels.reference import (
    EncodedTensor,
    Part,
    PartDtype,
    QuantParams,
    choose_qparams,
    n_groups,
)

SIGMA_BITS = 16
GROUP_OVERHEAD_BITS = 32  # fp16 scale + fp16 zero
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Factors:
    """u: (d_out, r), s: (r,) descending, v: (d_in, r); fp32, ΔW = u diag(s) vᵀ."""

    u: Tensor
    s: Tensor
    v: Tensor


def svd(delta: Tensor) -> Factors:
    """Thin SVD of a (d_out, d_in) delta in fp32; r = min(d_out, d_in)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    if float(s[0]) > FP16_MAX:
        raise ValueError(
            f"largest singular value {float(s[0]):.3g} exceeds fp16 ({FP16_MAX}); sigma cannot be "
            "stored by this format — store this tensor losslessly"
        )
    return Factors(u, s, vh.T)


def pair_cost(bits: int, shape: tuple[int, int], group_size: int) -> int:
    """Exact stored bits of one singular-vector pair at ``bits`` (0 for a dropped pair)."""
    if bits == 0:
        return 0
    d_out, d_in = shape
    scales = n_groups(d_in, group_size) + n_groups(d_out, group_size)
    return bits * (d_out + d_in) + GROUP_OVERHEAD_BITS * scales + SIGMA_BITS


def activation_hessian(gram: Tensor | None, d_in: int) -> Tensor:
    """H for the error objective: the Gram matrix, or the identity (weight error) without."""
    return torch.eye(d_in) if gram is None else gram


def quantize_v(
    factors: Factors, gram: Tensor | None, bits: int, config: GPTQConfig
) -> QuantizedMatrix:
    """GPTQ of every row of Vᵀ (r, d_in) at ``bits``; rows are independent of each other."""
    return gptq_rows(factors.v.T.contiguous(), gram, bits, config)


def v_errors(factors: Factors, v_hat: Tensor, gram: Tensor | None) -> Tensor:
    """(r,) e_i = sigma_i² δv_iᵀ H δv_i for dequantized rows ``v_hat`` (r, d_in)."""
    delta_v = factors.v.T - v_hat
    h = activation_hessian(gram, v_hat.shape[1])
    return factors.s**2 * ((delta_v @ h) * delta_v).sum(dim=1)


def u_errors(
    factors: Factors, v_hat: Tensor, gram: Tensor | None, bits: int, group_size: int
) -> Tensor:
    """(r,) estimate of what quantizing U at ``bits`` adds: sigma_i² ‖δu_i‖² v̂_iᵀ H v̂_i.

    δu_i is the round-to-nearest error of column u_i in U's stored layout (groups of
    ``group_size`` along d_out). Each pair is taken alone: U's error does not split exactly
    (its Hessian Σ V̂ᵀ H V̂ Σ is not diagonal), but leaving it out biases the allocation
    towards keeping many pairs at low widths, whose U error it never sees.
    """
    u_rows = factors.u.T.contiguous()
    params = choose_qparams(u_rows, bits, group_size, scale_dtype=FACTOR_SCALES)
    delta_u = u_rows - dequantize(quantize(u_rows, params), params)
    h = activation_hessian(gram, v_hat.shape[1])
    return factors.s**2 * delta_u.square().sum(dim=1) * ((v_hat @ h) * v_hat).sum(dim=1)


def _take_rows(q: QuantizedMatrix, rows: Tensor) -> QuantizedMatrix:
    p = q.params
    zero = None if p.zero is None else p.zero[rows]
    params = QuantParams(p.bits, p.group_size, p.scale[rows], zero)
    return QuantizedMatrix(q.codes[rows], params, q.dequantized[rows])


def encode_factors(
    target: Target,
    factors: Factors,
    widths: Sequence[int],
    v_quantized: dict[int, QuantizedMatrix],
    *,
    config: GPTQConfig,
    correct_u: bool,
    method: tuple[str, int],
) -> EncodedTensor:
    """Encode pairs at ``widths`` (r,) given V̂ᵀ quantized at each used width (all r rows).

    With ``correct_u`` (ADAMIX's reconstruction target correction, RTC), U is first moved to
    its least-squares optimum for the quantized V̂: U* = ΔW H V̂ Σ (Σ V̂ᵀ H V̂ Σ + λI)⁻¹, with
    λ the GPTQ damping; otherwise (Delta-CoMe) GPTQ quantizes the original U.
    """
    width_t = torch.tensor(list(widths), dtype=torch.int64)
    buckets = sorted({int(b) for b in widths if b > 0}, reverse=True)
    kept = [torch.nonzero(width_t == b).flatten() for b in buckets]
    v_parts = [_take_rows(v_quantized[b], rows) for b, rows in zip(buckets, kept, strict=True)]
    order = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64)
    sigma = factors.s[order].half().float()  # the sigma the decoder will see
    v_hat = (
        torch.cat([q.dequantized for q in v_parts]) if v_parts else torch.zeros(0, target.shape[1])
    )
    h = activation_hessian(target.gram, target.shape[1])
    scaled_v = v_hat * sigma.unsqueeze(1)  # Σ V̂ᵀ: (k, d_in)
    h_u = scaled_v @ h @ scaled_v.T
    u_target = factors.u[:, order]
    if correct_u and order.numel():
        damped = damped_hessian(h_u, order.numel(), config.damp)
        rhs = target.delta @ h @ scaled_v.T  # ΔW H V̂ Σ: (d_out, k)
        u_target = torch.linalg.solve(damped.double(), rhs.double().T).T.float()
    parts = []
    if order.numel():
        u_q = gptq_columns(u_target, h_u, [int(width_t[i]) for i in order], config)
    start = 0
    for b, v_q in zip(buckets, v_parts, strict=True):
        stop = start + v_q.codes.shape[0]
        parts += quantized_parts(f"v{b}", v_q.codes, v_q.params)
        u_params = u_q.params[start:stop]
        zero = torch.cat([p.zero for p in u_params if p.zero is not None])
        stacked = QuantParams(b, config.group_size, torch.cat([p.scale for p in u_params]), zero)
        parts += quantized_parts(f"u{b}", u_q.codes_t[start:stop], stacked)
        start = stop
    parts.append(Part.from_floats("sigma", sigma, PartDtype.FLOAT16))
    params = {"group_size": str(config.group_size), "widths": ",".join(map(str, buckets))}
    name, version = method
    return EncodedTensor(name, version, target.shape, target.dtype, params, tuple(parts))


def code_bits(encoded: EncodedTensor) -> int:
    """Σ over pairs of b·(d_out + d_in): what Delta-CoMe and ADAMIX count (SCIENCE.md §0)."""
    return sum(p.nbits for p in encoded.parts if p.name.endswith(".codes"))
