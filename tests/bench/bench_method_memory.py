"""Peak memory of one method encoding one matrix: how many fp32 deltas of working memory.

``python -m tests.bench.bench_method_memory [--methods dare bitdelta deltadq ...]
[--shape 2048 4096] [--ratio 16]``

Each method runs in a fresh child process: it builds a random fp32 delta of ``--shape``,
resets its resident-set high-water mark to the current RSS (``/proc/self/clear_refs``),
encodes, and prints how far the mark rose, in MiB and in multiples of the delta's own
bytes (Linux only). The compressor holds one such encoding in flight per
stream, so this multiple times the largest matrix bounds what a lossy compress adds. A
benchmark, not a test. BitDelta only reaches bands just below 16/levels x: ``--ratio 16``
is asked of it as 15.
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first, as in the services: before torch loads)

# isort: split

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

MiB = 1 << 20
_BITDELTA_RATIO = 15.0


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> float:
    """Reset the high-water mark to the current RSS (Linux ``clear_refs`` 5); that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def measure(method_name: str, shape: tuple[int, int], ratio: float) -> str:
    """In this process: encode one random delta with ``method_name``; one result line."""
    from compressor_svc.methods import get_method  # noqa: PLC0415 (after the fork's start)
    from compressor_svc.methods.base import Target  # noqa: PLC0415

    method = get_method(method_name)
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.01
    if method_name == "bitdelta":
        ratio = min(ratio, _BITDELTA_RATIO)
    before = _reset_peak()
    started = time.perf_counter()
    method.encode(Target(delta, ratio, None, "float16"), method.config_type())
    seconds = time.perf_counter() - started
    grew, delta_mib = _status_mib("VmHWM") - before, delta.numel() * 4 / MiB
    return (
        f"{method_name:<10} {ratio:>5g}x  peak +{grew:7.0f} MiB = {grew / delta_mib:5.1f}x the "
        f"{delta_mib:.0f} MiB fp32 delta  ({seconds:.1f} s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["bitdelta", "dare", "deltadq"])
    parser.add_argument("--shape", nargs=2, type=int, default=[2048, 4096])
    parser.add_argument("--ratio", type=float, default=16.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.shape[0], args.shape[1])
    if args.child:
        print(measure(args.child, shape, args.ratio), flush=True)
        return 0
    for name in args.methods:
        command = [sys.executable, "-m", "tests.bench.bench_method_memory", "--child", name]
        command += ["--shape", *map(str, shape), "--ratio", str(args.ratio)]
        subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
