"""``DeltaVault``: the Python SDK. Compress a fine-tune against its base into the store,
pull it back as an HF-loadable checkpoint or into a live torch module, plan, list, delete,
collect garbage and verify.

Checkpoints are read one tensor at a time (``clients.safetensors_io``) and written one
tensor at a time, so neither side of a model ever sits in memory whole. A fine-tune may be
a full checkpoint or a PEFT LoRA adapter (its ΔW = B·A·scale are sent as deltas).

Scaling out: given several compressor endpoints (a list, or ``all:HOST:PORT`` for every
address a DNS name has — a Kubernetes headless service), the SDK splits the model's
tensors across them by size, each compresses its share without a ref, and the SDK commits
one manifest that names every tensor. Compressors keep no state between calls.

Trust: with ``sealing`` keys every chunk written is sealed client-side and sealed manifests
are opened with the KEKs given (``clients.sealing``); with ``trusted_keys`` every manifest
read must carry a valid signature by one of them (``store_svc.signatures``); ``signer``
signs what this client commits. A rebuild checks the base's content fingerprint against
the one the delta records, and every chunk of the delta, before it writes a weight.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import torch
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from torch import Tensor, nn

from clients._generated.deltavault.common.v1 import common_pb2
from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.bases import (
    StoredBase,
    check_same_base,
    fingerprint,
    fingerprint_as,
    is_base,
    upload_snapshot,
)
from clients.calibration import GramSet
from clients.channel import Closing
from clients.compressor_client import DEFAULT_FRAME_BYTES, CompressorClient
from clients.encoding import WIRE_DTYPES, RoleTensor, decode_entry, rebuild_tensor
from clients.errors import (
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    ResourceExhaustedError,
)
from clients.lora import PEFT_PREFIX, LoraAdapter, resolve_names
from clients.safetensors_io import (
    Checkpoint,
    CheckpointError,
    StreamingWriter,
    TensorInfo,
    TensorSpec,
    torch_dtype,
)
from clients.sealing import ChunkSealer, SealingError, SealingKeys, kek_id, rewrap
from clients.side_files import upload_files, write_files
from clients.store_client import SignedManifest, StoreClient
from store_svc.digest import Digest
from store_svc.manifests import FORMAT_VERSION as MANIFEST_FORMAT_VERSION
from store_svc.manifests import chunk_refs
from store_svc.signatures import (
    SignatureError,
    Signer,
    TrustedKeys,
    require_trusted_signature,
    trusted_signers,
)

DEFAULT_STORE = "127.0.0.1:50061"
DEFAULT_COMPRESSOR = "127.0.0.1:50062"
ENV_STORE = "DELTAVAULT_STORE"
ENV_COMPRESSOR = "DELTAVAULT_COMPRESSOR"
SDK_PRODUCER = "deltavault-sdk 0.1.0"
_ADMISSION_ATTEMPTS = 10
_MAX_ADMISSION_PAUSE = 30.0

BASE = compressor_pb2.TENSOR_ROLE_BASE
FINETUNED = compressor_pb2.TENSOR_ROLE_FINETUNED
DELTA = compressor_pb2.TENSOR_ROLE_DELTA
CALIBRATION = compressor_pb2.TENSOR_ROLE_CALIBRATION

Calibration = GramSet | Mapping[str, Tensor] | Path | str | None
Progress = Callable[["TensorReport"], None]


def resolve_endpoints(spec: str | Sequence[str]) -> list[str]:
    """Compressor addresses from a list, a comma-separated string, or ``all:HOST:PORT``
    entries that expand to every IPv4/IPv6 address HOST resolves to."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (i.strip() for i in items if i.strip()):
        if not item.startswith("all:"):
            out.append(item)
            continue
        host, _, port = item.removeprefix("all:").rpartition(":")
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        addresses = sorted({str(info[4][0]) for info in infos})
        if not addresses:
            raise ValueError(f"{host} resolves to no address")
        out += [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]
    if not out:
        raise ValueError("no compressor endpoint given")
    return out


# --- reports -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorReport:
    name: str
    kind: str
    """compressed, lossless or zero."""
    method: str
    numel: int
    nbits: int
    ratio: float
    paper_ratio: float
    weight_error: float
    activation_error: float | None
    seconds: float
    new_chunk_bytes: int

    @classmethod
    def from_event(cls, event: compressor_pb2.TensorEvent) -> TensorReport:
        kind = common_pb2.StorageKind.Name(event.kind).removeprefix("STORAGE_KIND_").lower()
        error = event.error
        return cls(
            event.name,
            kind,
            event.method,
            event.numel,
            event.nbits,
            event.ratio,
            event.paper_ratio,
            error.relative_weight_error,
            error.relative_activation_error if error.has_activation_error else None,
            event.seconds,
            event.new_chunk_bytes,
        )


@dataclass(frozen=True)
class CompressReport:
    manifest: str
    """Digest of the committed manifest, ``algorithm:hex``."""
    ref: str
    ratio: float
    """Whole delta: every tensor's numel · 16 over every stored bit."""
    lossy_ratio: float
    """Over the lossy-compressed tensors only: how the papers count."""
    bytes_stored: int
    new_chunk_bytes: int
    tensor_count: int
    seconds: float
    tensors: list[TensorReport] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = _finite(asdict(self))
        return data


@dataclass(frozen=True)
class BaseReport:
    """What :meth:`DeltaVault.register_base` stored."""

    manifest: str
    ref: str
    tensor_count: int
    bytes_stored: int
    new_chunk_bytes: int
    """Of ``bytes_stored``, those the store did not have (0 when registered before)."""
    fingerprint: str
    """The identity deltas made against this base record."""
    seconds: float


@dataclass(frozen=True)
class Rotated:
    """One ref moved to its manifest re-wrapped for a new KEK."""

    ref: str
    previous: str
    manifest: str


@dataclass(frozen=True)
class PlanEstimate:
    method: str
    target_ratio: float
    ratio: float | None
    nbits: int | None
    weight_error: float | None
    activation_error: float | None
    unavailable: str = ""


@dataclass(frozen=True)
class PlanRow:
    name: str
    shape: tuple[int, ...]
    estimates: list[PlanEstimate]


def _finite(value: Any) -> Any:
    """JSON has no infinity: infinite ratios (nothing stored) become null."""
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# --- inputs ------------------------------------------------------------------------------


def _grams(calibration: Calibration) -> Mapping[str, Tensor]:
    if calibration is None:
        return {}
    if isinstance(calibration, str | Path):
        return GramSet.load(calibration).grams
    if isinstance(calibration, GramSet):
        return calibration.grams
    return calibration


def is_lora_adapter(path: Path | str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


@dataclass(frozen=True)
class ModelPair:
    """What to compress: a base checkpoint and a fine-tune (checkpoint or LoRA adapter)."""

    base: Checkpoint
    finetuned: Checkpoint | LoraAdapter
    grams: Mapping[str, Tensor]

    @classmethod
    def open(cls, base: Path | str, finetuned: Path | str, calibration: Calibration) -> ModelPair:
        tuned: Checkpoint | LoraAdapter = (
            LoraAdapter(finetuned) if is_lora_adapter(finetuned) else Checkpoint(finetuned)
        )
        return cls(Checkpoint(base), tuned, _grams(calibration))

    def sizes(self) -> dict[str, int]:
        """Tensor name → bytes the compressor receives for it, in stream order."""
        if isinstance(self.finetuned, LoraAdapter):
            return {
                name: self.base.info(name).nbytes * (2 if source.kind == "copy" else 1)
                for name, source in self._lora_sources().items()
            }
        return {
            name: self.finetuned.info(name).nbytes * (2 if name in self.base else 1)
            for name in self.finetuned.names()
        }

    def tensors(self, names: Iterable[str]) -> Iterator[RoleTensor]:
        """The stream for ``names``: each tensor's Gram first, then base and fine-tune (or
        its delta); one tensor read at a time."""
        lora = self._lora_sources() if isinstance(self.finetuned, LoraAdapter) else None
        for name in names:
            if name in self.grams:
                yield name, CALIBRATION, self.grams[name]
            if lora is not None:
                yield from self._lora_tensors(name, lora[name])
                continue
            assert isinstance(self.finetuned, Checkpoint)
            if name in self.base:
                yield name, BASE, self.base.get(name)
            yield name, FINETUNED, self.finetuned.get(name)

    def _lora_tensors(self, name: str, source: _LoraSource) -> Iterator[RoleTensor]:
        """A LoRA-adapted tensor's delta at the base's dtype (the merged weight is stored at
        it, and ΔW's own rounding there is far below the weight's), or for a
        ``modules_to_save`` copy the base tensor and the trained one."""
        adapter = self.finetuned
        assert isinstance(adapter, LoraAdapter)
        dtype = torch_dtype(self.base.info(name).dtype)
        if source.kind == "copy":
            yield name, BASE, self.base.get(name)
            yield name, FINETUNED, adapter.checkpoint.get(source.key).to(dtype)
        elif source.kind == "bias":
            bias = adapter.bias_delta(source.key)
            assert bias is not None
            yield name, DELTA, bias.to(dtype)
        else:
            yield name, DELTA, adapter.delta(source.key).to(dtype)

    def _lora_sources(self) -> dict[str, _LoraSource]:
        """Base tensor name → where the adapter changes it: a module's ΔW, its LoRA bias Δb,
        or a ``modules_to_save`` copy of the whole trained tensor."""
        adapter = self.finetuned
        assert isinstance(adapter, LoraAdapter)
        wanted: dict[str, _LoraSource] = {}
        for module in adapter.modules():
            wanted[f"{module}.weight"] = _LoraSource(module, "weight")
            if adapter.has_bias(module):
                wanted[f"{module}.bias"] = _LoraSource(module, "bias")
        for stored in adapter.other_tensors():
            wanted[stored.removeprefix(PEFT_PREFIX)] = _LoraSource(stored, "copy")
        mapping = resolve_names(list(wanted), self.base.names())
        return {mapping[name]: source for name, source in wanted.items()}


@dataclass(frozen=True)
class _LoraSource:
    key: str
    """The module (for ΔW and Δb) or the stored tensor name (for a copy)."""
    kind: Literal["weight", "bias", "copy"]
    """A module's ΔW, its LoRA bias Δb, or a ``modules_to_save`` tensor: the trained value
    itself, not a delta."""


def split_by_size(sizes: Mapping[str, int], parts: int) -> list[list[str]]:
    """Tensor names in ``parts`` shares of near-equal bytes (largest first to the lightest
    share), each share keeping stream order."""
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        i = loads.index(min(loads))
        shares[i].append(name)
        loads[i] += sizes[name]
    order = {name: i for i, name in enumerate(sizes)}
    return [sorted(share, key=order.__getitem__) for share in shares if share]


# --- the facade --------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenedManifest:
    """A manifest read for use: checked against its digest (and signature, when the
    client trusts keys), with the store view that opens its chunks."""

    ref: str
    signed: SignedManifest
    store: StoreClient
    signer: str | None
    """Key id of the trusted signer that was checked; None when no keys are trusted."""

    @property
    def manifest(self) -> common_pb2.Manifest:
        return self.signed.manifest


class DeltaVault(Closing):
    """The store and one or more compressors, by address (defaults: env DELTAVAULT_STORE
    and DELTAVAULT_COMPRESSOR, then the ports ``deltavault serve`` uses)."""

    def __init__(
        self,
        store: str | None = None,
        compressor: str | Sequence[str] | None = None,
        *,
        frame_bytes: int = DEFAULT_FRAME_BYTES,
        sealing: SealingKeys | None = None,
        signer: Signer | None = None,
        trusted_keys: TrustedKeys | None = None,
    ) -> None:
        self.store_address = store or os.environ.get(ENV_STORE, DEFAULT_STORE)
        self._compressor_spec = compressor or os.environ.get(ENV_COMPRESSOR, DEFAULT_COMPRESSOR)
        self._frame_bytes = frame_bytes
        self.store = StoreClient(self.store_address)
        self.sealing, self.signer, self.trusted_keys = sealing, signer, trusted_keys

    def close(self) -> None:
        self.store.close()

    def compressors(self) -> list[str]:
        return resolve_endpoints(self._compressor_spec)

    # --- compress ------------------------------------------------------------------------

    def compress(
        self,
        base: Path | str,
        finetuned: Path | str,
        *,
        ref: str,
        method: str = "adamix",
        ratio: float | None = 16.0,
        calibration: Calibration = None,
        allocation: str = "per-matrix",
        lossy: Sequence[str] = (),
        options: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        base_fingerprint: str = "",
        force: bool = False,
        progress: Progress | None = None,
    ) -> CompressReport:
        """Compress ``finetuned`` against ``base`` and point ``ref`` at the result (with the
        fine-tune's side files: config, tokenizer; a LoRA adapter's are not the model's).

        ``ratio`` is the target against the fp16 delta (None for ``lossless``);
        ``allocation`` is ``per-matrix`` (the papers) or ``model`` (one budget, adamix);
        ``lossy`` are regexes of the tensors to compress lossy (default: linear weights);
        ``force`` moves an existing ref (else it must not exist yet).
        """
        pair = ModelPair.open(base, finetuned, calibration)
        side_files = [] if isinstance(pair.finetuned, LoraAdapter) else pair.finetuned.side_files()
        sealing, data_key, writer = self._writer()
        header = compressor_pb2.CompressHeader(
            sealing=sealing,
            data_key=data_key,
            files=upload_files(writer, side_files),
            method=method,
            ratio=ratio or 0.0,
            allocation=_scope(allocation),
            ref=ref,
            force_ref=force,
            base_fingerprint=base_fingerprint or fingerprint(pair.base),
            lossy_patterns=list(lossy),
            method_options={k: json.dumps(v) for k, v in (options or {}).items()},
            labels=dict(labels or {}),
        )
        endpoints = self.compressors()
        sizes = pair.sizes()
        if len(endpoints) == 1:
            report = self._compress_on(endpoints[0], header, pair, list(sizes), progress)
            if self.signer is not None:
                self._countersign(Digest.parse(report.manifest), self.signer)
            return report
        if header.allocation == compressor_pb2.ALLOCATION_SCOPE_MODEL:
            raise ValueError("model-wide allocation needs every matrix on one compressor")
        return self._fan_out(endpoints, header, pair, sizes, progress)

    def _writer(self) -> tuple[common_pb2.ChunkSealing | None, bytes, StoreClient]:
        """What new data is written with: the keyring's record, its data key and the store
        view sealing under it; (None, b"", the plain store) when this client does not seal."""
        if self.sealing is None:
            return None, b"", self.store
        record, data_key = self.sealing.for_writing()
        return record, data_key, self.store.sealed(ChunkSealer(data_key))

    def _compress_on(
        self,
        endpoint: str,
        header: compressor_pb2.CompressHeader,
        pair: ModelPair,
        names: list[str],
        progress: Progress | None,
    ) -> CompressReport:
        """Compress on one compressor. A stream it sheds (admission control's
        RESOURCE_EXHAUSTED with a retry delay) is sent again after a growing pause: a
        compress commits only at its end, so rerunning it is safe (``progress`` may then
        see a tensor twice)."""
        for attempt in range(_ADMISSION_ATTEMPTS):
            try:
                return self._compress_once(endpoint, header, pair, names, progress)
            except ResourceExhaustedError as exc:
                if exc.retry_after is None or attempt == _ADMISSION_ATTEMPTS - 1:
                    raise
                pause = exc.retry_after * 2**attempt
            time.sleep(min(pause, _MAX_ADMISSION_PAUSE) * random.uniform(1, 1.5))
        raise AssertionError("unreachable")

    def _compress_once(
        self,
        endpoint: str,
        header: compressor_pb2.CompressHeader,
        pair: ModelPair,
        names: list[str],
        progress: Progress | None,
    ) -> CompressReport:
        tensors: list[TensorReport] = []
        with CompressorClient(endpoint, frame_bytes=self._frame_bytes) as client:
            for response in client.compress(header, pair.tensors(names)):
                if response.HasField("tensor"):
                    report = TensorReport.from_event(response.tensor)
                    tensors.append(report)
                    if progress is not None:
                        progress(report)
                else:
                    result = response.result
        return CompressReport(
            str(Digest.from_proto(result.manifest)),
            result.ref,
            result.ratio,
            result.lossy_ratio,
            result.bytes_stored,
            result.new_chunk_bytes,
            result.tensor_count,
            result.seconds,
            tensors,
        )

    def _fan_out(
        self,
        endpoints: list[str],
        header: compressor_pb2.CompressHeader,
        pair: ModelPair,
        sizes: Mapping[str, int],
        progress: Progress | None,
    ) -> CompressReport:
        started = time.perf_counter()
        partial = compressor_pb2.CompressHeader()
        partial.CopyFrom(header)
        partial.ref, partial.force_ref = "", False
        shares = split_by_size(sizes, len(endpoints))
        with futures.ThreadPoolExecutor(len(shares)) as pool:
            jobs = [
                pool.submit(self._compress_on, endpoint, partial, pair, share, progress)
                for endpoint, share in zip(endpoints, shares, strict=False)
            ]
            reports = [job.result() for job in jobs]
        merged = self._merge([Digest.parse(r.manifest) for r in reports], list(sizes))
        info = self.store.commit_manifest(
            merged, ref=header.ref, force=header.force_ref, signer=self.signer
        )
        tensors = [t for r in reports for t in r.tensors]
        numel, nbits = sum(t.numel for t in tensors), sum(t.nbits for t in tensors)
        lossy = [t for t in tensors if t.kind == "compressed"]
        lossy_bits = sum(t.nbits for t in lossy)
        return CompressReport(
            str(info.digest),
            header.ref,
            numel * 16 / nbits if nbits else float("inf"),
            sum(t.numel for t in lossy) * 16 / lossy_bits if lossy_bits else float("inf"),
            sum(r.bytes_stored for r in reports),
            sum(r.new_chunk_bytes for r in reports),
            len(merged.tensors),
            time.perf_counter() - started,
            tensors,
        )

    def _merge(self, digests: list[Digest], order: list[str]) -> common_pb2.Manifest:
        """One manifest naming every tensor of the partial ones, in stream order."""
        parts = [self.store.get_manifest(d) for d in digests]
        merged = common_pb2.Manifest()
        merged.CopyFrom(parts[0])
        del merged.tensors[:]
        entries = {t.name: t for part in parts for t in part.tensors}
        merged.tensors.extend(entries[name] for name in order)
        return merged

    # --- plan ----------------------------------------------------------------------------

    def plan(
        self,
        base: Path | str,
        finetuned: Path | str,
        *,
        methods: Sequence[str] = ("adamix", "deltadq"),
        ratios: Sequence[float] = (8.0, 16.0, 32.0),
        calibration: Calibration = None,
        lossy: Sequence[str] = (),
        options: Mapping[str, Any] | None = None,
    ) -> Iterator[PlanRow]:
        """Per lossy tensor, what each method would give at each ratio (nothing stored).
        ``options`` keys are ``METHOD.OPTION``."""
        pair = ModelPair.open(base, finetuned, calibration)
        header = compressor_pb2.PlanHeader(
            methods=list(methods),
            ratios=list(ratios),
            lossy_patterns=list(lossy),
            method_options={k: json.dumps(v) for k, v in (options or {}).items()},
        )
        with CompressorClient(self.compressors()[0], frame_bytes=self._frame_bytes) as client:
            for response in client.plan(header, pair.tensors(list(pair.sizes()))):
                yield PlanRow(
                    response.name,
                    tuple(response.shape),
                    [_estimate(e) for e in response.estimates],
                )

    # --- read back -----------------------------------------------------------------------

    def open(self, ref: str) -> OpenedManifest:
        """The manifest ``ref`` points at (a delta's or a registered base's), checked: its
        bytes against its digest, its signature against the trusted keys (if any), and the
        KEKs against its sealing (``PreconditionError`` if it is sealed and none opens it)."""
        signed, signer = self._signed(ref)
        return OpenedManifest(ref, signed, self._opening(ref, signed.manifest), signer)

    def _signed(self, ref: str) -> tuple[SignedManifest, str | None]:
        """The manifest ``ref`` names, checked against its digest and, when this client
        trusts keys, its signature; with the trusted signer's key id."""
        signed = self.store.get_signed_manifest(self.store.resolve_ref(ref))
        return signed, self._check_provenance(ref, signed)

    def _check_provenance(self, ref: str, signed: SignedManifest) -> str | None:
        """The trusted signer's key id; ``PermissionDeniedError`` for a missing, bad or
        untrusted signature. None when this client trusts no keys."""
        if self.trusted_keys is None:
            return None
        try:
            return require_trusted_signature(signed.signatures, signed.digest, self.trusted_keys)
        except SignatureError as exc:
            raise PermissionDeniedError(
                f"refusing {ref}: {exc}", grpc.StatusCode.PERMISSION_DENIED
            ) from None

    def _opening(self, ref: str, manifest: common_pb2.Manifest) -> StoreClient:
        """The store view that reads ``manifest``'s chunks: opening them if it is sealed."""
        if not manifest.HasField("sealing"):
            return self.store
        if self.sealing is None:
            wanted = ", ".join(w.kek_id for w in manifest.sealing.wrapped_keys)
            raise PreconditionError(
                f"{ref} is sealed (data key {manifest.sealing.data_key_id}, wrapped for "
                f"{wanted}): give a KEK that opens it",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        try:
            return self.store.sealed(self.sealing.sealer_for(manifest))
        except SealingError as exc:
            raise PreconditionError(f"{ref}: {exc}", grpc.StatusCode.FAILED_PRECONDITION) from None

    def manifest(self, ref: str) -> common_pb2.Manifest:
        """The manifest ``ref`` points at: a delta's or a registered base's, checked against
        its digest and signature as :meth:`open` checks it (no KEK needed: it is metadata)."""
        return self._signed(ref)[0].manifest

    def open_delta(self, ref: str) -> OpenedManifest:
        """:meth:`open` for a delta; ValueError if ``ref`` is a registered base."""
        opened = self.open(ref)
        if is_base(opened.manifest):
            raise ValueError(f"{ref} is a registered base, not a delta")
        return opened

    def delta_manifest(self, ref: str) -> common_pb2.Manifest:
        """The manifest of the delta ``ref``; ValueError if it is a registered base."""
        return self.open_delta(ref).manifest

    def deltas(self, ref: str) -> Iterator[tuple[str, Tensor]]:
        """(name, fp32 ΔŴ) of every stored non-zero delta, decoded here one at a time."""
        opened = self.open_delta(ref)
        for entry in opened.manifest.tensors:
            if entry.kind != common_pb2.STORAGE_KIND_ZERO:
                yield entry.name, decode_entry(opened.store, entry)

    def check(self, ref: str) -> dict[str, Any]:
        """Fetch every chunk of ``ref``'s manifest and check it here (digest, size and, for a
        sealed manifest opened with this client's KEKs, authentication), after the checks
        of :meth:`open`; nothing is kept. ``DataLossError`` at the first bad chunk."""
        signed, signer = self._signed(ref)
        sealed = signed.manifest.HasField("sealing")
        # Without a KEK a sealed manifest's chunks are still checked: as ciphertext.
        reader = self._opening(ref, signed.manifest) if self.sealing else self.store
        refs = list(chunk_refs(signed.manifest))
        checked = reader.check_chunks(refs)
        return {
            "ref": ref,
            "manifest": str(signed.digest),
            "signed_by": signer or "",
            "signatures": [s.key_id for s in signed.signatures],
            "sealed": sealed,
            "authenticated": sealed and reader.sealer is not None,
            "chunks": len(refs),
            "bytes": checked,
        }

    def reconstruct(
        self,
        ref: str,
        base: Path | str | None,
        out: Path | str,
        *,
        base_ref: str | None = None,
        dtype: torch.dtype | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Path:
        """Write base + ΔŴ as a checkpoint directory at ``out``, one tensor in memory at a
        time. The base is a local checkpoint (``base``) or a registered one (``base_ref``);
        the output is sharded like it, with its side files overlaid by the fine-tune's (the
        delta's, if it stored any). Tensors the delta does not name are the base's,
        unchanged. Before a weight is written the base is checked to be the delta's
        (FAILED_PRECONDITION naming both fingerprints) and every chunk of the delta is
        fetched and checked; the result is built in ``out.partial``, then renamed."""
        opened = self.open_delta(ref)
        manifest = opened.manifest
        source = self._base_weights(ref, manifest, base, base_ref)
        entries = {entry.name: entry for entry in manifest.tensors}
        missing = [name for name in entries if name not in source]
        if missing:
            where = base_ref or base
            raise CheckpointError(f"the base {where} lacks tensor(s) {missing[:5]} of {ref}")
        opened.store.check_chunks(chunk_refs(manifest))
        target, staging = Path(out), Path(f"{out}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for shard, names in source.shards().items():
            specs = [_spec(source.info(name), entries.get(name), dtype) for name in names]
            writer = StreamingWriter(staging / shard, specs)
            try:
                for name in names:
                    tensor = source.get(name)
                    rebuilt = rebuild_tensor(opened.store, entries.get(name), tensor, dtype)
                    writer.write(name, rebuilt)
                    if progress is not None:
                        progress(name)
            except BaseException:
                writer.abort()
                raise
            writer.close()
        source.write_side_files(staging)
        write_files(opened.store, manifest.files, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        return target

    def _base_weights(
        self,
        ref: str,
        manifest: common_pb2.Manifest,
        base: Path | str | None,
        base_ref: str | None,
    ) -> Checkpoint | StoredBase:
        """The base to rebuild on, checked to be the one ``manifest`` was made against."""
        if (base is None) == (base_ref is None):
            raise ValueError("give exactly one of a base checkpoint and a registered base's ref")
        if base_ref is None:
            assert base is not None
            checkpoint = Checkpoint(base)
            local = fingerprint_as(manifest.base_fingerprint, checkpoint)
            check_same_base(manifest, local, str(base), ref)
            return checkpoint
        opened = self.open(base_ref)
        stored = StoredBase(opened.store, opened.manifest, base_ref)
        check_same_base(manifest, stored.fingerprint, f"registered as {base_ref}", ref)
        return stored

    def register_base(
        self,
        base: Path | str,
        *,
        ref: str,
        force: bool = False,
        labels: Mapping[str, str] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> BaseReport:
        """Keep the checkpoint ``base`` in the store under ``ref`` (tensors exact at their
        dtype, side files and shard index too), so fine-tunes of it can be rebuilt with
        ``base_ref=ref``. Only chunks the store lacks are sent; sealed and signed as this
        client seals and signs."""
        started = time.perf_counter()
        checkpoint = Checkpoint(base)
        if not force:
            self._refuse_existing(ref)
        created = Timestamp()
        created.GetCurrentTime()
        sealing, _, writer = self._writer()
        manifest = common_pb2.Manifest(
            format_version=MANIFEST_FORMAT_VERSION,
            digest_algorithm=common_pb2.DIGEST_ALGORITHM_BLAKE3,
            base_fingerprint=fingerprint(checkpoint),
            labels=dict(labels or {}),
            created_at=created,
            producer=SDK_PRODUCER,
            sealing=sealing,
        )
        stored = new = 0
        for shard, names in checkpoint.shards().items():
            for name in names:
                uploaded = upload_snapshot(writer, name, checkpoint.get(name), shard=shard)
                manifest.tensors.append(uploaded.entry)
                stored, new = stored + uploaded.bytes_stored, new + uploaded.new_chunk_bytes
                if progress is not None:
                    progress(name)
        manifest.files.extend(upload_files(writer, checkpoint.kept_files()))
        info = self.store.commit_manifest(manifest, ref=ref, force=force, signer=self.signer)
        seconds = time.perf_counter() - started
        return BaseReport(
            str(info.digest),
            ref,
            len(manifest.tensors),
            stored,
            new,
            manifest.base_fingerprint,
            seconds,
        )

    def _refuse_existing(self, ref: str) -> None:
        """ConflictError before any upload if ``ref`` exists (the commit's compare-and-swap
        checks again, atomically)."""
        try:
            current = self.store.resolve_ref(ref)
        except NotFoundError:
            return
        error = ConflictError(
            f"ref {ref!r} exists (at {current}); pass force to move it", grpc.StatusCode.ABORTED
        )
        error.expected, error.actual = None, current
        raise error

    @torch.no_grad()
    def apply(self, model: nn.Module, ref: str, *, prefix: str = "") -> nn.Module:
        """Add the stored deltas to ``model``'s weights in place (names are the manifest's
        with ``prefix`` removed) and return it. ValueError, before any change, if a delta
        names a tensor the model lacks or a shape differs. A live module's weights are not
        fingerprinted: rebuild from a checkpoint (:meth:`reconstruct`) to have the base
        checked."""
        state = model.state_dict(keep_vars=True)
        opened = self.open_delta(ref)
        entries = {e.name.removeprefix(prefix): e for e in opened.manifest.tensors}
        problems = [
            f"{n}: not in the model"
            if n not in state
            else f"{n}: model {list(state[n].shape)} != delta {list(e.shape)}"
            for n, e in entries.items()
            if n not in state or list(state[n].shape) != list(e.shape)
        ]
        if problems:
            raise ValueError(f"cannot apply {ref}: " + "; ".join(problems[:5]))
        for name, entry in entries.items():
            if entry.kind != common_pb2.STORAGE_KIND_ZERO:
                tensor = state[name]
                tensor.copy_(rebuild_tensor(opened.store, entry, tensor, tensor.dtype))
        return model

    # --- provenance and keys -------------------------------------------------------------

    def sign(self, ref: str) -> str:
        """Add this client's signature to the manifest ``ref`` points at (stored beside it:
        the manifest and its digest are unchanged); returns the signer's key id."""
        if self.signer is None:
            raise ValueError("signing needs a signer (a key from `deltavault keys generate`)")
        self._countersign(self.store.resolve_ref(ref), self.signer)
        return self.signer.key_id

    def _countersign(self, digest: Digest, signer: Signer) -> None:
        """Store ``signer``'s signature beside the manifest ``digest`` (re-committing it:
        nothing else changes), after checking the signatures it already has."""
        signed = self.store.get_signed_manifest(digest)
        trusted_signers(signed.signatures, signed.digest, None)  # never countersign a forgery
        self.store.commit_manifest(signed.manifest, signer=signer)

    def rotate(self, new_kek: bytes, *, prefix: str = "", keep_old: bool = False) -> list[Rotated]:
        """Re-wrap the data key of every sealed manifest under ``prefix`` for ``new_kek``
        (opened with this client's KEKs) and move each ref to the re-wrapped manifest with
        compare-and-swap. Chunks are untouched: nothing is uploaded. Old wrappings are
        dropped unless ``keep_old``; the old manifests go at the next gc."""
        if self.sealing is None:
            raise ValueError("rotation needs the current KEK(s) in this client's sealing keys")
        rotated = []
        for ref, digest in list(self.store.list_refs(prefix)):
            signed = self.store.get_signed_manifest(digest)
            self._check_provenance(ref, signed)
            if not signed.manifest.HasField("sealing") or _rotated(
                signed.manifest.sealing, new_kek, keep_old
            ):
                continue
            manifest = common_pb2.Manifest()
            manifest.CopyFrom(signed.manifest)
            try:
                record = rewrap(manifest.sealing, self.sealing.keks, new_kek, keep_old=keep_old)
            except SealingError as exc:
                raise PreconditionError(
                    f"{ref}: {exc}", grpc.StatusCode.FAILED_PRECONDITION
                ) from None
            manifest.sealing.CopyFrom(record)
            info = self.store.commit_manifest(
                manifest, ref=ref, expected=digest, signer=self.signer
            )
            rotated.append(Rotated(ref, str(digest), str(info.digest)))
        return rotated

    # --- housekeeping --------------------------------------------------------------------

    def list(self, prefix: str = "") -> list[tuple[str, str]]:
        """(ref, manifest digest) of every ref under ``prefix``."""
        return [(ref, str(digest)) for ref, digest in self.store.list_refs(prefix)]

    def delete(self, ref: str) -> str:
        """Remove ``ref``; returns the digest it pointed at (the data goes at the next gc)."""
        return str(self.store.delete_ref(ref))

    def gc(self, *, dry_run: bool = False, grace_seconds: int | None = None) -> dict[str, Any]:
        """Sweep unreferenced chunks and manifests older than the grace period (None: the
        store's default); the counts, as the store reports them."""
        response = self.store.collect_garbage(dry_run=dry_run, grace_seconds=grace_seconds or 0)
        return _as_dict(response)

    def verify(self, ref: str | None = None) -> dict[str, Any]:
        """Re-hash every chunk (of ``ref``'s manifest, or of the whole store)."""
        response = self.store.verify(self.store.resolve_ref(ref) if ref else None)
        report = _as_dict(response)
        report["damaged"] = [
            {"key": d.key, "digest": str(Digest.from_proto(d.digest)), "problem": d.problem}
            for d in response.damaged
        ]
        return report


def _rotated(record: common_pb2.ChunkSealing, new_kek: bytes, keep_old: bool) -> bool:
    """Whether a rotation to ``new_kek`` has nothing left to do for ``record`` (a rotation
    interrupted halfway is finished by running it again)."""
    wrapped_for = {wrapped.kek_id for wrapped in record.wrapped_keys}
    return kek_id(new_kek) in wrapped_for and (keep_old or len(wrapped_for) == 1)


def _as_dict(message: Message) -> dict[str, Any]:
    """A flat response's scalar fields by name (numbers stay numbers, unlike MessageToDict)."""
    return {
        f.name: getattr(message, f.name)
        for f in message.DESCRIPTOR.fields
        if f.type != f.TYPE_MESSAGE
    }


def _scope(allocation: str) -> compressor_pb2.AllocationScope.ValueType:
    scopes = {
        "per-matrix": compressor_pb2.ALLOCATION_SCOPE_PER_MATRIX,
        "model": compressor_pb2.ALLOCATION_SCOPE_MODEL,
    }
    if allocation not in scopes:
        raise ValueError(f"allocation must be one of {sorted(scopes)}, got {allocation!r}")
    return scopes[allocation]


def _estimate(estimate: compressor_pb2.PlanEstimate) -> PlanEstimate:
    if estimate.unavailable:
        return PlanEstimate(
            estimate.method, estimate.target_ratio, None, None, None, None, estimate.unavailable
        )
    error = estimate.error
    return PlanEstimate(
        estimate.method,
        estimate.target_ratio,
        estimate.ratio,
        estimate.nbits,
        error.relative_weight_error,
        error.relative_activation_error if error.has_activation_error else None,
    )


def _spec(
    info: TensorInfo, entry: common_pb2.TensorEntry | None, dtype: torch.dtype | None
) -> TensorSpec:
    """How a rebuilt tensor is written: the fine-tuned dtype (the entry's, else the base's),
    or ``dtype`` for floating-point tensors when given."""
    stored = torch_dtype(info.dtype)
    if entry is not None and entry.kind != common_pb2.STORAGE_KIND_ZERO:
        stored = WIRE_DTYPES[entry.dtype]
    if dtype is not None and stored.is_floating_point:
        stored = dtype
    return TensorSpec(info.name, info.shape, stored)
