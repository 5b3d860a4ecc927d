"""``python -m compressor_svc``: run the compressor. Every flag also reads
DELTAVAULT_COMPRESSOR_<FLAG>."""

from __future__ import annotations

import clients.runtime_defaults  # noqa: F401  (first: before torch loads)

# isort: split

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from compressor_svc.config import CompressorConfig, Device
from compressor_svc.server import serve
from store_svc.serving import (
    add_limit_flags,
    add_security_flags,
    limits_from_args,
    run_command,
    server_tls_from_args,
)

_DEFAULTS = CompressorConfig()
ENV_PREFIX = "DELTAVAULT_COMPRESSOR_"


def _env(flag: str, default: object) -> object:
    """Default for ``--flag``: env DELTAVAULT_COMPRESSOR_FLAG if set, else ``default``."""
    return os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_"), default)


def add_server_flags(p: argparse.ArgumentParser, *, with_store: bool = True) -> None:
    """The compressor's flags (``deltavault serve`` reuses them without ``--store``)."""
    d = _DEFAULTS
    if with_store:
        p.add_argument(
            "--store", default=_env("store", d.store), help=f"delta store host:port ({d.store})"
        )
    p.add_argument(
        "--host", default=_env("host", d.host), help=f"address to bind ({d.host}; 0.0.0.0 in pods)"
    )
    p.add_argument(
        "--device",
        choices=[x.value for x in Device],
        default=_env("device", d.device.value),
        help="where the methods run: cuda, cpu, or auto (cuda if visible)",
    )
    flags: list[tuple[str, type, object, str]] = [
        ("max-frame-bytes", int, d.max_frame_bytes, "largest data bytes in one frame"),
        ("max-tensor-bytes", int, d.max_tensor_bytes, "largest single tensor accepted"),
        ("max-inflight-bytes", int, d.max_inflight_bytes, "unfinished tensor bytes per stream"),
        ("workers", int, d.workers, "streams served at once"),
        ("torch-threads", int, d.torch_threads, "intra-op threads; 0: every core"),
        ("shutdown-grace-seconds", float, d.shutdown_grace_seconds, "drain time on SIGTERM"),
        ("store-timeout-seconds", float, d.store_timeout_seconds, "deadline of store calls"),
    ]
    for flag, kind, default, text in flags:
        p.add_argument(
            f"--{flag}", type=kind, default=_env(flag, default), help=f"{text} ({default})"
        )
    add_limit_flags(p, _env, _DEFAULTS.limits)
    add_security_flags(p, _env)
    p.add_argument(
        "--spill-dir",
        type=Path,
        default=_env("spill-dir", None),
        help="local disk for model-wide allocation's factors (default: the temp dir)",
    )
    p.add_argument(
        "--signing-key",
        type=Path,
        default=_env("signing-key", None),
        help="Ed25519 private key (PEM) that signs every manifest committed "
        "(deltavault keys generate); default: unsigned",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compressor_svc",
        description="deltavault compressor: streams base and fine-tuned tensors in, compresses "
        "each delta (adamix, deltadq, deltacome, bitdelta, dare) and writes it to the delta "
        f"store. Every flag can also be set by {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PORT).",
    )
    add_server_flags(p)
    p.add_argument(
        "--port", type=int, default=_env("port", _DEFAULTS.port), help="gRPC port (0: any free)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=_env("metrics-port", _DEFAULTS.metrics_port),
        help="Prometheus /metrics port (-1 disables)",
    )
    p.add_argument("--log-level", default=_env("log-level", "INFO"), help="logging level")
    return p


def config_from_args(args: argparse.Namespace, **overrides: object) -> CompressorConfig:
    values: dict[str, object] = {
        "host": args.host,
        "device": Device(args.device),
        "max_frame_bytes": int(args.max_frame_bytes),
        "max_tensor_bytes": int(args.max_tensor_bytes),
        "max_inflight_bytes": int(args.max_inflight_bytes),
        "workers": int(args.workers),
        "torch_threads": int(args.torch_threads),
        "shutdown_grace_seconds": float(args.shutdown_grace_seconds),
        "store_timeout_seconds": float(args.store_timeout_seconds),
        "spill_dir": Path(args.spill_dir) if args.spill_dir else None,
        "tls": server_tls_from_args(args),
        "health_port": int(args.health_port),
        "auth_tokens": Path(args.auth_tokens) if args.auth_tokens else None,
        "limits": limits_from_args(args),
        "signing_key": Path(args.signing_key) if args.signing_key else None,
    }
    if hasattr(args, "store"):
        values["store"] = args.store
    if hasattr(args, "port"):
        values["port"], values["metrics_port"] = int(args.port), int(args.metrics_port)
    values.update(overrides)
    return CompressorConfig(**values)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), config_from_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
