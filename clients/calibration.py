"""Calibration statistics: the Gram matrix of every linear layer's inputs.

Data-aware compressors (GPTQ-style rounding, activation-aware bit allocation) weigh a delta's
error by what the layer actually sees: for a linear layer with inputs X (tokens x d_in), the
error of ΔŴ on those inputs is ‖X(ΔW - ΔŴ)ᵀ‖² = tr((ΔW - ΔŴ) G (ΔW - ΔŴ)ᵀ) with G = XᵀX.
So G (d_in x d_in) is all the compressor needs, whatever the number of tokens.

:func:`collect_grams` runs a user's model over calibration batches with a forward pre-hook
on each selected ``nn.Linear`` and sums XᵀX in float64 over the real tokens (padding is
masked out). The result, a :class:`GramSet`, is keyed by weight name, ``f"{module}.weight"``,
as in the model's state dict and safetensors checkpoint, and saves to one safetensors file
so a CLI can pass calibration along as a path. :func:`grams_from_texts` does the batching and
tokenizing for a Hugging Face model.

Pass the BASE model: the compressor weighs the delta by the inputs the base computes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = ["FORMAT", "GramSet", "collect_grams", "grams_from_texts"]

FORMAT = "deltavault.grams"
"""Value of the ``format`` metadata key of a saved :class:`GramSet`."""
ROW_BLOCK = 4096
"""Rows cast to float64 at a time, bounding the copy at ROW_BLOCK x d_in x 8 bytes."""

Forward = Callable[[nn.Module, Any], object]
Include = Callable[[str, nn.Linear], bool]
TokenMask = Callable[[Any], Tensor | None]


@dataclass(frozen=True)
class GramSet:
    """Per linear layer, G = XᵀX of its inputs over the calibration tokens.

    grams: weight name (``"encoder.layer.0.attention.self.query.weight"``) -> (d_in, d_in)
        float32 on the CPU, summed (not averaged) over every token the layer received.
    tokens: token positions fed, summed over batches (per batch, the most rows any layer
        received: a pooled head sees one row per sequence, the token layers see them all).
    """

    grams: dict[str, Tensor]
    tokens: int

    def save(self, path: Path | str) -> None:
        """Write one safetensors file (atomically: a temporary file, then a rename)."""
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        tensors = {name: gram.contiguous() for name, gram in self.grams.items()}
        save_file(tensors, temporary, metadata={"format": FORMAT, "tokens": str(self.tokens)})
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path | str) -> GramSet:
        """Read a file written by :meth:`save`; ValueError naming the file if it is not one."""
        path = Path(path)
        try:
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                grams = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"cannot read Gram file {path}: {exc}") from exc
        if metadata.get("format") != FORMAT or not metadata.get("tokens", "").isdigit():
            raise ValueError(
                f"{path} is not a Gram file: its metadata needs format={FORMAT!r} and an "
                f"integer 'tokens', found {metadata}"
            )
        for name, gram in grams.items():
            if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
                raise ValueError(f"{path}: Gram {name!r} is not square: {tuple(gram.shape)}")
        return cls(grams, int(metadata["tokens"]))


class _GramAccumulator:
    """Forward pre-hooks summing XᵀX (float64) of each hooked layer's selected input rows."""

    def __init__(self) -> None:
        """Start with no mask and nothing summed."""
        self.mask: Tensor | None = None
        self.sums: dict[str, Tensor] = {}
        self.batch_rows: dict[str, int] = {}

    def hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        """A pre-hook adding the inputs of the layer under ``name`` to its Gram."""

        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            rows = self._rows(args[0] if args else kwargs["input"])
            if name not in self.sums:
                self.sums[name] = rows.new_zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
            for block in torch.split(rows, ROW_BLOCK):
                block64 = block.double()
                self.sums[name].addmm_(block64.T, block64)
            self.batch_rows[name] = self.batch_rows.get(name, 0) + rows.shape[0]

        return record

    def _rows(self, x: Tensor) -> Tensor:
        """The (rows x d_in) inputs to count: masked where the mask fits the leading dims."""
        if self.mask is not None and self.mask.shape == x.shape[:-1]:
            return x[self.mask.to(x.device)]
        return x.reshape(-1, x.shape[-1])

    def start_batch(self, mask: Tensor | None) -> None:
        self.mask = None if mask is None else mask != 0
        self.batch_rows = {}

    def batch_tokens(self) -> int:
        return max(self.batch_rows.values(), default=0)


def collect_grams(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Forward | None = None,
    include: Include | None = None,
    token_mask: TokenMask | None = None,
) -> GramSet:
    """Run ``model`` over ``batches`` and return the Gram of every selected layer's inputs.

    forward: ``forward(model, batch)`` runs one batch; by default ``model(**batch)`` for a
        mapping, else ``model(batch)``.
    include: ``include(module_name, linear)`` picks the layers; by default every ``nn.Linear``.
    token_mask: ``token_mask(batch)`` gives a bool mask over the leading dims of the layers'
        inputs (batch x sequence), True at real tokens; by default a mapping batch's
        ``"attention_mask"``, else every position. A layer whose input's leading dims do not
        match the mask (a pooled head, inputs (batch, d_in)) counts all its rows.

    Runs in eval mode under ``torch.no_grad`` and restores the training flag and removes the
    hooks afterwards, even on error. Layers the forward never reaches get no entry.
    Raises ValueError when no layer matched, no token was counted, or a Gram is not finite
    (naming the first such layer: non-finite activations reached it).
    """
    linears = _select_linears(model, include)
    accumulator = _GramAccumulator()
    handles = [
        module.register_forward_pre_hook(accumulator.hook(f"{name}.weight"), with_kwargs=True)
        for name, module in linears
    ]
    was_training = model.training
    try:
        tokens = _run(model, batches, accumulator, forward or _default_forward, token_mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no tokens seen: the batches were empty or every position was masked")
    return GramSet(_finished(accumulator.sums), tokens)


def grams_from_texts(
    model: nn.Module,
    tokenizer: Callable[..., Mapping[str, Any]],
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 512,
) -> GramSet:
    """Gram matrices of a Hugging Face model's linear layers on ``texts``.

    Tokenizes ``batch_size`` texts at a time (padding, truncation to ``max_length``, PyTorch
    tensors) onto the model's device and counts only the attention mask's real tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters(), torch.empty(0)).device
    batches = (
        _to_device(
            tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ),
            device,
        )
        for start in range(0, len(texts), batch_size)
    )
    return collect_grams(model, batches)


def _select_linears(model: nn.Module, include: Include | None) -> list[tuple[str, nn.Linear]]:
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (include is None or include(name, module))
    ]
    if not linears:
        raise ValueError(
            f"no nn.Linear layers matched in {type(model).__name__}"
            + ("" if include is None else " (the include filter rejected them all)")
        )
    return linears


@torch.no_grad()
def _run(
    model: nn.Module,
    batches: Iterable[Any],
    accumulator: _GramAccumulator,
    forward: Forward,
    token_mask: TokenMask | None,
) -> int:
    """Feed every batch; return the tokens counted."""
    model.eval()
    tokens = 0
    for batch in batches:
        accumulator.start_batch(token_mask(batch) if token_mask else _default_mask(batch))
        forward(model, batch)
        tokens += accumulator.batch_tokens()
    return tokens


def _default_forward(model: nn.Module, batch: Any) -> object:
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def _default_mask(batch: Any) -> Tensor | None:
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        mask: Tensor = batch["attention_mask"]
        return mask
    return None


def _finished(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """float32 CPU copies of the sums; ValueError naming the first non-finite one.

    ``sums`` is in the order the layers first ran, so the first bad one is where NaN or Inf
    entered (the float32 check also catches a Gram beyond float32's range).
    """
    grams = {name: gram.float().cpu() for name, gram in sums.items()}
    bad = [name for name, gram in grams.items() if not bool(torch.isfinite(gram).all())]
    if bad:
        others = f" (and {len(bad) - 1} later layers)" if len(bad) > 1 else ""
        raise ValueError(f"non-finite activations reached layer {bad[0]!r}{others}")
    return grams


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
