"""Compression speed of each method at real Llama-2-7B layer sizes on this machine's CPUs.

``python -m tests.bench.bench_method_speed [--shapes 4096x4096 11008x4096 4096x11008]
[--methods deltacome adamix deltadq bitdelta dare] [--ratio 16] [--tokens 2048]``

Per shape (d_out x d_in) it builds a synthetic delta of low effective rank plus noise,
U diag(sigma) Vᵀ with sigma_i ∝ i^-0.8 over all min(d_out, d_in) pairs (U, V Gaussian with
columns of unit expected norm) plus Gaussian noise of 1% of the low-rank part's RMS, and a
Gram matrix XᵀX of ``--tokens`` correlated fp32 inputs X (tokens x d_in): log-normal channel
scales, so some channels are outliers, plus a shared 64-dimensional latent component.
Everything is drawn from one fixed torch seed. Then it times
``compress(delta, method, ratio=R, gram=gram)`` per method and prints a markdown table: the
exact ratio, the relative activation error ‖(Δ-Δ̂)X‖/‖ΔX‖, seconds, and the peak resident
memory above what the process held before that call. Each row is followed by the load
average: a concurrent process on a 2-core machine can slow the per-column GPTQ loop (many
small multi-threaded torch ops) several-fold, so compare timings taken at the same load.
Methods whose format stores only bands just below 16/k x (``bitdelta``) target R - 0.1, as
``bench_methods`` does. A call that raises ValueError, or runs past ``--max-seconds``, is
reported in its row.
A benchmark, not a test.
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import argparse
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch
from torch import Tensor

from compressor_svc.methods import compress, relative_activation_error
from kernels.reference import decode

METHODS = ("deltacome", "adamix", "deltadq", "bitdelta", "dare")
SHAPES = ("4096x4096", "11008x4096", "4096x11008")
JUST_BELOW = frozenset({"bitdelta"})
"""Methods whose format reaches only just below 16/k x: they target ratio - 0.1."""
SIGMA_DECAY = 0.8
NOISE = 0.01
LATENT = 64
DELTA_NORM = 1.5
"""‖ΔW‖_F of the low-rank part, about a 7B fine-tune's per-matrix delta."""


@dataclass(frozen=True)
class Row:
    shape: tuple[int, int]
    method: str
    target: float
    ratio: float | None
    error: float | None
    seconds: float
    peak_mib: float | None
    note: str = ""


class Overtime(Exception):
    """Raised by the alarm when one compress call runs past ``--max-seconds``."""


def parse_shape(text: str) -> tuple[int, int]:
    d_out, d_in = (int(part) for part in text.lower().split("x"))
    return d_out, d_in


def synthetic_delta(shape: tuple[int, int], gen: torch.Generator) -> Tensor:
    """(d_out, d_in) fp32 U diag(sigma) Vᵀ + noise, sigma_i ∝ i^-0.8, ‖low-rank‖_F ≈ 1.5."""
    d_out, d_in = shape
    rank = min(shape)
    sigma = torch.arange(1, rank + 1, dtype=torch.float32).pow(-SIGMA_DECAY)
    sigma *= DELTA_NORM / float(sigma.norm())
    u = torch.randn(d_out, rank, generator=gen) / math.sqrt(d_out)
    v = torch.randn(d_in, rank, generator=gen) / math.sqrt(d_in)
    low_rank = (u * sigma) @ v.T
    rms = float(low_rank.square().mean().sqrt())
    return low_rank + NOISE * rms * torch.randn(d_out, d_in, generator=gen)


def synthetic_gram(d_in: int, tokens: int, gen: torch.Generator) -> Tensor:
    """(d_in, d_in) fp32 XᵀX for correlated inputs X (tokens, d_in), see the module doc."""
    scale = torch.exp(torch.randn(d_in, generator=gen))
    mixing = torch.randn(LATENT, d_in, generator=gen) * scale / math.sqrt(LATENT)
    x = torch.randn(tokens, d_in, generator=gen) * scale
    x += torch.randn(tokens, LATENT, generator=gen) @ mixing
    return x.T @ x


def _rss_kib(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in KiB, None where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak_rss() -> int | None:
    """Reset the peak-RSS mark to the current RSS (Linux clear_refs); the RSS in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _rss_kib("VmRSS")


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Overtime


def measure(delta: Tensor, gram: Tensor, method: str, ratio: float, max_seconds: int) -> Row:
    """One timed compress call and its exact ratio, activation error and peak memory."""
    target = ratio - 0.1 if method in JUST_BELOW else ratio
    shape = (delta.shape[0], delta.shape[1])
    before = reset_peak_rss()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max_seconds)
    start = time.perf_counter()
    try:
        encoded = compress(delta, method, ratio=target, gram=gram)
    except Overtime:
        return Row(
            shape, method, target, None, None, time.perf_counter() - start, None, "timed out"
        )
    except ValueError as exc:
        return Row(shape, method, target, None, None, time.perf_counter() - start, None, str(exc))
    finally:
        signal.alarm(0)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    peak_mib = None if before is None or peak is None else max(0, peak - before) / 1024
    error = relative_activation_error(delta, decode(encoded), gram)
    return Row(shape, method, target, encoded.ratio, error, seconds, peak_mib)


def load() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews every timing."""
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def markdown(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| shape | method | target | exact ratio | act. error | seconds | peak RSS +MiB | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        error = "-" if r.error is None else f"{r.error:.4f}"
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(
            f"| {r.shape[0]}x{r.shape[1]} | {r.method} | {r.target:g} | {ratio} | {error} "
            f"| {r.seconds:.1f} | {peak} | {r.note} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Build each shape's delta and Gram matrix, time every method, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--ratio", type=float, default=16.0)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=int, default=600)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {args.seed}")
    rows: list[Row] = []
    for text in args.shapes:
        shape = parse_shape(text)
        gen = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        delta = synthetic_delta(shape, gen)
        gram = synthetic_gram(shape[1], args.tokens, gen)
        built = time.perf_counter() - start
        print(f"{text}: delta and gram built in {built:.1f} s, {load()}", flush=True)
        for method in args.methods:
            row = measure(delta, gram, method, args.ratio, args.max_seconds)
            print(markdown([row]).splitlines()[-1], load(), flush=True)
            rows.append(row)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
