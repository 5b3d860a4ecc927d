"""The method interface: config dataclasses, a registry, and the ``compress`` entry point.

Every method is a :class:`Method` subclass registered by name with :func:`register_method`;
callers use one verb, :func:`compress`, which validates the input once for all methods,
builds the method's config from keyword options, encodes, and checks the exact ratio.

Exact accounting: a target ratio R against the fp16 delta allows
``floor(16 · numel / R)`` stored bits (:func:`bit_budget`). Methods never exceed it, so the
achieved ``encoded.ratio`` is always ≥ R; landing within 10% above R is each method's design
goal, checked by the contract tests rather than enforced here, because an optimal allocator
may rightly stop early when more bits no longer reduce the error (an exactly low-rank delta).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from fractions import Fraction
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor

from kernels.reference import EncodedTensor

RATIO_TOLERANCE = 1.1
"""Methods aim for an exact ratio in [R, RATIO_TOLERANCE · R]."""

_DELTA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options; subclasses validate in ``__post_init__``."""

    version: ClassVar[int] = 1


C = TypeVar("C", bound=MethodConfig)


@dataclasses.dataclass(frozen=True)
class Target:
    """What to encode: the validated delta and everything the encoder may use.

    delta: (d_out, d_in) fp32.  gram: (d_in, d_in) fp32 or None.  dtype: the delta's
    original dtype name ("float16", "bfloat16", "float32").  ratio: target x against fp16
    (1.0 for lossless, which takes none).
    """

    delta: Tensor
    ratio: float
    gram: Tensor | None
    dtype: str

    @property
    def shape(self) -> tuple[int, int]:
        d_out, d_in = self.delta.shape
        return d_out, d_in

    @property
    def budget(self) -> int:
        """Most bits the encoding may take: ``bit_budget(shape, ratio)``."""
        return bit_budget(self.shape, self.ratio)


class Method(ABC, Generic[C]):
    """One compression method: its name, format version, config type and encoder."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    config_type: type[C]
    lossy: ClassVar[bool] = True
    """False only for ``lossless``, whose ratio is fixed by the dtype and takes no target."""
    uses_gram: ClassVar[bool] = False
    """True if the method reads the calibration Gram matrix XᵀX when one is given."""

    @abstractmethod
    def encode(self, target: Target, config: C) -> EncodedTensor:
        """Encode ``target.delta`` in at most ``target.budget`` bits.

        Raises ValueError, naming the limit, for a ratio the format cannot reach.
        """

    @abstractmethod
    def paper_bits(self, encoded: EncodedTensor) -> int:
        """The bits the method's paper would count for ``encoded`` (SCIENCE.md §0)."""

    def make_config(self, options: dict[str, Any]) -> C:
        fields = [f.name for f in dataclasses.fields(self.config_type)]
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(f"{self.name} has no option(s) {unknown}; its options are {fields}")
        return self.config_type(**options)


_REGISTRY: dict[str, Method[Any]] = {}

M = TypeVar("M", bound=type[Method[Any]])


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` available to :func:`compress` under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method[Any]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_REGISTRY)}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def bit_budget(shape: tuple[int, ...], ratio: float) -> int:
    """Most bits a tensor of ``shape`` may store at ``ratio`` x against fp16 (exact)."""
    return math.floor(Fraction(16 * math.prod(shape)) / Fraction(ratio))


def check_delta(delta: Tensor) -> None:
    """ValueError unless ``delta`` is a non-empty, finite, 2-D float16/bfloat16/float32 tensor."""
    if not isinstance(delta, Tensor):
        raise ValueError(f"delta must be a torch.Tensor, got {type(delta).__name__}")
    if delta.dim() != 2:
        raise ValueError(
            f"delta must be 2-D (d_out, d_in); got {delta.dim()}-D shape {tuple(delta.shape)}. "
            "Reshape convolution kernels to (out, in·k·k) first; store 1-D tensors losslessly"
        )
    if delta.numel() == 0:
        raise ValueError(f"delta must have at least one element; got shape {tuple(delta.shape)}")
    if delta.dtype not in _DELTA_DTYPES:
        raise ValueError(f"delta dtype must be float16, bfloat16 or float32; got {delta.dtype}")
    if not bool(torch.isfinite(delta).all()):
        bad = int((~torch.isfinite(delta)).sum())
        raise ValueError(f"delta must be finite; {bad} NaN/Inf element(s) found")


def check_gram(gram: Tensor, d_in: int) -> None:
    """ValueError unless ``gram`` is a finite (d_in, d_in) matrix."""
    if gram.dim() != 2 or tuple(gram.shape) != (d_in, d_in):
        raise ValueError(f"gram must be (d_in, d_in) = ({d_in}, {d_in}); got {tuple(gram.shape)}")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("gram must be finite; it has NaN/Inf entries")


def check_ratio(method: Method[Any], ratio: float | None) -> None:
    if not method.lossy:
        if ratio is not None:
            raise ValueError(
                f"{method.name} keeps every bit, so its ratio is fixed by the dtype "
                "(1.0 for float16, 0.5 for float32); pass ratio=None"
            )
        return
    if ratio is None or not math.isfinite(ratio) or ratio <= 1:
        raise ValueError(
            f"{method.name} needs a finite target ratio > 1 against the fp16 delta; got {ratio}"
        )


def make_target(delta: Tensor, ratio: float, gram: Tensor | None) -> Target:
    """A validated :class:`Target`: ValueError for a bad delta or a Gram matrix that does not
    fit it; both converted to fp32 before any arithmetic."""
    check_delta(delta)
    gram32 = None
    if gram is not None:
        check_gram(gram, delta.shape[1])
        gram32 = gram.float()
    return Target(delta.float(), ratio, gram32, str(delta.dtype).removeprefix("torch."))


def compress(
    delta: Tensor,
    method: str,
    *,
    ratio: float | None,
    gram: Tensor | None = None,
    **options: Any,
) -> EncodedTensor:
    """Compress a 2-D delta (d_out, d_in) with ``method`` at ``ratio`` x against fp16.

    ``gram`` is the optional (d_in, d_in) calibration Gram matrix XᵀX; methods that do not
    use activations ignore it. ``options`` are the method's config fields. The delta is
    converted to fp32 before any arithmetic.
    """
    impl = get_method(method)
    config = impl.make_config(options)
    target = make_target(delta, ratio if ratio is not None else 1.0, gram)
    check_ratio(impl, ratio)
    encoded = impl.encode(target, config)
    if ratio is not None and encoded.ratio < ratio:
        raise RuntimeError(
            f"{method} overspent its budget: "
            f"{encoded.nbits} bits > {bit_budget(delta.shape, ratio)}"
        )
    return encoded


def paper_ratio(encoded: EncodedTensor) -> float:
    """The ratio the method's paper would report for ``encoded`` (it omits some parts)."""
    bits = get_method(encoded.method).paper_bits(encoded)
    return encoded.numel * 16 / bits if bits else math.inf


def relative_weight_error(delta: Tensor, approx: Tensor) -> float:
    """‖Δ - Δ̂‖_F / ‖Δ‖_F for (d_out, d_in) tensors."""
    return float(torch.linalg.norm(delta.float() - approx) / torch.linalg.norm(delta.float()))


def relative_activation_error(delta: Tensor, approx: Tensor, gram: Tensor) -> float:
    """‖(Δ - Δ̂)X‖_F / ‖ΔX‖_F = √(tr(E G Eᵀ) / tr(Δ G Δᵀ)) with G = XXᵀ (d_in, d_in)."""
    err = delta.float() - approx
    num = (err @ gram * err).sum()
    den = (delta.float() @ gram * delta.float()).sum()
    return float(torch.sqrt(num / den))
