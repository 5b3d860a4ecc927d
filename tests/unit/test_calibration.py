"""Gram matrices from forward hooks: equal to XᵀX by hand, padding excluded, files round trip."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from clients.calibration import GramSet, collect_grams, grams_from_texts


class TwoLinears(nn.Module):
    """Token layers ``first`` (4 -> 5) and ``second`` (5 -> 3) on (batch, seq, 4) inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 5)
        self.second = nn.Linear(5, 3)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        del attention_mask  # the layers are per token; the mask only tells real from padding
        out: Tensor = self.second(torch.relu(self.first(inputs_embeds)))
        return out


def padded_batches() -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    masks = [torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])]
    return [
        {"inputs_embeds": torch.randn(*mask.shape, 4, generator=g), "attention_mask": mask}
        for mask in masks
    ]


def gram(x: Tensor) -> Tensor:
    x64 = x.double()
    return x64.T @ x64


def expected_grams(model: TwoLinears, batches: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    first = torch.zeros(4, 4, dtype=torch.float64)
    second = torch.zeros(5, 5, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            x = batch["inputs_embeds"][batch["attention_mask"].bool()]
            first += gram(x)
            second += gram(torch.relu(model.first(x)))
    return {"first.weight": first.float(), "second.weight": second.float()}


def assert_grams_equal(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == torch.float32
        torch.testing.assert_close(actual[name], tensor, rtol=1e-6, atol=1e-6)


def test_grams_equal_xtx_over_real_tokens() -> None:
    model, batches = TwoLinears(), padded_batches()
    result = collect_grams(model, batches)
    assert_grams_equal(result.grams, expected_grams(model, batches))
    assert result.tokens == 3 + 6


def test_tensor_batches_count_every_position() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2))
    batches = [torch.randn(2, 5, 3), torch.randn(7, 3)]
    result = collect_grams(model, batches)
    rows = torch.cat([b.reshape(-1, 3) for b in batches])
    torch.testing.assert_close(result.grams["0.weight"], gram(rows).float())
    with torch.no_grad():
        hidden = torch.tanh(model[0](rows))
    torch.testing.assert_close(result.grams["2.weight"], gram(hidden).float())
    assert result.tokens == 10 + 7


def test_forward_include_and_token_mask_are_honoured() -> None:
    model, batches = TwoLinears(), padded_batches()
    pairs = [(b["inputs_embeds"], b["attention_mask"]) for b in batches]
    result = collect_grams(
        model,
        pairs,
        forward=lambda m, pair: m(pair[0], pair[1]),
        include=lambda name, _linear: name == "second",
        token_mask=lambda pair: pair[1].bool(),
    )
    assert_grams_equal(
        result.grams, {"second.weight": expected_grams(model, batches)["second.weight"]}
    )
    assert result.tokens == 9


class PooledHead(nn.Module):
    """A token layer, a masked mean over the sequence, then a head on (batch, 5) inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.token = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def pooled(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        weights = attention_mask.unsqueeze(-1).float()
        tokens: Tensor = self.token(inputs_embeds)
        return (tokens * weights).sum(1) / weights.sum(1)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        out: Tensor = self.head(self.pooled(inputs_embeds, attention_mask))
        return out


def test_a_pooled_head_counts_one_row_per_sequence() -> None:
    model, batches = PooledHead(), padded_batches()
    result = collect_grams(model, batches)
    with torch.no_grad():
        pooled = torch.cat([model.pooled(**b) for b in batches])
    torch.testing.assert_close(result.grams["head.weight"], gram(pooled).float())
    assert result.tokens == 9  # the token layer's count; the head saw 4 rows


def test_eval_mode_during_collection_then_flag_and_hooks_restored() -> None:
    model = TwoLinears().train()
    modes: list[bool] = []

    def forward(m: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        modes.append(m.training)
        assert not torch.is_grad_enabled()
        out: Tensor = m(**batch)
        return out

    collect_grams(model, padded_batches(), forward=forward)
    assert modes == [False, False]
    assert model.training
    assert not model.first._forward_pre_hooks
    assert not model.second._forward_pre_hooks


def test_hooks_removed_and_flag_restored_on_error() -> None:
    model = TwoLinears().train()

    def failing(m: nn.Module, batch: Mapping[str, Tensor]) -> object:
        m(**batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_grams(model, padded_batches(), forward=failing)
    assert model.training
    assert not model.first._forward_pre_hooks
    assert not model.second._forward_pre_hooks


def test_no_linear_layers() -> None:
    with pytest.raises(ValueError, match=r"no nn\.Linear layers matched in Sequential"):
        collect_grams(nn.Sequential(nn.ReLU()), [torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="include filter rejected them all"):
        collect_grams(TwoLinears(), padded_batches(), include=lambda _name, _linear: False)


def test_no_tokens_seen() -> None:
    with pytest.raises(ValueError, match="no tokens seen"):
        collect_grams(TwoLinears(), [])
    batch = padded_batches()[0]
    masked = {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}
    with pytest.raises(ValueError, match="no tokens seen"):
        collect_grams(TwoLinears(), [masked])


def test_non_finite_activations_name_the_first_layer() -> None:
    batch = padded_batches()[0]
    poisoned = batch["inputs_embeds"].clone()
    poisoned[0, 2, 1] = float("nan")  # a padding position: masked out, harmless
    collect_grams(TwoLinears(), [{**batch, "inputs_embeds": poisoned}])
    poisoned[1, 0, 3] = float("inf")  # a real token
    with pytest.raises(ValueError, match=r"layer 'first\.weight' \(and 1 later layers\)"):
        collect_grams(TwoLinears(), [{**batch, "inputs_embeds": poisoned}])


def test_save_load_round_trip(tmp_path: Path) -> None:
    result = collect_grams(TwoLinears(), padded_batches())
    path = tmp_path / "grams.safetensors"
    result.save(path)
    loaded = GramSet.load(path)
    assert loaded.tokens == result.tokens
    assert loaded.grams.keys() == result.grams.keys()
    for name, tensor in result.grams.items():
        assert torch.equal(loaded.grams[name], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["grams.safetensors"]


def test_load_rejects_other_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2)}, plain)
    with pytest.raises(ValueError, match="is not a Gram file"):
        GramSet.load(plain)
    save_file(
        {"w": torch.zeros(2, 3)}, plain, metadata={"format": "deltavault.grams", "tokens": "4"}
    )
    with pytest.raises(ValueError, match=r"Gram 'w' is not square: \(2, 3\)"):
        GramSet.load(plain)
    with pytest.raises(ValueError, match="cannot read Gram file"):
        GramSet.load(tmp_path / "absent.safetensors")


class FakeTokenizer:
    """Ids are character codes mod 50, padded with 0 and truncated like a Hugging Face one."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def __call__(self, texts: list[str], **options: object) -> dict[str, Tensor]:
        self.calls.append({"texts": texts, **options})
        max_length = options["max_length"]
        assert isinstance(max_length, int)
        ids = [[ord(c) % 50 + 1 for c in text][:max_length] for text in texts]
        width = max(len(row) for row in ids)
        return {
            "input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
            "attention_mask": torch.tensor(
                [[1] * len(row) + [0] * (width - len(row)) for row in ids]
            ),
        }


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Embedding(51, 6)
        self.proj = nn.Linear(6, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        del attention_mask
        out: Tensor = self.proj(self.embed(input_ids))
        return out


def test_grams_from_texts_tokenizes_in_batches_and_masks_padding() -> None:
    model, tokenizer = Embedder(), FakeTokenizer()
    texts = ["a headline", "short", "a rather longer headline, truncated"]
    result = grams_from_texts(model, tokenizer, texts, batch_size=2, max_length=12)
    assert [call["texts"] for call in tokenizer.calls] == [texts[:2], texts[2:]]
    assert all(
        call.keys() >= {"padding", "truncation", "max_length", "return_tensors"}
        and call["return_tensors"] == "pt"
        for call in tokenizer.calls
    )
    ids = [ord(c) % 50 + 1 for text in texts for c in text[:12]]
    with torch.no_grad():
        rows = model.embed(torch.tensor(ids))
    torch.testing.assert_close(result.grams["proj.weight"], gram(rows).float())
    assert result.tokens == len(ids)


def test_grams_from_texts_rejects_a_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        grams_from_texts(Embedder(), FakeTokenizer(), ["x"], batch_size=0)


def test_a_hugging_face_encoder_keys_and_masking() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=51,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
    )
    torch.manual_seed(5)
    model = transformers.BertModel(config).eval()  # no dropout in the check by hand
    texts = ["one text", "another, longer text"]
    result = grams_from_texts(model, FakeTokenizer(), texts)
    linear_weights = {
        f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    assert result.grams.keys() == linear_weights
    assert set(result.grams) <= set(model.state_dict())
    batch = FakeTokenizer()(texts, max_length=512)
    with torch.no_grad():
        hidden = model.embeddings(input_ids=batch["input_ids"])[batch["attention_mask"].bool()]
    query = result.grams["encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(query, gram(hidden).float(), rtol=1e-5, atol=1e-5)
    assert result.tokens == sum(len(t) for t in texts)
