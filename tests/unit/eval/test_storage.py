"""The store section's pure pieces (dedup accounting, chunk counting, slopes) and the family
of fine-tunes it stores: children whose frozen tensors are bit-identical to the parent's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from clients._generated.deltavault.common.v1 import common_pb2
from clients.sdk import CompressReport, TensorReport
from store_svc.digest import Digest
from tests.eval.storage import (
    Cumulative,
    StoredModel,
    cumulative,
    distinct_chunk_bytes,
    slope,
    stored_model,
    tensor_chunks,
)
from tests.models import finetune_pair, task, variants


def model(name: str, own: int, new: int, fp16: int) -> StoredModel:
    return StoredModel(name, own, new, fp16, fp16, 3, 1, 16.0, 1.0)


def test_cumulative_sums_new_bytes_with_dedup_and_own_bytes_without() -> None:
    family = [model("parent", 100, 100, 1000), model("a", 100, 10, 1000), model("b", 90, 5, 1000)]
    assert cumulative(family) == [
        Cumulative(1, 100, 100, 1000, 1000),
        Cumulative(2, 110, 200, 2000, 2000),
        Cumulative(3, 115, 290, 3000, 3000),
    ]


def tensor_report(name: str, kind: str, numel: int, new: int) -> TensorReport:
    return TensorReport(name, kind, "bitdelta", numel, numel, 16.0, 16.0, 0.0, None, 0.1, new)


def test_stored_model_counts_fp16_deltas_of_non_zero_tensors_only() -> None:
    tensors = [
        tensor_report("w", "compressed", 10, 4),
        tensor_report("b", "lossless", 3, 0),
        tensor_report("z", "zero", 5, 0),
    ]
    report = CompressReport("blake3:00", "r", 8.0, 16.0, 20, 4, 3, 1.5, tensors)
    stored = stored_model("m", report)
    assert (stored.fp16_bytes, stored.fp16_delta_bytes) == (36, 26)
    assert (stored.bytes_stored, stored.new_chunk_bytes) == (20, 4)
    assert (stored.tensors, stored.tensors_new) == (3, 1)


def chunk(data: bytes) -> common_pb2.ChunkRef:
    return common_pb2.ChunkRef(digest=Digest.of(data).to_proto(), size=len(data))


def manifest(tensors: dict[str, list[bytes]], files: list[bytes]) -> common_pb2.Manifest:
    """One part per tensor, holding a chunk per item; one side file per item of ``files``."""
    return common_pb2.Manifest(
        tensors=[
            common_pb2.TensorEntry(
                name=name, parts=[common_pb2.EncodedPart(chunks=[chunk(c) for c in chunks])]
            )
            for name, chunks in tensors.items()
        ],
        files=[common_pb2.FileEntry(name=f"f{i}", chunks=[chunk(f)]) for i, f in enumerate(files)],
    )


def test_distinct_chunk_bytes_counts_a_shared_chunk_once_and_files_apart() -> None:
    parent = manifest({"w": [b"aaaa", b"bb"], "v": [b"cc"]}, [b"tok"])
    child = manifest({"w": [b"aaaa", b"dddddd"], "v": [b"cc"]}, [b"tok"])
    assert distinct_chunk_bytes([parent, child], files=False) == (4, 4 + 2 + 2 + 6)
    assert distinct_chunk_bytes([parent, child], files=True) == (1, 3)


def test_tensor_chunks_lists_each_tensors_digests_in_order() -> None:
    chunks = tensor_chunks(manifest({"w": [b"x", b"y"]}, []))
    assert chunks == {"w": (Digest.of(b"x"), Digest.of(b"y"))}


def test_slope_of_a_line_and_of_too_little_data() -> None:
    assert slope([1, 2, 4], [3, 5, 9]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="two or more"):
        slope([1], [1])
    with pytest.raises(ValueError, match="different x"):
        slope([2, 2], [1, 3])


# --- variants -------------------------------------------------------------------------------


@pytest.fixture
def tiny_pair(tmp_path: Path) -> Path:
    """A pair folder whose fine-tune is a two-layer encoder of width 16 with the shipped
    tokenizer (random weights: only what the children keep and change matters here)."""
    pair = tmp_path / "pair"
    tokenizer = task.load_tokenizer(task.shipped_model_dir())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=task.MAX_TOKENS + 2,
    )
    torch.manual_seed(0)
    classifier = task.Classifier(
        BertModel(config, add_pooling_layer=False), nn.Linear(16, len(task.LABELS))
    )
    finetune_pair.save_model(classifier, tokenizer, pair / variants.PARENT)
    provenance = {"provenance": {"pair": "tiny"}}
    (pair / finetune_pair.PAIR_FILE).write_text(json.dumps(provenance))
    return pair


def test_children_train_only_the_last_layer_and_the_head(tiny_pair: Path) -> None:
    children = variants.ensure_variants(tiny_pair, 2, 2)
    assert children == [tiny_pair / "variants" / "2-1", tiny_pair / "variants" / "2-2"]
    prefixes = variants.trained_prefixes(tiny_pair / variants.PARENT)
    assert prefixes == ("encoder.layer.1.", "classifier.")
    parent = task.load_state(tiny_pair / variants.PARENT)
    states = [task.load_state(child) for child in children]
    for state in states:
        assert state.keys() == parent.keys()
        for name, tensor in state.items():
            same = tensor.dtype == parent[name].dtype and torch.equal(tensor, parent[name])
            assert same != name.startswith(prefixes), name
    assert not torch.equal(states[0]["classifier.weight"], states[1]["classifier.weight"])


def test_children_are_reused_while_the_pair_is_unchanged(tiny_pair: Path) -> None:
    (first,) = variants.ensure_variants(tiny_pair, 1, 1)
    built = (first / task.WEIGHTS_FILE).stat().st_mtime_ns
    assert variants.ensure_variants(tiny_pair, 1, 1) == [first]
    assert (first / task.WEIGHTS_FILE).stat().st_mtime_ns == built
    pair_file = tiny_pair / finetune_pair.PAIR_FILE
    pair_file.write_text(json.dumps({"provenance": {"pair": "retrained"}}))
    variants.ensure_variants(tiny_pair, 1, 1)
    assert (first / task.WEIGHTS_FILE).stat().st_mtime_ns != built
    assert not first.with_name(f"{first.name}.partial").exists()


def test_a_family_needs_a_child_and_a_step(tiny_pair: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        variants.ensure_variants(tiny_pair, 0, 1)
