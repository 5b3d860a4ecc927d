"""The main job, end to end (``make demo``): a real fine-tune stored as a compressed delta.

1. Build (first run, a few minutes) or reuse the cached MiniLM base/fine-tuned pair that
   ``tests/models`` makes from a shipped pretrained model (BBC headline topics).
2. Start ``deltavault serve`` (store on a local folder + compressor) as a real process.
3. Collect calibration Gram matrices from the base model with the SDK's forward hooks.
4. Compress the fine-tune with each method at the target ratio over gRPC, reconstruct an
   HF-style checkpoint from the store, and score it on the held-out test split.
5. Print the table (ratio, bytes, task metrics of base / fine-tune / reconstructed), stop
   the server.
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clients.calibration import GramSet, grams_from_texts
from clients.cli import tensor_progress
from clients.sdk import CompressReport, DeltaVault, ModelPair
from tests.models import task
from tests.models.finetune_pair import ensure_pair
from tests.support.embedded import REPO_ROOT, EmbeddedServer

METHOD_OPTIONS: dict[str, dict[str, object]] = {"deltadq": {"debias": True}}
"""DeltaDQ with its scales debiased: no systematic shrinkage of the fine-tuning effect
(README, findings); ADAMIX with its defaults."""


def calibration(base_dir: Path) -> GramSet:
    """XᵀX of every encoder linear layer on the calibration split, through the base."""
    tokenizer = task.load_tokenizer(base_dir)
    encoder = task.load_encoder(task.load_state(base_dir), base_dir)
    texts = [example.text for example in task.load_split("calibration")]
    return grams_from_texts(encoder, tokenizer, texts, batch_size=64, max_length=task.MAX_TOKENS)


@dataclass(frozen=True)
class Row:
    method: str
    report: CompressReport
    metrics: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class Job:
    """What every method's run shares."""

    vault: DeltaVault
    pair_dir: Path
    grams: GramSet
    ratio: float
    work: Path


def run_method(job: Job, method: str) -> Row:
    """Compress with ``method``, reconstruct from the store, score on the test split."""
    started = time.perf_counter()
    base, tuned = job.pair_dir / "base", job.pair_dir / "finetuned"
    sizes = ModelPair.open(base, tuned, None).sizes()
    with tensor_progress(sizes, desc=method) as progress:
        report = job.vault.compress(
            base,
            tuned,
            ref=f"demo/minilm-{method}-{job.ratio:g}x",
            method=method,
            ratio=job.ratio,
            calibration=job.grams,
            options=METHOD_OPTIONS.get(method),
            force=True,
            progress=progress,
        )
    out = job.vault.reconstruct(report.ref, base, job.work / f"{method}-rebuilt")
    metrics = task.evaluate(out, "test")
    return Row(method, report, metrics, time.perf_counter() - started)


def print_table(pair: dict[str, object], rows: list[Row], ratio: float) -> None:
    metrics = pair["metrics"]
    assert isinstance(metrics, dict)
    base, tuned = metrics["base"]["test"], metrics["finetuned"]["test"]
    first = rows[0].report
    lossy = [t for t in first.tensors if t.kind == "compressed"]
    lossy_fp16 = sum(t.numel for t in lossy) * 2
    print()
    print(
        f"target {ratio:g}x on the {len(lossy)} linear weights of the encoder "
        f"(fp16 delta {lossy_fp16:,} bytes); embeddings, norms, biases and the head "
        "are stored lossless (exact)."
    )
    header = (
        f"{'model':<24}{'ratio':>8}{'lossy bytes':>13}{'all bytes':>13}{'whole':>8}"
        f"{'new bytes':>13}"
        f"{'accuracy':>10}{'macro-F1':>10}{'NLL':>8}{'seconds':>9}"
    )
    print(header)
    print(f"{'base (no delta)':<24}{'':>55}{_metric_cells(base)}")
    print(f"{'fine-tuned (original)':<24}{'':>55}{_metric_cells(tuned)}")
    for row in rows:
        report = row.report
        lossy_bytes = sum(t.nbits for t in report.tensors if t.kind == "compressed") // 8
        print(
            f"{row.method + ' rebuilt':<24}{report.lossy_ratio:>7.2f}x{lossy_bytes:>13,}"
            f"{report.bytes_stored:>13,}{report.ratio:>7.2f}x{report.new_chunk_bytes:>13,}"
            f"{_metric_cells(row.metrics)}{row.seconds:>9.1f}"
        )
    print(
        "ratio: fp16 delta bits / stored bits over the compressed weights; all bytes: every "
        "chunk the delta's manifest names, lossless tensors included; whole: the same ratio "
        "over every tensor of the model; new bytes: not in the store before this run."
    )


def _metric_cells(m: dict[str, float]) -> str:
    return f"{m['accuracy']:>10.4f}{m['macro_f1']:>10.4f}{m['nll']:>8.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO_ROOT / ".deltavault" / "demo")
    parser.add_argument("--ratio", type=float, default=16.0)
    parser.add_argument("--methods", nargs="+", default=["adamix", "deltadq"])
    parser.add_argument("--pair", type=Path, default=task.default_pair_dir())
    args = parser.parse_args(argv)
    print(f"model pair: {args.pair} (built on first use, then cached)")
    pair = ensure_pair(args.pair)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    with EmbeddedServer(args.work / "store") as server:
        print(f"deltavault serve: store {server.store}, compressor {server.compressor}")
        grams = calibration(args.pair / "base")
        print(f"calibration: {len(grams.grams)} Gram matrices from {grams.tokens} tokens")
        with DeltaVault(server.store, server.compressor) as vault:
            job = Job(vault, args.pair, grams, args.ratio, args.work)
            rows = [run_method(job, method) for method in args.methods]
        code = server.stop()
    print_table(pair, rows, args.ratio)
    print(f"server stopped cleanly (exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
