"""The store's chunk codec on real payloads: zstd level against stored size and speed.

``python -m tests.bench.bench_codec [--pair DIR] [--levels -1 1 3]``

Payloads, 4 MiB each (the writers' chunk size): the MiniLM pair's lossless word-embedding
delta (float32; the pair ``make demo`` builds and caches, skipped if absent), a synthetic
fp16 weight delta (noise of 1e-3 on unit weights, as ``bench_compressor`` streams), and
4-bit packed codes (uniform, as lossy methods store them). Prints, per payload and level,
the stored fraction and compression MiB/s (best of three). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import zstandard

from clients.safetensors_io import Checkpoint
from tests.models import task

CHUNK = 4 << 20
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def payloads(pair: Path) -> dict[str, bytes]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(CHUNK // 2, generator=generator).half()
    tuned = (base.float() + 1e-3 * torch.randn(base.shape, generator=generator)).half()
    codes = torch.randint(0, 256, (CHUNK,), generator=generator, dtype=torch.uint8)
    found = {
        "fp16 weight delta (synthetic)": (tuned.float() - base.float()).half(),
        "4-bit packed codes (uniform)": codes,
    }
    if (pair / "base").is_dir():
        base_ckpt, tuned_ckpt = Checkpoint(pair / "base"), Checkpoint(pair / "finetuned")
        name = next(n for n in base_ckpt.names() if n.endswith(WORD_EMBEDDINGS))
        found["MiniLM word-embedding delta (fp32)"] = tuned_ckpt.get(name) - base_ckpt.get(name)
    return {
        label: t.contiguous().view(-1).view(torch.uint8)[:CHUNK].numpy().tobytes()
        for label, t in found.items()
    }


def measure(data: bytes, level: int) -> tuple[float, float]:
    """(stored fraction, MiB/s) of one zstd compression at ``level``, best of three."""
    compressor = zstandard.ZstdCompressor(level=level)
    best, size = float("inf"), 0
    for _ in range(3):
        started = time.perf_counter()
        size = len(compressor.compress(data))
        best = min(best, time.perf_counter() - started)
    return size / len(data), len(data) / best / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", type=Path, default=task.default_pair_dir())
    parser.add_argument("--levels", type=int, nargs="+", default=[-1, 1, 3])
    args = parser.parse_args(argv)
    for label, data in payloads(args.pair).items():
        print(label)
        for level in args.levels:
            fraction, rate = measure(data, level)
            print(f"  zstd level {level:>2}: stored {fraction:.3f}  {rate:8.0f} MiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
