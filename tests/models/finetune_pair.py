"""Build, cache and report the base/fine-tuned MiniLM pair for the BBC headline topic task.

    python -m tests.models.finetune_pair [--out DIR] [--steps N] [--force]

Base: the shipped all-MiniLM-L6-v2 encoder, frozen, with a linear probe (L-BFGS logistic
regression on mean-pooled features, its L2 strength picked on the validation split). A base
with a random head says nothing; the best linear read-out of the frozen encoder is the
strongest base a head alone can give, so the fine-tune's gain over it is what changing the
encoder bought. Fine-tune: every encoder weight plus the head, the head starting from the probe
(LP-FT), AdamW without weight decay (decay would add a shrink-towards-zero term to every delta
that is no part of the task), linear warm-up and decay, dropout on, fixed seeds.

Writes DIR/base and DIR/finetuned (``model.safetensors`` with identical encoder tensor names,
``head.safetensors``, ``config.json``, tokenizer files) and DIR/pair.json (sources, recipe,
metrics, timings), built in DIR.partial and renamed into place. A run whose recipe and package
versions match pair.json only reports (unless --force).

A build takes a few minutes on 2 CPU cores (under 3.5 with another job running); a progress
bar on stderr shows the fine-tune's steps, loss and time left.
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import argparse
import copy
import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from tqdm import tqdm
from transformers import BertModel, PreTrainedTokenizerBase

from tests.models import task

PAIR_FILE = "pair.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the pair's weights, besides the packages' contents."""

    steps: int = 300
    batch_size: int = 32
    encoder_lr: float = 5e-5
    head_lr: float = 1e-3
    warmup_steps: int = 30
    seed: int = 0
    probe_l2: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)


QUICK_RECIPE = Recipe(steps=60, warmup_steps=6)
"""A short fine-tune for smoke runs (the evaluation's ``--quick`` variant): a real pair, less
trained, built in about a minute."""


def cache_dir(recipe: Recipe) -> Path:
    """Where the pair of ``recipe`` is cached: ``task.default_pair_dir()`` for the default
    recipe, else a folder beside it named by the recipe's digest (so pairs never evict each
    other)."""
    default = task.default_pair_dir()
    if recipe == Recipe():
        return default
    digest = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode()).hexdigest()
    return default.with_name(f"{default.name}-{digest[:12]}")


def provenance(recipe: Recipe) -> dict[str, Any]:
    """What a cached pair must match to be reused, in its JSON form."""
    wanted = {
        "format": FORMAT_VERSION,
        "task": task.TASK_NAME,
        "split_seed": task.SPLIT_SEED,
        "data": task.data_source(),
        "model": task.model_source(),
        "recipe": asdict(recipe),
    }
    loaded: dict[str, Any] = json.loads(json.dumps(wanted))
    return loaded


def ensure_pair(out: Path, recipe: Recipe | None = None, *, force: bool = False) -> dict[str, Any]:
    """The pair's pair.json contents, building the pair first unless a matching one is cached."""
    wanted = provenance(recipe or Recipe())
    pair_file = out / PAIR_FILE
    if not force and pair_file.exists():
        cached: dict[str, Any] = json.loads(pair_file.read_text())
        if cached.get("provenance") == wanted:
            return cached
    return build_pair(out, recipe or Recipe())


def features(
    encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[task.Example]
) -> tuple[Tensor, Tensor]:
    """Mean-pooled features of the frozen encoder (evaluation mode) and the labels."""
    encoder.eval()
    with torch.no_grad():
        parts = [
            task.mean_pool(encoder, task.tokenize(tokenizer, part))
            for part in task.batched(examples, 128)
        ]
    return torch.cat(parts), torch.tensor([example.label for example in examples])


def train_probe(x: Tensor, y: Tensor, l2: float) -> nn.Linear:
    """Multinomial logistic regression, L2 on the weights, solved by full-batch L-BFGS from 0."""
    head = nn.Linear(x.shape[1], len(task.LABELS))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> float:
        optimizer.zero_grad()
        loss = cross_entropy(head(x), y) + l2 * head.weight.square().sum()
        torch.autograd.backward(loss)
        return float(loss.detach())

    optimizer.step(closure)  # type: ignore[no-untyped-call]  # LBFGS.step is unannotated
    return head


def fit_probe(
    encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, grid: Sequence[float]
) -> tuple[nn.Linear, float]:
    """The probe, over ``grid``'s L2 strengths, with the best validation accuracy (then NLL)."""
    x, y = features(encoder, tokenizer, task.load_split("train"))
    x_val, y_val = features(encoder, tokenizer, task.load_split("validation"))

    def rank(l2: float) -> tuple[float, float]:
        with torch.no_grad():
            metrics = task.classification_metrics(probes[l2](x_val), y_val)
        return metrics["accuracy"], -metrics["nll"]

    probes = {l2: train_probe(x, y, l2) for l2 in grid}
    best = max(grid, key=rank)
    return probes[best], best


def batch_order(n: int, recipe: Recipe) -> Iterator[list[int]]:
    """``recipe.steps`` batches of example indices: seeded epochs of permutations, concatenated."""
    generator = torch.Generator().manual_seed(recipe.seed)
    epochs = -(-recipe.steps * recipe.batch_size // n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)]).tolist()
    for step in range(recipe.steps):
        yield order[step * recipe.batch_size : (step + 1) * recipe.batch_size]


def lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warm-up over ``warmup_steps``, then linear decay to zero at ``steps``."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    return max(0.0, (recipe.steps - step) / max(1, recipe.steps - recipe.warmup_steps))


@contextmanager
def compact_vocabulary(encoder: BertModel, token_ids: Tensor) -> Iterator[Tensor]:
    """Train only the word embedding rows of ``token_ids``; yield token id -> compact row.

    A row no batch looks up has zero gradients, so AdamW (no weight decay) never moves it, yet
    sweeps all 30,522 rows (half the encoder's weights) each step. Swapping in the ~2,900 rows
    the train split uses, and writing them back on exit, gives bit-identical weights, faster.
    """
    full = encoder.embeddings.word_embeddings
    kept = torch.unique(token_ids)  # sorted, padding id included
    rows = torch.full((full.num_embeddings,), -1, dtype=torch.long)
    rows[kept] = torch.arange(len(kept))
    # from_pretrained draws no random init, which would shift the dropout masks' stream
    encoder.embeddings.word_embeddings = nn.Embedding.from_pretrained(  # type: ignore[no-untyped-call]
        full.weight.detach()[kept], freeze=False, padding_idx=int(rows[full.padding_idx])
    )
    try:
        yield rows
    finally:
        with torch.no_grad():
            full.weight[kept] = encoder.embeddings.word_embeddings.weight
        encoder.embeddings.word_embeddings = full


def optimizer(
    classifier: task.Classifier, recipe: Recipe
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without weight decay over the classifier's current parameters, and its schedule."""
    adamw = torch.optim.AdamW(
        [
            {"params": classifier.encoder.parameters(), "lr": recipe.encoder_lr},
            {"params": classifier.head.parameters(), "lr": recipe.head_lr},
        ],
        weight_decay=0.0,
    )
    return adamw, torch.optim.lr_scheduler.LambdaLR(adamw, lambda step: lr_factor(step, recipe))


def fine_tune(
    classifier: task.Classifier, tokenizer: PreTrainedTokenizerBase, recipe: Recipe
) -> list[float]:
    """Train every weight of ``classifier`` on the train split; the loss of each step.

    Shows a progress bar (steps, loss, time left) on stderr.
    """
    train = task.load_split("train")
    token_ids = task.tokenize(tokenizer, train)["input_ids"]
    losses: list[float] = []
    with (
        compact_vocabulary(classifier.encoder, token_ids) as rows,
        tqdm(desc="fine-tune", total=recipe.steps, unit="step", file=sys.stderr) as bar,
    ):
        adamw, schedule = optimizer(classifier, recipe)
        classifier.train()
        for indices in batch_order(len(train), recipe):
            batch = [train[i] for i in indices]
            tokens = task.tokenize(tokenizer, batch)
            tokens["input_ids"] = rows[tokens["input_ids"]]
            labels = torch.tensor([example.label for example in batch])
            loss = cross_entropy(classifier(tokens), labels)
            adamw.zero_grad()
            torch.autograd.backward(loss)
            adamw.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update()
    classifier.eval()
    return losses


def save_model(
    classifier: task.Classifier, tokenizer: PreTrainedTokenizerBase, model_dir: Path
) -> None:
    """Write the model as task.py reads it: encoder and head safetensors, config, tokenizer."""
    model_dir.mkdir(parents=True)
    encoder = {name: t.contiguous() for name, t in classifier.encoder.state_dict().items()}
    head = {k: t.contiguous() for k, t in classifier.state().items() if k not in encoder}
    save_file(encoder, model_dir / task.WEIGHTS_FILE, metadata={"format": "pt"})
    save_file(head, model_dir / task.HEAD_FILE, metadata={"format": "pt"})
    classifier.encoder.config.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))


def split_metrics(
    classifier: task.Classifier, tokenizer: PreTrainedTokenizerBase
) -> dict[str, dict[str, float]]:
    """Task metrics on the validation and test splits."""
    return {
        split: task.score(classifier, tokenizer, task.load_split(split))
        for split in ("validation", "test")
    }


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Torch's deterministic algorithms on for the block, the previous setting restored."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def build_pair(out: Path, recipe: Recipe) -> dict[str, Any]:
    """Fit the base probe, fine-tune, evaluate and write the pair; pair.json's contents."""
    print(f"building the pair in {out} (probe, fine-tune, evaluation)", file=sys.stderr)
    torch.manual_seed(recipe.seed)
    shipped = task.shipped_model_dir()
    tokenizer = task.load_tokenizer(shipped)
    encoder = task.load_encoder(task.load_state(shipped), shipped)
    probe, l2 = fit_probe(encoder, tokenizer, recipe.probe_l2)
    base = task.Classifier(encoder, probe).eval()
    finetuned = copy.deepcopy(base)
    started = time.perf_counter()
    with deterministic_algorithms():
        losses = fine_tune(finetuned, tokenizer, recipe)
    seconds = time.perf_counter() - started
    pair = {
        "provenance": provenance(recipe),
        "labels": list(task.LABELS),
        "split_sizes": {name: len(task.load_split(name)) for name in task.SPLIT_FRACTIONS},
        "probe_l2": l2,
        "fine_tune_seconds": round(seconds, 1),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "metrics": {
            "base": split_metrics(base, tokenizer),
            "finetuned": split_metrics(finetuned, tokenizer),
        },
    }
    write_pair(out, pair, {"base": base, "finetuned": finetuned}, tokenizer)
    return pair


def write_pair(
    out: Path,
    pair: Mapping[str, Any],
    models: Mapping[str, task.Classifier],
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Write models and pair.json into ``out``.partial, then swap it in for ``out``."""
    staging = out.with_name(f"{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    for role, classifier in models.items():
        save_model(classifier, tokenizer, staging / role)
    (staging / PAIR_FILE).write_text(json.dumps(pair, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def tensor_type(name: str) -> str:
    """A tensor's name without its layer index: ``attention.self.query.weight``, say."""
    return re.sub(r"^encoder\.layer\.\d+\.", "", name)


def effective_rank(matrix: Tensor) -> tuple[float, int]:
    """Entropy effective rank and the rank holding 90% of the squared Frobenius norm.

    The entropy effective rank (Roy & Vetterli 2007) is exp(H(p)), p = s / sum(s) over the
    singular values s.
    """
    sigma = torch.linalg.svdvals(matrix.double())
    p = sigma / sigma.sum()
    entropy = -(p * p.clamp(min=1e-300).log()).sum()
    energy = (sigma.square().cumsum(0) / sigma.square().sum()).tolist()
    return float(entropy.exp()), next(i + 1 for i, e in enumerate(energy) if e >= 0.9)


def delta_rows(pair_dir: Path) -> list[tuple[str, int, list[float], list[tuple[float, int]]]]:
    """Per tensor type: count, ‖ΔW‖/‖W‖ of each, and effective ranks of each 2-D linear ΔW."""
    base, finetuned = task.load_state(pair_dir / "base"), task.load_state(pair_dir / "finetuned")
    deltas = task.encoder_deltas(base, finetuned)
    linear = set(task.linear_weight_names(base))
    groups: dict[str, list[str]] = {}
    for name in deltas:
        groups.setdefault(tensor_type(name), []).append(name)
    return [
        (
            kind,
            len(names),
            [float(deltas[n].norm() / base[n].float().norm()) for n in names],
            [effective_rank(deltas[n]) for n in names if n in linear],
        )
        for kind, names in groups.items()
    ]


def format_metrics(pair: Mapping[str, Any]) -> list[str]:
    """Lines: base and fine-tune metrics on each split."""
    lines = [f"{'model':<34}{'split':<12}{'accuracy':>9}{'macro-F1':>10}{'NLL':>8}{'n':>6}"]
    names = {"base": f"base (frozen + probe, l2={pair['probe_l2']:g})", "finetuned": "fine-tuned"}
    for role, splits in pair["metrics"].items():
        for split, m in splits.items():
            lines.append(
                f"{names[role]:<34}{split:<12}{m['accuracy']:>9.4f}{m['macro_f1']:>10.4f}"
                f"{m['nll']:>8.4f}{int(m['n']):>6}"
            )
    return lines


def format_deltas(pair_dir: Path) -> list[str]:
    """Lines: relative delta norm per tensor type, with effective ranks for linear weights."""
    lines = [f"{'tensor type (x count)':<46}{'|dW|/|W| mean [min, max]':<30}eff. rank / r90"]
    for kind, count, rel, ranks in delta_rows(pair_dir):
        span = f"{sum(rel) / count:.2e} [{min(rel):.1e}, {max(rel):.1e}]"
        rank = ""
        if ranks:
            eff = [r[0] for r in ranks]
            r90 = [r[1] for r in ranks]
            rank = f"{min(eff):.0f}-{max(eff):.0f} / {min(r90)}-{max(r90)}"
        lines.append(f"{kind + f' (x{count})':<46}{span:<30}{rank}")
    return lines


def format_report(out: Path, pair: Mapping[str, Any], seconds: float) -> str:
    """The CLI's report: where, sources, splits, timings, metrics, delta facts."""
    source = pair["provenance"]
    data, model, recipe = source["data"], source["model"], source["recipe"]
    sizes = ", ".join(f"{k} {v}" for k, v in pair["split_sizes"].items())
    header = [
        f"pair: {out} ({seconds:.1f} s this run)",
        f"task: {source['task']}: {data['corpus']} -> {len(pair['labels'])} topics"
        f" ({data['package']} {data['version']})",
        f"model: {model['model']} ({model['package']} {model['version']}),"
        f" torch {pair['torch']}, {pair['threads']} threads",
        f"splits (seed {source['split_seed']}): {sizes}",
        f"fine-tune: {recipe['steps']} steps x {recipe['batch_size']}, seed {recipe['seed']},"
        f" {pair['fine_tune_seconds']} s, final train loss {pair['final_train_loss']:.4f}",
        "",
    ]
    return "\n".join([*header, *format_metrics(pair), "", *format_deltas(out)])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: --out, --steps, --force."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.models.finetune_pair",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=task.default_pair_dir(), help="pair directory")
    parser.add_argument("--steps", type=int, default=Recipe.steps, help="fine-tuning steps")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Ensure the pair exists, then print its report."""
    args = parse_args(argv)
    started = time.perf_counter()
    pair = ensure_pair(args.out, replace(Recipe(), steps=args.steps), force=args.force)
    print(format_report(args.out, pair, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
