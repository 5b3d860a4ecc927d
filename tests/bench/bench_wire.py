"""Serializing one stream frame: protobuf's ``SerializeToString`` against
``clients.wire.serialize_with_bytes``, per frame size, in this process's default malloc.

``python -m tests.bench.bench_wire [--repeats 500]``

Prints microseconds per frame and MiB/s for each. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.wire import serialize_with_bytes

KIB = 1024


def microseconds(repeats: int, run: Callable[[], object]) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args(argv)
    print(f"{'frame':>8} {'protobuf us':>12} {'MiB/s':>8} {'by hand us':>11} {'MiB/s':>8}")
    for kib in (64, 128, 256, 1024, 4096):
        data = bytes(kib * KIB)
        head = compressor_pb2.TensorFrame(name="w", shape=[1 << 20], dtype="float16")
        whole = compressor_pb2.CompressRequest()
        whole.frame.CopyFrom(head)
        whole.frame.data = data
        protobuf = microseconds(args.repeats, whole.SerializeToString)
        by_hand = microseconds(
            args.repeats,
            partial(
                serialize_with_bytes,
                head,
                "data",
                data,
                wrapper=compressor_pb2.CompressRequest,
                wrapper_field="frame",
            ),
        )
        mib = kib / KIB
        print(
            f"{kib:>5} KiB {protobuf:12.1f} {mib / protobuf * 1e6:8.0f} "
            f"{by_hand:11.1f} {mib / by_hand * 1e6:8.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
