"""PEFT LoRA adapters as compressor input: ΔW = B·A·scale, one target module at a time.

A LoRA fine-tune leaves the base weights alone and trains, per target module, factors
A (r x in) and B (out x r); the fine-tuned weight is W + ΔW with ΔW = B·A·scale, where
scale = lora_alpha / r, or lora_alpha / √r under rank-stabilised LoRA (``use_rslora``).
``rank_pattern`` and ``alpha_pattern`` override r and lora_alpha per module: a key applies to
a module whose name ends with it at a dot boundary or matches it as a whole regex, the first
such key winning (PEFT's ``get_pattern_key``). ``fan_in_fan_out`` marks a base that stores
weights as (in, out) (GPT-2's ``Conv1D``): ΔW is transposed to match. Embedding LoRA
(``lora_embedding_A`` (r x num_embeddings), ``lora_embedding_B`` (dim x r)) gives ΔW = (B·A)ᵀ,
shaped like the embedding weight. With ``lora_bias`` the adapter also trains a bias, whose
change is ``lora_B.bias`` · scale.

An adapter is a directory as ``save_pretrained`` writes it: ``adapter_config.json`` and
``adapter_model.safetensors``, tensors named ``base_model.model.<module>.lora_A.weight``.
:class:`LoraAdapter` validates the config and every factor's shape from the headers alone,
then reads two factors per delta, so a whole adapter is never in memory. Its names drop
PEFT's ``base_model.model.`` prefix; :func:`resolve_names` maps the resulting weight names
onto a base checkpoint's, which may carry one prefix more or less (``model.``, ``bert.``).

Not supported, with an error saying so: pickled ``adapter_model.bin``, other PEFT methods
than LoRA, and DoRA (its magnitude vector rescales the merged weight, so the change is not
B·A alone).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor

from clients.safetensors_io import Checkpoint

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "LoraAdapter", "resolve_names"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""Prefix PEFT puts before every module name it saves (the wrapper's attribute path)."""

_FACTOR = re.compile(r"(?P<module>.+)\.lora_(?P<part>A\.weight|B\.weight|B\.bias|embedding_[AB])")
_T = TypeVar("_T")
_SHOWN = 10
"""Names listed in an error before the rest are counted."""


@dataclass(frozen=True)
class _Factors:
    """Tensor names (as stored) of one module's LoRA factors."""

    a: str
    b: str
    bias: str | None
    embedding: bool


@dataclass(frozen=True)
class _Config:
    """The fields of ``adapter_config.json`` that define ΔW."""

    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[re.Pattern[str], int]
    """Each key compiled as PEFT matches it (see ``_patterns``) -> r; the first match wins."""
    alpha_pattern: dict[re.Pattern[str], float]


class LoraAdapter:
    """A PEFT LoRA adapter directory, read one module's factors at a time.

    Module names have PEFT's ``base_model.model.`` prefix stripped
    (``"encoder.layer.0.attention.self.query"``); deltas are float32 and shaped like the
    base weight they add to: (out, in), or (in, out) under ``fan_in_fan_out``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._config = _read_config(self.path / ADAPTER_CONFIG)
        self.checkpoint = Checkpoint(_weights_file(self.path))
        self._factors = _pair_factors(self.checkpoint)
        for module in self._factors:
            self._check_shapes(module)

    def modules(self) -> list[str]:
        """Target module names, in the adapter file's order."""
        return list(self._factors)

    def other_tensors(self) -> list[str]:
        """Stored names of tensors that are not LoRA factors (``modules_to_save`` copies:
        whole trained weights, not deltas); read them with ``self.checkpoint.get``."""
        factors = {n for f in self._factors.values() for n in (f.a, f.b, f.bias) if n}
        return [name for name in self.checkpoint.names() if name not in factors]

    def rank(self, module: str) -> int:
        """r for ``module``: its ``rank_pattern`` entry, else the config's ``r``."""
        return _lookup(self._config.rank_pattern, module, self._config.r)

    def scale(self, module: str) -> float:
        """alpha / r, or alpha / √r with ``use_rslora`` (alpha from ``alpha_pattern`` first)."""
        alpha = _lookup(self._config.alpha_pattern, module, self._config.alpha)
        rank = self.rank(module)
        return alpha / math.sqrt(rank) if self._config.rslora else alpha / rank

    def delta(self, module: str) -> Tensor:
        """ΔW = B·A·scale for ``module`` (float32), laid out like the base weight."""
        factors = self._module(module)
        a = self.checkpoint.get(factors.a).float()
        b = self.checkpoint.get(factors.b).float()
        delta = (b @ a) * self.scale(module)
        transpose = factors.embedding or self._config.fan_in_fan_out
        return delta.T.contiguous() if transpose else delta

    def bias_delta(self, module: str) -> Tensor | None:
        """Δb = lora_B.bias · scale for ``module`` (float32), None without a LoRA bias."""
        factors = self._module(module)
        if factors.bias is None:
            return None
        return self.checkpoint.get(factors.bias).float() * self.scale(module)

    def iter_deltas(self) -> Iterator[tuple[str, Tensor]]:
        """``(f"{module}.weight", ΔW)`` per module, one at a time, and ``(f"{module}.bias",
        Δb)`` after it where the adapter trained a LoRA bias."""
        for module in self._factors:
            yield f"{module}.weight", self.delta(module)
            bias = self.bias_delta(module)
            if bias is not None:
                yield f"{module}.bias", bias

    def has_bias(self, module: str) -> bool:
        return self._module(module).bias is not None

    def _module(self, module: str) -> _Factors:
        try:
            return self._factors[module]
        except KeyError:
            raise ValueError(
                f"{self.checkpoint.path} has no LoRA factors for module {module!r}"
            ) from None

    def _check_shapes(self, module: str) -> None:
        """A is (r, in) and B is (out, r), with r as configured for the module."""
        factors = self._factors[module]
        a = self.checkpoint.info(factors.a).shape
        b = self.checkpoint.info(factors.b).shape
        where = f"{self.checkpoint.path}: module {module!r}"
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ValueError(
                f"{where}: lora_A {a} and lora_B {b} do not chain as B (out, r) · A (r, in)"
                " (only Linear and Embedding LoRA are supported)"
            )
        if a[0] != self.rank(module):
            raise ValueError(
                f"{where}: factors have rank {a[0]} but {ADAPTER_CONFIG} gives r ="
                f" {self.rank(module)} (check r and rank_pattern)"
            )


def resolve_names(adapter_names: Iterable[str], base_names: Collection[str]) -> dict[str, str]:
    """Map each adapter weight name to the base checkpoint's name for the same tensor.

    An exact match wins; otherwise the one base name that equals the adapter's name up to a
    leading prefix on either side (``layers.0.q.weight`` ~ ``model.layers.0.q.weight``).
    ValueError listing the names with no match, several matches, or a base name claimed twice.
    """
    exact = set(base_names)
    mapping: dict[str, str] = {}
    problems: list[str] = []
    for name in adapter_names:
        found = [name] if name in exact else [b for b in base_names if _same_tail(name, b)]
        if len(found) == 1:
            mapping[name] = found[0]
        else:
            problems.append(f"{name} -> {sorted(found) if found else 'no base tensor'}")
    claimed: dict[str, list[str]] = {}
    for name, base in mapping.items():
        claimed.setdefault(base, []).append(name)
    problems += [
        f"{names} -> {base} (claimed twice)" for base, names in claimed.items() if len(names) > 1
    ]
    if problems:
        raise ValueError(
            f"cannot map {len(problems)} adapter names onto the base names: {_listing(problems)}"
        )
    return mapping


def _same_tail(a: str, b: str) -> bool:
    """Whether one name is the other with a dotted prefix in front."""
    return a.endswith("." + b) or b.endswith("." + a)


def _listing(items: list[str]) -> str:
    shown = "; ".join(items[:_SHOWN])
    return shown + (f"; and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _weights_file(directory: Path) -> Path:
    weights = directory / ADAPTER_WEIGHTS
    if weights.is_file():
        return weights
    if (directory / "adapter_model.bin").is_file():
        raise ValueError(
            f"{directory / 'adapter_model.bin'}: pickled adapters are not supported; save with"
            f" safe_serialization=True (the default) to get {ADAPTER_WEIGHTS}"
        )
    raise ValueError(f"{directory} has no {ADAPTER_WEIGHTS}")


def _read_config(path: Path) -> _Config:
    """Parse and check ``adapter_config.json``; ValueError naming the file and field."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise ValueError(
            f"{path}: field 'peft_type' is {raw.get('peft_type')!r}; only 'LORA' is supported"
        )
    if _flag(path, raw, "use_dora"):
        raise ValueError(
            f"{path}: DoRA (use_dora: true) is not supported: its magnitude vector rescales the"
            " merged weight, so the change is not a delta B·A"
        )
    r: Any = raw.get("r")
    alpha: Any = raw.get("lora_alpha")
    _require(path, "r", r, _is_rank(r), "an integer >= 1")
    _require(path, "lora_alpha", alpha, _is_number(alpha), "a finite number")
    return _Config(
        r=r,
        alpha=float(alpha),
        rslora=_flag(path, raw, "use_rslora"),
        fan_in_fan_out=_flag(path, raw, "fan_in_fan_out"),
        rank_pattern=_patterns(path, raw, "rank_pattern", _is_rank, "an integer >= 1"),
        alpha_pattern=_patterns(path, raw, "alpha_pattern", _is_number, "a finite number"),
    )


def _require(path: Path, key: str, value: object, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"{path}: field {key!r} must be {want}, got {value!r}")


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _flag(path: Path, raw: dict[str, Any], key: str) -> bool:
    """An optional boolean field; absent or null is False."""
    value = raw.get(key)
    _require(path, key, value, value is None or isinstance(value, bool), "true or false")
    return value is True


def _patterns(
    path: Path, raw: dict[str, Any], key: str, valid: Callable[[object], bool], want: str
) -> dict[re.Pattern[str], Any]:
    """A ``rank_pattern``-like field: module-name regex -> value, compiled as PEFT matches."""
    table = raw.get(key) or {}
    _require(path, key, table, isinstance(table, dict), "an object of regex -> value")
    compiled: dict[re.Pattern[str], Any] = {}
    for pattern, value in table.items():
        _require(path, f"{key}[{pattern!r}]", value, valid(value), want)
        try:
            compiled[re.compile(rf"(.*\.)?({pattern})$")] = value
        except re.error as exc:
            raise ValueError(f"{path}: field {key!r}: {pattern!r} is not a regex: {exc}") from exc
    return compiled


def _lookup(table: dict[re.Pattern[str], _T], module: str, default: _T) -> _T:
    """The value of the first pattern matching ``module``, else ``default``."""
    return next((value for pattern, value in table.items() if pattern.match(module)), default)


def _pair_factors(checkpoint: Checkpoint) -> dict[str, _Factors]:
    """Module name (prefix stripped) -> its factors; ValueError for a factor without its pair."""
    parts: dict[str, dict[str, str]] = {}
    for name in checkpoint.names():
        match = _FACTOR.fullmatch(name.removeprefix(PEFT_PREFIX))
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = name
    factors: dict[str, _Factors] = {}
    for module, found in parts.items():
        embedding = "embedding_A" in found or "embedding_B" in found
        a, b = ("embedding_A", "embedding_B") if embedding else ("A.weight", "B.weight")
        missing = [f"lora_{part}" for part in (a, b) if part not in found]
        if missing:
            raise ValueError(
                f"{checkpoint.path}: module {module!r} has no {missing[0]}"
                " (LoRA factors come in A/B pairs)"
            )
        factors[module] = _Factors(found[a], found[b], found.get("B.bias"), embedding)
    if not factors:
        raise ValueError(
            f"{checkpoint.path} holds no LoRA factors (<module>.lora_A.weight and .lora_B.weight)"
        )
    return factors
