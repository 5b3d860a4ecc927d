"""The report's allocation section: what ADAMIX spends its bits on, and DeltaDQ's group size.

- ADAMIX: the bit width the exact 0/1 program gives each singular-vector pair of each matrix
  (``adamix.compress_with_widths``: the choice ``compress`` stores), as the paper pictures it.
- DeltaDQ: the model compressed with one dropout group size g at a time, scored by the
  paper's criterion (attention-output error of the rebuilt model on calibration headlines)
  and, to check the criterion, by test recovery.
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap

from compressor_svc.methods import adamix, compress
from kernels.reference import decode
from tests.eval import sweep
from tests.eval.report import Figures, Section, table

WIDTH_COLOURS = {0: "#f4f4f4", 2: "#c6dbef", 3: "#6baed6", 4: "#2171b5", 8: "#08306b"}
LEADING_PAIRS = 16


@dataclass(frozen=True)
class Settings:
    adamix_ratios: tuple[float, ...]
    groups: dict[float, tuple[int, ...]]
    """DeltaDQ: target ratio -> the dropout group sizes tried at it."""


# g = 8 cannot reach 128x on MiniLM's 384x384 matrices (deltadq tops out at 124x there).
FULL = Settings((16.0, 128.0), {16.0: (8, 32, 512), 128.0: (32, 512)})
QUICK = Settings((64.0,), {64.0: (16, 64, 256)})


def short_name(name: str) -> str:
    """``L3 up`` for ``encoder.layer.3.intermediate.dense.weight``."""
    return f"L{name.split('.')[2]} {sweep.layer_type(name)}"


def adamix_widths(pair: sweep.Pair, ratio: float) -> sweep.Widths:
    return {
        n: adamix.compress_with_widths(d, ratio, pair.grams[n])[1] for n, d in pair.deltas.items()
    }


def width_summary(widths: dict[str, list[int]]) -> dict[str, Any]:
    """Pairs kept, share of kept pairs per width, and mean width of the leading pairs
    against the rest, over all matrices and per layer type."""
    every = np.array(list(widths.values()))
    kept = every[every > 0]
    by_type: dict[str, list[list[int]]] = {}
    for name, row in widths.items():
        by_type.setdefault(sweep.layer_type(name), []).append(row)
    return {
        "pairs": int(every.size),
        "kept": int(kept.size),
        "share_by_width": {int(b): float((kept == b).mean()) for b in np.unique(kept)},
        "leading_mean_bits": float(every[:, :LEADING_PAIRS].mean()),
        "rest_mean_bits": float(every[:, LEADING_PAIRS:].mean()),
        "kept_by_type": {
            kind: float((np.array(rows) > 0).sum(axis=1).mean()) for kind, rows in by_type.items()
        },
    }


def plot_widths(results: dict[float, dict[str, list[int]]], figures: Figures) -> str:
    widths = sorted(WIDTH_COLOURS)
    colours = ListedColormap([WIDTH_COLOURS[b] for b in widths])
    norm = BoundaryNorm([*(b - 0.5 for b in widths), widths[-1] + 0.5], colours.N)
    figure = figures.figure(5.5 * len(results), 7)
    axes = np.atleast_1d(figure.subplots(1, len(results), sharey=True))
    image = None
    for ax, (ratio, by_matrix) in zip(axes, results.items(), strict=True):
        names = list(by_matrix)
        image = ax.imshow(
            np.array([by_matrix[n] for n in names]),
            aspect="auto",
            interpolation="nearest",
            cmap=colours,
            norm=norm,
        )
        ax.set_yticks(range(len(names)), [short_name(n) for n in names], fontsize=6)
        last_kept = max(
            max((i for i, b in enumerate(w) if b), default=0) for w in by_matrix.values()
        )
        ax.set_xlim(-0.5, min(len(next(iter(by_matrix.values()))), int(last_kept * 1.1) + 2))
        ax.set_xlabel("singular-vector pair (largest sigma first; pairs past the axis: 0)")
        ax.set_title(f"ADAMIX at {ratio:g}x: bits per pair")
    assert image is not None
    figure.colorbar(image, ax=list(axes), ticks=widths, label="bits (0: dropped)")
    return figures.save(
        figure, "adamix-bit-allocation", "Bits ADAMIX gives each singular-vector pair, per matrix"
    )


def adamix_part(
    pair: sweep.Pair, settings: Settings, figures: Figures, known: Mapping[float, sweep.Widths]
) -> tuple[str, Any]:
    results = {r: known.get(r) or adamix_widths(pair, r) for r in settings.adamix_ratios}
    summaries = {ratio: width_summary(w) for ratio, w in results.items()}
    kinds = list(sweep.LAYER_TYPES.values())
    lines = []
    for ratio, s in summaries.items():
        shares = ", ".join(f"{b}: {v:.0%}" for b, v in sorted(s["share_by_width"].items()))
        lines.append(
            [
                f"{ratio:g}x",
                f"{s['kept']:,} / {s['pairs']:,}",
                shares,
                f"{s['leading_mean_bits']:.2f}",
                f"{s['rest_mean_bits']:.3f}",
                *(f"{s['kept_by_type'][k]:.1f}" for k in kinds),
            ]
        )
    header = (
        "ratio",
        "pairs kept",
        "kept pairs by width",
        f"mean bits, first {LEADING_PAIRS}",
        "mean bits, rest",
        *(f"kept/matrix {k}" for k in kinds),
    )
    text = (
        "Each matrix's 384 singular-vector pairs get 0 (dropped), 2, 3, 4 or 8 bits from the "
        "exact 0/1 program under the matrix's budget; the allocation is what the compressor "
        "stores (`compressor_svc.methods.adamix.compress_with_widths`).\n\n"
        + plot_widths(results, figures)
        + "\n\n"
        + table(header, lines, [False, True, False, *[True] * (len(header) - 3)])
    )
    data = {f"{r:g}": {"summary": summaries[r], "widths": results[r]} for r in results}
    return text, data


def group_scores(pair: sweep.Pair, ratio: float, groups: tuple[int, ...]) -> list[dict[str, Any]]:
    """DeltaDQ at ``ratio`` with each dropout group size: probe score, errors and recovery."""
    probe = sweep.attention_probe(pair)
    scores = []
    for g in groups:
        start = time.perf_counter()
        try:
            encoded = {
                n: compress(
                    d,
                    "deltadq",
                    ratio=ratio,
                    gram=pair.grams[n],
                    dropout_groups=(min(g, d.shape[1]),),
                )
                for n, d in pair.deltas.items()
            }
        except ValueError as exc:
            scores.append({"group": g, "unreachable": str(exc)})
            continue
        seconds = time.perf_counter() - start
        approx = {n: decode(e) for n, e in encoded.items()}
        row = sweep.score(pair, "deltadq", ratio, encoded, seconds, approx=approx)
        scores.append(
            {
                "group": g,
                "attention_error": probe(approx),
                "activation_error": row.activation_error,
                "recovery": row.metrics["recovery"],
                "accuracy": row.metrics["accuracy"],
                "ratio": row.ratio,
            }
        )
    return scores


def plot_groups(results: dict[float, list[dict[str, Any]]], figures: Figures) -> str:
    figure = figures.figure(10, 3.6)
    left, right = figure.subplots(1, 2)
    for ratio, scores in results.items():
        ok = [s for s in scores if "attention_error" in s]
        groups = [s["group"] for s in ok]
        left.plot(groups, [s["attention_error"] for s in ok], "o-", label=f"{ratio:g}x")
        right.plot(groups, [s["recovery"] for s in ok], "o-", label=f"{ratio:g}x")
        chosen = min(ok, key=lambda s: s["attention_error"])
        left.plot([chosen["group"]], [chosen["attention_error"]], "k*", ms=10)
        right.plot([chosen["group"]], [chosen["recovery"]], "k*", ms=10)
    for ax, title in ((left, "attention-output error (squared, summed)"), (right, "recovery")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dropout group size g")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_yscale("log")
    return figures.save(
        figure,
        "deltadq-group-size",
        "DeltaDQ with one dropout group size for the whole model (★: the criterion's choice)",
    )


def deltadq_part(pair: sweep.Pair, settings: Settings, figures: Figures) -> tuple[str, Any]:
    results = {r: group_scores(pair, r, groups) for r, groups in settings.groups.items()}
    lines = []
    for ratio, scores in results.items():
        ok = [s for s in scores if "attention_error" in s]
        chosen = min(ok, key=lambda s: s["attention_error"])
        best = max(ok, key=lambda s: s["recovery"])
        for s in ok:
            mark = " (chosen)" if s is chosen else ""
            mark += " (best recovery)" if s is best else ""
            lines.append(
                [
                    f"{ratio:g}x",
                    f"{s['group']}{mark}",
                    f"{s['attention_error']:.4g}",
                    f"{s['activation_error']:.3f}",
                    f"{s['recovery']:.3f}",
                    f"{s['accuracy']:.3f}",
                ]
            )
        lines += [
            [f"{ratio:g}x", str(s["group"]), "unreachable", "", "", ""]
            for s in scores
            if "unreachable" in s
        ]
    header = ("ratio", "g", "attention error", "activation error", "recovery", "accuracy")
    text = (
        "DeltaDQ's paper picks one dropout group size g for the model by the attention-output "
        f"error on calibration samples ({sweep.PROBE_EXAMPLES} calibration headlines here); "
        "the survivors' widths and parts are still chosen per matrix.\n\n"
        + plot_groups(results, figures)
        + "\n\n"
        + table(header, lines, [False, False, True, True, True, True])
    )
    return text, {f"{r:g}": s for r, s in results.items()}


def section(
    pair: sweep.Pair, figures: Figures, settings: Settings, known: Mapping[float, sweep.Widths]
) -> Section:
    """``known``: ADAMIX widths the sweep already chose, by ratio (others are computed)."""
    start = time.perf_counter()
    adamix_text, adamix_data = adamix_part(pair, settings, figures, known)
    deltadq_text, deltadq_data = deltadq_part(pair, settings, figures)
    body = f"### ADAMIX: bits per singular vector\n\n{adamix_text}\n\n"
    body += f"### DeltaDQ: the group size\n\n{deltadq_text}"
    data = {"adamix": adamix_data, "deltadq": deltadq_data}
    return Section("Where the bits go", body, data, time.perf_counter() - start)
