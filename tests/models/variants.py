"""A family of fine-tunes: children of the pair's fine-tune that share most of its tensors.

Independent fine-tunes of one base share no compressed bytes (every tensor's delta differs),
so what a content-addressed store can deduplicate is a family: models derived from one
fine-tune. Child ``seed`` starts from ``pair_dir/finetuned`` and trains only the last encoder
layer (``encoder.layer.<last>.*``) and the head, for a few steps of the pair's recipe with its
own seed (its own batch order and dropout masks); every other tensor stays bit-identical to
the parent's, so its compressed delta against the base is the parent's, chunk for chunk.

Each child is saved like ``pair_dir/finetuned`` (``finetune_pair.save_model``) under
``pair_dir/variants/<steps>-<seed>``, with ``variant.json`` (what it was built from), built
in a ``.partial`` folder and renamed into place; a matching one is reused.
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.functional import cross_entropy
from transformers import BertConfig, PreTrainedTokenizerBase

from tests.models import finetune_pair, task

FORMAT_VERSION = 1
VARIANT_FILE = "variant.json"
PARENT = "finetuned"


def child_recipe(steps: int, seed: int) -> finetune_pair.Recipe:
    """The pair's learning rates and batch size, ``steps`` steps decaying linearly from the
    first (no warm-up: the parent is already trained), seeded with ``seed``."""
    return replace(finetune_pair.Recipe(), steps=steps, warmup_steps=0, seed=seed)


def trained_prefixes(model_dir: Path) -> tuple[str, ...]:
    """Where the names (as in ``Classifier.state``) that a child of the model saved in
    ``model_dir`` trains begin: its last encoder layer, and the head."""
    config = BertConfig.from_pretrained(str(model_dir), local_files_only=True)
    return (f"encoder.layer.{config.num_hidden_layers - 1}.", task.HEAD_PREFIX)


def freeze_all_but(classifier: task.Classifier, prefixes: tuple[str, ...]) -> list[str]:
    """Turn off gradients outside ``prefixes`` (state names); the names left trainable."""
    encoder = dict(classifier.encoder.named_parameters())
    head = {f"{task.HEAD_PREFIX}{name}": p for name, p in classifier.head.named_parameters()}
    trainable = []
    for name, parameter in {**encoder, **head}.items():
        parameter.requires_grad_(name.startswith(prefixes))
        if parameter.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"no parameter starts with any of {prefixes}")
    return trainable


def train_child(
    classifier: task.Classifier, tokenizer: PreTrainedTokenizerBase, recipe: finetune_pair.Recipe
) -> list[float]:
    """``recipe.steps`` AdamW steps on the train split over the parameters that still need
    gradients (the rest get none, so AdamW never touches them); the loss of each step."""
    train = task.load_split("train")
    adamw, schedule = finetune_pair.optimizer(classifier, recipe)
    losses: list[float] = []
    classifier.train()
    for indices in finetune_pair.batch_order(len(train), recipe):
        batch = [train[i] for i in indices]
        labels = torch.tensor([example.label for example in batch])
        loss = cross_entropy(classifier(task.tokenize(tokenizer, batch)), labels)
        adamw.zero_grad()
        torch.autograd.backward(loss)
        adamw.step()
        schedule.step()
        losses.append(float(loss.detach()))
    classifier.eval()
    return losses


def provenance(pair_dir: Path, recipe: finetune_pair.Recipe) -> dict[str, Any]:
    """What a cached child must match to be reused: the parent pair's provenance and the
    child's recipe, in their JSON form."""
    pair = json.loads((pair_dir / finetune_pair.PAIR_FILE).read_text())
    wanted = {
        "format": FORMAT_VERSION,
        "parent": pair["provenance"],
        "recipe": asdict(recipe),
        "torch": torch.__version__,
    }
    loaded: dict[str, Any] = json.loads(json.dumps(wanted))
    return loaded


def build_child(pair_dir: Path, out: Path, recipe: finetune_pair.Recipe) -> None:
    """Train one child of ``pair_dir``'s fine-tune and write it to ``out`` (via .partial)."""
    torch.manual_seed(recipe.seed)
    classifier, tokenizer = task.open_classifier(pair_dir / PARENT)
    trainable = freeze_all_but(classifier, trained_prefixes(pair_dir / PARENT))
    with finetune_pair.deterministic_algorithms():
        losses = train_child(classifier, tokenizer, recipe)
    staging = out.with_name(f"{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    finetune_pair.save_model(classifier, tokenizer, staging)
    record = {
        "provenance": provenance(pair_dir, recipe),
        "trained": trainable,
        "losses": losses,
    }
    (staging / VARIANT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def variant_dir(pair_dir: Path, steps: int, seed: int) -> Path:
    return pair_dir / "variants" / f"{steps}-{seed}"


def ensure_variants(pair_dir: Path, count: int, steps: int) -> list[Path]:
    """Children with seeds 1..``count``, each trained ``steps`` steps; built unless cached."""
    if count < 1 or steps < 1:
        raise ValueError(f"need at least one child and one step, got {count} and {steps}")
    paths = []
    for seed in range(1, count + 1):
        recipe = child_recipe(steps, seed)
        out = variant_dir(pair_dir, steps, seed)
        record = out / VARIANT_FILE
        cached = json.loads(record.read_text()) if record.exists() else {}
        if cached.get("provenance") != provenance(pair_dir, recipe):
            build_child(pair_dir, out, recipe)
        paths.append(out)
    return paths
