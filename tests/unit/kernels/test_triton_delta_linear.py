"""``kernels.decode`` and ``kernels.delta_linear`` on the Triton backend (CPU tensors,
Triton's interpreter) against the torch reference, for every lossy format.

Tolerances, relative to the largest output magnitude: fp32 1e-5 (the kernels reduce in
another order); fp16 4e-3 and bf16 3e-2 (operands rounded to the dtype for ``tl.dot``, and
the base product and the delta rounded to it separately, where the reference rounds once).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import kernels
from compressor_svc.methods.base import compress
from kernels import reference
from kernels.dispatch import BACKEND_ENV, Backend, backend_for
from kernels.layout import SparseMasks, stack
from kernels.reference import EncodedTensor
from kernels.triton.lowrank import add_low_rank
from kernels.triton.segments import row_offsets
from tests.support import deltas

pytestmark = pytest.mark.usefixtures("triton_backend")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SHAPE = (37, 70)


def _inputs(rows: int, shape: tuple[int, int], dtype: torch.dtype, seed: int) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    x = torch.randn(rows, d_in, generator=generator).to(dtype)
    w_base = (torch.randn(d_out, d_in, generator=generator) * d_in**-0.5).to(dtype)
    bias = torch.randn(d_out, generator=generator).to(dtype)
    return x, w_base, bias


def _assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype
    assert not torch.isnan(actual).any(), "an output element was never written"
    scale = float(expected.float().abs().max()) or 1.0
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol * scale, rtol=tol)


def _reference_linear(
    x: Tensor, w_base: Tensor, encoded: EncodedTensor, bias: Tensor | None
) -> Tensor:
    out = x.float() @ (w_base.float() + reference.decode(encoded)).T
    return (out if bias is None else out + bias.float()).to(x.dtype)


def _formats() -> dict[str, EncodedTensor]:
    """One encoding of each lossy format variant, every width covered across them."""
    out = {
        f"lowrank-{b}bit": deltas.low_rank(SHAPE, [(b, 5)], group_size=16, seed=b)
        for b in range(1, 9)
    }
    out["lowrank-mixed"] = deltas.low_rank(
        SHAPE, [(8, 3), (3, 9), (2, 33)], group_size=45, seed=11, method="deltacome"
    )
    out["lowrank-symmetric"] = deltas.low_rank(
        SHAPE, [(4, 6)], group_size=7, seed=12, symmetric=True
    )
    out["bitdelta-row"] = deltas.signs(SHAPE, 3, per_row=True, seed=13)
    out["bitdelta-matrix"] = deltas.signs(SHAPE, 1, per_row=False, seed=14)
    for bits in (1, 2, 4, 8, 16):
        out[f"dare-{bits}bit"] = deltas.dare(SHAPE, 0.3, bits=bits, group_size=33, seed=bits)
    for bits in (1, 3, 5, 7):
        out[f"deltadq-{bits}bit"] = deltas.deltadq(
            SHAPE, 8, 3, bits=bits, group_size=19, seed=20 + bits
        )
    out["deltadq-separated"] = deltas.deltadq(SHAPE, 16, 5, bits=2, group_size=32, seed=30, extra=2)
    out["deltadq-tail"] = deltas.deltadq(SHAPE, 64, 9, bits=4, group_size=128, seed=31)
    return out


FORMATS = _formats()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_decode_matches_reference(name: str, dtype: torch.dtype) -> None:
    encoded = FORMATS[name]
    expected = reference.decode(encoded).to(dtype)
    actual = kernels.decode(encoded, dtype=dtype)
    assert actual.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-9)
    else:
        _assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_delta_linear_matches_reference(name: str, dtype: torch.dtype) -> None:
    encoded = FORMATS[name]
    x, w_base, bias = _inputs(5, SHAPE, dtype, seed=len(name))
    actual = kernels.delta_linear(x, w_base, encoded, bias)
    _assert_close(actual, _reference_linear(x, w_base, encoded, bias), dtype)


SPARSE = sorted(name for name in FORMATS if name.startswith(("dare", "deltadq")))


@pytest.mark.parametrize("name", SPARSE)
def test_hashed_masks_give_what_bitmaps_give(name: str) -> None:
    encoded = FORMATS[name]
    hashed = stack([encoded], sparse_masks=SparseMasks.HASH)
    if encoded.method == "dare":  # DeltaDQ's hashed masks pay 32 bits per dropout group
        assert hashed.nbytes < stack([encoded]).nbytes
    x, w_base, bias = _inputs(3, SHAPE, torch.float32, seed=4)
    actual = kernels.delta_linear(x, w_base, hashed, bias)
    _assert_close(actual, _reference_linear(x, w_base, encoded, bias), torch.float32)
    torch.testing.assert_close(
        kernels.decode(hashed), reference.decode(encoded), rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("rows", [1, 17, 70])
def test_delta_linear_row_counts_and_leading_dims(rows: int) -> None:
    encoded = FORMATS["lowrank-mixed"]
    x, w_base, _ = _inputs(rows, SHAPE, torch.float32, seed=rows)
    expected = _reference_linear(x, w_base, encoded, None)
    _assert_close(kernels.delta_linear(x, w_base, encoded), expected, torch.float32)
    stacked = kernels.delta_linear(x.view(1, rows, -1), w_base, encoded)
    assert stacked.shape == (1, rows, SHAPE[0])


@pytest.mark.parametrize("shape", [(1, 1), (1, 33), (65, 3), (129, 130)])
def test_awkward_shapes(shape: tuple[int, int]) -> None:
    cases = [
        deltas.low_rank(shape, [(3, 2), (2, 1)], group_size=5, seed=1),
        deltas.signs(shape, 2, per_row=True, seed=2),
        deltas.dare(shape, 0.5, bits=3, group_size=7, seed=3),
        deltas.deltadq(shape, 4, 1, bits=2, group_size=9, seed=4),
    ]
    for encoded in cases:
        x, w_base, bias = _inputs(3, shape, torch.float32, seed=5)
        actual = kernels.delta_linear(x, w_base, encoded, bias)
        _assert_close(actual, _reference_linear(x, w_base, encoded, bias), torch.float32)
        decoded = kernels.decode(encoded)
        torch.testing.assert_close(decoded, reference.decode(encoded), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_deltas_each_serve_their_rows(dtype: torch.dtype) -> None:
    encodings = [
        FORMATS["lowrank-mixed"],
        FORMATS["deltadq-separated"],
        FORMATS["lowrank-3bit"],
        FORMATS["bitdelta-row"],
        FORMATS["dare-4bit"],
        FORMATS["lowrank-8bit"],
    ]
    rows = [2, 0, 3, 1, 4, 17]
    x, w_base, bias = _inputs(sum(rows), SHAPE, dtype, seed=3)
    layout = stack(encodings, x.device)
    actual = kernels.delta_linear_batched(x, w_base, layout, rows, bias)
    start = 0
    for encoded, count in zip(encodings, rows, strict=True):
        part = slice(start, start + count)
        if count:
            expected = _reference_linear(x[part], w_base, encoded, bias)
            _assert_close(actual[part], expected, dtype)
        start += count


def test_split_reduction_adds_partial_sums() -> None:
    encoded = deltas.low_rank((40, 300), [(4, 7), (2, 20)], group_size=64, seed=9)
    layout = stack([encoded])
    x, _, _ = _inputs(6, (40, 300), torch.float32, seed=9)
    offsets = row_offsets([6], x.device)
    expected = x @ reference.decode(encoded).T
    for split_k in (1, 3):
        y = torch.zeros(6, 40)
        assert layout.low_rank is not None
        add_low_rank(x, y, offsets, [6], layout.low_rank, split_k=split_k)
        _assert_close(y, expected, torch.float32)


METHOD_CASES: dict[str, dict[str, float | None]] = {
    "adamix": {"ratio": 16.0},
    "deltacome": {"ratio": 16.0},
    "deltadq": {"ratio": 16.0},
    "dare": {"ratio": 16.0},
    "bitdelta": {"ratio": 7.5},
    "lossless": {"ratio": None},
}


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_encodings_of_the_compressor(method: str) -> None:
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(48, 160, generator=generator) * 1e-2
    encoded = compress(delta, method, ratio=METHOD_CASES[method]["ratio"])
    x, w_base, bias = _inputs(4, (48, 160), torch.float16, seed=1)
    actual = kernels.delta_linear(x, w_base, encoded, bias)
    _assert_close(actual, _reference_linear(x, w_base, encoded, bias), torch.float16)
    decoded = kernels.decode(encoded, dtype=torch.float32)
    torch.testing.assert_close(decoded, reference.decode(encoded), rtol=1e-6, atol=1e-9)


def test_reference_backend_gives_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "reference")
    encoded = FORMATS["deltadq-3bit"]
    x, w_base, bias = _inputs(4, SHAPE, torch.float32, seed=2)
    actual = kernels.delta_linear(x, w_base, encoded, bias)
    assert torch.equal(actual, _reference_linear(x, w_base, encoded, bias))


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    assert backend_for(cpu) is Backend.TRITON  # forced by the fixture
    monkeypatch.delenv(BACKEND_ENV)
    assert backend_for(cpu) is Backend.REFERENCE
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="use triton or reference"):
        backend_for(cpu)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        backend_for(cpu)


def test_bad_calls_are_refused() -> None:
    encoded = FORMATS["lowrank-4bit"]
    x, w_base, _ = _inputs(4, SHAPE, torch.float32, seed=0)
    with pytest.raises(ValueError, match="share a float dtype"):
        kernels.delta_linear(x.half(), w_base, encoded)
    with pytest.raises(ValueError, match="the deltas are"):
        kernels.delta_linear(x[:, :10], w_base[:, :10], encoded)
    with pytest.raises(ValueError, match="rows"):
        kernels.delta_linear_batched(x, w_base, [encoded, encoded], [1, 2])
    with pytest.raises(ValueError, match="bias"):
        kernels.delta_linear(x, w_base, encoded, torch.zeros(3))
    with pytest.raises(ValueError, match="share one 2-D shape"):
        stack([encoded, deltas.signs((3, 4), 1, per_row=False, seed=0)])
