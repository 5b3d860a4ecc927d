"""Rows of ``x`` routed to segments (one delta each) inside a launch.

``row_offsets`` (n_segments + 1,) int64: segment s owns rows ``[row_offsets[s],
row_offsets[s + 1])`` of ``x`` and of the output. A stack of one format covers some of the
segments; its ``segments`` table maps each of its entries (the launch's third grid axis) to
the segment it serves.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def segment_rows(row_offsets, segments, entry, block, BLOCK_M: tl.constexpr):
    """(rows, row mask, whether the block is past the segment's rows) of row ``block`` of
    the segment that stack entry ``entry`` serves."""
    segment = tl.load(segments + entry)
    first = tl.load(row_offsets + segment)
    end = tl.load(row_offsets + segment + 1)
    rows = first + block * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < end, first + block * BLOCK_M >= end


def row_offsets(rows_per_segment: Sequence[int], device: torch.device) -> Tensor:
    """The (n_segments + 1,) int64 offsets of consecutive row groups of these sizes, on
    ``device``. Kernels only read them, so each routing is copied to the device once: a
    fresh host-to-device copy per call would wait for the stream's queued work."""
    if any(r < 0 for r in rows_per_segment):
        raise ValueError(f"row counts must be ≥ 0, got {list(rows_per_segment)}")
    return _device_offsets(tuple(rows_per_segment), device)


@functools.lru_cache(maxsize=256)
def _device_offsets(rows_per_segment: tuple[int, ...], device: torch.device) -> Tensor:
    offsets = [0]
    for rows in rows_per_segment:
        offsets.append(offsets[-1] + rows)
    return torch.tensor(offsets, dtype=torch.int64, device=device)


def row_blocks(rows_per_segment: Sequence[int], block_m: int) -> int:
    """Row blocks of the grid: enough for the largest segment."""
    return max(1, int(triton.cdiv(max(rows_per_segment, default=0), block_m)))
