"""What both deltavault gRPC servers share: registering a service's methods, health and
reflection, binding (TLS flags included) and the plaintext health port, the /metrics
endpoint, the serving/not-serving switch, and waiting for SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from clients.tls import ServerTls
from clients.wire import lenient
from store_svc.limits import Limits

log = logging.getLogger(__name__)

C = TypeVar("C")


Codec = tuple[Callable[[bytes], Any], Callable[[Any], bytes] | None]
"""A method's (request deserializer, response serializer); None sends responses as the
bytes the method yields."""

_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(
    server: grpc.Server,
    servicer: object,
    messages: ModuleType,
    service: str,
    codecs: Mapping[str, Codec] | None = None,
) -> None:
    """Register every method of ``service`` (declared in the generated module ``messages``)
    as ``servicer``'s method of that name, with protobuf's (de)serializers except where
    ``codecs`` names others (frames parsed and sent around their data: ``clients.wire``).
    Requests that do not parse reach the handler as ``clients.wire.Malformed`` (the
    ``CallInterceptor`` refuses them with INVALID_ARGUMENT)."""
    descriptor = messages.DESCRIPTOR.services_by_name[service]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        request_type = getattr(messages, method.input_type.name)
        deserialize, serialize = (codecs or {}).get(method.name) or (
            request_type.FromString,
            getattr(messages, method.output_type.name).SerializeToString,
        )
        handlers[method.name] = _HANDLERS[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=lenient(deserialize, request_type),
            response_serializer=serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )
    server.add_registered_method_handlers(descriptor.full_name, handlers)


def add_health_and_reflection(server: grpc.Server, service_name: str) -> health.HealthServicer:
    """Register the standard health service and reflection for ``service_name``."""
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            service_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return health_servicer


def start_metrics(
    port: int, host: str, registry: CollectorRegistry
) -> tuple[WSGIServer | None, int | None]:
    """Serve ``registry`` on http://host:port/metrics; port 0 picks one, -1 serves nothing.
    Returns the HTTP server (to shut down) and the bound port."""
    if port < 0:
        return None, None
    http, _ = start_http_server(port, addr=host, registry=registry)
    return http, http.server_port


def mark_serving(health_servicer: health.HealthServicer, service_name: str) -> None:
    for name in (service_name, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def bind(server: grpc.Server, host: str, port: int, tls: ServerTls | None) -> int:
    """Listen on ``host:port``, over TLS when ``tls`` is given; the port bound."""
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls.credentials())
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    return bound


@dataclass
class HealthPort:
    """A plaintext server answering only the standard health service, from the main
    server's own servicer (so with its statuses): what Kubernetes' gRPC probes, which
    cannot speak TLS, reach when the service itself takes only TLS."""

    server: grpc.Server
    port: int

    @classmethod
    def open(
        cls, health_servicer: health.HealthServicer, host: str, port: int
    ) -> HealthPort | None:
        """None when ``port`` is negative (no health port)."""
        if port < 0:
            return None
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        return cls(server, bind(server, host, port, None))


def drain(
    health_servicer: health.HealthServicer,
    server: grpc.Server,
    grace: float,
    metrics_http: WSGIServer | None,
    health_port: HealthPort | None = None,
) -> None:
    """Report NOT_SERVING, let in-flight calls finish within ``grace``, stop /metrics and
    the health port."""
    health_servicer.enter_graceful_shutdown()
    server.stop(grace).wait()
    if metrics_http is not None:
        metrics_http.shutdown()
    if health_port is not None:
        health_port.server.stop(0).wait()


def add_security_flags(
    parser: argparse.ArgumentParser, env: Callable[[str, object], object]
) -> None:
    """``--tls-cert``, ``--tls-key``, ``--tls-client-ca``, ``--health-port`` and
    ``--auth-tokens``; ``env`` gives each flag's default (the service's environment
    variable)."""
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=env("tls-cert", None),
        help="PEM certificate chain: serve TLS only",
    )
    parser.add_argument(
        "--tls-key", type=Path, default=env("tls-key", None), help="PEM key of --tls-cert"
    )
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        default=env("tls-client-ca", None),
        help="require client certificates signed by this PEM CA (mutual TLS)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=env("health-port", -1),
        help="plaintext port answering only the gRPC health service, for probes that cannot "
        "speak TLS (-1: none)",
    )
    parser.add_argument(
        "--auth-tokens",
        type=Path,
        default=env("auth-tokens", None),
        help="JSON tokens file: require a bearer token whose role allows each call "
        "(see store_svc.auth)",
    )


def add_limit_flags(
    parser: argparse.ArgumentParser, env: Callable[[str, object], object], defaults: Limits
) -> None:
    """``--max-streams``, ``--max-streams-per-client``, ``--max-stream-bytes`` and
    ``--max-stream-bytes-per-client`` (``store_svc.limits``; 0: unlimited)."""
    flags = [
        ("max-streams", defaults.max_streams, "streaming calls in flight"),
        (
            "max-streams-per-client",
            defaults.max_streams_per_client,
            "streaming calls one client has in flight",
        ),
        ("max-stream-bytes", defaults.max_bytes, "bytes all streams hold in memory"),
        (
            "max-stream-bytes-per-client",
            defaults.max_bytes_per_client,
            "bytes one client's streams hold in memory",
        ),
    ]
    for name, default, what in flags:
        parser.add_argument(
            f"--{name}",
            type=int,
            default=env(name, default),
            help=f"{what}; beyond it RESOURCE_EXHAUSTED, retried by clients (0: unlimited, "
            f"default {default})",
        )


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(
        max_streams=int(args.max_streams),
        max_streams_per_client=int(args.max_streams_per_client),
        max_bytes=int(args.max_stream_bytes),
        max_bytes_per_client=int(args.max_stream_bytes_per_client),
    )


def server_tls_from_args(args: argparse.Namespace) -> ServerTls | None:
    """The TLS settings of :func:`add_tls_flags`' flags; ValueError when incomplete."""
    cert, key, client_ca = args.tls_cert, args.tls_key, args.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return ServerTls(Path(cert), Path(key), None if client_ca is None else Path(client_ca))


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_command(
    parser: argparse.ArgumentParser,
    to_config: Callable[[argparse.Namespace], C],
    serve: Callable[[C], None],
    argv: Sequence[str] | None,
) -> int:
    """A service's ``main``: parse flags, log, build the config (errors as usage), serve."""
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = to_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    serve(config)
    return 0


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT (both services drain after it)."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        log.info("signal %d: draining in-flight calls", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
