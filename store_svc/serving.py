"""What both deltavault gRPC servers share: registering a service's methods, health and
reflection, the /metrics endpoint, the serving/not-serving switch, and waiting for SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from types import FrameType, ModuleType
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

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
    ``codecs`` names others (frames parsed and sent around their data: ``clients.wire``)."""
    descriptor = messages.DESCRIPTOR.services_by_name[service]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        deserialize, serialize = (codecs or {}).get(method.name) or (
            getattr(messages, method.input_type.name).FromString,
            getattr(messages, method.output_type.name).SerializeToString,
        )
        handlers[method.name] = _HANDLERS[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=deserialize,
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


def drain(
    health_servicer: health.HealthServicer,
    server: grpc.Server,
    grace: float,
    metrics_http: WSGIServer | None,
) -> None:
    """Report NOT_SERVING, let in-flight calls finish within ``grace``, stop /metrics."""
    health_servicer.enter_graceful_shutdown()
    server.stop(grace).wait()
    if metrics_http is not None:
        metrics_http.shutdown()


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
