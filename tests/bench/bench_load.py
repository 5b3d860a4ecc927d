"""Load: concurrent compress streams and readers against one store, for a bounded time.

``python -m tests.bench.bench_load [--compressors 16] [--readers 64] [--seconds 60]
[--backend local|s3] [--hidden 256] [--layers 1] [--method adamix] [--ratio 16]
[--store-arg=ARGS]... [--compressor-arg=ARGS]...`` (``make bench-load LOAD_ARGS=...``)

Starts ``python -m store_svc`` (a local folder in a temp dir, or ``--backend s3``: SeaweedFS
on loopback) and ``python -m compressor_svc`` as their own processes on free 127.0.0.1
ports, writes a synthetic fp16 base model (``--layers`` x q/up/down projections and a norm
at ``--hidden``; by default 0.6 MiB, which one adamix compress takes about 1 s for, alone on
the 2-core dev machine) and seeds ``--seed-refs`` lossless fine-tunes of it for the readers.
Then, until ``--seconds`` have passed:

- each of ``--compressors`` threads (its own ``DeltaVault``) compresses the base and a new
  fine-tune (a fresh seed, so every chunk is new) with ``--method`` to a ref of its own;
- each of ``--readers`` threads (its own ``StoreClient``) picks a seeded ref, resolves it,
  fetches its manifest and reads every chunk (verified against its digest), checking the
  ref, the manifest and the byte count against what seeding stored.

A call an admission limit sheds (RESOURCE_EXHAUSTED with a retry delay) is retried by the
clients themselves, as for any user; the servers' /metrics count the calls they shed.
Prints per operation the successes, failures by status code, p50/p99/max latency (a shed
and retried operation's includes its wait), ops/s and MiB/s (compress: base + fine-tune
bytes streamed; read: chunk bytes); the calls each server shed, by method; and per process
its RSS when idle, at the load's start, its peak (sampled every 0.2 s, and VmHWM), its
largest in the first and the last quarter of the load, and its CPU seconds.
``--store-arg``/``--compressor-arg`` (repeatable, shell-split) are appended to that server's
command line, e.g. ``--store-arg=--workers=64``.

Exit status 1 if any operation failed (a shed call retried into success is not a failure),
a server died or had to be killed, or the workers had not all stopped
``--margin`` seconds after the deadline. The servers are stopped on every path, Ctrl-C
included. A benchmark, not a test (``tests/integration/test_bench_load.py`` runs a tiny one).
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import argparse
import contextlib
import itertools
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType

import torch
from torch import Tensor

from clients._generated.deltavault.common.v1 import common_pb2
from clients.errors import DeltaVaultError
from clients.sdk import DeltaVault
from clients.store_client import StoreClient
from store_svc.digest import Digest
from tests.support.checkpoints import write_checkpoint
from tests.support.children import free_port
from tests.support.processes import ServiceProcess, cpu_seconds, proc_status_bytes
from tests.support.seaweedfs import SeaweedS3

MiB = 1 << 20
SAMPLE_SECONDS = 0.2
STOP_SECONDS = 60.0
"""How long a server gets to exit after SIGTERM before it is killed."""
ERROR_PAUSE_SECONDS = 0.1
"""A worker's pause after a failed operation, so a dead server is not hammered."""
KINDS = ("compress", "resolve", "manifest", "read")
"""The operations, in report order (a ``worker`` row appears if a worker itself failed)."""
SERVER_FLAGS = ("--log-level", "WARNING", "--shutdown-grace-seconds", "10")
SHED = re.compile(
    r'^deltavault_\w+_rpc_requests_total\{grpc_code="RESOURCE_EXHAUSTED",'
    r'grpc_method="(\w+)"\} ([0-9.e+]+)$',
    re.MULTILINE,
)


class Mismatch(Exception):
    """What came back is not what was stored."""


# --- settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    compressors: int
    readers: int
    seconds: float
    margin: float
    """Seconds past the deadline the workers get to finish their last operation."""
    backend: str
    hidden: int
    layers: int
    method: str
    ratio: float
    seed_refs: int
    store_args: list[str]
    compressor_args: list[str]


def parse_settings(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--compressors", type=int, default=16, help="concurrent compress streams")
    p.add_argument("--readers", type=int, default=64, help="concurrent readers")
    p.add_argument("--seconds", type=float, default=60.0, help="load duration")
    p.add_argument("--margin", type=float, default=60.0, help="time to stop after it")
    p.add_argument("--backend", choices=["local", "s3"], default="local")
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=1, help="layers of 3 matrices and a norm")
    p.add_argument("--method", default="adamix", help="compress workers' method")
    p.add_argument("--ratio", type=float, default=16.0, help="its target ratio")
    p.add_argument("--seed-refs", type=int, default=4, help="lossless refs the readers read")
    p.add_argument("--store-arg", action="append", default=[], help="appended to the store")
    p.add_argument("--compressor-arg", action="append", default=[], help="... the compressor")
    a = p.parse_args(argv)
    if min(a.compressors, a.readers) < 0 or a.compressors + a.readers == 0 or a.seed_refs < 1:
        p.error("need compressors, readers >= 0 (not both 0) and seed-refs >= 1")
    return Settings(
        a.compressors,
        a.readers,
        a.seconds,
        a.margin,
        a.backend,
        a.hidden,
        a.layers,
        a.method,
        a.ratio,
        a.seed_refs,
        _words(a.store_arg),
        _words(a.compressor_arg),
    )


def _words(values: list[str]) -> list[str]:
    """Each ``--*-arg`` value split as a shell would: ``--store-arg='--workers 64'``."""
    return [word for value in values for word in shlex.split(value)]


# --- the model ---------------------------------------------------------------------------


def base_model(hidden: int, layers: int) -> dict[str, Tensor]:
    """fp16 tensors: per layer q_proj (h, h), up_proj (2h, h), down_proj (h, 2h), a norm."""
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, Tensor] = {}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for name, shape in (
            ("self_attn.q_proj.weight", (hidden, hidden)),
            ("mlp.up_proj.weight", (2 * hidden, hidden)),
            ("mlp.down_proj.weight", (hidden, 2 * hidden)),
        ):
            tensors[f"{prefix}.{name}"] = (0.02 * torch.randn(shape, generator=generator)).half()
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
    return tensors


def write_finetune(folder: Path, base: dict[str, Tensor], seed: int) -> Path:
    """A checkpoint of ``base`` plus small noise drawn from ``seed``: every delta new."""
    generator = torch.Generator().manual_seed(seed)
    tuned = {
        name: (t.float() + 1e-3 * torch.randn(t.shape, generator=generator)).half()
        for name, t in base.items()
    }
    return write_checkpoint(folder, tuned)


# --- operations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str
    started: float
    """time.monotonic() at the first attempt."""
    seconds: float
    nbytes: int
    error: str | None
    """None, or the status code name (a non-gRPC failure: its exception class)."""
    message: str


def attempt(kind: str, run: Callable[[], int]) -> Op:
    """Run ``run`` (it returns the bytes it moved) once; the outcome as an :class:`Op`."""
    started = time.monotonic()
    try:
        nbytes = run()
    except Exception as exc:  # every failure is a result here, never a dead worker
        return _failed(kind, started, exc)
    return Op(kind, started, time.monotonic() - started, nbytes, None, "")


def _failed(kind: str, started: float, exc: Exception) -> Op:
    code = exc.code.name if isinstance(exc, DeltaVaultError) else type(exc).__name__
    return Op(kind, started, time.monotonic() - started, 0, code, str(exc)[:200])


@dataclass(frozen=True)
class SeededRef:
    """What seeding stored under a ref: the readers' expected answers."""

    digest: Digest
    manifest: common_pb2.Manifest
    chunks: list[common_pb2.ChunkRef]
    nbytes: int


def manifest_chunks(manifest: common_pb2.Manifest) -> list[common_pb2.ChunkRef]:
    """Every chunk a manifest names: its tensors' parts, then its side files."""
    parts = [c for t in manifest.tensors for p in t.parts for c in p.chunks]
    return parts + [c for f in manifest.files for c in f.chunks]


@dataclass
class Load:
    """What every worker shares. Workers start no operation past ``deadline`` or once
    ``stop`` is set, and append their results to their own list in ``ops``."""

    settings: Settings
    store: str
    compressor: str
    work: Path
    base: Path
    base_tensors: dict[str, Tensor]
    seeded: dict[str, SeededRef]
    deadline: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    ops: list[list[Op]] = field(default_factory=list)

    def running(self) -> bool:
        return time.monotonic() < self.deadline and not self.stop.is_set()

    @property
    def streamed_bytes(self) -> int:
        """Bytes one compress streams: the base and the fine-tune."""
        return 2 * sum(t.nbytes for t in self.base_tensors.values())


def compress_worker(load: Load, index: int, ops: list[Op]) -> None:
    """Compress new fine-tunes to ``load/compress-<index>`` until the deadline."""
    ref = f"load/compress-{index}"
    with DeltaVault(load.store, load.compressor) as vault:
        for iteration in itertools.count():
            if not load.running():
                return
            folder = load.work / f"tuned-{index}-{iteration}"
            tuned = write_finetune(folder, load.base_tensors, 1_000_000 * (index + 1) + iteration)
            compress = partial(compress_once, vault, load, tuned, ref)
            ops.append(attempt("compress", compress))
            shutil.rmtree(folder)
            if ops[-1].error:
                time.sleep(ERROR_PAUSE_SECONDS)


def compress_once(vault: DeltaVault, load: Load, tuned: Path, ref: str) -> int:
    """One compress of the base and ``tuned`` to ``ref``; the bytes it streamed."""
    s = load.settings
    report = vault.compress(load.base, tuned, ref=ref, method=s.method, ratio=s.ratio, force=True)
    if report.tensor_count != len(load.base_tensors):
        raise Mismatch(f"{report.tensor_count} tensors stored of {len(load.base_tensors)}")
    return load.streamed_bytes


def reader_worker(load: Load, index: int, ops: list[Op]) -> None:
    """Resolve, fetch the manifest of and read a random seeded ref until the deadline."""
    rng = random.Random(index)
    refs = sorted(load.seeded)
    with StoreClient(load.store) as store:
        while load.running():
            ref = rng.choice(refs)
            for kind, step in read_steps(store, ref, load.seeded[ref]):
                ops.append(attempt(kind, step))
                if ops[-1].error:
                    time.sleep(ERROR_PAUSE_SECONDS)
                    break


def read_steps(
    store: StoreClient, ref: str, want: SeededRef
) -> list[tuple[str, Callable[[], int]]]:
    """A reader's three operations on ``ref``, each checking its answer."""

    def resolve() -> int:
        if (got := store.resolve_ref(ref)) != want.digest:
            raise Mismatch(f"{ref} resolved to {got}, not {want.digest}")
        return 0

    def manifest() -> int:
        if store.get_manifest(want.digest) != want.manifest:
            raise Mismatch(f"manifest {want.digest} differs from the one stored")
        return 0

    def read() -> int:
        data = store.read(want.chunks)  # each chunk checked against its digest and size
        if len(data) != want.nbytes:
            raise Mismatch(f"{len(data)} bytes read of {want.nbytes}")
        return len(data)

    return [("resolve", resolve), ("manifest", manifest), ("read", read)]


def seed(load: Load) -> None:
    """Store ``seed_refs`` lossless fine-tunes under ``load/seed-<i>`` and note what each
    ref's reader must get back."""
    with DeltaVault(load.store, load.compressor) as vault:
        for i in range(load.settings.seed_refs):
            ref = f"load/seed-{i}"
            tuned = write_finetune(load.work / f"seed-{i}", load.base_tensors, seed=i + 1)
            report = vault.compress(
                load.base, tuned, ref=ref, method="lossless", ratio=None, force=True
            )
            digest = Digest.parse(report.manifest)
            manifest = vault.store.get_manifest(digest)
            chunks = manifest_chunks(manifest)
            load.seeded[ref] = SeededRef(digest, manifest, chunks, sum(c.size for c in chunks))


# --- running the workers -----------------------------------------------------------------


def start_workers(load: Load) -> list[threading.Thread]:
    """Daemon threads (one stuck in a call must not keep the process alive)."""
    threads = []
    kinds = [(compress_worker, load.settings.compressors), (reader_worker, load.settings.readers)]
    for worker, count in kinds:
        for index in range(count):
            ops: list[Op] = []
            load.ops.append(ops)
            thread = threading.Thread(
                target=guarded,
                args=(worker, load, index, ops),
                name=f"{worker.__name__}-{index}",
                daemon=True,
            )
            thread.start()
            threads.append(thread)
    return threads


def guarded(
    worker: Callable[[Load, int, list[Op]], None], load: Load, index: int, ops: list[Op]
) -> None:
    """``worker``, with anything it raises outside an operation (a checkpoint it could
    not write) recorded as a failed ``worker`` operation rather than lost in a dead thread."""
    try:
        worker(load, index, ops)
    except Exception as exc:
        ops.append(_failed("worker", time.monotonic(), exc))


def join_all(threads: list[threading.Thread], until: float) -> list[str]:
    """Wait for the threads until ``until`` (monotonic); the names of those still running.
    Short waits, so a Ctrl-C in the main thread is seen at once."""
    for thread in threads:
        while thread.is_alive() and time.monotonic() < until:
            thread.join(timeout=0.5)
    return [t.name for t in threads if t.is_alive()]


class RssSampler(threading.Thread):
    """VmRSS of some processes every ``SAMPLE_SECONDS``: (monotonic time, name, bytes)."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pids = pids
        self.samples: list[tuple[float, str, int]] = []
        self.done = threading.Event()

    def sample(self) -> None:
        now = time.monotonic()
        for name, pid in self.pids.items():
            rss = proc_status_bytes(pid, "VmRSS")
            if rss is not None:
                self.samples.append((now, name, rss))

    def run(self) -> None:
        while not self.done.wait(SAMPLE_SECONDS):
            self.sample()


# --- the report --------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank ``q`` quantile of a sorted, non-empty list."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def op_table(ops: list[Op], elapsed: float) -> list[str]:
    by_kind: dict[str, list[Op]] = {kind: [] for kind in KINDS}
    for op in ops:
        by_kind.setdefault(op.kind, []).append(op)
    lines = [
        f"{'op':<9}{'ok':>7}  {'errors':<24}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'ops/s':>8}{'MiB/s':>8}"
    ]
    for kind, done in by_kind.items():
        ok = sorted(op.seconds * 1000 for op in done if op.error is None)
        errors = Counter(op.error for op in done if op.error is not None)
        text = ", ".join(f"{code} {n}" for code, n in errors.most_common()) or "-"
        p50, p99, top = (
            (_ms(percentile(ok, 0.5)), _ms(percentile(ok, 0.99)), _ms(ok[-1])) if ok else ("-",) * 3
        )
        mib = sum(op.nbytes for op in done) / MiB / elapsed
        lines.append(
            f"{kind:<9}{len(ok):>7}  {text:<24}{p50:>9}{p99:>9}{top:>9}"
            f"{len(ok) / elapsed:>8.1f}{mib:>8.1f}"
        )
    return lines


def _ms(value: float) -> str:
    return f"{value:.0f}"


@dataclass(frozen=True)
class ProcessFigures:
    name: str
    pid: int
    idle: int
    start: int
    peak: int
    hwm: int | None
    first_quarter: int | None
    last_quarter: int | None
    cpu: float | None


def process_figures(
    name: str, pid: int, samples: list[tuple[float, str, int]], window: tuple[float, float]
) -> ProcessFigures:
    """The first of ``name``'s samples is taken idle, before seeding; the second at the
    load's start."""
    mine = [(t, rss) for t, n, rss in samples if n == name]
    begin, end = window
    quarter = (end - begin) / 4
    first = [rss for t, rss in mine if begin <= t < begin + quarter]
    last = [rss for t, rss in mine if end - quarter <= t <= end]
    return ProcessFigures(
        name,
        pid,
        mine[0][1],
        mine[1][1],
        max(rss for _, rss in mine),
        proc_status_bytes(pid, "VmHWM"),
        max(first, default=None),
        max(last, default=None),
        cpu_seconds(pid),
    )


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.0f}"


def process_table(rows: list[ProcessFigures]) -> list[str]:
    lines = [
        f"{'process':<11}{'pid':>8}{'idle MiB':>10}{'start MiB':>11}{'peak MiB':>10}"
        f"{'VmHWM MiB':>11}{'Q1 max MiB':>12}{'Q4 max MiB':>12}{'cpu s':>8}"
    ]
    for r in rows:
        cpu = "-" if r.cpu is None else f"{r.cpu:.0f}"
        lines.append(
            f"{r.name:<11}{r.pid:>8}{_mib(r.idle):>10}{_mib(r.start):>11}{_mib(r.peak):>10}"
            f"{_mib(r.hwm):>11}{_mib(r.first_quarter):>12}{_mib(r.last_quarter):>12}{cpu:>8}"
        )
    return lines


# --- the run -----------------------------------------------------------------------------


def start_store(settings: Settings, work: Path, s3: SeaweedS3 | None) -> ServiceProcess:
    if s3 is None:
        backend = ["--backend", "local", "--root", str(work / "store")]
        env = {}
    else:
        backend = ["--backend", "s3", "--endpoint", s3.endpoint, "--bucket", "load"]
        backend += ["--access-key", s3.access_key]
        env = {"DELTAVAULT_STORE_SECRET_KEY": s3.secret_key}  # not on the command line
    args = [*backend, *SERVER_FLAGS, *settings.store_args]
    return ServiceProcess.start(
        "store", "store_svc", args, free_port(), log=work / "store.log", env=env
    )


def start_compressor(settings: Settings, work: Path, store: str) -> ServiceProcess:
    """One worker thread per stream (+2 for health checks), one torch thread each: 16 streams
    on a 2-core machine are 16 threads, not 16 teams of 2."""
    workers = str(settings.compressors + 2)
    args = ["--store", store, "--workers", workers, "--torch-threads", "1", *SERVER_FLAGS]
    args += settings.compressor_args
    log = work / "compressor.log"
    return ServiceProcess.start("compressor", "compressor_svc", args, free_port(), log=log)


@contextlib.contextmanager
def services(settings: Settings, work: Path) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """The store and the compressor, serving; both stopped (compressor first) on exit.
    Both boot at once: the compressor needs the store only when a stream arrives."""
    with SeaweedS3() if settings.backend == "s3" else contextlib.nullcontext() as s3:
        store = start_store(settings, work, s3)
        compressor = None
        try:
            compressor = start_compressor(settings, work, store.target)
            store.wait_serving()
            compressor.wait_serving()
            yield store, compressor
        finally:
            for process in (compressor, store):
                if process is not None:
                    process.stop(STOP_SECONDS)


@dataclass
class Outcome:
    ops: list[Op]
    elapsed: float
    stragglers: list[str]
    figures: list[ProcessFigures]
    servers: list[ServiceProcess]
    died: list[str]
    """Servers that had exited before the load was over."""
    shed: dict[str, Counter[str]]
    """Per live server: the calls its admission limits shed, by method."""


def run_load(load: Load, servers: list[ServiceProcess]) -> Outcome:
    """Seed, run the workers to the deadline (plus the margin at most), measure."""
    pids = {s.name: s.pid for s in servers} | {"client": os.getpid()}
    sampler = RssSampler(pids)
    sampler.sample()  # idle
    seed(load)
    sampler.sample()  # at the start
    started = time.monotonic()
    load.deadline = started + load.settings.seconds
    sampler.start()
    try:
        threads = start_workers(load)
        stragglers = join_all(threads, load.deadline + load.settings.margin)
    finally:
        load.stop.set()
        sampler.done.set()
    elapsed = time.monotonic() - started
    window = (started, load.deadline)
    figures = [process_figures(n, pid, sampler.samples, window) for n, pid in pids.items()]
    died = [s.name for s in servers if s.process.poll() is not None]
    shed = {s.name: shed_calls(s) for s in servers if s.name not in died}
    ops = [op for worker in load.ops for op in worker]
    return Outcome(ops, elapsed, stragglers, figures, servers, died, shed)


def shed_calls(server: ServiceProcess) -> Counter[str]:
    """The calls ``server`` answered RESOURCE_EXHAUSTED, by method (its /metrics)."""
    return Counter({m: int(float(n)) for m, n in SHED.findall(server.metrics())})


def failures(outcome: Outcome) -> list[str]:
    """Why the run failed; empty when it did not."""
    reasons = [
        f"{n} {op} operation(s) failed"
        for op, n in Counter(o.kind for o in outcome.ops if o.error is not None).items()
    ]
    if outcome.stragglers:
        reasons.append(f"{len(outcome.stragglers)} worker(s) still running past the margin")
    for server in outcome.servers:
        if server.name in outcome.died:
            reasons.append(f"{server.name} died during the load (exit {server.exit_code})")
        elif server.exit_code:
            reasons.append(f"{server.name} exited {server.exit_code} after SIGTERM")
    return reasons


def report(settings: Settings, load: Load, outcome: Outcome) -> list[str]:
    model = load.streamed_bytes / 2 / MiB
    seeded = next(iter(load.seeded.values())).nbytes / MiB
    lines = [
        f"load: {settings.compressors} compress streams ({settings.method} {settings.ratio:g}x, "
        f"{settings.layers} layers at hidden {settings.hidden}: {model:.1f} MiB fp16 per model), "
        f"{settings.readers} readers of {settings.seed_refs} lossless refs ({seeded:.2f} MiB "
        f"each), {settings.seconds:g} s, {settings.backend} backend, {os.cpu_count()} CPUs",
        f"store args: {shlex.join(settings.store_args) or '-'}; "
        f"compressor args: {shlex.join(settings.compressor_args) or '-'}",
        f"ran {outcome.elapsed:.1f} s: {settings.seconds:g} s of load, then the last operations "
        f"(up to {settings.margin:g} s allowed)",
        "",
        *op_table(outcome.ops, outcome.elapsed),
        "",
        *process_table(outcome.figures),
    ]
    shed = (
        f"{name} " + (", ".join(f"{m} {n}" for m, n in calls.most_common()) or "none")
        for name, calls in outcome.shed.items()
    )
    lines.append(f"calls shed by admission limits (retried by the clients): {'; '.join(shed)}")
    logs = (f"{s.name} {s.log_lines()}" for s in outcome.servers)
    lines.append(f"server log lines (WARNING and up): {', '.join(logs)}")
    first_errors: dict[tuple[str, str], str] = {}
    for op in outcome.ops:
        if op.error is not None:
            first_errors.setdefault((op.kind, op.error), op.message)
    lines += [f"first {kind} {code}: {message}" for (kind, code), message in first_errors.items()]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        base_tensors = base_model(settings.hidden, settings.layers)
        base = write_checkpoint(work / "base", base_tensors)
        try:
            with services(settings, work) as (store, compressor):
                load = Load(settings, store.target, compressor.target, work, base, base_tensors, {})
                outcome = run_load(load, [store, compressor])
        except KeyboardInterrupt:
            print("interrupted: servers stopped", file=sys.stderr)
            return 130
        reasons = failures(outcome)
        print("\n".join(report(settings, load, outcome)))
        for server in outcome.servers if reasons else ():
            print(f"--- {server.name} log ends:\n{server.log_tail()}")
    print("FAILED: " + "; ".join(reasons) if reasons else "OK: every operation succeeded")
    return 1 if reasons else 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM as Ctrl-C: the servers are stopped on the way out."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
