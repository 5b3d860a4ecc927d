"""Store throughput through the service next to the raw minio SDK, same S3 server.

``python -m tests.bench.bench_store [--mib 64] [--chunk-mib 4] [--repeats 3]``

Starts SeaweedFS on loopback (or uses DELTAVAULT_TEST_S3_ENDPOINT), then times:
- raw: ``minio`` put_object / get_object of each chunk, one at a time;
- service: ``StoreClient.upload`` (probe + stream + server-side verify + S3 write) and
  ``StoreClient.get_chunks`` (S3 read + verify + stream) of the same bytes, against
  ``python -m store_svc --backend s3`` running as its own process, as it is deployed.
Prints MiB/s and service/raw ratios (target >= 0.8). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from minio import Minio

from clients.store_client import StoreClient, cut_chunks
from store_svc.digest import Algorithm, Digest
from tests.support.children import free_port
from tests.support.seaweedfs import SeaweedS3

MiB = 1 << 20


def best_rate(total_bytes: int, repeats: int, run: Callable[[int], None]) -> float:
    """Best MiB/s over ``repeats`` runs; ``run(i)`` must move ``total_bytes`` each time."""
    best = float("inf")
    for i in range(repeats):
        start = time.perf_counter()
        run(i)
        best = min(best, time.perf_counter() - start)
    return total_bytes / MiB / best


@dataclass
class StoreProcess:
    process: subprocess.Popen[bytes]
    target: str

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def start_store_process(s3: SeaweedS3, workdir: str) -> StoreProcess:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "store_svc",
            "--backend",
            "s3",
            "--endpoint",
            s3.endpoint,
            "--bucket",
            "store",
            "--access-key",
            s3.access_key,
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            "--log-level",
            "WARNING",
        ],
        env={**os.environ, "DELTAVAULT_STORE_SECRET_KEY": s3.secret_key},
        cwd=workdir,
    )
    target = f"127.0.0.1:{port}"
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    for _ in range(300):
        try:
            health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            return StoreProcess(process, target)
        except grpc.RpcError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the store process did not start")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="bytes moved per run")
    parser.add_argument("--chunk-mib", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    chunk = args.chunk_mib * MiB
    total = args.mib * MiB

    with SeaweedS3() as s3, tempfile.TemporaryDirectory() as tmp:
        raw = Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False)
        raw.make_bucket("raw")
        payloads = [os.urandom(total) for _ in range(args.repeats)]  # fresh bytes per run

        def raw_put(i: int) -> None:
            for n, (_, piece) in enumerate(cut_chunks(payloads[i], chunk, Algorithm.BLAKE3)):
                raw.put_object("raw", f"run{i}/{n}", io.BytesIO(piece), len(piece))

        def raw_get(i: int) -> None:
            for n in range(total // chunk):
                response = raw.get_object("raw", f"run{i}/{n}")
                response.read()
                response.close()
                response.release_conn()

        server = start_store_process(s3, tmp)
        client = StoreClient(server.target, chunk_bytes=chunk)
        stored: list[list[tuple[Digest, int, int]]] = []

        def service_put(i: int) -> None:
            refs, stats = client.upload(payloads[i])
            assert stats.chunks_sent == len(refs)
            stored.append([(Digest.from_proto(r.digest), 0, 0) for r in refs])

        def service_get(i: int) -> None:
            for _ in client.get_chunks(stored[i]):
                pass

        try:
            rows = [
                (
                    "put",
                    best_rate(total, args.repeats, raw_put),
                    best_rate(total, args.repeats, service_put),
                ),
                (
                    "get",
                    best_rate(total, args.repeats, raw_get),
                    best_rate(total, args.repeats, service_get),
                ),
            ]
        finally:
            client.close()
            server.stop()

    print(
        f"{args.mib} MiB per run in {args.chunk_mib} MiB chunks, best of {args.repeats}, "
        f"S3 server at {s3.endpoint}"
    )
    print(f"{'op':<5}{'raw minio MiB/s':>17}{'service MiB/s':>15}{'ratio':>8}")
    for op, raw_rate, service_rate in rows:
        print(f"{op:<5}{raw_rate:>17.1f}{service_rate:>15.1f}{service_rate / raw_rate:>8.2f}")


if __name__ == "__main__":
    main()
