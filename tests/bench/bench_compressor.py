"""Compressor ingest next to a raw gRPC byte stream of the same size, and its peak memory.

``python -m tests.bench.bench_compressor [--tensors 8] [--mib 64] [--repeats 2]``

Writes a synthetic fp16 base/fine-tuned pair (``--tensors`` matrices of ``--mib`` MiB each),
starts ``deltavault serve`` (store on a local folder + compressor) as its own process, and
a raw sink as another, then times, best of ``--repeats``:

- raw: the same bytes, in frames of the same size (``--frame-kib``), over one gRPC client
  stream into a server that only counts them (the floor any gRPC ingest pays);
- ingest: ``DeltaVault.compress`` of a pair whose tensors are equal (every delta is zero):
  the checkpoint read, framing, server assembly and pairing, nothing encoded or stored;
- lossless: the real pair stored exactly (encode, hash, upload to the store on disk; once,
  then again, best of ``--repeats``, when the store already holds every chunk);
- reconstruct: that delta rebuilt into a checkpoint by the SDK (store reads, decode, add,
  write), and by the Reconstruct RPC (base streamed in, fine-tuned tensors streamed back).

Prints MiB/s (bytes streamed to the compressor, both sides), ingest/raw (target >= 0.8),
and the server's peak RSS against the largest tensor (target <= 3 x largest + 300 MB).
A benchmark, not a test.
"""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.compressor_client import DEFAULT_FRAME_BYTES, CompressorClient
from clients.safetensors_io import Checkpoint
from clients.sdk import DeltaVault
from tests.support.checkpoints import write_checkpoint
from tests.support.children import free_port
from tests.support.embedded import REPO_ROOT, EmbeddedServer

MiB = 1 << 20
SINK_METHOD = "/bench.Sink/Take"


def run_sink(port: int) -> None:
    """A gRPC server whose one client-streaming method counts the bytes it is sent."""

    def take(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return str(sum(len(r) for r in requests)).encode()

    handler = grpc.method_handlers_generic_handler(
        "bench.Sink", {"Take": grpc.stream_unary_rpc_method_handler(take)}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(4),
        options=[("grpc.max_receive_message_length", 8 * MiB)],
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def raw_stream(target: str, total: int, frame_bytes: int) -> None:
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 8 * MiB)])
    take: Any = channel.stream_unary(SINK_METHOD)
    frame = bytes(frame_bytes)
    frames = (frame for _ in range(total // frame_bytes))
    grpc.channel_ready_future(channel).result(timeout=30)
    assert int(take(frames, timeout=600)) == total // frame_bytes * frame_bytes
    channel.close()


def rebuild_over_rpc(target: str, ref: str, base: Path) -> None:
    """Stream the base to the compressor's Reconstruct and take the rebuilt tensors back."""
    header = compressor_pb2.ReconstructHeader(ref=ref, add_base=True)
    with CompressorClient(target) as client:
        for _ in client.reconstruct(header, Checkpoint(base).iter_tensors()):
            pass


def write_pair(root: Path, tensors: int, mib: int) -> tuple[Path, Path, Path]:
    """(base, fine-tune, equal copy of the base): fp16 matrices of ``mib`` MiB each."""
    cols = 1024
    rows = mib * MiB // (2 * cols)
    generator = torch.Generator().manual_seed(0)
    base = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(rows, cols, generator=generator).half()
        for i in range(tensors)
    }
    tuned = {
        n: (t.float() + 1e-3 * torch.randn(t.shape, generator=generator)).half()
        for n, t in base.items()
    }
    return (
        write_checkpoint(root / "base", base),
        write_checkpoint(root / "tuned", tuned),
        write_checkpoint(root / "same", base),
    )


def best_seconds(repeats: int, run: Callable[[int], object]) -> float:
    best = float("inf")
    for i in range(repeats):
        started = time.perf_counter()
        run(i)
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--frame-kib", type=int, default=DEFAULT_FRAME_BYTES // 1024, help="frame size, SDK and raw"
    )
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        run_sink(args.sink)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-compressor-") as work:
        root = Path(work)
        base, tuned, same = write_pair(root, args.tensors, args.mib)
        streamed = 2 * args.tensors * args.mib * MiB
        port = free_port()
        sink = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.bench_compressor", "--sink", str(port)],
            cwd=REPO_ROOT,
        )
        try:
            raw = best_seconds(
                args.repeats,
                lambda _: raw_stream(f"127.0.0.1:{port}", streamed, args.frame_kib * 1024),
            )
        finally:
            sink.terminate()
            sink.wait()
        with (
            EmbeddedServer(root / "store") as server,
            DeltaVault(server.store, server.compressor, frame_bytes=args.frame_kib * 1024) as vault,
        ):
            ingest = best_seconds(
                args.repeats,
                lambda i: vault.compress(
                    base, same, ref=f"bench/zero-{i}", method="lossless", ratio=None
                ),
            )

            def exact(i: int) -> object:
                return vault.compress(
                    base, tuned, ref=f"bench/exact-{i}", method="lossless", ratio=None
                )

            lossless = best_seconds(1, exact)  # every chunk new to the store
            again = best_seconds(args.repeats, lambda i: exact(i + 1))  # every chunk present
            peak = server.peak_rss_bytes()
            rebuilt = args.tensors * args.mib * MiB / MiB
            sdk_rebuild = best_seconds(
                args.repeats,
                lambda i: vault.reconstruct("bench/exact-0", base, root / f"rebuilt-{i}"),
            )
            rpc_rebuild = best_seconds(
                args.repeats, lambda _: rebuild_over_rpc(server.compressor, "bench/exact-0", base)
            )
    rate = streamed / MiB
    print(f"streamed {rate:.0f} MiB ({args.tensors} x {args.mib} MiB fp16, base + fine-tune)")
    print(f"raw gRPC stream        {rate / raw:8.1f} MiB/s")
    print(
        f"compressor ingest      {rate / ingest:8.1f} MiB/s   ratio {raw / ingest:.2f} "
        "(target >= 0.8)"
    )
    print(f"lossless, stored       {rate / lossless:8.1f} MiB/s   ratio {raw / lossless:.2f}")
    print(f"lossless, again        {rate / again:8.1f} MiB/s   (every chunk already stored)")
    print(f"reconstruct, SDK       {rebuilt / sdk_rebuild:8.1f} MiB/s   (fine-tune bytes written)")
    print(f"Reconstruct RPC        {rebuilt / rpc_rebuild:8.1f} MiB/s   (base in, fine-tune back)")
    largest = args.mib * MiB
    print(
        f"server peak RSS {peak / MiB:.0f} MiB; largest tensor {args.mib} MiB; "
        f"budget 3 x largest + 300 MB = {(3 * largest + 300e6) / MiB:.0f} MiB "
        f"({'within' if peak <= 3 * largest + 300e6 else 'OVER'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
