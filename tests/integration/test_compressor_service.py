"""The compressor over real gRPC on loopback, writing to a real store on each backend:
the SDK's compress → reconstruct round trip, dedup, Plan, Reconstruct, model-wide allocation,
fan-out over two compressors, and every kind of bad input, which must fail with the right
status, name the tensor, and commit nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from torch import Tensor, nn

from clients._generated.deltavault.compressor.v1 import compressor_pb2, compressor_pb2_grpc
from clients.compressor_client import CompressorClient
from clients.encoding import tensor_frames
from clients.errors import (
    ConflictError,
    InvalidArgumentError,
    PreconditionError,
    UnavailableError,
)
from clients.safetensors_io import Checkpoint
from clients.sdk import DeltaVault, TensorReport
from compressor_svc.server import CompressorServer
from tests.integration.conftest import EMBEDDING, LINEAR, RunningStore, start_compressor
from tests.support.checkpoints import write_adapter

BASE = compressor_pb2.TENSOR_ROLE_BASE
FINETUNED = compressor_pb2.TENSOR_ROLE_FINETUNED


def test_compress_then_reconstruct_rebuilds_the_finetune(
    vault: DeltaVault, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    base_dir, tuned_dir = pair
    events: list[TensorReport] = []
    report = vault.compress(
        base_dir, tuned_dir, ref="team/toy", method="adamix", ratio=8, progress=events.append
    )
    kinds = {t.name: t.kind for t in report.tensors}
    assert kinds[LINEAR] == "compressed"
    assert kinds["model.embed_tokens.weight"] == "lossless"
    assert kinds["model.layers.0.input_layernorm.weight"] == "zero"
    assert kinds["model.position_ids"] == "zero"
    assert [e.name for e in events] == [t.name for t in report.tensors]
    assert report.lossy_ratio >= 8
    assert report.new_chunk_bytes == report.bytes_stored > 0

    out = vault.reconstruct("team/toy", base_dir, tmp_path / "rebuilt")
    rebuilt, tuned = Checkpoint(out), Checkpoint(tuned_dir)
    assert sorted(rebuilt.shards()) == sorted(Checkpoint(base_dir).shards())
    assert (out / "config.json").is_file()
    assert (out / "model.safetensors.index.json").is_file()
    for name in tuned.names():
        got, want = rebuilt.get(name), tuned.get(name)
        assert got.dtype == want.dtype, name
        if kinds[name] == "compressed":
            delta = want.float() - Checkpoint(base_dir).get(name).float()
            error = (got.float() - want.float()).norm() / delta.norm()
            assert error < 0.7, name
        else:
            assert torch.equal(got, want), name  # lossless and zero deltas are exact


def test_recompressing_the_same_pair_writes_no_new_chunk_bytes(
    vault: DeltaVault, pair: tuple[Path, Path]
) -> None:
    first = vault.compress(*pair, ref="team/a", method="deltadq", ratio=8)
    again = vault.compress(*pair, ref="team/b", method="deltadq", ratio=8)
    assert first.new_chunk_bytes > 0
    assert again.new_chunk_bytes == 0
    assert again.bytes_stored == first.bytes_stored


def test_existing_ref_is_refused_before_any_work_unless_forced(
    vault: DeltaVault, pair: tuple[Path, Path]
) -> None:
    vault.compress(*pair, ref="team/a", method="bitdelta", ratio=14.5)
    with pytest.raises(ConflictError):
        vault.compress(*pair, ref="team/a", method="dare", ratio=8)
    moved = vault.compress(*pair, ref="team/a", method="dare", ratio=8, force=True)
    assert vault.list("team/") == [("team/a", moved.manifest)]


def toy_model() -> nn.Module:
    """A module whose state dict has the toy checkpoint's names."""
    root, model, layer, mlp = nn.Module(), nn.Module(), nn.Module(), nn.Module()
    model.embed_tokens = nn.Embedding(50, 32)
    mlp.up_proj = nn.Linear(32, 96, bias=False)
    mlp.down_proj = nn.Linear(96, 32)
    layer.mlp = mlp
    layer.input_layernorm = nn.LayerNorm(32, bias=False)
    model.layers = nn.ModuleList([layer])
    model.register_buffer("position_ids", torch.zeros(16, dtype=torch.int64))
    root.model = model
    return root.half()


def test_apply_adds_the_deltas_to_a_live_module(vault: DeltaVault, pair: tuple[Path, Path]) -> None:
    base_dir, tuned_dir = pair
    vault.compress(base_dir, tuned_dir, ref="team/toy", method="lossless", ratio=None)
    module = toy_model()
    module.load_state_dict(dict(Checkpoint(base_dir).iter_tensors()))
    vault.apply(module, "team/toy")
    state = module.state_dict()
    for name, want in Checkpoint(tuned_dir).iter_tensors():
        assert torch.equal(state[name], want), name


def test_model_wide_allocation_meets_the_model_budget(
    vault: DeltaVault, pair: tuple[Path, Path]
) -> None:
    report = vault.compress(*pair, ref="team/m", method="adamix", ratio=8, allocation="model")
    lossy = [t for t in report.tensors if t.kind == "compressed"]
    assert len(lossy) == 2
    assert report.lossy_ratio >= 8


def test_fan_out_over_two_compressors_commits_one_manifest(
    store: RunningStore, compressor: CompressorServer, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    second = start_compressor(store.target)
    try:
        endpoints = [f"127.0.0.1:{compressor.port}", f"127.0.0.1:{second.port}"]
        with DeltaVault(store.target, endpoints) as vault:
            report = vault.compress(*pair, ref="team/wide", method="deltadq", ratio=8)
            manifest = vault.manifest("team/wide")
            assert [t.name for t in manifest.tensors] == Checkpoint(pair[1]).names()
            assert report.tensor_count == len(manifest.tensors)
            out = vault.reconstruct("team/wide", pair[0], tmp_path / "out")
        assert torch.equal(Checkpoint(out).get(EMBEDDING), Checkpoint(pair[1]).get(EMBEDDING))
    finally:
        second.stop(grace=0)


def test_plan_reports_every_method_and_ratio_without_storing(
    vault: DeltaVault, pair: tuple[Path, Path], store: RunningStore
) -> None:
    rows = list(vault.plan(*pair, methods=["adamix", "dare"], ratios=[4, 8]))
    assert sorted(r.name for r in rows) == sorted([LINEAR, "model.layers.0.mlp.down_proj.weight"])
    for row in rows:
        assert [(e.method, e.target_ratio) for e in row.estimates] == [
            ("adamix", 4),
            ("adamix", 8),
            ("dare", 4),
            ("dare", 8),
        ]
        for e in row.estimates:
            assert e.unavailable or (e.ratio is not None and e.ratio >= e.target_ratio)
    assert store.client.verify().chunks_checked == 0


def test_reconstruct_rpc_streams_deltas_and_rebuilt_weights(
    vault: DeltaVault, compressor: CompressorServer, pair: tuple[Path, Path]
) -> None:
    vault.compress(*pair, ref="team/toy", method="lossless", ratio=None)
    base, tuned = Checkpoint(pair[0]), Checkpoint(pair[1])
    with CompressorClient(f"127.0.0.1:{compressor.port}", frame_bytes=8 * 1024) as client:
        deltas = dict(client.reconstruct(compressor_pb2.ReconstructHeader(ref="team/toy")))
        assert set(deltas) == {LINEAR, "model.layers.0.mlp.down_proj.weight", EMBEDDING}
        header = compressor_pb2.ReconstructHeader(ref="team/toy", add_base=True)
        rebuilt = dict(client.reconstruct(header, base.iter_tensors()))
    for name in tuned.names():
        assert torch.equal(rebuilt[name], tuned.get(name)), name


# --- bad input: the right status, the tensor named, nothing committed -------------------


def _stream(
    client: CompressorClient, tensors: list[tuple[str, int, Tensor]], **header: object
) -> list[compressor_pb2.CompressResponse]:
    settings: dict[str, object] = {"method": "adamix", "ratio": 8.0, "ref": "bad/input"}
    settings.update(header)
    return list(client.compress(compressor_pb2.CompressHeader(**settings), tensors))  # type: ignore[arg-type]


@pytest.fixture
def client(compressor: CompressorServer) -> Iterator[CompressorClient]:
    with CompressorClient(f"127.0.0.1:{compressor.port}", frame_bytes=4096) as c:
        yield c


W = torch.randn(64, 32).half()


@pytest.mark.parametrize(
    ("tensors", "header", "message"),
    [
        ([(LINEAR, BASE, W), (LINEAR, FINETUNED, torch.randn(32, 64).half())], {}, "shape"),
        ([(LINEAR, BASE, W), (LINEAR, FINETUNED, W.float())], {}, "dtype"),
        (
            [(LINEAR, BASE, W), (LINEAR, FINETUNED, torch.full((64, 32), float("nan")).half())],
            {},
            "NaN/Inf",
        ),
        ([(LINEAR, BASE, W)], {}, "fine-tuned missing"),
        ([(LINEAR, FINETUNED, W)], {}, "base missing"),
        ([(LINEAR, BASE, W), (LINEAR, FINETUNED, W)], {"method": "zip"}, "unknown method"),
        ([(LINEAR, BASE, W), (LINEAR, FINETUNED, W)], {"ratio": 0.5}, "ratio"),
        ([(LINEAR, BASE, W), (LINEAR, FINETUNED, W)], {"ref": "no-slash"}, "namespace/name"),
        (
            [(LINEAR, BASE, W), (LINEAR, FINETUNED, W)],
            {"method_options": {"widths": "[9]"}},
            "widths",
        ),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_problem(
    client: CompressorClient,
    store: RunningStore,
    tensors: list[tuple[str, int, Tensor]],
    header: dict[str, object],
    message: str,
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        _stream(client, tensors, **header)
    assert message in str(caught.value)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    if not header:  # a tensor's problem names the tensor
        assert LINEAR in str(caught.value)
    assert list(store.client.list_refs()) == []


def test_truncated_stream_commits_nothing(
    compressor: CompressorServer, store: RunningStore
) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{compressor.port}")
    header = compressor_pb2.CompressHeader(method="lossless", ref="bad/truncated")
    frame = next(tensor_frames(LINEAR, BASE, W, 1024))

    def requests() -> Iterator[compressor_pb2.CompressRequest]:
        yield compressor_pb2.CompressRequest(header=header)
        yield compressor_pb2.CompressRequest(frame=frame)  # half a tensor, then no End

    stub = compressor_pb2_grpc.CompressorStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Compress(requests(), timeout=30))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "without End" in str(caught.value.details())
    assert list(store.client.list_refs()) == []
    channel.close()


def test_reconstruct_without_the_base_tensors_is_failed_precondition(
    vault: DeltaVault, client: CompressorClient, pair: tuple[Path, Path]
) -> None:
    vault.compress(*pair, ref="team/toy", method="lossless", ratio=None)
    header = compressor_pb2.ReconstructHeader(ref="team/toy", add_base=True)
    with pytest.raises(PreconditionError) as caught:
        list(client.reconstruct(header, []))
    assert LINEAR in str(caught.value)


def test_unreachable_store_is_unavailable() -> None:
    server = start_compressor("127.0.0.1:1", store_timeout_seconds=2.0)
    try:
        with (
            CompressorClient(f"127.0.0.1:{server.port}") as client,
            pytest.raises(UnavailableError),
        ):
            _stream(client, [(LINEAR, BASE, W), (LINEAR, FINETUNED, W)])
    finally:
        server.stop(grace=0)


def test_a_lora_adapter_compresses_as_deltas_of_its_modules(
    vault: DeltaVault, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    base_dir = pair[0]
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 32, generator=generator), torch.randn(96, 4, generator=generator)
    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    adapter = write_adapter(
        tmp_path / "adapter",
        {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"]},
    )

    report = vault.compress(base_dir, adapter, ref="team/lora", method="lossless", ratio=None)
    assert [t.name for t in report.tensors] == [LINEAR]
    out = vault.reconstruct("team/lora", base_dir, tmp_path / "merged")
    base = Checkpoint(base_dir)
    want = (base.get(LINEAR).float() + b @ a * 2.0).half()
    merged = Checkpoint(out)
    got = merged.get(LINEAR)
    assert got.dtype == torch.float16
    assert (got.float() - want.float()).abs().max() <= 2 * 2**-10 * want.float().abs().max()
    assert torch.equal(merged.get(EMBEDDING), base.get(EMBEDDING))  # not adapted: the base's


def test_a_lora_adapter_brings_its_biases_and_modules_to_save(
    vault: DeltaVault, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    base_dir = pair[0]
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 96, generator=generator), torch.randn(32, 2, generator=generator)
    bias = torch.randn(32, generator=generator)
    norm = torch.rand(32, generator=generator).half() + 0.5  # trained, saved whole
    module = "base_model.model.model.layers.0.mlp.down_proj"
    adapter = write_adapter(
        tmp_path / "adapter",
        {
            f"{module}.lora_A.weight": a,
            f"{module}.lora_B.weight": b,
            f"{module}.lora_B.bias": bias,
            "base_model.model.model.layers.0.input_layernorm.weight": norm,
        },
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "lora_bias": True},
    )

    report = vault.compress(base_dir, adapter, ref="team/lora-b", method="lossless", ratio=None)
    down = "model.layers.0.mlp.down_proj"
    norm_name = "model.layers.0.input_layernorm.weight"
    assert sorted(t.name for t in report.tensors) == sorted(
        [f"{down}.weight", f"{down}.bias", norm_name]
    )
    merged = Checkpoint(vault.reconstruct("team/lora-b", base_dir, tmp_path / "merged"))
    base = Checkpoint(base_dir)
    assert torch.equal(merged.get(norm_name), norm)  # the trained copy, bit for bit
    want_bias = (base.get(f"{down}.bias").float() + bias).half()
    assert torch.allclose(merged.get(f"{down}.bias").float(), want_bias.float(), atol=2e-3)
    want = (base.get(f"{down}.weight").float() + b @ a).half()
    assert torch.allclose(merged.get(f"{down}.weight").float(), want.float(), atol=4e-3)
