"""Quality against compression on a real fine-tuned pair, every method, several ratios.

``python -m tests.bench.bench_methods [--ratios 8 16 32 64 128 512] [--methods ...]``

The pair is the MiniLM encoder fine-tuned on BBC headline topics (``tests/models``; built
and cached on first use). Each of the 36 linear weight deltas of the encoder is compressed
with its Gram matrix XᵀX from held-out calibration text run through the base model; the
other tensors stay exact. Per method and ratio it prints the achieved exact and
paper-style ratios over those matrices, the relative weight error ‖ΔW-ΔŴ‖/‖ΔW‖ and
activation error ‖X(ΔW-ΔŴ)ᵀ‖/‖XΔWᵀ‖ and output projection ⟨XΔŴᵀ, XΔWᵀ⟩/‖XΔWᵀ‖² (all over
the 36 matrices together, X from a fourth, disjoint split), compression seconds, and on the
test split, for the model rebuilt as base + ΔŴ: accuracy, macro-F1, agreement with the
fine-tune's predictions, the mean KL(p_ft ‖ p_rebuilt) of the topic distributions, and delta
recovery
1 - ‖z - z_ft‖ / ‖z_0 - z_ft‖ on the logits, z_0 being the model with the compressed layers'
deltas dropped (0: no better than dropping them, 1: exact).
A benchmark, not a test.
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import argparse
from collections.abc import Mapping, Sequence

import torch

from tests.eval.sweep import Pair, load_pair, logits, measure, targets, task_metrics
from tests.models.finetune_pair import ensure_pair
from tests.models.task import default_pair_dir

METHODS = (
    "dare",
    "bitdelta",
    "deltacome",
    "deltadq",
    "deltadq-plain",
    "deltadq-debias",
    "adamix",
    "adamix-paper",
)
RATIOS = (8.0, 16.0, 32.0, 64.0, 128.0, 512.0)


def metric_cells(metrics: Mapping[str, float]) -> str:
    return (
        f"{metrics['accuracy']:.3f} | {metrics['macro_f1']:.3f} | {metrics['agreement']:.3f} | "
        f"{metrics['kl']:.4f} | {metrics['recovery']:.3f}"
    )


def reference_rows(pair: Pair) -> list[str]:
    rows = []
    for label, z in (
        ("base", logits(pair.base, pair.test)),
        ("deltas dropped", pair.dropped_logits),
        ("fine-tuned", pair.finetuned_logits),
    ):
        metrics = task_metrics(pair, z)
        rows.append(f"| {label} | | | | | | | | {metric_cells(metrics)} |")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    ensure_pair(default_pair_dir())
    pair = load_pair()
    print(
        "| method | target | exact ratio | paper ratio | weight err | activation err | "
        "projection | seconds | accuracy | macro-F1 | agreement | KL | recovery |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for line in reference_rows(pair):
        print(line, flush=True)
    for method in args.methods:
        for target in targets(method) or args.ratios:
            try:
                row, _ = measure(pair, method, target)
            except ValueError as exc:
                print(f"| {method} | {target:g}x | unreachable: {str(exc)[:60]} |", flush=True)
                continue
            print(
                f"| {method} | {target:g}x | {row.ratio:.1f} | {row.paper:.1f} | "
                f"{row.weight_error:.3f} | {row.activation_error:.3f} | {row.projection:.3f} | "
                f"{row.seconds:.1f} | "
                f"{metric_cells(row.metrics)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
