"""What a client asks for, validated once: the Compress and Plan headers as domain values,
and which tensors are compressed lossy.

Everything here fails with :class:`~compressor_svc.errors.InvalidInput` before any tensor
is read, so a bad request costs the client nothing but the header.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from clients._generated.deltavault.common.v1 import common_pb2
from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.key_files import KEY_BYTES
from clients.sealing import SCHEME, ChunkSealer, data_key_id
from compressor_svc.errors import InvalidInput
from compressor_svc.methods import get_method
from compressor_svc.methods.base import Method, check_ratio
from store_svc.digest import Algorithm, Digest
from store_svc.refs import RefName

_EXCLUDED_SEGMENTS = frozenset({"lm_head", "classifier", "score", "wte", "wpe", "head"})


class Scope(enum.Enum):
    PER_MATRIX = "per-matrix"
    """Every matrix meets the ratio (the papers)."""
    MODEL = "model"
    """One bit budget over every lossy matrix (ADAMIX only): two passes."""


@dataclass(frozen=True)
class TensorSelector:
    """Which tensors are compressed lossy: those matching any pattern, or by default every
    2-D ``*.weight`` of a linear layer. Embeddings, norms, LM and classifier heads are
    excluded by default (SCIENCE.md pitfall 8); patterns override the default entirely."""

    patterns: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def parse(cls, patterns: Sequence[str]) -> TensorSelector:
        compiled = []
        for text in patterns:
            try:
                compiled.append(re.compile(text))
            except re.error as exc:
                raise InvalidInput(
                    f"lossy pattern {text!r} is not a regular expression: {exc}"
                ) from None
        return cls(tuple(compiled))

    def is_lossy(self, name: str, shape: Sequence[int]) -> bool:
        if len(shape) != 2:
            return False
        if self.patterns:
            return any(p.search(name) for p in self.patterns)
        segments = name.split(".")
        return (
            name.endswith(".weight")
            and not _EXCLUDED_SEGMENTS.intersection(segments)
            and not any("embed" in s or "norm" in s.lower() for s in segments)
        )


def parse_options(method: Method[Any], options: Mapping[str, str]) -> dict[str, Any]:
    """Method options from strings: each value is JSON when it parses (lists become tuples),
    else the string itself; each must be of its config field's type, and the method's
    config checks names and values."""
    parsed: dict[str, Any] = {}
    for key, text in options.items():
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        parsed[key] = tuple(value) if isinstance(value, list) else value
    try:
        _check_types(method.config_type, parsed)
        method.make_config(parsed)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"method {method.name} options: {exc}") from None
    return parsed


def _check_types(config_type: type[Any], options: Mapping[str, Any]) -> None:
    """TypeError naming the first option whose value is not of its field's type: configs
    check ranges, so a string where an int belongs would otherwise fail deep inside the
    method, mid-stream, as an internal error."""
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        if field.name in options and not _fits(options[field.name], hints[field.name]):
            raise TypeError(
                f"option {field.name!r} must be {_describe(hints[field.name])}, "
                f"got {options[field.name]!r}"
            )


def _fits(value: Any, hint: Any) -> bool:  # noqa: PLR0911 (one answer per kind of type)
    """Whether a parsed option value is of the annotated type (floats finite)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(item, args[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return any(value == member.value for member in hint)
    return isinstance(hint, type) and isinstance(value, hint)


def _describe(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"one of {[member.value for member in hint]}"
    return str(hint) if typing.get_origin(hint) else hint.__name__


def _method(name: str) -> Method[Any]:
    try:
        return get_method(name)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


@dataclass(frozen=True)
class CompressSpec:
    """A validated Compress header."""

    method: str
    ratio: float | None
    scope: Scope
    ref: str
    expected_ref: Digest | None
    force_ref: bool
    base_fingerprint: str
    selector: TensorSelector
    options: dict[str, Any]
    labels: dict[str, str]
    algorithm: Algorithm
    files: tuple[common_pb2.FileEntry, ...] = ()
    """Side files the client uploaded; the store checks them at the commit."""
    sealing: common_pb2.ChunkSealing | None = None
    """Seal every chunk (``clients.sealing``): the manifest's record of the data key."""
    data_key: bytes = dataclasses.field(default=b"", repr=False)
    """The key ``sealing`` records; never in a repr, a log line or an error message."""

    @classmethod
    def from_proto(cls, header: compressor_pb2.CompressHeader) -> CompressSpec:
        method = _method(header.method)
        ratio = header.ratio if method.lossy else None
        try:
            check_ratio(method, ratio)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        scope = _scope(header.allocation, method.name)
        if header.ref:
            RefName.parse(header.ref)  # INVALID_ARGUMENT naming the rule
        expected = None
        if header.HasField("expected_ref_target"):
            try:
                expected = Digest.from_proto(header.expected_ref_target)
            except ValueError as exc:
                raise InvalidInput(f"expected_ref_target: {exc}") from None
        try:
            algorithm = (
                Algorithm.from_proto(header.digest_algorithm)
                if header.digest_algorithm
                else Algorithm.BLAKE3
            )
        except ValueError as exc:
            raise InvalidInput(f"digest_algorithm: {exc}") from None
        return cls(
            method=method.name,
            ratio=ratio,
            scope=scope,
            ref=header.ref,
            expected_ref=expected,
            force_ref=header.force_ref,
            base_fingerprint=header.base_fingerprint,
            selector=TensorSelector.parse(header.lossy_patterns),
            options=parse_options(method, header.method_options),
            labels=dict(header.labels),
            algorithm=algorithm,
            files=tuple(header.files),
            sealing=_sealing(header),
            data_key=header.data_key,
        )

    def sealer(self) -> ChunkSealer | None:
        return ChunkSealer(self.data_key) if self.sealing is not None else None


def _sealing(header: compressor_pb2.CompressHeader) -> common_pb2.ChunkSealing | None:
    """The header's sealing record, checked to name the data key it comes with."""
    if not header.HasField("sealing") and not header.data_key:
        return None
    if not header.HasField("sealing") or not header.data_key:
        raise InvalidInput("sealing and data_key come together: send both or neither")
    if header.sealing.scheme != SCHEME:
        raise InvalidInput(f"sealing scheme {header.sealing.scheme!r} unknown; use {SCHEME}")
    key_id = data_key_id(header.data_key) if len(header.data_key) == KEY_BYTES else ""
    if key_id != header.sealing.data_key_id:
        raise InvalidInput(
            f"data_key is not the {KEY_BYTES}-byte key {header.sealing.data_key_id} the "
            "sealing record names"
        )
    return header.sealing


def _scope(value: int, method: str) -> Scope:
    if value not in compressor_pb2.AllocationScope.values():  # an open enum takes any value
        raise InvalidInput(f"allocation {value} is not an AllocationScope; use PER_MATRIX or MODEL")
    if value == compressor_pb2.ALLOCATION_SCOPE_MODEL:
        if method != "adamix":
            raise InvalidInput(
                f"model-wide allocation is built for adamix (one bit budget over all matrices); "
                f"{method} allocates per matrix"
            )
        return Scope.MODEL
    return Scope.PER_MATRIX


@dataclass(frozen=True)
class PlanSpec:
    """A validated Plan header: methods with their options, and target ratios."""

    methods: dict[str, dict[str, Any]]
    ratios: tuple[float, ...]
    selector: TensorSelector

    @classmethod
    def from_proto(cls, header: compressor_pb2.PlanHeader) -> PlanSpec:
        names = list(header.methods) or ["adamix", "deltadq"]
        ratios = tuple(header.ratios) or (8.0, 16.0, 32.0)
        per_method: dict[str, dict[str, str]] = {name: {} for name in names}
        for key, value in header.method_options.items():
            name, _, option = key.partition(".")
            if name not in per_method or not option:
                raise InvalidInput(
                    f"plan option {key!r} must be METHOD.OPTION for a planned method {names}"
                )
            per_method[name][option] = value
        methods = {}
        for name, options in per_method.items():
            method = _method(name)
            if not method.lossy:
                raise InvalidInput(f"{name} is not a lossy method; there is nothing to plan")
            for ratio in ratios:
                try:
                    check_ratio(method, ratio)
                except ValueError as exc:
                    raise InvalidInput(str(exc)) from None
            methods[name] = parse_options(method, options)
        return cls(methods, ratios, TensorSelector.parse(header.lossy_patterns))
