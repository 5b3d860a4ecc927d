"""Sealed and signed deltas end to end, over real gRPC on each backend: the bucket holds
only ciphertext, tampering fails authentication, an unknown signer is refused by readers
and by a store that trusts keys, a delta never lands on the wrong base, and a KEK
rotation keeps every delta readable without uploading a chunk."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import pytest
import torch

from clients._generated.deltavault.common.v1 import common_pb2
from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients._generated.deltavault.store.v1 import store_pb2
from clients.cli import EXIT_OK, EXIT_PRECONDITION, EXIT_REFUSED, main
from clients.compressor_client import CompressorClient
from clients.errors import (
    DataLossError,
    PermissionDeniedError,
    PreconditionError,
)
from clients.key_files import write_key_file
from clients.safetensors_io import Checkpoint
from clients.sdk import DeltaVault
from clients.sealing import SealingKeys, new_keyring, save_keyring
from compressor_svc.server import CompressorServer
from store_svc.backends.base import Backend
from store_svc.cas import chunk_key
from store_svc.digest import Digest
from store_svc.manifests import chunk_refs
from store_svc.signatures import Signer, TrustedKeys, generate_key_pair, signature_key
from tests.integration.conftest import (
    RunningStore,
    finetune_of,
    model_tensors,
    start_compressor,
    start_store,
    status_of,
    stop_store,
)
from tests.support.checkpoints import write_checkpoint

TUNED_CONFIG = {"model_type": "toy", "secret_label": "project-nightingale"}
WINDOW = 32


@dataclass(frozen=True)
class Keys:
    folder: Path
    kek: Path
    keyring: Path
    producer: Signer
    trusted: Path
    """Folder holding only the producer's public key."""

    def sealing(self, *keks: Path) -> SealingKeys:
        return SealingKeys.from_files(list(keks) or [self.kek], self.keyring)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    folder = tmp_path / "keys"
    folder.mkdir()
    kek = folder / "kek"
    record, _ = new_keyring(write_key_file(kek))
    save_keyring(folder / "keyring.json", record, replace=False)
    private, public, _ = generate_key_pair(folder / "producer", "producer")
    trusted = folder / "trusted"
    trusted.mkdir()
    (trusted / public.name).write_bytes(public.read_bytes())
    return Keys(folder, kek, folder / "keyring.json", Signer.from_file(private), trusted)


@pytest.fixture
def signing_compressor(store: RunningStore, keys: Keys) -> Iterator[CompressorServer]:
    """A compressor that signs every manifest it commits with the producer's key."""
    server = start_compressor(store.target, signing_key=keys.folder / "producer/producer.key")
    yield server
    server.stop(grace=0)


def client(store: RunningStore, compressor: CompressorServer, **trust: object) -> DeltaVault:
    return DeltaVault(store.target, f"127.0.0.1:{compressor.port}", frame_bytes=16 * 1024, **trust)  # type: ignore[arg-type]


@pytest.fixture
def sealed_pair(pair: tuple[Path, Path]) -> tuple[Path, Path]:
    base_dir, tuned_dir = pair
    (tuned_dir / "config.json").write_text(json.dumps(TUNED_CONFIG))
    return base_dir, tuned_dir


@pytest.fixture
def sealed_vault(
    store: RunningStore, compressor: CompressorServer, sealed_pair: tuple[Path, Path], keys: Keys
) -> Iterator[DeltaVault]:
    """A sealing client that has compressed the pair to ``team/sealed`` (adamix at 8x)."""
    base_dir, tuned_dir = sealed_pair
    with client(store, compressor, sealing=keys.sealing()) as vault:
        vault.compress(base_dir, tuned_dir, ref="team/sealed", method="adamix", ratio=8)
        yield vault


def stored_objects(backend: Backend) -> dict[str, bytes]:
    return {info.key: backend.get(info.key) for info in backend.list("")}


def windows(data: bytes, count: int = 24) -> list[bytes]:
    """Up to ``count`` telling windows of ``data``: ``WINDOW`` bytes with at least 8
    distinct values (a run of zeros says nothing about who can read what)."""
    if len(data) < WINDOW:
        return []
    rng = random.Random(len(data))
    starts = [rng.randrange(len(data) - WINDOW + 1) for _ in range(count)]
    return [w for w in (data[i : i + WINDOW] for i in starts) if len(set(w)) >= 8]


def plaintexts(vault: DeltaVault, ref: str) -> list[bytes]:
    """The plaintext of every tensor chunk of ``ref``'s manifest, as the key holder reads
    it. (Side files are sealed too, but a shard index lists tensor names, which the
    manifest itself carries in the clear.)"""
    opened = vault.open(ref)
    parts = [part for tensor in opened.manifest.tensors for part in tensor.parts]
    return [opened.store.read([chunk]) for part in parts for chunk in part.chunks]


def leaked(objects: dict[str, bytes], secrets: list[bytes]) -> list[str]:
    """Keys of the stored objects containing a window of some secret."""
    return [
        key
        for key, data in objects.items()
        if any(w in data for secret in secrets for w in windows(secret))
    ]


# --- encryption at rest, client side -------------------------------------------------------


def test_the_store_holds_only_ciphertext_of_a_sealed_delta_and_base(
    store: RunningStore,
    signing_compressor: CompressorServer,
    sealed_pair: tuple[Path, Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    base_dir, tuned_dir = sealed_pair
    with client(store, signing_compressor, sealing=keys.sealing()) as vault:
        vault.compress(base_dir, tuned_dir, ref="team/sealed", method="lossless", ratio=None)
        vault.register_base(base_dir, ref="bases/sealed")
        secrets = plaintexts(vault, "team/sealed") + plaintexts(vault, "bases/sealed")
        manifest = vault.manifest("team/sealed")
        rebuilt = vault.reconstruct("team/sealed", None, tmp_path / "out", base_ref="bases/sealed")
    assert manifest.sealing.data_key_id and manifest.sealing.wrapped_keys[0].wrapped != b""
    tuned = Checkpoint(tuned_dir)
    secrets += [t.numpy().tobytes() for t in map(tuned.get, tuned.names()) if t.numel() > 16]
    secrets.append(json.dumps(TUNED_CONFIG).encode())
    assert sum(len(windows(secret)) for secret in secrets) > 100
    assert leaked(stored_objects(store.backend), secrets) == []
    assert json.loads((rebuilt / "config.json").read_text()) == TUNED_CONFIG
    for name in tuned.names():
        assert torch.equal(Checkpoint(rebuilt).get(name), tuned.get(name)), name


def test_the_same_check_finds_plaintext_in_an_unsealed_store(
    store: RunningStore, vault: DeltaVault, sealed_pair: tuple[Path, Path]
) -> None:
    """The leak check above can fail: without sealing, the bytes are right there."""
    base_dir, tuned_dir = sealed_pair
    vault.compress(base_dir, tuned_dir, ref="team/plain", method="lossless", ratio=None)
    assert leaked(stored_objects(store.backend), [json.dumps(TUNED_CONFIG).encode()]) != []


def test_a_sealed_delta_needs_a_kek_that_opens_it(
    store: RunningStore,
    compressor: CompressorServer,
    sealed_vault: DeltaVault,
    sealed_pair: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    other = tmp_path / "other-kek"
    write_key_file(other)
    for trust in ({}, {"sealing": SealingKeys.from_files([other])}):
        with (
            client(store, compressor, **trust) as reader,
            pytest.raises(PreconditionError, match=r"sealed|wrapped for"),
        ):
            reader.reconstruct("team/sealed", sealed_pair[0], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_sealed_chunks_still_deduplicate_under_one_keyring(
    store: RunningStore,
    compressor: CompressorServer,
    sealed_pair: tuple[Path, Path],
    keys: Keys,
) -> None:
    base_dir, tuned_dir = sealed_pair
    with client(store, compressor, sealing=keys.sealing()) as vault:
        first = vault.compress(base_dir, tuned_dir, ref="team/a", method="adamix", ratio=8)
        again = vault.compress(base_dir, tuned_dir, ref="team/b", method="adamix", ratio=8)
    assert first.new_chunk_bytes > 0 and again.new_chunk_bytes == 0


def test_a_flipped_bit_in_a_sealed_chunk_fails_authentication(
    store: RunningStore, sealed_vault: DeltaVault, sealed_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Whoever holds the bucket flips a bit of a sealed chunk and re-addresses it (a new
    digest, a manifest naming it): the digests then agree, and authentication fails."""
    manifest = sealed_vault.manifest("team/sealed")
    chunk = next(t for t in manifest.tensors if t.parts).parts[0].chunks[0]
    sealed = bytearray(store.client.read([chunk]))
    sealed[len(sealed) // 2] ^= 0x10
    forged = Digest.of(bytes(sealed))
    store.client.put_chunks([(forged, bytes(sealed))])
    chunk.digest.CopyFrom(forged.to_proto())
    store.client.commit_manifest(manifest, ref="team/forged")
    with pytest.raises(DataLossError, match="does not authenticate"):
        sealed_vault.reconstruct("team/forged", sealed_pair[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_store_refuses_a_stored_chunk_altered_in_place(
    store: RunningStore, sealed_vault: DeltaVault, sealed_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Altered without re-addressing, a chunk fails its digest before it leaves the store."""
    chunk = next(chunk_refs(sealed_vault.manifest("team/sealed")))
    key = chunk_key(Digest.from_proto(chunk.digest))
    stored = bytearray(store.backend.get(key))
    stored[-1] ^= 0x01
    store.backend.delete(key)
    store.backend.put_if_absent(key, bytes(stored))
    with pytest.raises(DataLossError):
        sealed_vault.reconstruct("team/sealed", sealed_pair[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- provenance ------------------------------------------------------------------------


def resigned_by_stranger(manifest: common_pb2.Manifest, tmp_path: Path) -> Signer:
    """A stranger's key, and ``manifest`` altered as a stranger would (a label)."""
    private, _, _ = generate_key_pair(tmp_path / "stranger", "stranger")
    manifest.labels["approved"] = "yes"
    return Signer.from_file(private)


def test_a_manifest_resigned_by_an_unknown_key_is_refused_by_readers(
    store: RunningStore,
    signing_compressor: CompressorServer,
    sealed_pair: tuple[Path, Path],
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base_dir, tuned_dir = sealed_pair
    trusted = TrustedKeys.load(keys.trusted)
    with client(store, signing_compressor, trusted_keys=trusted) as vault:
        vault.compress(base_dir, tuned_dir, ref="team/signed", method="adamix", ratio=8)
        assert vault.check("team/signed")["signed_by"] == keys.producer.key_id
        manifest = vault.manifest("team/signed")
        stranger = resigned_by_stranger(manifest, keys.folder)
        store.client.commit_manifest(manifest, ref="team/signed", force=True, signer=stranger)
        with pytest.raises(PermissionDeniedError, match="not among"):
            vault.reconstruct("team/signed", base_dir, keys.folder / "out")
    assert not (keys.folder / "out").exists()
    argv = ["verify", "team/signed", "--store", store.target, "--trusted-keys", str(keys.trusted)]
    assert main(argv) == EXIT_REFUSED
    assert stranger.key_id in capsys.readouterr().err


def test_a_bad_signature_served_by_the_store_fails_with_a_clear_message(
    store: RunningStore,
    signing_compressor: CompressorServer,
    sealed_pair: tuple[Path, Path],
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The store checks signatures on commit; a reader does not rely on that: a signature
    swapped in the bucket (the producer's, of another manifest) is caught by the reader."""
    base_dir, tuned_dir = sealed_pair
    with client(store, signing_compressor) as vault:
        report = vault.compress(base_dir, tuned_dir, ref="team/m", method="adamix", ratio=8)
    digest = Digest.parse(report.manifest)
    key = signature_key(digest, keys.producer.key_id)
    store.backend.delete(key)
    swapped = keys.producer.sign(Digest.of(b"another manifest"))
    store.backend.put_if_absent(key, swapped.SerializeToString())
    argv = ["reconstruct", "team/m", "--base", str(base_dir), "--out", str(keys.folder / "out")]
    argv += ["--store", store.target, "--trusted-keys", str(keys.trusted)]
    assert main(argv) == EXIT_REFUSED
    assert f"the signature by {keys.producer.key_id} does not verify" in capsys.readouterr().err
    assert not (keys.folder / "out").exists()


def test_an_unsigned_manifest_is_refused_by_a_reader_that_trusts_keys(
    store: RunningStore,
    compressor: CompressorServer,
    sealed_pair: tuple[Path, Path],
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base_dir, tuned_dir = sealed_pair
    with client(store, compressor) as vault:
        vault.compress(base_dir, tuned_dir, ref="team/unsigned", method="adamix", ratio=8)
    argv = ["verify", "team/unsigned", "--store", store.target, "--trusted-keys", str(keys.trusted)]
    assert main(argv) == EXIT_REFUSED
    assert "not signed" in capsys.readouterr().err
    with client(store, compressor, signer=keys.producer) as vault:
        vault.sign("team/unsigned")
    assert main([*argv, "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["client"]["signed_by"] == keys.producer.key_id
    assert report["client"]["chunks"] == report["chunks_checked"]


def test_a_client_with_a_signing_key_countersigns_what_it_compresses(
    store: RunningStore,
    compressor: CompressorServer,
    sealed_pair: tuple[Path, Path],
    keys: Keys,
) -> None:
    base_dir, tuned_dir = sealed_pair
    with client(store, compressor, signer=keys.producer) as vault:
        vault.compress(base_dir, tuned_dir, ref="team/m", method="adamix", ratio=8)
    with client(store, compressor, trusted_keys=TrustedKeys.load(keys.trusted)) as reader:
        assert reader.check("team/m")["signed_by"] == keys.producer.key_id


@pytest.fixture
def strict_store(backend: Backend, keys: Keys, tmp_path: Path) -> Iterator[RunningStore]:
    """A store started with --trusted-keys (the producer's) and --require-signatures."""
    running = start_store(
        backend, tmp_path / "strict", trusted_keys=keys.trusted, require_signatures=True
    )
    yield running
    stop_store(running)


def test_a_store_that_trusts_keys_refuses_unsigned_and_unknown_signers(
    strict_store: RunningStore, sealed_pair: tuple[Path, Path], keys: Keys
) -> None:
    store, base_dir, tuned_dir = strict_store, *sealed_pair
    plain = start_compressor(store.target)
    signing = start_compressor(store.target, signing_key=keys.folder / "producer/producer.key")
    try:
        with client(store, plain) as unsigned:
            refused = partial(
                unsigned.compress, base_dir, tuned_dir, ref="team/x", method="adamix", ratio=8
            )
            assert status_of(refused) is grpc.StatusCode.FAILED_PRECONDITION
        with client(store, signing) as vault:
            vault.compress(base_dir, tuned_dir, ref="team/x", method="adamix", ratio=8)
            manifest = vault.manifest("team/x")
    finally:
        plain.stop(grace=0)
        signing.stop(grace=0)
    stranger = resigned_by_stranger(manifest, keys.folder)
    with pytest.raises(PermissionDeniedError, match="not among"):
        store.client.commit_manifest(manifest, signer=stranger)
    # The producer's signature of another manifest, sent with this one.
    borrowed = keys.producer.sign(Digest.of(b"another manifest"))
    request = store_pb2.CommitManifestRequest(manifest=manifest, signatures=[borrowed])
    commit = partial(store.client._stub.CommitManifest, request, timeout=10)
    assert status_of(partial(store.client._call, commit)) is grpc.StatusCode.INVALID_ARGUMENT


# --- the right base --------------------------------------------------------------------


def test_a_delta_is_never_applied_to_the_wrong_base(
    store: RunningStore,
    compressor: CompressorServer,
    sealed_pair: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Another base of the very same layout (names, shapes, dtypes) is still refused."""
    base_dir, tuned_dir = sealed_pair
    impostor = write_checkpoint(tmp_path / "impostor", model_tensors(7), shards=2)
    with client(store, compressor) as vault:
        report = vault.compress(base_dir, tuned_dir, ref="team/toy", method="adamix", ratio=8)
        recorded = vault.manifest("team/toy").base_fingerprint
        with pytest.raises(PreconditionError) as refused:
            vault.reconstruct("team/toy", impostor, tmp_path / "out")
        vault.register_base(impostor, ref="bases/impostor")
        with pytest.raises(PreconditionError, match=recorded):
            vault.reconstruct("team/toy", None, tmp_path / "out", base_ref="bases/impostor")
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert recorded.startswith("weights:") and recorded in str(refused.value)
    assert "weights:" in str(refused.value).replace(recorded, "", 1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    argv = ["reconstruct", "team/toy", "--base", str(impostor), "--out", str(tmp_path / "cli")]
    assert main([*argv, "--store", store.target]) == EXIT_PRECONDITION
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    assert report.manifest


# --- key rotation ----------------------------------------------------------------------


def test_key_rotation_keeps_every_delta_readable_without_uploading(
    store: RunningStore,
    compressor: CompressorServer,
    sealed_pair: tuple[Path, Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    base_dir, tuned_dir = sealed_pair
    second = write_checkpoint(tmp_path / "tuned-2", finetune_of(model_tensors(0), seed=9), 2)
    refs = {"team/one": tuned_dir, "team/two": second}
    with client(store, compressor, sealing=keys.sealing()) as vault:
        for ref, tuned in refs.items():
            vault.compress(base_dir, tuned, ref=ref, method="adamix", ratio=8)
        vault.register_base(base_dir, ref="bases/toy")
        before = {
            ref: vault.reconstruct(ref, base_dir, tmp_path / f"before-{i}")
            for i, ref in enumerate(refs)
        }
    chunks_before = sorted(info.key for info in store.backend.list("chunks/"))
    new_kek = tmp_path / "new-kek"
    write_key_file(new_kek)
    argv = ["keys", "rotate", "--new-kek", str(new_kek), "--kek", str(keys.kek)]
    argv += ["--keyring", str(keys.keyring), "--store", store.target, "--json"]
    assert main(argv) == EXIT_OK
    assert sorted(info.key for info in store.backend.list("chunks/")) == chunks_before
    with client(
        store, compressor, sealing=SealingKeys.from_files([new_kek], keys.keyring)
    ) as vault:
        for i, ref in enumerate(refs):
            out = vault.reconstruct(ref, None, tmp_path / f"after-{i}", base_ref="bases/toy")
            old, new = Checkpoint(before[ref]), Checkpoint(out)
            for name in old.names():
                assert torch.equal(old.get(name), new.get(name)), (ref, name)
        vault.compress(base_dir, tuned_dir, ref="team/three", method="adamix", ratio=8)
    with client(store, compressor, sealing=SealingKeys.from_files([keys.kek])) as old_only:
        for ref in [*refs, "team/three", "bases/toy"]:
            with pytest.raises(PreconditionError, match="wrapped for"):
                old_only.reconstruct(ref, base_dir, tmp_path / "refused")


def test_the_reconstruct_rpc_opens_a_sealed_delta_with_its_data_key(
    compressor: CompressorServer,
    sealed_vault: DeltaVault,
    sealed_pair: tuple[Path, Path],
    keys: Keys,
    tmp_path: Path,
) -> None:
    sealed_vault.register_base(sealed_pair[0], ref="bases/sealed")
    expected = dict(sealed_vault.deltas("team/sealed"))
    out = sealed_vault.reconstruct("team/sealed", None, tmp_path / "out", base_ref="bases/sealed")
    _, data_key = keys.sealing().for_writing()
    with CompressorClient(f"127.0.0.1:{compressor.port}") as rpc:
        header = compressor_pb2.ReconstructHeader(ref="team/sealed", data_key=data_key)
        deltas = dict(rpc.reconstruct(header))
        header.base_ref = "bases/sealed"
        rebuilt = dict(rpc.reconstruct(header))
        for wrong in (b"", bytes(32)):
            refused = compressor_pb2.ReconstructHeader(ref="team/sealed", data_key=wrong)
            assert status_of(partial(rpc.reconstruct, refused)) is (
                grpc.StatusCode.FAILED_PRECONDITION
            )
    assert deltas.keys() == expected.keys()
    for name, delta in expected.items():
        assert torch.equal(deltas[name], delta), name
    by_sdk = Checkpoint(out)
    assert sorted(rebuilt) == sorted(by_sdk.names())
    for name, tensor in rebuilt.items():
        assert torch.equal(tensor, by_sdk.get(name)), name
