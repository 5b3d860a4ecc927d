"""The kernel benchmark runs end to end (tiny shapes, timed on the CPU interpreter), so its
CUDA path, which differs only in the timer, does not rot between GPU sessions."""

from __future__ import annotations

import pytest

from tests.bench import bench_kernels


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("masks", ["bitmap", "hash"])
def test_bench_prints_every_format(masks: str, capsys: pytest.CaptureFixture[str]) -> None:
    bench_kernels.main(["--shapes", "40x72", "--batches", "1", "--time", "--masks", masks])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(rows) == {"adamix", "bitdelta", "deltadq", "dare"}
    assert all(len(cells) == 13 for cells in rows.values())
