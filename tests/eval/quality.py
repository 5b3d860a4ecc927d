"""The report's quality section: every method at every ratio on the real pair.

Per method and target ratio (``Sweep``), the 36 encoder linear deltas are compressed through
``compressor_svc.methods.compress`` (what the compressor service runs) and scored by
``tests.eval.sweep.score``: the rebuilt model's task metrics next to base and fine-tune, the
activation error of each layer type, and the stored bits per weight.
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter

from tests.eval import sweep
from tests.eval.report import Figures, Section, table

# Display names: what each row runs, as a user would ask for it.
LABELS = {
    "dare": "DARE",
    "bitdelta": "BitDelta",
    "deltacome": "Delta-CoMe",
    "deltadq": "DeltaDQ (paper)",
    "deltadq-debias": "DeltaDQ + debias (ours)",
    "adamix-paper": "ADAMIX (paper)",
    "adamix": "ADAMIX + U error (ours)",
}
REFERENCES = ("base", "deltas dropped", "fine-tuned")


@dataclass(frozen=True)
class Sweep:
    methods: tuple[str, ...]
    ratios: tuple[float, ...]


FULL = Sweep(tuple(LABELS), (8.0, 16.0, 32.0, 64.0, 128.0, 512.0))
QUICK = Sweep(("dare", "bitdelta", "deltacome", "deltadq-debias", "adamix"), (64.0,))


def ratio_axis(ax: Axes) -> None:
    """A log2 x axis of compression ratios, labelled 8x, 16x, ..."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.set_xlabel("exact compression ratio")


@dataclass(frozen=True)
class Results:
    """The sweep's rows, the targets no setting of a method reaches, and the references."""

    rows: list[sweep.Row]
    unreachable: list[dict[str, Any]]
    references: dict[str, dict[str, float]]
    widths: dict[float, sweep.Widths] = dataclasses.field(default_factory=dict)
    """Target ratio -> ADAMIX's (ours, per matrix) widths at it."""

    def of(self, method: str) -> list[sweep.Row]:
        return [row for row in self.rows if row.method == method]


def run(pair: sweep.Pair, settings: Sweep) -> Results:
    """Measure every (method, ratio) of ``settings``; a ratio a method cannot reach is noted."""
    rows: list[sweep.Row] = []
    unreachable: list[dict[str, Any]] = []
    widths: dict[float, sweep.Widths] = {}
    for method in settings.methods:
        for target in sweep.targets(method) or settings.ratios:
            try:
                row, chosen = sweep.measure(pair, method, target)
            except ValueError as exc:
                unreachable.append({"method": method, "target": target, "why": str(exc)})
                continue
            rows.append(row)
            if method == "adamix":
                widths[target] = chosen
    references = {
        "base": sweep.task_metrics(pair, sweep.logits(pair.base, pair.test)),
        "deltas dropped": sweep.task_metrics(pair, pair.dropped_logits),
        "fine-tuned": sweep.task_metrics(pair, pair.finetuned_logits),
    }
    return Results(rows, unreachable, references, widths)


def quality_table(results: Results) -> str:
    header = (
        "method",
        "target",
        "exact ratio",
        "paper ratio",
        "bits/weight",
        "weight err",
        "activation err",
        "projection",
        "accuracy",
        "macro-F1",
        "KL",
        "recovery",
        "seconds",
    )
    lines: list[list[str]] = []
    for name, m in results.references.items():
        blank = [""] * 7
        lines.append([name, *blank, *metric_cells(m), ""])
    for row in results.rows:
        lines.append(
            [
                LABELS[row.method],
                f"{row.target:g}x",
                f"{row.ratio:.1f}",
                f"{row.paper:.1f}",
                f"{row.bits_per_weight:.3f}",
                f"{row.weight_error:.3f}",
                f"{row.activation_error:.3f}",
                f"{row.projection:.3f}",
                *metric_cells(row.metrics),
                f"{row.seconds:.1f}",
            ]
        )
    return table(header, lines, [False, *[True] * (len(header) - 1)])


def metric_cells(metrics: Mapping[str, float]) -> list[str]:
    return [
        f"{metrics['accuracy']:.3f}",
        f"{metrics['macro_f1']:.3f}",
        f"{metrics['kl']:.4f}",
        f"{metrics['recovery']:.3f}",
    ]


def layer_table(results: Results) -> str:
    kinds = list(sweep.LAYER_TYPES.values())
    lines = [
        [
            LABELS[row.method],
            f"{row.target:g}x",
            *(f"{row.by_layer_type[k]['activation_error']:.3f}" for k in kinds),
        ]
        for row in results.rows
    ]
    return table(("method", "target", *kinds), lines, [False, True, *[True] * len(kinds)])


def plot_quality(results: Results, figures: Figures) -> str:
    figure = figures.figure(11, 3.6)
    axes = figure.subplots(1, 3)
    panels = (("recovery", "delta recovery (1 = exact)"), ("kl", "KL(p_ft ‖ p)"), ("accuracy", ""))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for method, label in LABELS.items():
            rows = results.of(method)
            if rows:
                metric = [r.metrics[key] for r in rows]
                ax.plot([r.ratio for r in rows], metric, "o-", ms=3, label=label)
        ratio_axis(ax)
        ax.set_title(title or "test accuracy")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    for name, style in (("base", ":"), ("fine-tuned", "--")):
        axes[2].axhline(results.references[name]["accuracy"], color="gray", ls=style, label=name)
    axes[2].legend(fontsize=7)
    return figures.save(
        figure,
        "quality-vs-ratio",
        "Rebuilt model on the test split against the compression ratio, per method",
    )


def plot_layers(results: Results, figures: Figures) -> str:
    figure = figures.figure(11, 6)
    axes = figure.subplots(2, 3, sharex=True, sharey=True).flatten()
    for ax, kind in zip(axes, sweep.LAYER_TYPES.values(), strict=True):
        for method, label in LABELS.items():
            rows = results.of(method)
            if rows:
                errors = [r.by_layer_type[kind]["activation_error"] for r in rows]
                ax.plot([r.ratio for r in rows], errors, "o-", ms=3, label=label)
        ax.set_title(f"{kind}: ‖X(ΔW-ΔŴ)ᵀ‖ / ‖XΔWᵀ‖", fontsize=9)
        ratio_axis(ax)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return figures.save(
        figure,
        "activation-error-by-layer",
        "Activation error per layer type (all six layers pooled) against the compression ratio",
    )


def intro(pair: sweep.Pair, settings: Sweep) -> str:
    numel = sum(d.numel() for d in pair.deltas.values())
    ratios = ", ".join(f"{r:g}x" for r in settings.ratios)
    layers = sorted({sweep.layer(name) for name in pair.deltas})
    return (
        f"The {len(pair.deltas)} linear weight deltas of encoder layers "
        f"{', '.join(map(str, layers))} "
        f"({numel:,} weights, {numel * 2 / 1e6:.1f} MB as fp16) are compressed with each "
        f"method at {ratios} (BitDelta at its own ratios: one or two sign planes), each "
        "with its layer's calibration Gram matrix; every other tensor stays exact. "
        "*exact ratio* counts every stored bit of those matrices (codes, scales, zero "
        "points, sigma, positions), *paper ratio* what the method's paper counts, "
        "*bits/weight* the stored bits per weight. Errors are pooled over the matrices on "
        f"{next(iter(pair.samples.values())).shape[0]:,} activation-split tokens the "
        "compressors never saw; *projection* is how much of the delta's output survives "
        "(1: nothing lost, below 1: the delta is shrunk). On the "
        f"{len(pair.test)}-headline test split: accuracy and macro-F1 of the rebuilt model "
        "(one headline is "
        f"{100 / len(pair.test):.2f} points), KL(p_ft ‖ p) from the fine-tune's topic "
        "distribution, and *recovery* 1 - ‖z - z_ft‖ / ‖z₀ - z_ft‖ of the logits, where z₀ "
        "drops the compressed deltas (0: no better than dropping them, 1: exact). MiniLM has "
        "no gated MLP: its layer types are attention q/k/v/o and MLP up/down."
    )


def section(pair: sweep.Pair, figures: Figures, settings: Sweep) -> tuple[Section, Results]:
    """The section and the results the summary draws on."""
    start = time.perf_counter()
    results = run(pair, settings)
    missing = "\n".join(
        f"- {LABELS[u['method']]} at {u['target']:g}x: unreachable ({u['why']})"
        for u in results.unreachable
    )
    body = "\n\n".join(
        part
        for part in (
            intro(pair, settings),
            plot_quality(results, figures),
            quality_table(results),
            missing,
            "Activation error per layer type (relative, pooled over the six layers):",
            plot_layers(results, figures),
            layer_table(results),
        )
        if part
    )
    data = {
        "rows": [dataclasses.asdict(row) for row in results.rows],
        "unreachable": results.unreachable,
        "references": results.references,
    }
    seconds = time.perf_counter() - start
    return Section("Quality against compression", body, data, seconds), results
