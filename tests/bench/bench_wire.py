"""One stream frame through protobuf against ``clients.wire``, per frame size: serializing
(``SerializeToString`` against ``serialize_with_bytes``), and receiving (``FromString``,
reading ``frame.data`` and copying it into its tensor, against ``parse_with_bytes`` and the
same copy from its view).

``python -m tests.bench.bench_wire [--repeats 500] [--server-malloc]``

Protobuf's cost depends on where glibc puts each message's buffer: with its default,
dynamic mmap threshold a fresh process maps (and faults in) every buffer above 128 KiB
until a large block has been freed; ``--server-malloc`` pins the threshold at 1 MiB as the
compressor does (``compressor_svc.server.return_freed_tensors_to_the_os``). Prints
microseconds per frame and MiB/s for each. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.wire import parse_with_bytes, serialize_with_bytes
from compressor_svc.server import return_freed_tensors_to_the_os

KIB = 1024
SIZES_KIB = (64, 128, 256, 512, 1024, 4096)


def microseconds(repeats: int, run: Callable[[], object]) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats * 1e6


def row(kib: int, protobuf: float, by_hand: float) -> str:
    mib = kib / KIB
    return (
        f"{kib:>5} KiB {protobuf:12.1f} {mib / protobuf * 1e6:8.0f} "
        f"{by_hand:11.1f} {mib / by_hand * 1e6:8.0f}"
    )


def serializing(repeats: int, kib: int) -> tuple[float, float]:
    data = bytes(kib * KIB)
    head = compressor_pb2.TensorFrame(name="w", shape=[1 << 20], dtype="float16")
    whole = compressor_pb2.CompressRequest()
    whole.frame.CopyFrom(head)
    whole.frame.data = data
    by_hand = partial(
        serialize_with_bytes,
        head,
        "data",
        data,
        wrapper=compressor_pb2.CompressRequest,
        wrapper_field="frame",
    )
    return microseconds(repeats, whole.SerializeToString), microseconds(repeats, by_hand)


def receiving(repeats: int, kib: int) -> tuple[float, float]:
    frame = compressor_pb2.TensorFrame(name="w", shape=[1 << 20], dtype="float16")
    frame.data = bytes(kib * KIB)
    serialized = compressor_pb2.CompressRequest(frame=frame).SerializeToString()
    array: Any = torch.empty(kib * KIB, dtype=torch.uint8).numpy()
    tensor = memoryview(array)

    def with_protobuf() -> None:
        tensor[:] = compressor_pb2.CompressRequest.FromString(serialized).frame.data

    def by_hand() -> None:
        tensor[:] = parse_with_bytes(serialized, compressor_pb2.CompressRequest, "frame", "data")[1]

    return microseconds(repeats, with_protobuf), microseconds(repeats, by_hand)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--server-malloc", action="store_true", help="malloc as the server")
    args = parser.parse_args(argv)
    if args.server_malloc:
        return_freed_tensors_to_the_os()
    for title, measure in (("serialize", serializing), ("receive", receiving)):
        print(f"{title:>9} {'protobuf us':>12} {'MiB/s':>8} {'by hand us':>11} {'MiB/s':>8}")
        for kib in SIZES_KIB:
            print(row(kib, *measure(args.repeats, kib)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
