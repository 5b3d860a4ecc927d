"""``python -m tests.eval --quick`` end to end: the report CI can afford, as a user runs it.

Builds (or reuses) the quick MiniLM pair, measures every section, and checks that the
report shows every figure it wrote and that its numbers are the ones in evaluation.json.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.embedded import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(1600)]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("evaluation")
    subprocess.run(
        [sys.executable, "-m", "tests.eval", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        check=True,
        timeout=1500,
    )
    return (
        out,
        (out / "evaluation.md").read_text(),
        json.loads((out / "evaluation.json").read_text()),
    )


def test_every_figure_is_written_and_shown(report: tuple[Path, str, dict[str, Any]]) -> None:
    out, text, data = report
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(shown) == sorted(f"{name}.png" for name in data["figures"])
    assert len(shown) >= 5
    for name in shown:
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_sections_and_quick_title(report: tuple[Path, str, dict[str, Any]]) -> None:
    _, text, data = report
    assert text.startswith("# Evaluation: quality against compression (quick variant")
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert headings == list(data["sections"])
    assert headings[0] == "What to choose"
    assert "python -m tests.eval --quick" in text


def test_quality_numbers_are_the_measured_ones(report: tuple[Path, str, dict[str, Any]]) -> None:
    _, text, data = report
    rows = data["sections"]["Quality against compression"]["rows"]
    assert {row["method"] for row in rows} >= {"adamix", "deltadq-debias", "dare", "bitdelta"}
    for row in rows:
        cells = (
            f"| {row['ratio']:.1f} | {row['paper']:.1f} | {row['bits_per_weight']:.3f} |"
            f" {row['weight_error']:.3f} | {row['activation_error']:.3f} |"
        )
        assert cells in text, row["method"]
        assert 0 < row["metrics"]["recovery"] <= 1
        assert set(row["by_layer_type"]) == {"q", "k", "v", "o", "up", "down"}


def test_allocation_matches_the_stored_budget(report: tuple[Path, str, dict[str, Any]]) -> None:
    _, _, data = report
    section = data["sections"]["Where the bits go"]
    for ratio, found in section["adamix"].items():
        widths = found["widths"]
        assert all(len(pairs) == 384 for pairs in widths.values())
        kept = sum(b > 0 for pairs in widths.values() for b in pairs)
        assert kept == found["summary"]["kept"], ratio
    for scores in section["deltadq"].values():
        assert any("attention_error" in s for s in scores)
