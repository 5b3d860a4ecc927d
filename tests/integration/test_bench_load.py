"""The load benchmark, tiny: real store and compressor processes, 2 compress streams and 4
readers for 4 s. Every operation succeeds, the report has its figures, no server outlives it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.bench import bench_load

TINY = [
    "--compressors", "2", "--readers", "4", "--seconds", "4", "--margin", "20",
    "--hidden", "64", "--layers", "1", "--seed-refs", "2",
    "--store-arg=--workers 8",
]  # fmt: skip
OP_ROW = re.compile(r"^(compress|resolve|manifest|read) +(\d+)  (\S+)(.*)$", re.MULTILINE)
PROCESS_ROW = re.compile(r"^(store|compressor|client) +(\d+)((?: +\d+){7})$", re.MULTILINE)


@pytest.mark.slow
def test_a_tiny_load_succeeds_and_leaves_no_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_load.main(TINY) == 0
    out = capsys.readouterr().out
    assert "OK: every operation succeeded" in out
    assert "store args: --workers 8" in out
    assert re.search(r"calls shed by admission limits .*: store \w+", out)

    ops = {m.group(1): m for m in OP_ROW.finditer(out)}
    assert set(ops) == set(bench_load.KINDS)
    for kind, row in ops.items():
        assert int(row.group(2)) > 0, kind
        assert row.group(3) == "-", f"{kind} errors: {row.group(3)}"
        p50, p99, top, per_second, mib = map(float, row.group(4).split())
        assert 0 <= p50 <= p99 <= top and per_second > 0
        assert mib > 0 or kind in ("resolve", "manifest"), kind  # those move no chunk bytes

    processes = {m.group(1): int(m.group(2)) for m in PROCESS_ROW.finditer(out)}
    assert set(processes) == {"store", "compressor", "client"}
    for name in ("store", "compressor"):
        assert not Path(f"/proc/{processes[name]}").exists(), f"{name} still running"
