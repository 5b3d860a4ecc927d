"""``python -m store_svc``: run the delta store. Every flag also reads DELTAVAULT_STORE_<FLAG>."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from store_svc.cas import CompressionPolicy
from store_svc.config import (
    BackendKind,
    S3Settings,
    ServerSideEncryption,
    SseMode,
    StoreConfig,
)
from store_svc.server import serve
from store_svc.serving import (
    add_limit_flags,
    add_security_flags,
    limits_from_args,
    run_command,
    server_tls_from_args,
)

_DEFAULTS = StoreConfig(root=Path("."))


def _env(flag: str, default: object) -> object:
    """Default for ``--flag``: env DELTAVAULT_STORE_FLAG if set, else ``default``."""
    return os.environ.get("DELTAVAULT_STORE_" + flag.upper().replace("-", "_"), default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m store_svc",
        description="deltavault delta store: a content-addressed chunk store with manifests and "
        "refs, over a local folder or any S3 API. Every flag can also be set by the "
        "environment variable DELTAVAULT_STORE_<FLAG> (e.g. DELTAVAULT_STORE_PORT).",
    )
    p.add_argument(
        "--backend",
        choices=[b.value for b in BackendKind],
        default=_env("backend", "local"),
        help="object storage (default: local)",
    )
    p.add_argument(
        "--root", type=Path, default=_env("root", None), help="folder of the local backend"
    )
    p.add_argument(
        "--endpoint", default=_env("endpoint", None), help="S3 endpoint host:port, no scheme"
    )
    p.add_argument("--bucket", default=_env("bucket", "deltavault"), help="S3 bucket")
    p.add_argument("--access-key", default=_env("access-key", None), help="S3 access key")
    p.add_argument(
        "--secret-key",
        default=_env("secret-key", None),
        help="S3 secret key (prefer the environment variable to the flag)",
    )
    p.add_argument("--region", default=_env("region", None), help="S3 region")
    p.add_argument(
        "--secure",
        action="store_true",
        default=_env("secure", "") == "true",
        help="HTTPS to the S3 endpoint",
    )
    p.add_argument(
        "--s3-ca-file",
        type=Path,
        default=_env("s3-ca-file", None),
        help="PEM CA bundle to trust for HTTPS to the S3 endpoint (a private CA; default: "
        "the system's)",
    )
    p.add_argument(
        "--sse",
        choices=[m.value for m in SseMode],
        default=_env("sse", SseMode.NONE.value),
        help="encryption at rest: none (default); s3 = SSE-S3, the S3 server encrypts with "
        "keys it manages (s3 backend only; MinIO needs a KMS); c = SSE-C with the key in "
        "--sse-key-file (on S3 the server encrypts with it and needs --secure; on the local "
        "backend the store encrypts every file with AES-256-GCM)",
    )
    p.add_argument(
        "--sse-key-file",
        type=Path,
        default=_env("sse-key-file", None),
        help="file holding the SSE-C key: 32 raw bytes, 64 hex digits or base64 (say, a "
        "mounted Secret); objects written under one key cannot be read under another",
    )
    p.add_argument(
        "--trusted-keys",
        type=Path,
        default=_env("trusted-keys", None),
        help="folder of Ed25519 *.pub keys: refuse manifests signed by any other key "
        "(deltavault keys generate)",
    )
    p.add_argument(
        "--require-signatures",
        action="store_true",
        default=_env("require-signatures", "") == "true",
        help="refuse unsigned manifests (signed by a --trusted-keys key, when given)",
    )
    p.add_argument(
        "--prefix",
        default=_env("prefix", ""),
        help="key prefix inside the bucket, to share one bucket",
    )
    p.add_argument(
        "--no-create-bucket",
        action="store_true",
        default=_env("no-create-bucket", "") == "true",
        help="fail instead of creating an absent bucket",
    )
    p.add_argument(
        "--host",
        default=_env("host", _DEFAULTS.host),
        help=f"address to bind (default {_DEFAULTS.host}; 0.0.0.0 in a container)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=_env("port", _DEFAULTS.port),
        help=f"gRPC port (default {_DEFAULTS.port}; 0 picks a free one)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=_env("metrics-port", _DEFAULTS.metrics_port),
        help=f"Prometheus /metrics port (default {_DEFAULTS.metrics_port}; -1 disables)",
    )
    p.add_argument(
        "--max-frame-bytes",
        type=int,
        default=_env("max-frame-bytes", _DEFAULTS.max_frame_bytes),
        help="largest chunk data in one stream message (default 2 MiB)",
    )
    p.add_argument(
        "--max-chunk-bytes",
        type=int,
        default=_env("max-chunk-bytes", _DEFAULTS.max_chunk_bytes),
        help="largest chunk accepted (default 64 MiB)",
    )
    p.add_argument(
        "--compression",
        choices=[c.value for c in CompressionPolicy],
        default=_env("compression", _DEFAULTS.compression.value),
        help="zstd per chunk: auto keeps it only where it saves 3%% (default auto)",
    )
    p.add_argument(
        "--gc-grace-seconds",
        type=float,
        default=_env("gc-grace-seconds", _DEFAULTS.gc_grace_seconds),
        help="unreferenced objects younger than this survive GC (default 3600)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=_env("workers", _DEFAULTS.workers),
        help=f"RPCs served at once (default {_DEFAULTS.workers})",
    )
    p.add_argument(
        "--io-threads",
        type=int,
        default=_env("io-threads", _DEFAULTS.io_threads),
        help=f"threads doing backend I/O for streams (default {_DEFAULTS.io_threads})",
    )
    p.add_argument(
        "--stream-window",
        type=int,
        default=_env("stream-window", _DEFAULTS.stream_window),
        help=f"chunks each stream writes or prefetches at once (default {_DEFAULTS.stream_window})",
    )
    p.add_argument(
        "--shutdown-grace-seconds",
        type=float,
        default=_env("shutdown-grace-seconds", _DEFAULTS.shutdown_grace_seconds),
        help="time in-flight calls get to finish after SIGTERM (default 30)",
    )
    add_limit_flags(p, _env, _DEFAULTS.limits)
    add_security_flags(p, _env)
    p.add_argument("--log-level", default=_env("log-level", "INFO"), help="logging level")
    return p


def config_from_args(args: argparse.Namespace) -> StoreConfig:
    s3 = None
    if args.backend == BackendKind.S3.value:
        missing = [f for f in ("endpoint", "access_key", "secret_key") if not getattr(args, f)]
        if missing:
            flags = ", ".join("--" + f.replace("_", "-") for f in missing)
            raise ValueError(f"the s3 backend needs {flags}")
        s3 = S3Settings(
            endpoint=args.endpoint,
            bucket=args.bucket,
            access_key=args.access_key,
            secret_key=args.secret_key,
            secure=args.secure,
            region=args.region,
            prefix=args.prefix,
            create_bucket=not args.no_create_bucket,
            ca_file=args.s3_ca_file,
        )
    config = StoreConfig(
        backend=BackendKind(args.backend),
        root=args.root,
        s3=s3,
        host=args.host,
        port=int(args.port),
        metrics_port=int(args.metrics_port),
        max_frame_bytes=int(args.max_frame_bytes),
        max_chunk_bytes=int(args.max_chunk_bytes),
        compression=CompressionPolicy(args.compression),
        gc_grace_seconds=float(args.gc_grace_seconds),
        workers=int(args.workers),
        io_threads=int(args.io_threads),
        stream_window=int(args.stream_window),
        shutdown_grace_seconds=float(args.shutdown_grace_seconds),
        tls=server_tls_from_args(args),
        health_port=int(args.health_port),
        auth_tokens=args.auth_tokens,
        limits=limits_from_args(args),
        encryption=ServerSideEncryption(SseMode(args.sse), args.sse_key_file),
        trusted_keys=args.trusted_keys,
        require_signatures=args.require_signatures,
    )
    if config.encryption.mode is SseMode.C:
        config.encryption.key()  # a bad key file is a usage error, before anything starts
    config.signature_policy()  # so is an unusable trusted keys folder
    return config


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), config_from_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
