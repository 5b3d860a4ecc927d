"""PEFT LoRA adapters read as deltas: ΔW = B·A·scale exactly, PEFT's options, name mapping."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from clients.lora import LoraAdapter, resolve_names
from tests.support.checkpoints import write_adapter as write_folder

PREFIX = "base_model.model."
QUERY = "encoder.layer.0.attention.self.query"
VALUE = "encoder.layer.0.attention.self.value"
DENSE = "encoder.layer.0.output.dense"
SHAPES = {QUERY: (4, 6), VALUE: (5, 6), DENSE: (3, 7)}
"""Module -> (out, in) of its base weight: no two alike, so a transpose cannot hide."""


def factors(rank: int = 2, ranks: dict[str, int] | None = None) -> dict[str, Tensor]:
    """lora_A (r, in) and lora_B (out, r) per module, under PEFT's saved names."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out, inp) in SHAPES.items():
        r = (ranks or {}).get(module, rank)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(r, inp, generator=g)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(out, r, generator=g)
    return tensors


def write_adapter(
    folder: Path, tensors: dict[str, Tensor] | None = None, **config: Any
) -> dict[str, Tensor]:
    """An adapter directory as PEFT's ``save_pretrained`` writes it; returns its tensors."""
    tensors = factors() if tensors is None else tensors
    fields = {"peft_type": "LORA", "r": 2, "lora_alpha": 16, "target_modules": ["query"]}
    write_folder(folder, tensors, fields | config)
    return tensors


def product(tensors: dict[str, Tensor], module: str) -> Tensor:
    b = tensors[f"{PREFIX}{module}.lora_B.weight"].float()
    a = tensors[f"{PREFIX}{module}.lora_A.weight"].float()
    return b @ a


def test_delta_is_b_a_alpha_over_r(tmp_path: Path) -> None:
    tensors = write_adapter(tmp_path)
    adapter = LoraAdapter(tmp_path)
    assert adapter.modules() == sorted(SHAPES)
    for module, shape in SHAPES.items():
        delta = adapter.delta(module)
        assert delta.dtype == torch.float32
        assert tuple(delta.shape) == shape
        assert torch.equal(delta, product(tensors, module) * (16 / 2))


def test_half_precision_factors_give_float32_deltas(tmp_path: Path) -> None:
    tensors = write_adapter(tmp_path, {n: t.half() for n, t in factors().items()})
    delta = LoraAdapter(tmp_path).delta(QUERY)
    assert delta.dtype == torch.float32
    assert torch.equal(delta, product(tensors, QUERY) * 8)


def test_iter_deltas_yields_weight_names_one_at_a_time(tmp_path: Path) -> None:
    tensors = write_adapter(tmp_path)
    stream = LoraAdapter(tmp_path).iter_deltas()
    name, delta = next(stream)
    assert name == f"{QUERY}.weight"  # modules come in the file's (sorted) order
    assert torch.equal(delta, product(tensors, QUERY) * 8)
    assert [n for n, _ in stream] == [f"{VALUE}.weight", f"{DENSE}.weight"]


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path: Path) -> None:
    tensors = write_adapter(tmp_path, use_rslora=True)
    adapter = LoraAdapter(tmp_path)
    assert adapter.scale(QUERY) == 16 / math.sqrt(2)
    assert torch.equal(adapter.delta(QUERY), product(tensors, QUERY) * (16 / math.sqrt(2)))


def test_fan_in_fan_out_transposes(tmp_path: Path) -> None:
    tensors = write_adapter(tmp_path, fan_in_fan_out=True)
    delta = LoraAdapter(tmp_path).delta(QUERY)
    assert tuple(delta.shape) == (6, 4)
    assert delta.is_contiguous()
    assert torch.equal(delta, product(tensors, QUERY).T * 8)


def test_rank_and_alpha_patterns_override_per_module(tmp_path: Path) -> None:
    tensors = write_adapter(
        tmp_path,
        factors(ranks={VALUE: 4, DENSE: 3}),
        rank_pattern={"value": 4, r"output\.d.*": 3},
        alpha_pattern={"layer.0.attention.self.query": 32, "alue": 99},
    )
    adapter = LoraAdapter(tmp_path)
    assert [adapter.rank(m) for m in (QUERY, VALUE, DENSE)] == [2, 4, 3]
    # "alue" is no dotted suffix of ".value": PEFT matches whole name components.
    assert [adapter.scale(m) for m in (QUERY, VALUE, DENSE)] == [32 / 2, 16 / 4, 16 / 3]
    assert torch.equal(adapter.delta(VALUE), product(tensors, VALUE) * 4)


def test_first_matching_pattern_wins(tmp_path: Path) -> None:
    write_adapter(tmp_path, alpha_pattern={"query": 4, r".*\.query": 8})
    assert LoraAdapter(tmp_path).scale(QUERY) == 4 / 2


def test_rank_pattern_must_agree_with_the_factors(tmp_path: Path) -> None:
    write_adapter(tmp_path, rank_pattern={"query": 3})
    with pytest.raises(
        ValueError, match=r"'encoder.layer.0.attention.self.query': factors have rank 2"
    ):
        LoraAdapter(tmp_path)


def test_embedding_lora_is_transposed_like_the_embedding(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 10, generator=g), torch.randn(3, 2, generator=g)
    names = (f"{PREFIX}embeddings.word_embeddings.lora_embedding_{f}" for f in "AB")
    write_adapter(tmp_path, dict(zip(names, (a, b), strict=True)))
    delta = LoraAdapter(tmp_path).delta("embeddings.word_embeddings")
    assert tuple(delta.shape) == (10, 3)
    assert torch.equal(delta, (b @ a).T * 8)


def test_lora_bias_and_other_tensors(tmp_path: Path) -> None:
    bias = torch.randn(4)
    head = torch.randn(2, 6)
    tensors = factors() | {f"{PREFIX}{QUERY}.lora_B.bias": bias, f"{PREFIX}classifier.weight": head}
    write_adapter(tmp_path, tensors, lora_bias=True)
    adapter = LoraAdapter(tmp_path)
    deltas = dict(adapter.iter_deltas())
    assert list(deltas) == [
        f"{QUERY}.weight",
        f"{QUERY}.bias",
        f"{VALUE}.weight",
        f"{DENSE}.weight",
    ]
    assert torch.equal(deltas[f"{QUERY}.bias"], bias * 8)
    assert adapter.other_tensors() == [f"{PREFIX}classifier.weight"]
    assert torch.equal(adapter.checkpoint.get(f"{PREFIX}classifier.weight"), head)


def test_resolve_names_exact_then_unique_suffix() -> None:
    adapter = ["model.layers.0.q.weight", "layers.1.q.weight", "lm.head.weight"]
    base = ["model.layers.0.q.weight", "model.layers.1.q.weight", "head.weight", "norm.weight"]
    assert resolve_names(adapter, base) == {
        "model.layers.0.q.weight": "model.layers.0.q.weight",  # exact
        "layers.1.q.weight": "model.layers.1.q.weight",  # the base adds a prefix
        "lm.head.weight": "head.weight",  # the base lacks one
    }


def test_resolve_names_prefers_exact_over_suffix() -> None:
    assert resolve_names(["q.weight"], ["q.weight", "model.q.weight"]) == {"q.weight": "q.weight"}


def test_resolve_names_reports_unmatched_ambiguous_and_claimed_twice() -> None:
    base = ["a.q.weight", "b.q.weight", "model.k.weight"]
    with pytest.raises(ValueError, match="3 adapter names") as caught:
        resolve_names(["q.weight", "v.weight", "k.weight", "x.model.k.weight"], base)
    message = str(caught.value)
    assert "q.weight -> ['a.q.weight', 'b.q.weight']" in message
    assert "v.weight -> no base tensor" in message
    assert "['k.weight', 'x.model.k.weight'] -> model.k.weight (claimed twice)" in message


CONFIG_ERRORS = [
    pytest.param({"peft_type": "IA3"}, r"field 'peft_type' is 'IA3'; only 'LORA'", id="ia3"),
    pytest.param({"peft_type": None}, r"field 'peft_type' is None", id="no-peft-type"),
    pytest.param({"use_dora": True}, r"DoRA \(use_dora: true\) is not supported", id="dora"),
    pytest.param({"r": None}, r"field 'r' must be an integer >= 1, got None", id="no-r"),
    pytest.param({"r": 0}, r"field 'r' must be an integer >= 1, got 0", id="r-zero"),
    pytest.param({"r": True}, r"field 'r' must be an integer >= 1, got True", id="r-bool"),
    pytest.param({"lora_alpha": "16"}, r"field 'lora_alpha' must be a finite number", id="alpha"),
    pytest.param({"use_rslora": "yes"}, r"field 'use_rslora' must be true or false", id="rslora"),
    pytest.param({"rank_pattern": ["q"]}, r"field 'rank_pattern' must be an object", id="table"),
    pytest.param({"rank_pattern": {"q": 1.5}}, r"field \"rank_pattern\['q'\]\"", id="rank-value"),
    pytest.param(
        {"alpha_pattern": {"(": 2}}, r"field 'alpha_pattern': '\(' is not a regex", id="re"
    ),
]


@pytest.mark.parametrize(("config", "message"), CONFIG_ERRORS)
def test_config_errors_name_file_and_field(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    write_adapter(tmp_path, **config)
    with pytest.raises(ValueError, match=message) as caught:
        LoraAdapter(tmp_path)
    assert "adapter_config.json" in str(caught.value)


def test_unreadable_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read .*adapter_config\.json"):
        LoraAdapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{r: 8")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        LoraAdapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[8]")
    with pytest.raises(ValueError, match="must hold a JSON object, not list"):
        LoraAdapter(tmp_path)


def test_pickled_or_absent_weights(tmp_path: Path) -> None:
    write_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has no adapter_model\.safetensors"):
        LoraAdapter(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"adapter_model\.bin: pickled adapters are not supported"):
        LoraAdapter(tmp_path)


def test_a_factor_without_its_pair(tmp_path: Path) -> None:
    tensors = factors()
    del tensors[f"{PREFIX}{VALUE}.lora_B.weight"]
    write_adapter(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"module '.*self\.value' has no lora_B\.weight"):
        LoraAdapter(tmp_path)


def test_factors_that_do_not_chain(tmp_path: Path) -> None:
    tensors = factors() | {f"{PREFIX}{QUERY}.lora_B.weight": torch.zeros(4, 3)}
    write_adapter(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"lora_A \(2, 6\) and lora_B \(4, 3\) do not chain"):
        LoraAdapter(tmp_path)


def test_conv_factors_are_refused(tmp_path: Path) -> None:
    tensors = {
        f"{PREFIX}conv.lora_A.weight": torch.zeros(2, 3, 3, 3),
        f"{PREFIX}conv.lora_B.weight": torch.zeros(4, 2, 1, 1),
    }
    write_adapter(tmp_path, tensors)
    with pytest.raises(ValueError, match="only Linear and Embedding LoRA are supported"):
        LoraAdapter(tmp_path)


def test_no_lora_factors_and_unknown_module(tmp_path: Path) -> None:
    write_adapter(tmp_path, {f"{PREFIX}classifier.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="holds no LoRA factors"):
        LoraAdapter(tmp_path)
    write_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"no LoRA factors for module 'decoder\.q'"):
        LoraAdapter(tmp_path).delta("decoder.q")
