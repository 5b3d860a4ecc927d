"""The main job of ``make demo``, as far as the project goes today: the store's round trip.

Starts the embedded default (the store on a local folder) as a real server process,
stores two checkpoints that share most tensors as lossless deltas, reads them back
bit-exactly, verifies every chunk, and prints what was stored and deduplicated. The
compressor issue replaces the synthetic checkpoints with a real fine-tuned model pair.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients._generated.deltavault.common.v1 import common_pb2
from clients.store_client import StoreClient
from store_svc.digest import Algorithm
from store_svc.manifests import FORMAT_VERSION

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYER_SHAPES = {
    "attention.query": (384, 384),
    "attention.output": (384, 384),
    "intermediate": (1536, 384),
    "output": (384, 1536),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_store(root: Path, port: int, metrics_port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "store_svc",
            "--backend",
            "local",
            "--root",
            str(root),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--log-level",
            "WARNING",
        ],
        cwd=REPO_ROOT,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return process
        except grpc.RpcError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the store did not become healthy within 30 s")


def checkpoint(seed: int, layers: int) -> dict[str, torch.Tensor]:
    """Deterministic fp16 weights, layer by layer."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"encoder.layer.{i}.{name}.weight": torch.randn(shape, generator=generator).half()
        for i in range(layers)
        for name, shape in LAYER_SHAPES.items()
    }


def store_checkpoint(
    client: StoreClient, tensors: dict[str, torch.Tensor], ref: str
) -> tuple[str, int, int]:
    """Upload every tensor losslessly and commit; returns (manifest, bytes, new bytes)."""
    manifest = common_pb2.Manifest(
        format_version=FORMAT_VERSION,
        digest_algorithm=Algorithm.BLAKE3.to_proto(),
        base_fingerprint="demo-base",
        producer="deltavault demo",
    )
    total = sent = 0
    for name, tensor in tensors.items():
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        chunks, stats = client.upload(data)
        total, sent = total + len(data), sent + stats.bytes_sent
        part = common_pb2.EncodedPart(
            name="values",
            dtype="float16",
            shape=list(tensor.shape),
            nbits=8 * len(data),
            byte_length=len(data),
            chunks=chunks,
        )
        manifest.tensors.add(
            name=name,
            kind=common_pb2.STORAGE_KIND_LOSSLESS,
            method="lossless",
            method_version=1,
            shape=list(tensor.shape),
            dtype="float16",
            parts=[part],
            nbits=part.nbits,
        )
    info = client.commit_manifest(manifest, ref=ref, force=True)
    return str(info.digest), total, sent


def read_back(client: StoreClient, ref: str) -> dict[str, torch.Tensor]:
    manifest = client.get_manifest(client.resolve_ref(ref))
    out = {}
    for entry in manifest.tensors:
        data = bytearray(client.read(entry.parts[0].chunks))
        out[entry.name] = torch.frombuffer(data, dtype=torch.float16).reshape(tuple(entry.shape))
    return out


def run(root: Path, layers: int) -> None:
    port, metrics_port = free_port(), free_port()
    process = start_store(root, port, metrics_port)
    print(f"store: local folder {root}, gRPC 127.0.0.1:{port}, metrics :{metrics_port}")
    try:
        with StoreClient(f"127.0.0.1:{port}") as client:
            base = checkpoint(seed=0, layers=layers)
            variant = dict(base)
            variant[f"encoder.layer.{layers - 1}.output.weight"] = checkpoint(1, layers)[
                f"encoder.layer.{layers - 1}.output.weight"
            ]
            print(f"{'ref':<18}{'manifest':<24}{'bytes':>12}{'new bytes':>12}{'read back':>11}")
            for ref, tensors in (("demo/base", base), ("demo/variant", variant)):
                digest, total, sent = store_checkpoint(client, tensors, ref)
                exact = all(torch.equal(read_back(client, ref)[n], t) for n, t in tensors.items())
                print(
                    f"{ref:<18}{digest[:22]:<24}{total:>12,}{sent:>12,}"
                    f"{'exact' if exact else 'MISMATCH':>11}"
                )
                if not exact:
                    raise SystemExit("read-back mismatch")
            report = client.verify()
            gc = client.collect_garbage(dry_run=True)
            print(
                f"verify: {report.chunks_checked} chunks, {report.bytes_checked:,} bytes, "
                f"{len(report.damaged)} damaged; gc dry run: {gc.chunks_live} live chunks, "
                f"{gc.chunks_swept} to sweep"
            )
    finally:
        process.terminate()
        process.wait(timeout=60)
    print(f"store stopped cleanly (exit code {process.returncode})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT / ".deltavault" / "demo-store")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--keep", action="store_true", help="keep the store folder from before")
    args = parser.parse_args(argv)
    if not args.keep:
        shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True, exist_ok=True)
    run(args.root, args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
