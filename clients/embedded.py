"""``deltavault serve``: the embedded default, the store on a local folder and a compressor
in one process, each on its own port, with one /metrics endpoint for both."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from compressor_svc.__main__ import add_server_flags, config_from_args
from compressor_svc.server import build_server as build_compressor
from store_svc.config import StoreConfig
from store_svc.server import build_server as build_store
from store_svc.serving import configure_logging, wait_for_signal

log = logging.getLogger("deltavault.serve")


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, required=True, help="folder the store keeps data in")
    p.add_argument("--store-port", type=int, default=50061, help="store gRPC port (0: any)")
    p.add_argument(
        "--compressor-port", type=int, default=50062, help="compressor gRPC port (0: any)"
    )
    p.add_argument(
        "--metrics-port", type=int, default=-1, help="Prometheus /metrics of both (-1: none)"
    )
    p.add_argument("--log-level", default="WARNING", help="logging level")
    p.add_argument(
        "--store-trusted-keys",
        type=Path,
        help="the store refuses manifests signed by keys outside this folder of *.pub files",
    )
    p.add_argument(
        "--require-signatures",
        action="store_true",
        help="the store refuses unsigned manifests (sign with --signing-key)",
    )
    add_server_flags(p, with_store=False)


def serve_embedded(args: argparse.Namespace) -> None:
    """Run both services until SIGTERM/SIGINT; print one line with the bound addresses."""
    configure_logging(args.log_level)
    args.root.mkdir(parents=True, exist_ok=True)
    store = build_store(
        StoreConfig(
            root=args.root,
            host=args.host,
            port=args.store_port,
            metrics_port=-1,
            trusted_keys=args.store_trusted_keys,
            require_signatures=args.require_signatures,
        )
    )
    store.start()
    config = config_from_args(
        args, store=f"127.0.0.1:{store.port}", port=args.compressor_port, metrics_port=-1
    )
    compressor = build_compressor(config)
    compressor.start()
    metrics = ""
    if args.metrics_port >= 0:
        registry = CollectorRegistry()
        registry.register(store.metrics.registry)
        registry.register(compressor.metrics.registry)
        http, _ = start_http_server(args.metrics_port, addr=args.host, registry=registry)
        metrics = f" metrics={args.host}:{http.server_port}"
    print(
        f"deltavault serve: store={args.host}:{store.port} "
        f"compressor={args.host}:{compressor.port}{metrics} root={args.root} "
        f"device={compressor.device}",
        flush=True,
    )
    try:
        wait_for_signal()
    finally:
        compressor.stop()
        store.stop()
