"""The Triton kernels at 7B layer shapes: bytes each moves, and on a GPU its time against the
dense fp16 path and against its bytes-moved floor.

``python -m tests.bench.bench_kernels [--shapes 4096x4096 11008x4096 4096x11008]
[--batches 1 16 64] [--ratio 16] [--masks bitmap|hash] [--time]``

Shapes are d_out x d_in. Each lossy format gets a synthetic delta at about ``--ratio`` x
(fresh random values; the kernels' cost depends on the format, not on the values):
ADAMIX-style low rank (8/3/2-bit pairs, 10/30/60% of the bits; Delta-CoMe is the same
kernel), BitDelta (one sign plane), DeltaDQ (4-bit codes, 16 of every 64 kept), DARE (4-bit
codes, a quarter kept; their masks as ``--masks`` says, see ``kernels.layout.SparseMasks``).
Per format, shape and batch it prints the bytes ``delta_linear``
reads and writes against the base-only product (the weight read once: the floor for any
path that does not keep weights on chip), and the bytes of ``decode``.

On CUDA (or with ``--time``, which times whatever device runs, the CPU interpreter too) it
also times, with ``triton.testing.do_bench`` on CUDA: the base-only fp16 matmul, the dense
fp16 matmul with a materialised fine-tuned weight, ``delta_linear``, and ``decode``; the
floor is bytes / the bandwidth of a device copy measured first. The issue's target:
``delta_linear`` at batch 1 within 1.3x of the base-only matmul for 16x deltas.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

import kernels
from kernels.layout import DeltaStack, SparseMasks
from kernels.reference import EncodedTensor
from tests.support import deltas

SHAPES = ("4096x4096", "11008x4096", "4096x11008")
BATCHES = (1, 16, 64)
FP16 = 2
GROUP = 128


def _parse_shape(text: str) -> tuple[int, int]:
    d_out, d_in = (int(v) for v in text.lower().split("x"))
    return d_out, d_in


def _low_rank_pairs(shape: tuple[int, int], budget: int) -> list[tuple[int, int]]:
    """(width, count) buckets spending 10/30/60% of ``budget`` bits on 8/3/2-bit pairs."""
    d_out, d_in = shape
    pairs = []
    for bits, share in ((8, 0.1), (3, 0.3), (2, 0.6)):
        groups = -(-d_in // GROUP) + -(-d_out // GROUP)
        per_pair = bits * (d_in + d_out) + 32 * groups + 16
        pairs.append((bits, max(1, int(share * budget // per_pair))))
    return pairs


def synthetic_encodings(shape: tuple[int, int], ratio: float) -> dict[str, EncodedTensor]:
    numel = shape[0] * shape[1]
    budget = int(numel * 16 / ratio)
    per_element = 16 / ratio  # bits each weight may cost
    keep_dq = max(1, min(64, round(64 * per_element / 4)))
    return {
        "adamix": deltas.low_rank(shape, _low_rank_pairs(shape, budget), group_size=GROUP, seed=1),
        "bitdelta": deltas.signs(shape, 1, per_row=False, seed=2),
        "deltadq": deltas.deltadq(shape, 64, keep_dq, bits=4, group_size=GROUP, seed=3),
        "dare": deltas.dare(shape, per_element / 4, bits=4, group_size=GROUP, seed=4),
    }


@dataclass(frozen=True)
class Traffic:
    """Bytes one call reads and writes."""

    base: int
    delta_linear: int
    decode: int


def traffic(layout: DeltaStack, shape: tuple[int, int], batch: int) -> Traffic:
    d_out, d_in = shape
    activations = batch * (d_in + d_out) * FP16
    base = d_out * d_in * FP16 + activations
    # The delta products read x again and read-modify-write y once per launch; low rank
    # also writes and reads T (fp32, batch x rank).
    low_rank = layout.low_rank
    t_bytes = 0 if low_rank is None else batch * low_rank.max_rank * 4 * 2
    launches = (low_rank is not None) + (layout.signs is not None) + len(layout.sparse)
    extra = launches * batch * (d_in + 2 * d_out) * FP16 + t_bytes
    return Traffic(base, base + layout.nbytes + extra, layout.nbytes + d_out * d_in * FP16)


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds per call: do_bench on CUDA, else the median of a few wall-clock runs."""
    if device.type == "cuda":
        from triton.testing import do_bench  # noqa: PLC0415

        return lambda fn: float(do_bench(fn))

    def wall(fn: Callable[[], object]) -> float:
        fn()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
        return statistics.median(runs)

    return wall


def copy_bandwidth(device: torch.device, measure: Callable[[Callable[[], object]], float]) -> float:
    """Bytes per millisecond of a device-to-device copy of 1 GiB (256 MiB off CUDA)."""
    size = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / measure(lambda: dst.copy_(src))


def _row(cells: Sequence[object]) -> str:
    return " ".join(f"{c:>12}" if not isinstance(c, float) else f"{c:>12.3f}" for c in cells)


def _timings(
    measure: Callable[[Callable[[], object]], float],
    *,
    x: torch.Tensor,
    w_base: torch.Tensor,
    w_tuned: torch.Tensor,
    layout: DeltaStack,
    moved: Traffic,
    bandwidth: float,
) -> list[float]:
    """base, dense and delta_linear ms, the floor, delta/base, floor/delta, decode ms."""
    base_ms = measure(lambda: F.linear(x, w_base))
    dense_ms = measure(lambda: F.linear(x, w_tuned))
    delta_ms = measure(lambda: kernels.delta_linear(x, w_base, layout))
    decode_ms = measure(lambda: kernels.decode(layout, dtype=torch.float16))
    floor_ms = moved.delta_linear / bandwidth
    return [
        base_ms,
        dense_ms,
        delta_ms,
        floor_ms,
        delta_ms / base_ms,
        floor_ms / delta_ms,
        decode_ms,
    ]


def run(
    shapes: Sequence[tuple[int, int]],
    batches: Sequence[int],
    ratio: float,
    masks: SparseMasks,
    timed: bool,
) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    measure = timer(device)
    bandwidth = copy_bandwidth(device, measure) if timed else 0.0
    print(f"device {device}; kernels {kernels.dispatch.backend_for(torch.empty(0, device=device))}")
    if timed:
        print(f"copy bandwidth {bandwidth / 1e6:.1f} GB/s (the floors below divide by it)")
    header = ["method", "shape", "batch", "ratio", "bytes/base", "decode MB"]
    if timed:
        header += [
            "base ms",
            "dense ms",
            "delta ms",
            "floor ms",
            "delta/base",
            "floor/delta",
            "decode ms",
        ]
    print(_row(header))
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        d_out, d_in = shape
        w_base = (torch.randn(shape, generator=generator) * d_in**-0.5).half().to(device)
        for method, encoded in synthetic_encodings(shape, ratio).items():
            layout = kernels.stack([encoded], device, sparse_masks=masks)
            w_tuned = (w_base.float() + kernels.decode(encoded, device=device)).half()
            for batch in batches:
                x = torch.randn(batch, d_in, generator=generator).half().to(device)
                moved = traffic(layout, shape, batch)
                cells: list[object] = [
                    method,
                    f"{d_out}x{d_in}",
                    batch,
                    round(encoded.ratio, 2),
                    round(moved.delta_linear / moved.base, 3),
                    round(moved.decode / 1e6, 2),
                ]
                if timed:
                    cells += _timings(
                        measure,
                        x=x,
                        w_base=w_base,
                        w_tuned=w_tuned,
                        layout=layout,
                        moved=moved,
                        bandwidth=bandwidth,
                    )
                print(_row(cells))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--ratio", type=float, default=16.0)
    parser.add_argument("--masks", choices=[m.value for m in SparseMasks], default="bitmap")
    parser.add_argument("--time", action="store_true", help="time off CUDA too")
    args = parser.parse_args(argv)
    timed = args.time or torch.cuda.is_available()
    run(
        [_parse_shape(s) for s in args.shapes],
        args.batches,
        args.ratio,
        SparseMasks(args.masks),
        timed,
    )


if __name__ == "__main__":
    main()
