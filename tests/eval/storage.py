"""The store side of the evaluation: what a family of fine-tunes costs to keep, how fast the
store moves bytes, and how the compressor's memory grows with the model.

1. Deduplication. The pair's fine-tune (the parent) and children of it that trained only the
   last encoder layer and the head (``tests/models/variants.py``) are compressed one after
   another against the base into one fresh ``deltavault serve`` store. After each model:
   the bytes the store holds (the sum of each compress's new chunk bytes), the bytes a store
   without content addressing would hold (the sum of each model's own ``bytes_stored``), and
   the fp16 sizes of as many full checkpoints and fp16 deltas. The parent is compressed twice
   first (nothing may be new the second time: identical deltas must give identical chunks),
   each child must write new chunks only for its trained tensors and name the parent's for
   the rest, and the store's own count (``Verify``) and its folder must agree.
2. Throughput. ``StoreClient.upload`` and ``read`` of fresh random bytes through
   ``python -m store_svc`` as its own process, on a local folder and on SeaweedFS S3, both on
   loopback; best of a few repeats, fresh bytes for every upload (bytes the store has take
   the dedup path instead).
3. Compressor peak memory. Synthetic fp16 checkpoints, one fresh ``deltavault serve`` per
   point (VmHWM is a high-water mark): a model that grows by more tensors of one size, and
   one whose single tensor grows; peak RSS against model size, and the fitted slopes.
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from clients._generated.deltavault.common.v1 import common_pb2
from clients.encoding import decode_entry
from clients.sdk import CompressReport, DeltaVault
from clients.store_client import StoreClient
from store_svc.digest import Digest
from tests.bench.bench_store import best_rate, start_store_process
from tests.eval.report import Figures, Section, mib, table
from tests.models import variants
from tests.support.checkpoints import write_checkpoint
from tests.support.children import free_port
from tests.support.embedded import EmbeddedServer
from tests.support.processes import ServiceProcess
from tests.support.seaweedfs import SeaweedS3

MiB = 1 << 20
TITLE = "Store: deduplication, throughput, compressor memory"
METHOD = "bitdelta"
RATIO = 15.0
"""BitDelta, one sign plane and one fp32 scale per matrix: just under 16x on these shapes
(a target of 16 is refused as out of reach). Chosen for speed: on the MiniLM pair it
compresses in seconds where DARE at 16x takes several times longer on two cores."""
BUDGET_BYTES = 300e6
"""The fixed part of the compressor's memory budget (``MemoryPoint.budget_mib``)."""
BACKENDS = ("local", "s3")
DIRECTIONS = ("upload", "download")


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    children: int
    """Children of the pair's fine-tune (the family is the parent plus these)."""
    child_steps: int
    payload_mib: tuple[int, ...]
    repeats: int
    tensor_mib: int
    """Series (a): the one tensor size."""
    tensor_counts: tuple[int, ...]
    """Series (a): tensors of ``tensor_mib`` per model."""
    largest_mib: tuple[int, ...]
    """Series (b): the single tensor's size."""


FULL = Sizes(
    children=8,
    child_steps=40,
    payload_mib=(16, 64, 256),
    repeats=3,
    tensor_mib=8,
    tensor_counts=(1, 4, 16, 32, 64),
    largest_mib=(8, 32, 64, 128),
)
QUICK = Sizes(
    children=2,
    child_steps=8,
    payload_mib=(8, 32),
    repeats=2,
    tensor_mib=8,
    tensor_counts=(1, 4),
    largest_mib=(8, 32),
)


# --- 1. deduplication ---------------------------------------------------------------------


@dataclass(frozen=True)
class StoredModel:
    """One compress into the family's store."""

    name: str
    bytes_stored: int
    """Every chunk byte its manifest names: what it costs alone."""
    new_chunk_bytes: int
    """Of those, the bytes the store did not have yet."""
    fp16_bytes: int
    """Its full checkpoint at 2 bytes per element."""
    fp16_delta_bytes: int
    """Its non-zero tensor deltas at 2 bytes per element."""
    tensors: int
    tensors_new: int
    """Tensors that wrote at least one new chunk."""
    lossy_ratio: float
    seconds: float


@dataclass(frozen=True)
class Cumulative:
    """Totals over the first ``models`` models of the family."""

    models: int
    deduplicated: int
    without_dedup: int
    fp16_checkpoints: int
    fp16_deltas: int


@dataclass(frozen=True)
class ChildCheck:
    """What a child shares with the parent, and what it does not."""

    name: str
    trained: int
    trained_new: int
    """Trained tensors that wrote new chunks."""
    frozen: int
    """Frozen tensors: each named the parent's chunks and wrote nothing."""
    max_change: float
    """Largest |ΔŴ_child - ΔŴ_parent| over its trained tensors, decoded from the store."""


@dataclass(frozen=True)
class StoreCheck:
    """The store's contents after the family, counted three ways."""

    manifests: int
    tensor_chunk_bytes: int
    """Distinct chunks the manifests' tensors name."""
    file_chunk_bytes: int
    """Distinct chunks the manifests' side files (config, tokenizer) name."""
    chunks: int
    verified_chunks: int
    verified_bytes: int
    """``Verify`` over the whole store: every chunk re-hashed, raw bytes."""
    disk_bytes: int
    """Chunk files in the store folder: headers, and zstd where it saved enough."""


@dataclass(frozen=True)
class Dedup:
    models: list[StoredModel]
    totals: list[Cumulative]
    repeat_new_bytes: int
    """New chunk bytes of the parent compressed a second time."""
    repeat_chunks: int
    """Chunks the parent's tensors name (the same ones both times)."""
    children: list[ChildCheck]
    store: StoreCheck
    children_seconds: float
    steps: int


def cumulative(models: Sequence[StoredModel]) -> list[Cumulative]:
    """Running totals after each model: with dedup (new chunk bytes), without (each model's
    own bytes), and the fp16 references."""
    totals: list[Cumulative] = []
    dedup = alone = checkpoints = deltas = 0
    for n, model in enumerate(models, start=1):
        dedup += model.new_chunk_bytes
        alone += model.bytes_stored
        checkpoints += model.fp16_bytes
        deltas += model.fp16_delta_bytes
        totals.append(Cumulative(n, dedup, alone, checkpoints, deltas))
    return totals


def stored_model(name: str, report: CompressReport) -> StoredModel:
    tensors = report.tensors
    return StoredModel(
        name=name,
        bytes_stored=report.bytes_stored,
        new_chunk_bytes=report.new_chunk_bytes,
        fp16_bytes=2 * sum(t.numel for t in tensors),
        fp16_delta_bytes=2 * sum(t.numel for t in tensors if t.kind != "zero"),
        tensors=len(tensors),
        tensors_new=sum(t.new_chunk_bytes > 0 for t in tensors),
        lossy_ratio=report.lossy_ratio,
        seconds=report.seconds,
    )


def tensor_chunks(manifest: common_pb2.Manifest) -> dict[str, tuple[Digest, ...]]:
    """Per tensor, the digests of its parts' chunks in order."""
    return {
        entry.name: tuple(
            Digest.from_proto(chunk.digest) for part in entry.parts for chunk in part.chunks
        )
        for entry in manifest.tensors
    }


def distinct_chunk_bytes(
    manifests: Iterable[common_pb2.Manifest], *, files: bool
) -> tuple[int, int]:
    """(count, bytes) of the distinct chunks that the manifests' tensors name, or (with
    ``files``) that their side files name."""
    sizes: dict[Digest, int] = {}
    for manifest in manifests:
        groups = (
            [f.chunks for f in manifest.files]
            if files
            else [part.chunks for entry in manifest.tensors for part in entry.parts]
        )
        for chunks in groups:
            sizes.update((Digest.from_proto(chunk.digest), chunk.size) for chunk in chunks)
    return len(sizes), sum(sizes.values())


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def check_child(
    vault: DeltaVault,
    name: str,
    report: CompressReport,
    parent: common_pb2.Manifest,
    prefixes: tuple[str, ...],
) -> ChildCheck:
    """Frozen tensors must name the parent's chunks and write nothing; trained ones must
    decode to a delta that differs from the parent's. RuntimeError otherwise."""
    manifest = vault.manifest(report.ref)
    mine, theirs = tensor_chunks(manifest), tensor_chunks(parent)
    wrote = {t.name for t in report.tensors if t.new_chunk_bytes > 0}
    frozen = [n for n in mine if not n.startswith(prefixes)]
    moved = [n for n in frozen if mine[n] != theirs[n] or n in wrote]
    if moved:
        raise RuntimeError(f"{name}: frozen tensors stored anew, e.g. {moved[0]}")
    entries = {e.name: e for e in manifest.tensors}
    parent_entries = {e.name: e for e in parent.tensors}
    trained = [n for n in mine if n.startswith(prefixes)]
    changes = {
        n: float(
            (decode_entry(vault.store, entries[n]) - decode_entry(vault.store, parent_entries[n]))
            .abs()
            .max()
        )
        for n in trained
    }
    for prefix in prefixes:
        if not any(change > 0 for n, change in changes.items() if n.startswith(prefix)):
            raise RuntimeError(f"{name}: no tensor under {prefix} differs from the parent's")
    return ChildCheck(
        name, len(trained), len(wrote & set(trained)), len(frozen), max(changes.values())
    )


def check_repeat(vault: DeltaVault, first: CompressReport, again: CompressReport) -> int:
    """The parent compressed a second time must write nothing and name the same chunks
    (else nothing could deduplicate); RuntimeError otherwise. The chunks it names."""
    chunks = tensor_chunks(vault.manifest(first.ref))
    if again.new_chunk_bytes or tensor_chunks(vault.manifest(again.ref)) != chunks:
        raise RuntimeError(
            f"{METHOD} is not deterministic: the same delta compressed twice gave other "
            f"chunks ({again.new_chunk_bytes} new bytes the second time)"
        )
    return len({digest for digests in chunks.values() for digest in digests})


def measure_dedup(pair_dir: Path, sizes: Sizes, work: Path) -> Dedup:
    """Compress the parent twice, then each child, into one store; account and check."""
    started = time.perf_counter()
    children = variants.ensure_variants(pair_dir, sizes.children, sizes.child_steps)
    children_seconds = time.perf_counter() - started
    parent_dir = pair_dir / variants.PARENT
    prefixes = variants.trained_prefixes(parent_dir)
    with EmbeddedServer(work / "store") as server:
        with DeltaVault(server.store, server.compressor) as vault:

            def compress(model: Path, ref: str) -> CompressReport:
                return vault.compress(pair_dir / "base", model, ref=ref, method=METHOD, ratio=RATIO)

            first = compress(parent_dir, "eval/parent")
            again = compress(parent_dir, "eval/parent-again")
            repeat_chunks = check_repeat(vault, first, again)
            parent = vault.manifest(first.ref)
            models, checks = [stored_model("parent", first)], []
            for number, path in enumerate(children, start=1):
                name = f"child {number}"
                report = compress(path, f"eval/child-{number}")
                models.append(stored_model(name, report))
                checks.append(check_child(vault, name, report, parent, prefixes))
            store = check_store(vault, work / "store", models)
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"deltavault serve exited with {code}")
    return Dedup(
        models,
        cumulative(models),
        again.new_chunk_bytes,
        repeat_chunks,
        checks,
        store,
        children_seconds,
        sizes.child_steps,
    )


def check_store(vault: DeltaVault, root: Path, models: Sequence[StoredModel]) -> StoreCheck:
    """Count the store's chunks from its manifests, by ``Verify`` and on disk; RuntimeError
    unless they agree with each other and with the compress reports."""
    manifests = [vault.manifest(ref) for ref, _ in vault.list("eval/")]
    tensor_count, tensor_bytes = distinct_chunk_bytes(manifests, files=False)
    file_count, file_bytes = distinct_chunk_bytes(manifests, files=True)
    verified = vault.verify()
    reported = sum(model.new_chunk_bytes for model in models)
    if verified["damaged"] or tensor_bytes != reported:
        raise RuntimeError(
            f"the store disagrees: {tensor_bytes} tensor chunk bytes named, {reported} "
            f"reported new; damaged: {verified['damaged']}"
        )
    check = StoreCheck(
        manifests=len(manifests),
        tensor_chunk_bytes=tensor_bytes,
        file_chunk_bytes=file_bytes,
        chunks=tensor_count + file_count,
        verified_chunks=int(verified["chunks_checked"]),
        verified_bytes=int(verified["bytes_checked"]),
        disk_bytes=folder_bytes(root / "chunks"),
    )
    if (check.verified_chunks, check.verified_bytes) != (check.chunks, tensor_bytes + file_bytes):
        raise RuntimeError(f"Verify counts other chunks than the manifests name: {check}")
    return check


# --- 2. throughput ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    backend: str
    direction: str
    payload_mib: int
    mib_per_s: float


@contextmanager
def store_service(backend: str, work: Path) -> Iterator[str]:
    """``python -m store_svc`` on ``backend`` as its own process on loopback; its address.
    The S3 backend gets a SeaweedFS of its own. Both are stopped on exit, also on error."""
    work.mkdir(parents=True)
    if backend == "local":
        args = ["--backend", "local", "--root", str(work / "store"), "--log-level", "WARNING"]
        service = ServiceProcess.start(
            "store", "store_svc", args, free_port(), log=work / "store.log"
        )
        try:
            service.wait_serving()
            yield service.target
        finally:
            service.stop()
        return
    with SeaweedS3() as s3:
        process = start_store_process(s3, str(work))
        try:
            yield process.target
        finally:
            process.stop()


def measure_rates(client: StoreClient, backend: str, payloads: Sequence[bytes]) -> list[Rate]:
    """Upload each payload once (best of them), then read each back (best of them)."""
    size = len(payloads[0])
    refs: list[list[common_pb2.ChunkRef]] = []
    received: list[bytes] = []

    def upload(i: int) -> None:
        chunk_refs, stats = client.upload(payloads[i])
        if stats.chunks_sent != stats.chunks:
            raise RuntimeError(f"{backend}: upload {i} was not fresh ({stats})")
        refs.append(chunk_refs)

    def download(i: int) -> None:
        received.append(client.read(refs[i]))

    up = best_rate(size, len(payloads), upload)
    down = best_rate(size, len(payloads), download)
    if received != list(payloads):
        raise RuntimeError(f"{backend}: the bytes read back differ from those uploaded")
    mib_size = size // MiB
    return [
        Rate(backend, "upload", mib_size, up),
        Rate(backend, "download", mib_size, down),
    ]


def measure_throughput(sizes: Sizes, work: Path) -> tuple[list[Rate], int]:
    """Rates per backend, direction and payload size; and the client's chunk size. Each
    size's payloads are drawn once and sent to both stores (each store sees them fresh)."""
    rates: list[Rate] = []
    with ExitStack() as stack:
        clients = {
            backend: stack.enter_context(
                StoreClient(stack.enter_context(store_service(backend, work / backend)))
            )
            for backend in BACKENDS
        }
        for payload_mib in sizes.payload_mib:
            payloads = [os.urandom(payload_mib * MiB) for _ in range(sizes.repeats)]
            for backend, client in clients.items():
                rates += measure_rates(client, backend, payloads)
        chunk_bytes = clients[BACKENDS[0]].chunk_bytes
    return rates, chunk_bytes


# --- 3. compressor memory -----------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPoint:
    tensors: int
    tensor_mib: int
    idle_mib: float
    """VmHWM of the fresh server before any request."""
    peak_mib: float
    """VmHWM after the compress."""
    seconds: float

    @property
    def model_mib(self) -> int:
        return self.tensors * self.tensor_mib

    @property
    def budget_mib(self) -> float:
        """The compressor's stated bound on its peak (README, ``bench_compressor``): three
        largest tensors plus 300 MB."""
        return 3 * self.tensor_mib + BUDGET_BYTES / MiB


def write_pair(root: Path, tensors: int, tensor_mib: int) -> tuple[Path, Path]:
    """A synthetic fp16 base and fine-tune: ``tensors`` matrices of ``tensor_mib`` MiB."""
    cols = 1024
    rows = tensor_mib * MiB // (2 * cols)
    generator = torch.Generator().manual_seed(0)
    base = {
        f"layers.{i}.weight": torch.randn(rows, cols, generator=generator, dtype=torch.float16)
        for i in range(tensors)
    }
    tuned = {
        name: t + 1e-3 * torch.randn(t.shape, generator=generator, dtype=torch.float16)
        for name, t in base.items()
    }
    return write_checkpoint(root / "base", base), write_checkpoint(root / "tuned", tuned)


def measure_point(tensors: int, tensor_mib: int, work: Path) -> MemoryPoint:
    """Peak RSS of a fresh ``deltavault serve`` compressing one synthetic pair."""
    work.mkdir(parents=True)
    try:
        base, tuned = write_pair(work, tensors, tensor_mib)
        with EmbeddedServer(work / "store") as server:
            idle = server.peak_rss_bytes()
            with DeltaVault(server.store, server.compressor) as vault:
                report = vault.compress(
                    base, tuned, ref="eval/synthetic", method=METHOD, ratio=RATIO
                )
            peak = server.peak_rss_bytes()
            code = server.stop()
        if code != 0 or report.tensor_count != tensors:
            raise RuntimeError(f"compress of {tensors} x {tensor_mib} MiB: exit {code}, {report}")
    finally:
        shutil.rmtree(work)
    return MemoryPoint(tensors, tensor_mib, idle / MiB, peak / MiB, report.seconds)


def measure_memory(sizes: Sizes, work: Path) -> dict[str, list[MemoryPoint]]:
    """Series ``many`` (more tensors of one size) and ``largest`` (one growing tensor);
    a shape both series hold is measured once."""
    shapes = {
        "many": [(n, sizes.tensor_mib) for n in sizes.tensor_counts],
        "largest": [(1, m) for m in sizes.largest_mib],
    }
    points: dict[tuple[int, int], MemoryPoint] = {}
    for shape in dict.fromkeys(s for series in shapes.values() for s in series):
        points[shape] = measure_point(*shape, work / f"{shape[0]}x{shape[1]}")
    return {name: [points[s] for s in series] for name, series in shapes.items()}


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("a slope needs two or more (x, y) pairs")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    if spread == 0:
        raise ValueError("a slope needs two different x values")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / spread


# --- the section --------------------------------------------------------------------------


def section(pair_dir: Path, figures: Figures, *, quick: bool) -> Section:
    """Measure all three parts and write them up."""
    sizes = QUICK if quick else FULL
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="eval-storage-") as tmp:
        work = Path(tmp)
        clock = time.perf_counter()
        dedup = measure_dedup(pair_dir, sizes, work / "dedup")
        seconds["dedup"] = time.perf_counter() - clock
        clock = time.perf_counter()
        rates, chunk_bytes = measure_throughput(sizes, work / "throughput")
        seconds["throughput"] = time.perf_counter() - clock
        clock = time.perf_counter()
        memory = measure_memory(sizes, work / "memory")
        seconds["memory"] = time.perf_counter() - clock
    machine = {
        "cpus": os.cpu_count() or 0,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
    }
    slopes = {
        name: slope([p.model_mib for p in series], [p.peak_mib for p in series])
        for name, series in memory.items()
    }
    data: dict[str, Any] = {
        "quick": quick,
        "sizes": asdict(sizes),
        "method": METHOD,
        "ratio": RATIO,
        "machine": machine,
        "seconds": seconds,
        "dedup": asdict(dedup),
        "throughput": {"chunk_bytes": chunk_bytes, "rates": [asdict(r) for r in rates]},
        "memory": {
            name: [
                {**asdict(p), "model_mib": p.model_mib, "budget_mib": p.budget_mib} for p in series
            ]
            for name, series in memory.items()
        },
        "memory_slopes": slopes,
    }
    body = "\n\n".join(
        [
            intro(machine, seconds),
            dedup_text(dedup, figures, seconds["dedup"]),
            throughput_text(rates, chunk_bytes, sizes.repeats, figures, seconds["throughput"]),
            memory_text(memory, slopes, figures, seconds["memory"]),
        ]
    )
    return Section(TITLE, body, data, time.perf_counter() - started)


def intro(machine: dict[str, Any], seconds: dict[str, float]) -> str:
    return (
        f"Measured on this machine: {machine['cpus']} CPU cores "
        f"(1-minute load average {machine['load_before']:.2f} at the start, "
        f"{machine['load_after']:.2f} at the end; times and rates move with load), "
        f"{sum(seconds.values()):.0f} s in all. Every server is a real process "
        "on 127.0.0.1, started for this run and stopped at its end."
    )


def dedup_text(dedup: Dedup, figures: Figures, seconds: float) -> str:
    parent, children = dedup.models[0], dedup.models[1:]
    last, store = dedup.totals[-1], dedup.store
    intro = (
        f"### Deduplication across {len(dedup.models)} fine-tunes\n\n"
        f"The pair's fine-tune (the parent) and {len(children)} children of it, each "
        f"trained {dedup.steps} more steps on the last encoder layer and the head only, with "
        f"its own seed (`tests/models/variants.py`; ready in {dedup.children_seconds:.1f} s: "
        "trained on first use, then cached), compressed one after another against the base "
        f"into one fresh `deltavault serve` store (local folder) with {METHOD} at a target "
        f"of {RATIO:g}x ({parent.lossy_ratio:.3f}x measured on the linear weights; "
        "embeddings, norms, biases and the head are kept exact). *With dedup* is the sum of "
        "the bytes each compress found new, what the store holds; *without* the sum of "
        "each model's own bytes, what a store that does not share chunks would hold; the "
        f"fp16 columns are {len(dedup.models)} full checkpoints and fp16 deltas at 2 bytes "
        f"per element. {seconds:.0f} s."
    )
    rows = [
        [
            model.name,
            mib(model.bytes_stored),
            mib(model.new_chunk_bytes),
            f"{model.tensors_new}/{model.tensors}",
            mib(total.deduplicated),
            mib(total.without_dedup),
            mib(total.fp16_deltas),
            mib(total.fp16_checkpoints),
            f"{model.seconds:.1f}",
        ]
        for model, total in zip(dedup.models, dedup.totals, strict=True)
    ]
    header = [
        "model",
        "own MiB",
        "new MiB",
        "tensors new",
        "Σ with dedup",
        "Σ without",
        "Σ fp16 deltas",
        "Σ fp16 checkpoints",
        "seconds",
    ]
    grid = table(header, rows, [False, *[True] * 8])
    mean_child = sum(c.new_chunk_bytes for c in children) / len(children)
    checks = (
        f"After {len(dedup.models)} models the store holds {mib(last.deduplicated)} MiB "
        f"against {mib(last.without_dedup)} MiB without dedup "
        f"({last.without_dedup / last.deduplicated:.2f}x less) and "
        f"{mib(last.fp16_deltas)} MiB of fp16 deltas ({last.fp16_deltas / last.deduplicated:.1f}x "
        f"less); each child added {mib(mean_child)} MiB on average against "
        f"{mib(parent.bytes_stored)} MiB for the parent alone.\n\n"
        f"Checks, each of which would have failed the run: the parent compressed a second "
        f"time wrote {dedup.repeat_new_bytes} new bytes and named the same "
        f"{dedup.repeat_chunks} chunks (the compression is deterministic); every child wrote "
        f"new chunks only for its trained tensors ({trained_new(dedup.children)}) and named "
        f"the parent's chunks for all {dedup.children[0].frozen} frozen ones, "
        "while its trained tensors, decoded from the store, differ from the parent's "
        f"(largest change {min(c.max_change for c in dedup.children):.2e} to "
        f"{max(c.max_change for c in dedup.children):.2e}). The store agrees: "
        f"{store.manifests} manifests name {store.chunks} distinct chunks, "
        f"{mib(store.tensor_chunk_bytes)} MiB of tensors (= the sum of new bytes) plus "
        f"{mib(store.file_chunk_bytes)} MiB of side files (config and tokenizer, shared too); "
        f"`Verify` re-hashed {store.verified_chunks} chunks, {mib(store.verified_bytes)} MiB; "
        f"the chunk files take {mib(store.disk_bytes)} MiB on disk (zstd where it pays)."
    )
    return "\n\n".join([intro, grid, dedup_figure(dedup, figures), checks])


def trained_new(children: Sequence[ChildCheck]) -> str:
    """How many trained tensors wrote new chunks: once if every child agrees, else each."""
    counts = [f"{c.trained_new} of {c.trained}" for c in children]
    return f"{counts[0]} for every child" if len(set(counts)) == 1 else ", ".join(counts)


def dedup_figure(dedup: Dedup, figures: Figures) -> str:
    figure = figures.figure(6.5, 3.8)
    axes = figure.add_subplot()
    n = [t.models for t in dedup.totals]
    checkpoints = [t.fp16_checkpoints for t in dedup.totals]
    deltas = [t.fp16_deltas for t in dedup.totals]
    fp16 = (
        {"fp16 deltas (= checkpoints)": deltas}
        if deltas == checkpoints
        else {
            "fp16 checkpoints": checkpoints,
            "fp16 deltas": deltas,
        }
    )
    series = {
        **fp16,
        f"{METHOD}, without dedup": [t.without_dedup for t in dedup.totals],
        f"{METHOD}, with dedup (stored)": [t.deduplicated for t in dedup.totals],
    }
    for label, values in series.items():
        axes.plot(n, [v / MiB for v in values], marker="o", label=label)
    axes.set_yscale("log")
    axes.set_xticks(n)
    axes.set_xlabel("models stored (parent, then children)")
    axes.set_ylabel("MiB, cumulative (log)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    caption = (
        f"Bytes for a family of {len(n)} fine-tunes: with and without the store's "
        "deduplication, and the fp16 references"
    )
    return figures.save(figure, "storage-dedup", caption)


def throughput_text(
    rates: Sequence[Rate], chunk_bytes: int, repeats: int, figures: Figures, seconds: float
) -> str:
    intro = (
        "### Upload and download throughput\n\n"
        "`StoreClient.upload` (probe for missing chunks, stream, server-side verify, write) "
        "and `StoreClient.read` (read, server-side and client-side verify) of random bytes "
        f"in {chunk_bytes // MiB} MiB chunks, through `python -m store_svc` as its own "
        "process on a local folder and on SeaweedFS S3 (`weed mini`), all on loopback; "
        f"MiB/s, best of {repeats}, every upload of bytes new to the store; the store's "
        f"default `--compression auto` tries zstd on each chunk. {seconds:.0f} s."
    )
    sizes = sorted({r.payload_mib for r in rates})
    by = {(r.backend, r.direction, r.payload_mib): r.mib_per_s for r in rates}
    rows = [
        [backend, direction, *(f"{by[backend, direction, s]:.1f}" for s in sizes)]
        for backend in BACKENDS
        for direction in DIRECTIONS
    ]
    grid = table(
        ["backend", "direction", *(f"{s} MiB" for s in sizes)],
        rows,
        [False, False, *[True] * len(sizes)],
    )
    figure = figures.figure(6.5, 3.8)
    axes = figure.add_subplot()
    for backend in BACKENDS:
        for direction in DIRECTIONS:
            values = [by[backend, direction, s] for s in sizes]
            style = "-" if direction == "upload" else "--"
            axes.plot(sizes, values, style, marker="o", label=f"{backend} {direction}")
    axes.set_xscale("log", base=2)
    axes.set_xticks(sizes, [str(s) for s in sizes])
    axes.set_xlabel("payload (MiB)")
    axes.set_ylabel("MiB/s")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend()
    plot = figures.save(
        figure, "storage-throughput", "Store throughput by backend, direction and payload size"
    )
    return "\n\n".join([intro, grid, plot])


SERIES_LABELS = {
    "many": "more tensors",
    "largest": "one larger tensor",
}


def memory_text(
    memory: dict[str, list[MemoryPoint]],
    slopes: dict[str, float],
    figures: Figures,
    seconds: float,
) -> str:
    many, largest = memory["many"], memory["largest"]
    shapes = list({(p.tensors, p.tensor_mib): p for s in memory.values() for p in s}.values())
    idle = [p.idle_mib for p in shapes]
    intro = (
        "### Compressor peak memory against model size\n\n"
        f"Synthetic fp16 base and fine-tune checkpoints, compressed with {METHOD} at "
        f"{RATIO:g}x by a fresh `deltavault serve` per shape (store and compressor in one "
        "process; peak = its VmHWM after the compress, idle = before the first request); "
        "model size is one checkpoint's bytes (base and fine-tune together stream twice "
        "that). "
        f"Series *{SERIES_LABELS['many']}*: {', '.join(str(p.tensors) for p in many)} "
        f"tensors of {many[0].tensor_mib} MiB; series *{SERIES_LABELS['largest']}*: one "
        f"tensor of {', '.join(str(p.tensor_mib) for p in largest)} MiB. {seconds:.0f} s."
    )
    rows = [
        [
            SERIES_LABELS[name],
            f"{p.tensors} x {p.tensor_mib}",
            str(p.model_mib),
            f"{p.idle_mib:.0f}",
            f"{p.peak_mib:.0f}",
            f"{p.budget_mib:.0f}",
            f"{(p.peak_mib - p.idle_mib) / p.tensor_mib:.1f}",
            f"{p.seconds:.1f}",
        ]
        for name, series in memory.items()
        for p in series
    ]
    grid = table(
        [
            "series",
            "tensors x MiB",
            "model MiB",
            "idle MiB",
            "peak MiB",
            "budget MiB",
            "growth / largest tensor",
            "seconds",
        ],
        rows,
        [False, False, True, True, True, True, True, True],
    )
    figure = figures.figure(6.5, 3.8)
    axes = figure.add_subplot()
    for name, series in memory.items():
        axes.plot(
            [p.model_mib for p in series],
            [p.peak_mib for p in series],
            marker="o",
            label=f"peak, {SERIES_LABELS[name]}",
        )
    axes.axhline(max(idle), color="gray", linestyle=":", label="idle server (highest)")
    axes.set_xlim(left=0)
    axes.set_xlabel("model size (MiB of fp16 weights, linear: the slope is the cost)")
    axes.set_ylabel("peak RSS (MiB)")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend()
    plot = figures.save(
        figure, "storage-memory", "Compressor peak RSS against model size, two ways to grow"
    )
    idle_range = (
        f"{min(idle):.0f} MiB at every start"
        if round(min(idle)) == round(max(idle))
        else f"{min(idle):.0f} to {max(idle):.0f} MiB"
    )
    verdict = (
        f"Fitted slopes (least squares, MiB of peak per MiB of model): "
        f"{slopes['many']:.3f} when the model grows by more {many[0].tensor_mib} MiB tensors "
        f"({many[0].model_mib} to {many[-1].model_mib} MiB: peak {many[0].peak_mib:.0f} to "
        f"{many[-1].peak_mib:.0f} MiB), {slopes['largest']:.2f} when its one tensor grows "
        f"({largest[0].model_mib} to {largest[-1].model_mib} MiB: peak "
        f"{largest[0].peak_mib:.0f} to {largest[-1].peak_mib:.0f} MiB); the idle server "
        f"takes {idle_range}. The stated budget (3 x the largest tensor + 300 MB of peak) "
        f"holds at {sum(p.peak_mib <= p.budget_mib for p in shapes)} of {len(shapes)} shapes; "
        "*growth / largest tensor* is the peak over idle in units of the largest tensor."
    )
    return "\n\n".join([intro, grid, plot, verdict])
