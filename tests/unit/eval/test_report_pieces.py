"""The evaluation report's pure pieces: tables, names, error sums and the summary's rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.eval import choose, sweep
from tests.eval.quality import Results
from tests.eval.report import Figures, anchor, table


def test_table_aligns_number_columns_and_refuses_ragged_rows() -> None:
    text = table(("method", "ratio"), [["adamix", "16.0"]], [False, True])
    assert text.splitlines() == ["| method | ratio |", "|---|---:|", "| adamix | 16.0 |"]
    with pytest.raises(ValueError, match="cells"):
        table(("method", "ratio"), [["adamix"]], [False, True])


def test_figures_are_written_once_each(tmp_path: Path) -> None:
    figures = Figures(tmp_path)
    markdown = figures.save(figures.figure(), "curve", "A curve")
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
    assert markdown.startswith("![A curve](curve.png)")
    with pytest.raises(ValueError, match="twice"):
        figures.save(figures.figure(), "curve", "again")


def test_layer_names() -> None:
    name = "encoder.layer.3.intermediate.dense.weight"
    assert (sweep.layer(name), sweep.layer_type(name)) == (3, "up")
    assert sweep.layer_type("encoder.layer.0.attention.output.dense.weight") == "o"
    with pytest.raises(KeyError):
        sweep.layer_type("encoder.layer.0.attention.output.LayerNorm.weight")
    with pytest.raises(KeyError):
        sweep.layer("embeddings.word_embeddings.weight")


def test_errors_pool_before_taking_ratios() -> None:
    delta = torch.eye(2)
    x = torch.eye(2)
    exact = sweep.matrix_errors(delta, delta, x)
    dropped = sweep.matrix_errors(delta, torch.zeros(2, 2), x)
    assert exact.relative() == {"weight_error": 0.0, "activation_error": 0.0, "projection": 1.0}
    pooled = (exact + dropped).relative()
    assert pooled["weight_error"] == pytest.approx(0.5**0.5)
    assert pooled["projection"] == pytest.approx(0.5)


def test_anchor_matches_github_headings() -> None:
    assert anchor("Store: deduplication, throughput") == "store-deduplication-throughput"


def row(method: str, ratio: float, recovery: float, kl: float, seconds: float = 1.0) -> sweep.Row:
    metrics = {"recovery": recovery, "kl": kl, "accuracy": 0.9}
    return sweep.Row(method, ratio, ratio, ratio, 16 / ratio, 0, 0, 1, seconds, metrics)


def results(*rows: sweep.Row) -> Results:
    references = {"base": {"accuracy": 0.8, "n": 400.0}, "fine-tuned": {"accuracy": 0.9, "n": 400}}
    return Results(list(rows), [], references)


def test_leaders_group_bitdelta_with_the_nearest_round_ratio() -> None:
    found = results(
        row("bitdelta", 15.9, 0.8, 0.002), row("adamix", 16.1, 0.9, 0.003), row("dare", 64, 0.7, 1)
    )
    lines = choose.leaders(found)
    assert len(lines) == 2
    assert lines[0].startswith("- **~16x**: ADAMIX")
    assert "next BitDelta, 0.800" in lines[0]
    assert "lowest KL: BitDelta, 0.0020" in lines[0]
    assert choose.leading_methods(found) == {"16": "adamix", "64": "dare"}


def test_reach_table_takes_the_highest_ratio_clearing_each_bar() -> None:
    found = results(
        row("adamix", 8, 0.97, 0, 4.0), row("adamix", 32, 0.93, 0, 2.0), row("dare", 8, 0.5, 0)
    )
    lines = choose.reach_table(found).splitlines()
    assert lines[2] == "| DARE | not reached | not reached | 1.0 |"
    assert lines[3] == "| ADAMIX + U error (ours) | 8.0x | 32.0x | 3.0 |"


def test_storage_notes_read_the_store_section() -> None:
    mib = 1 << 20
    storage = {
        "method": "bitdelta",
        "dedup": {
            "totals": [{"models": 3, "deduplicated": 6 * mib, "without_dedup": 18 * mib}],
            "models": [{"new_chunk_bytes": 5 * mib}, *[{"new_chunk_bytes": mib // 2}] * 2],
        },
        "memory": {"largest": [{"tensor_mib": 32, "peak_mib": 700.0}]},
        "memory_slopes": {"many": 0.5, "largest": 13.8},
    }
    family, memory = choose.storage_notes(storage)
    assert "3 related models took 6.00 MiB deduplicated against 18.00 MiB" in family
    assert "(3.0x less)" in family
    assert "added 0.50 MiB next to the parent's 5.00 MiB" in family
    assert "0.50 MiB per MiB" in memory
    assert "13.8 MiB per MiB" in memory
    assert "a 32 MiB tensor peaked at 700 MiB with bitdelta" in memory
