"""The report's "what to choose" section: rules read off this run's quality numbers.

Nothing here is typed in: which method leads at a ratio, how far each can go before the
rebuilt model drifts, and what it costs in time all come from the sweep's rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import median
from typing import Any

from tests.eval import sweep
from tests.eval.quality import LABELS, Results
from tests.eval.report import Section, table

RECOVERY_BARS = (0.95, 0.9)
MiB = 1 << 20


def ratio_class(row: sweep.Row) -> int:
    """The power of two a row's exact ratio rounds to (BitDelta's 15.9x counts as 16x)."""
    return int(2 ** round(math.log2(row.ratio)))


def by_class(rows: Sequence[sweep.Row]) -> dict[int, list[sweep.Row]]:
    classes: dict[int, list[sweep.Row]] = {}
    for row in rows:
        classes.setdefault(ratio_class(row), []).append(row)
    return dict(sorted(classes.items()))


def leaders(results: Results) -> list[str]:
    """Per ratio class, the method with the best recovery, the runner-up and the lowest KL."""
    lines = []
    for ratio, rows in by_class(results.rows).items():
        ranked = sorted(rows, key=lambda r: r.metrics["recovery"], reverse=True)
        first = ranked[0]
        text = (
            f"- **~{ratio}x**: {LABELS[first.method]} keeps the most of the fine-tune "
            f"(recovery {first.metrics['recovery']:.3f}, KL {first.metrics['kl']:.4f}"
        )
        if len(ranked) > 1:
            second = ranked[1]
            text += f"; next {LABELS[second.method]}, {second.metrics['recovery']:.3f}"
        lowest_kl = min(rows, key=lambda r: r.metrics["kl"])
        if lowest_kl is not first:
            text += f"; lowest KL: {LABELS[lowest_kl.method]}, {lowest_kl.metrics['kl']:.4f}"
        lines.append(text + ").")
    return lines


def reach_table(results: Results) -> str:
    """Per method: the highest exact ratio whose recovery clears each bar, and its time."""
    lines = []
    for method, label in LABELS.items():
        rows = results.of(method)
        if not rows:
            continue
        cells = [label]
        for bar in RECOVERY_BARS:
            passing = [r for r in rows if r.metrics["recovery"] >= bar]
            cells.append(f"{max(r.ratio for r in passing):.1f}x" if passing else "not reached")
        cells.append(f"{median(r.seconds for r in rows):.1f}")
        lines.append(cells)
    header = (
        "method",
        *(f"highest ratio with recovery >= {bar}" for bar in RECOVERY_BARS),
        "median seconds to compress",
    )
    return table(header, lines, [False, True, True, True])


def accuracy_note(results: Results) -> str:
    tuned = results.references["fine-tuned"]["accuracy"]
    base = results.references["base"]["accuracy"]
    step = 1 / results.references["fine-tuned"]["n"]
    worst = min(results.rows, key=lambda r: r.metrics["accuracy"])
    return (
        f"- Accuracy alone separates little on this task: the base scores {base:.3f} and the "
        f"fine-tune {tuned:.3f} (one headline = {step:.4f}); the worst rebuilt model here, "
        f"{LABELS[worst.method]} at {worst.target:g}x, scores {worst.metrics['accuracy']:.3f}. "
        "Read recovery and KL, which see every logit."
    )


def storage_notes(storage: Mapping[str, Any]) -> list[str]:
    """What the store section's numbers mean for deploying: families and memory."""
    totals, models = storage["dedup"]["totals"][-1], storage["dedup"]["models"]
    children = models[1:]
    child_mib = sum(m["new_chunk_bytes"] for m in children) / len(children) / MiB
    largest = storage["memory"]["largest"][-1]
    slopes = storage["memory_slopes"]
    return [
        f"- **Keep a family of fine-tunes in one store.** {totals['models']} related models "
        f"took {totals['deduplicated'] / MiB:.2f} MiB deduplicated against "
        f"{totals['without_dedup'] / MiB:.2f} MiB stored separately "
        f"({totals['without_dedup'] / totals['deduplicated']:.1f}x less); a child that "
        f"retrained one layer added {child_mib:.2f} MiB next to the parent's "
        f"{models[0]['new_chunk_bytes'] / MiB:.2f} MiB.",
        f"- **Size the compressor by its largest tensor, not the model.** Its peak grew by "
        f"{slopes['many']:.2f} MiB per MiB of model as tensors were added, and by "
        f"{slopes['largest']:.1f} MiB per MiB as one tensor grew (a {largest['tensor_mib']} "
        f"MiB tensor peaked at {largest['peak_mib']:.0f} MiB with {storage['method']}).",
    ]


def section(results: Results, storage: Mapping[str, Any]) -> Section:
    body = "\n".join(
        [
            "From this run's numbers on the MiniLM pair (one small encoder: check the ordering "
            "on your own model with `deltavault plan` before committing to a method):",
            "",
            *leaders(results),
            accuracy_note(results),
            *storage_notes(storage),
            "",
            reach_table(results),
        ]
    )
    return Section("What to choose", body, {"leaders": leading_methods(results)})


def leading_methods(results: Results) -> dict[str, str]:
    """Ratio class -> the method with the best recovery there."""
    return {
        str(ratio): max(rows, key=lambda r: r.metrics["recovery"]).method
        for ratio, rows in by_class(results.rows).items()
    }
