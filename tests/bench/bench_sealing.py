"""What client-side sealing costs: StoreClient upload and read MiB/s, plain vs sealed, one store.

``python -m tests.bench.bench_sealing [--sizes 16 64 256] [--repeats 3] [--chunk-mib 4]
[--backend local|s3] [--store-arg=ARG]...``

Starts ``python -m store_svc`` as its own process on a free 127.0.0.1 port, over a local
folder in a temporary directory (or ``--backend s3``: SeaweedFS on loopback, see
``tests/support/seaweedfs.py``), and through one ``StoreClient`` times, per payload size
(MiB of random bytes):

- ``upload``: cut, digest, probe which chunks are missing, stream them (the sealed client
  seals every chunk first, so it digests and sends the sealed bytes);
- ``read``: stream every chunk back, verify it against its digest (and, sealed, open it).

Plain and sealed (``client.sealed(ChunkSealer(data_key))``) run in the same process against
the same server, alternating within each repeat (the first of the pair alternates too, so a
drift in the machine's speed falls on both), and every upload is of fresh random bytes, so
nothing deduplicates: each upload sends every chunk, which is checked. Each read is checked
against what was uploaded, outside the timing. Figures are medians over ``--repeats``.
Between sizes the store is emptied (garbage collection, grace 0: nothing has a ref).

Also times ``ChunkSealer.seal`` and ``open`` of one chunk in memory: the cost sealing adds
per byte, without a network or a store. The client and the server share the machine's
cores, so the server's CPU is on the clock too. The load average is printed before and
after: a busy machine makes every figure smaller. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from clients.sealing import OVERHEAD, ChunkSealer
from clients.store_client import StoreClient
from tests.support.children import free_port
from tests.support.processes import ServiceProcess
from tests.support.seaweedfs import SeaweedS3

T = TypeVar("T")

MiB = 1 << 20
MODES = ("plain", "sealed")
_STORE_FLAGS = ["--log-level", "WARNING", "--shutdown-grace-seconds", "5"]


@dataclass(frozen=True)
class Settings:
    sizes: list[int]
    """Payload sizes, MiB."""
    repeats: int
    chunk_mib: int
    backend: str
    raw_mib: int
    """Bytes per timing of the in-memory seal/open, MiB."""
    store_args: list[str]


def parse_settings(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_sealing",
        description=(__doc__ or "").splitlines()[0],
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[16, 64, 256],
        metavar="MIB",
        help="payload sizes in MiB (default: 16 64 256)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per size and mode (median)")
    p.add_argument("--chunk-mib", type=int, default=4, help="client chunk size (default 4)")
    p.add_argument("--backend", choices=["local", "s3"], default="local")
    p.add_argument(
        "--raw-mib",
        type=int,
        default=64,
        help="MiB sealed and opened per in-memory timing (default 64)",
    )
    p.add_argument(
        "--store-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="appended to the store's command line (repeatable), e.g. --store-arg=--workers=8",
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.chunk_mib < 1 or args.raw_mib < 1 or min(args.sizes) < 1:
        p.error("--sizes, --repeats, --chunk-mib and --raw-mib must be positive")
    return Settings(
        args.sizes, args.repeats, args.chunk_mib, args.backend, args.raw_mib, args.store_arg
    )


# --- the store ---------------------------------------------------------------------------------


@contextlib.contextmanager
def running_store(settings: Settings, work: Path) -> Iterator[tuple[ServiceProcess, str]]:
    """The store serving on loopback, and a description of its backend; stopped on exit."""
    with SeaweedS3() if settings.backend == "s3" else contextlib.nullcontext() as s3:
        if s3 is None:
            backend = ["--backend", "local", "--root", str(work / "store")]
            env: dict[str, str] = {}
            where = f"a local folder ({work / 'store'})"
        else:
            backend = ["--backend", "s3", "--endpoint", s3.endpoint, "--bucket", "sealing"]
            backend += ["--access-key", s3.access_key]
            env = {"DELTAVAULT_STORE_SECRET_KEY": s3.secret_key}  # not on the command line
            where = f"S3 (SeaweedFS at {s3.endpoint})"
        store = ServiceProcess.start(
            "store",
            "store_svc",
            [*backend, *_STORE_FLAGS, *settings.store_args],
            free_port(),
            log=work / "store.log",
            env=env,
        )
        try:
            store.wait_serving()
            yield store, where
        finally:
            store.stop(30)


# --- timings -----------------------------------------------------------------------------------


@dataclass
class Figures:
    """Per size and mode, the MiB/s of each repeat."""

    up: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    down: dict[tuple[int, str], list[float]] = field(default_factory=dict)

    def add(self, size: int, mode: str, up: float, down: float) -> None:
        self.up.setdefault((size, mode), []).append(up)
        self.down.setdefault((size, mode), []).append(down)


def timed(run: Callable[[], T]) -> tuple[float, T]:
    """Seconds ``run()`` took, and what it returned."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def round_trip(client: StoreClient, size_mib: int, chunk_bytes: int) -> tuple[float, float]:
    """Upload ``size_mib`` MiB of fresh random bytes and read them back: (up, down) MiB/s."""
    payload = os.urandom(size_mib * MiB)
    up_seconds, (refs, stats) = timed(lambda: client.upload(payload))
    chunks = -(-len(payload) // chunk_bytes)
    # Nothing deduplicated: every chunk sent, sealed ones OVERHEAD bytes larger each.
    assert stats.chunks == stats.chunks_sent == chunks, stats
    extra = 0 if client.sealer is None else chunks * OVERHEAD
    assert stats.bytes_sent == len(payload) + extra, stats
    down_seconds, back = timed(lambda: client.read(refs))
    if back != payload:
        raise RuntimeError(f"{size_mib} MiB read back differ from what was uploaded")
    return size_mib / up_seconds, size_mib / down_seconds


def measure_store(settings: Settings, client: StoreClient, sealed: StoreClient) -> Figures:
    figures = Figures()
    clients = {"plain": client, "sealed": sealed}
    chunk_bytes = settings.chunk_mib * MiB
    for size in settings.sizes:
        for repeat in range(settings.repeats):
            order = MODES if repeat % 2 == 0 else MODES[::-1]
            for mode in order:
                up, down = round_trip(clients[mode], size, chunk_bytes)
                figures.add(size, mode, up, down)
        client.collect_garbage(grace_seconds=0)  # nothing has a ref: empty the store
    return figures


def measure_raw(settings: Settings) -> tuple[float, float]:
    """In-memory ``seal`` and ``open`` MiB/s of one chunk, each the median of the repeats."""
    sealer = ChunkSealer(os.urandom(32))
    chunk_mib = settings.chunk_mib
    plain = os.urandom(chunk_mib * MiB)
    rounds = max(1, settings.raw_mib // chunk_mib)
    sealed = bytes(sealer.seal(plain))
    if sealer.open(sealed) != plain:
        raise RuntimeError("a sealed chunk did not open to its plaintext")

    def seal_all() -> None:
        for _ in range(rounds):
            sealer.seal(plain)

    def open_all() -> None:
        for _ in range(rounds):
            sealer.open(sealed)

    seal_rates, open_rates = [], []
    for _ in range(max(3, settings.repeats)):
        seal_rates.append(rounds * chunk_mib / timed(seal_all)[0])
        open_rates.append(rounds * chunk_mib / timed(open_all)[0])
    return statistics.median(seal_rates), statistics.median(open_rates)


# --- report ------------------------------------------------------------------------------------


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def report(settings: Settings, figures: Figures, raw: tuple[float, float]) -> list[str]:
    lines = [
        f"{'size':>8} | {'up plain':>9} {'up sealed':>10} {'ratio':>6} | "
        f"{'down plain':>10} {'down sealed':>12} {'ratio':>6}   (MiB/s)",
    ]
    for size in settings.sizes:
        up = [statistics.median(figures.up[size, mode]) for mode in MODES]
        down = [statistics.median(figures.down[size, mode]) for mode in MODES]
        lines.append(
            f"{size:>4} MiB | {up[0]:>9.1f} {up[1]:>10.1f} {up[1] / up[0]:>6.2f} | "
            f"{down[0]:>10.1f} {down[1]:>12.1f} {down[1] / down[0]:>6.2f}"
        )
    seal, open_ = raw
    lines.append(
        f"in memory, one {settings.chunk_mib} MiB chunk: seal {seal:.1f} MiB/s, "
        f"open {open_:.1f} MiB/s"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-sealing-") as tmp:
        with running_store(settings, Path(tmp)) as (store, where):
            client = StoreClient(store.target, chunk_bytes=settings.chunk_mib * MiB)
            sealed = client.sealed(ChunkSealer(os.urandom(32)))
            try:
                figures = measure_store(settings, client, sealed)
            except KeyboardInterrupt:
                print("interrupted: store stopped", file=sys.stderr)
                return 130
            finally:
                sealed.close()
                client.close()
        raw = measure_raw(settings)
    print(
        f"store at {store.target} over {where}; {settings.chunk_mib} MiB chunks; "
        f"median of {settings.repeats}, plain and sealed alternating"
    )
    print(f"{os.cpu_count()} CPUs; load average {before} before, {load_average()} after")
    print("\n".join(report(settings, figures, raw)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
