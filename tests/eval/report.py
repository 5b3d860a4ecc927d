"""The pieces every section of the evaluation report is made of: its text, its figures and
the numbers behind them.

A section's ``body`` is Markdown whose every number was formatted from ``data`` by this run;
``data`` goes to ``evaluation.json`` beside the report, so a reader (or a test) can check a
figure against what was measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")  # files only: no display here, and none is needed

# isort: split

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

DPI = 110


@dataclass(frozen=True)
class Section:
    """One part of the report: a ``## title``, its Markdown, and the numbers behind it."""

    title: str
    body: str
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Figures:
    """Writes a report's PNG files into its folder, each named once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: list[str] = []

    def figure(self, width: float = 7.0, height: float = 4.0, **kwargs: Any) -> Figure:
        """A new figure of ``width`` x ``height`` inches (``plt.subplots`` keyword arguments)."""
        made: Figure = plt.figure(figsize=(width, height), layout="constrained", **kwargs)
        return made

    def save(self, figure: Figure, name: str, caption: str) -> str:
        """Write ``figure`` as ``name``.png; the Markdown that shows it with ``caption``."""
        if name in self.names:
            raise ValueError(f"figure {name!r} is written twice")
        self.names.append(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        figure.savefig(self.folder / f"{name}.png", dpi=DPI)
        plt.close(figure)
        return f"![{caption}]({name}.png)\n\n*{caption}*"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool]) -> str:
    """A Markdown table; ``right`` says which columns are numbers (right-aligned)."""
    if len(right) != len(header):
        raise ValueError("one alignment per column")
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)} has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def mib(n_bytes: float) -> str:
    """Bytes as MiB with two decimals."""
    return f"{n_bytes / (1 << 20):.2f}"


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return kept.replace(" ", "-")
