"""``deltadq``: group-wise dropout + separate quantization of the survivors (arXiv 2410.08666).

Group-wise dropout: each row is cut into groups of g columns along the input dimension; in
every group exactly k = keep elements survive, chosen uniformly without replacement by a
seeded mask (``kernels.reference.prng.group_mask``), and are rescaled by g/k (the tail group
of t < g columns keeps its share k_t and is rescaled by t/k_t). Against DARE's Bernoulli
draw, each group's error then sums to zero, so only the within-group spread of ΔW_ij x_j
remains (SCIENCE.md §1).

Separate quantization into m parts (``kernels.reference.separate``): survivors are quantized
on a grid log2(m) bits finer than the stored ``bits``; in each quantization group the densest
of the m value ranges is the inner part and stores ``bits``-bit offsets, the other values form
a sparse outer part with full fine codes and Rice-coded positions. Membership is paid for
explicitly (pitfall 12): the split gains only where survivors concentrate, as heavy-tailed
deltas do. m = 1 is plain ``bits``-bit codes.

Exact accounting: positions of survivors cost 0 bits (a seeded mask; seed and PRNG name in
params). Every row keeps the same count, so survivors form a dense row-major sequence,
quantized with a 16-bit scale + fp16 zero per ``quant_group_size`` survivors and a clipping
search.

The ratio fixes p (SCIENCE.md pitfall 11): for each candidate (bits, g) the largest k that
fits the budget is taken, and candidates that cannot land within 10% of the target are
skipped. Among the rest, the one with the least error wins: activation error under ``gram``,
or without it the data-free proxy G = I + 11ᵀ, i.e. inputs with unit mean and unit variance
per channel, which scores both the weight error and the row-sum error that the "balanced
intermediate results" argument is about (SCIENCE.md §1). Each width's best g is then tried
with m > 1 parts. Candidates are scored on a sample of rows (~0.5 M elements) and the winner then
encodes the whole matrix, which keeps 7B-sized layers to seconds, not minutes.
:func:`compress_model` instead chooses one g for the whole model, as the paper does, scored
by a caller's probe (say, attention-output error) or by output error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from compressor_svc.methods.base import (
    RATIO_TOLERANCE,
    Method,
    MethodConfig,
    Target,
    check_ratio,
    get_method,
    make_target,
    register_method,
)
from kernels import dequantize, quantize, quantized_parts
from kernels.reference import (
    EncodedTensor,
    QuantParams,
    choose_qparams,
    decode,
    group_keep_counts,
    group_mask_from_keys,
    n_groups,
    prng_params,
    ranked_keys,
    separate_dequantize,
    separate_quantize,
    separated_parts,
)
from kernels.reference.quant import stored_scale

GROUP_OVERHEAD_BITS = 32  # 16-bit scale (fp16, or bf16 out of range) + fp16 zero
DEFAULT_BITS = (1, 2, 3, 4)
DEFAULT_PARTS = (1, 2, 4)
BASE_QUANT_GROUP = 128
MAX_CODE_BITS = 8
SELECTION_ELEMENTS = 1 << 19
"""Layouts are scored on evenly spaced rows holding about this many elements (at least
:data:`MIN_SELECTION_ROWS` rows), then the winner encodes the whole matrix. Rows are
independent under dropout and quantization, so a row sample ranks layouts as the whole
matrix does, at a fraction of the cost (32x less for a 4096 x 4096 layer)."""
MIN_SELECTION_ROWS = 32

ModelProbe = Callable[[Mapping[str, Tensor]], float]
"""Scores a whole model's reconstructed deltas (name → ΔŴ); lower is better."""


@dataclass(frozen=True)
class DeltaDQConfig(MethodConfig):
    bits: tuple[int, ...] = DEFAULT_BITS
    """Code widths to try; a single width fixes it."""
    dropout_groups: tuple[int, ...] | None = None
    """Group sizes g to try; None: powers of two from 8 up to d_in."""
    parts: tuple[int, ...] = DEFAULT_PARTS
    """Separate quantization: part counts m (powers of two) to try; 1 is plain codes."""
    quant_group_size: int | None = None
    """Survivors per scale/zero; None: 128 · R/16 rounded up to a power of two (≥ 128), so
    the scale overhead per original weight stays what it is at 16x."""
    seed: int = 0
    debias: bool = False
    """Rescale each matrix's quantization scales so ΔŴ's output projects exactly onto ΔW's
    (free: folded into the stored scales). Trades a little activation error for no
    systematic shrinkage of the fine-tuning effect. Off: the MSE-optimal, shrunk, codes."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(self.bits))
        if not self.bits or any(not 1 <= b <= MAX_CODE_BITS for b in self.bits):
            raise ValueError(f"bits must be code widths in 1..8, got {self.bits}")
        if self.dropout_groups is not None:
            object.__setattr__(self, "dropout_groups", tuple(self.dropout_groups))
            if not self.dropout_groups or min(self.dropout_groups) < 1:
                raise ValueError(f"dropout_groups must be sizes ≥ 1, got {self.dropout_groups}")
        object.__setattr__(self, "parts", tuple(self.parts))
        if not self.parts or any(m < 1 or m & (m - 1) for m in self.parts):
            raise ValueError(f"parts must be powers of two ≥ 1, got {self.parts}")
        if self.quant_group_size is not None and self.quant_group_size < 1:
            raise ValueError(f"quant_group_size must be ≥ 1, got {self.quant_group_size}")
        if not 0 <= self.seed < 1 << 32:
            raise ValueError(f"seed must fit in 32 unsigned bits, got {self.seed}")


@dataclass(frozen=True)
class Layout:
    """One candidate: ``bits``-bit codes, keep ``keep`` of every ``group`` columns, survivors
    on a grid ``extra`` bits finer split into 2**extra parts (0: plain codes)."""

    bits: int
    group: int
    keep: int
    quant_group: int
    extra: int = 0


def quant_group_for(ratio: float, config: DeltaDQConfig) -> int:
    if config.quant_group_size is not None:
        return config.quant_group_size
    size = BASE_QUANT_GROUP
    while size < BASE_QUANT_GROUP * ratio / 16:
        size *= 2
    return size


def dropout_groups_for(d_in: int, config: DeltaDQConfig) -> tuple[int, ...]:
    """The group sizes tried for rows of ``d_in``: the config's (those ≤ d_in) or powers of 2."""
    if config.dropout_groups is not None:
        return tuple(g for g in config.dropout_groups if g <= d_in)
    return tuple(2**i for i in range(3, d_in.bit_length()) if 2**i <= d_in) or (d_in,)


def layout_bits(layout: Layout, shape: tuple[int, int]) -> int:
    """Exact bits of a plain layout: survivor codes plus their scales and zeros."""
    d_out, d_in = shape
    kept = d_out * sum(group_keep_counts(d_in, layout.group, layout.keep))
    return kept * layout.bits + n_groups(kept, layout.quant_group) * GROUP_OVERHEAD_BITS


def _within_tolerance(target: Target, nbits: int) -> bool:
    return 16 * math.prod(target.shape) / nbits <= RATIO_TOLERANCE * target.ratio


def fitted_layouts(target: Target, config: DeltaDQConfig, bits: int) -> list[Layout]:
    """For every g, plain ``bits``-bit codes keeping the largest k that fits the budget."""
    quant_group = quant_group_for(target.ratio, config)
    found = []
    for group in dropout_groups_for(target.shape[1], config):
        layout = fitted_layout(target, Layout(bits, group, group, quant_group))
        if layout is not None:
            found.append(layout)
    return found


def unreachable(target: Target, config: DeltaDQConfig) -> ValueError:
    """The error for a target no plain layout lands on, naming the reachable range: keep all
    at the widest code, or keep one per row in the largest group at the narrowest."""
    groups = dropout_groups_for(target.shape[1], config)
    if not groups:
        return ValueError(
            f"deltadq: no dropout group in {config.dropout_groups} fits rows of {target.shape[1]}"
        )
    quant_group = quant_group_for(target.ratio, config)
    numel = math.prod(target.shape)
    widest = Layout(max(config.bits), min(groups), min(groups), quant_group)
    sparsest = Layout(min(config.bits), max(groups), 1, quant_group)
    low = 16 * numel / layout_bits(widest, target.shape)
    high = 16 * numel / layout_bits(sparsest, target.shape)
    return ValueError(
        f"deltadq reaches {low:.2f}-{high:.0f}x for {target.shape} with bits {config.bits} "
        f"and groups {groups}, but no layout lands in [{target.ratio}, "
        f"{RATIO_TOLERANCE * target.ratio:.1f}]x"
    )


def _column_rescale(d_in: int, layout: Layout) -> Tensor:
    """(d_in,) g/k per column (t/k_t in the tail group)."""
    counts = group_keep_counts(d_in, layout.group, layout.keep)
    widths = [min(layout.group, d_in - i * layout.group) for i in range(len(counts))]
    per_group = torch.tensor([w / k for w, k in zip(widths, counts, strict=True)])
    return per_group.repeat_interleave(torch.tensor(widths))


@dataclass(frozen=True)
class Candidate:
    """One layout's encoding and the delta it decodes to, (d_out, d_in) fp32."""

    layout: Layout
    encoded: EncodedTensor
    approx: Tensor


def apply_selection_gram(target: Target, x: Tensor) -> Tensor:
    """``x @ G`` for the Gram matrix that scores candidates: the caller's, or the data-free
    I + 11ᵀ applied without forming it (``x + rowsum(x)``; a d_in-square matrix is 64 MiB
    at d_in = 4096, and forming I + 11ᵀ took three of them)."""
    if target.gram is not None:
        return x @ target.gram
    return x + x.sum(dim=1, keepdim=True)


def output_error(target: Target, approx: Tensor) -> float:
    """tr(E G Eᵀ) for E = Δ - Δ̂: the squared output error on inputs with Gram matrix G
    (:func:`apply_selection_gram`)."""
    err = target.delta - approx
    return float((apply_selection_gram(target, err) * err).sum())


class LayoutEncoder:
    """Encodes one target under many layouts; element hashes are computed once."""

    def __init__(self, target: Target, config: DeltaDQConfig, method: tuple[str, int]) -> None:
        """Hash every element of ``target`` with the config's seed; encodings are named
        ``method``."""
        self.target, self.seed, self.debias, self.method = (
            target,
            config.seed,
            config.debias,
            method,
        )
        rows, cols = target.shape
        self.keys = ranked_keys(rows * cols, self.seed).view(rows, cols)
        self._delta_gram: Tensor | None = None

    def error(self, candidate: Candidate) -> float:
        """The candidate's squared output error (:func:`output_error`)."""
        return output_error(self.target, candidate.approx)

    def encode(self, layout: Layout) -> Candidate:
        target = self.target
        mask = group_mask_from_keys(self.keys, layout.group, layout.keep)
        scaled = target.delta * _column_rescale(target.shape[1], layout)
        survivors = scaled[mask].unsqueeze(0)
        params = {
            **prng_params(self.seed),
            "dropout_group": str(layout.group),
            "keep": str(layout.keep),
            "group_size": str(layout.quant_group),
            "parts": str(1 << layout.extra),
        }
        if layout.extra:
            split = separate_quantize(survivors, layout.bits, layout.extra, layout.quant_group)
            if self.debias:
                gain = self._gain(mask, separate_dequantize(split))
                split = dataclasses.replace(split, params=_scaled(split.params, gain))
            parts = separated_parts("values", split)
            values = separate_dequantize(split)
        else:
            qparams = choose_qparams(survivors, layout.bits, layout.quant_group, clip_search=True)
            codes = quantize(survivors, qparams)
            if self.debias:
                qparams = _scaled(qparams, self._gain(mask, dequantize(codes, qparams).view(-1)))
            parts = quantized_parts("values", codes, qparams)
            values = dequantize(codes, qparams).view(-1)
        name, version = self.method
        encoded = EncodedTensor(name, version, target.shape, target.dtype, params, tuple(parts))
        return Candidate(layout, encoded, self._scatter(mask, values))

    def _scatter(self, mask: Tensor, values: Tensor) -> Tensor:
        approx = torch.zeros(self.target.shape)
        approx[mask] = values
        return approx

    def _gain(self, mask: Tensor, values: Tensor) -> float:
        """The gain c with ⟨cΔ̂, Δ⟩_G = ⟨Δ, Δ⟩_G: cΔ̂'s output projects exactly onto Δ's.

        Low-bit codes with a clipping search shrink the delta (at 1-2 bits its output keeps
        ~0.76 of the true one's projection on the real pair); the loss is systematic, so it
        costs the rebuilt model far more than its share of the activation error suggests.
        """
        if self._delta_gram is None:
            self._delta_gram = apply_selection_gram(self.target, self.target.delta)
        along = float((self._delta_gram * self._scatter(mask, values)).sum())
        return float((self._delta_gram * self.target.delta).sum()) / along if along > 0 else 1.0

    def split(self, plain: Layout, extra: int) -> Candidate | None:
        """``plain`` split into 2**extra parts, keeping as many survivors as the budget allows.

        The split's size depends on the data, so k is found by encoding: start from the plain
        layout's k (an upper bound: the split never costs less) and shrink in proportion to
        the overspend. None if no k lands within 10% of the target.
        """
        target, keep = self.target, plain.keep
        while keep >= 1:
            candidate = self.encode(dataclasses.replace(plain, keep=keep, extra=extra))
            nbits = candidate.encoded.nbits
            if nbits <= target.budget:
                return candidate if _within_tolerance(target, nbits) else None
            keep = min(keep - 1, math.floor(keep * target.budget / nbits))
        return None


def _scaled(params: QuantParams, gain: float) -> QuantParams:
    """``params`` with every value multiplied by ``gain``: scales rescaled, codes unchanged."""
    return dataclasses.replace(params, scale=stored_scale(params.scale.float() * gain))


def fitted_layout(target: Target, layout: Layout) -> Layout | None:
    """``layout`` with the largest k whose plain codes fit ``target``'s budget."""
    fits = [
        k
        for k in range(1, layout.group + 1)
        if layout_bits(dataclasses.replace(layout, keep=k, extra=0), target.shape) <= target.budget
    ]
    return dataclasses.replace(layout, keep=max(fits), extra=0) if fits else None


def row_sample(target: Target) -> Target:
    """``target`` cut to evenly spaced rows of about :data:`SELECTION_ELEMENTS` elements
    (itself if it is no larger)."""
    d_out, d_in = target.shape
    count = max(MIN_SELECTION_ROWS, SELECTION_ELEMENTS // d_in)
    if d_out <= count:
        return target
    rows = torch.linspace(0, d_out - 1, count).round().long()
    return dataclasses.replace(target, delta=target.delta[rows])


def score_layouts(encoder: LayoutEncoder, config: DeltaDQConfig) -> list[tuple[float, Candidate]]:
    """Every candidate that lands in the target window, with its output error: per width,
    plain codes at every g; then the width's best g split into each part count."""
    target = encoder.target
    scored: list[tuple[float, Candidate]] = []
    for bits in config.bits:
        fitted = [
            (encoder.error(candidate), candidate)
            for layout in fitted_layouts(target, config, bits)
            for candidate in [encoder.encode(layout)]
        ]
        if 1 in config.parts:
            scored += [c for c in fitted if _within_tolerance(target, c[1].encoded.nbits)]
        if not fitted:
            continue
        # The split starts from the g that serves this width best, even where plain codes
        # keep everything and so land above the target window (the split then lands in it).
        best = min(fitted, key=lambda c: c[0])[1].layout
        for parts in config.parts:
            extra = parts.bit_length() - 1
            if extra == 0 or bits + extra > MAX_CODE_BITS:
                continue
            split = encoder.split(best, extra)
            if split is not None:
                scored.append((encoder.error(split), split))
    return scored


def encode_full(encoder: LayoutEncoder, chosen: Layout) -> EncodedTensor | None:
    """The layout chosen on a row sample, refitted to the whole matrix's budget; None if it
    no longer lands in the target window there."""
    plain = fitted_layout(encoder.target, chosen)
    if plain is None:
        return None
    candidate = encoder.split(plain, chosen.extra) if chosen.extra else encoder.encode(plain)
    if candidate is None or not _within_tolerance(encoder.target, candidate.encoded.nbits):
        return None
    return candidate.encoded


@register_method
class DeltaDQ(Method[DeltaDQConfig]):
    name = "deltadq"
    config_type = DeltaDQConfig
    uses_gram = True

    @override
    def encode(self, target: Target, config: DeltaDQConfig) -> EncodedTensor:
        method = (self.name, self.version)
        sample = row_sample(target)
        ranked = sorted(
            score_layouts(LayoutEncoder(sample, config, method), config),
            key=lambda c: c[0],
        )
        if sample is target and ranked:
            return ranked[0][1].encoded
        full = LayoutEncoder(target, config, method)
        for _, candidate in ranked:
            encoded = encode_full(full, candidate.layout)
            if encoded is not None:
                return encoded
        raise unreachable(target, config)

    @override
    def paper_bits(self, encoded: EncodedTensor) -> int:
        # Value bits only, every survivor at the stored width: positions, scales and part
        # membership are free in the paper's count (SCIENCE.md §0-1).
        codes = encoded.part("values.codes")
        outer = [p for p in encoded.parts if p.name == "values.outer"]
        return codes.nbits + sum(p.numel for p in outer) * codes.dtype.bits


def compress_model(
    deltas: Mapping[str, Tensor],
    ratio: float,
    grams: Mapping[str, Tensor] | None = None,
    *,
    probe: ModelProbe | None = None,
    **options: Any,
) -> dict[str, EncodedTensor]:
    """DeltaDQ with one dropout group size g for the whole model, as the paper chooses it.

    Every candidate g (``dropout_groups``, default powers of two from 8 to the widest row;
    capped at each matrix's d_in) compresses every matrix at ``ratio``, widths and parts still
    chosen per matrix; the g whose model scores lowest wins. The score is ``probe(ΔŴ by
    name)`` when given (the paper's attention-output error on calibration samples, say), else
    the summed squared output error under each matrix's Gram matrix (data-free proxy without).
    """
    method = get_method(DeltaDQ.name)
    config: DeltaDQConfig = method.make_config(options)
    if not deltas:
        raise ValueError("need at least one delta")
    check_ratio(method, ratio)
    targets = {
        name: make_target(delta, ratio, None if grams is None else grams.get(name))
        for name, delta in deltas.items()
    }
    widest = max(t.shape[1] for t in targets.values())
    candidates = config.dropout_groups or tuple(2**i for i in range(3, widest.bit_length()))
    best: tuple[float, dict[str, EncodedTensor]] | None = None
    for group in candidates:
        try:
            encoded = {
                name: method.encode(
                    target,
                    dataclasses.replace(config, dropout_groups=(min(group, target.shape[1]),)),
                )
                for name, target in targets.items()
            }
        except ValueError:
            continue  # this g cannot reach the ratio on some matrix
        if probe is not None:
            score = probe({name: decode(e) for name, e in encoded.items()})
        else:
            score = sum(output_error(targets[n], decode(e)) for n, e in encoded.items())
        if best is None or score < best[0]:
            best = (score, encoded)
    if best is None:
        raise ValueError(
            f"deltadq: no dropout group in {candidates} reaches {ratio}x on every matrix"
        )
    return best[1]
