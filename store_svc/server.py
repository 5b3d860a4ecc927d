"""Build and run the store's gRPC server: servicer, health, reflection, metrics, limits."""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health

from clients._generated.deltavault.store.v1 import store_pb2
from store_svc.auth import open_tokens
from store_svc.backends.base import Backend
from store_svc.backends.instrumented import InstrumentedBackend
from store_svc.config import BackendKind, SseMode, StoreConfig
from store_svc.interceptors import CallInterceptor
from store_svc.limits import Admission
from store_svc.metrics import StoreMetrics
from store_svc.repository import Repository
from store_svc.service import DeltaStoreServicer, add_to_server
from store_svc.serving import (
    HealthPort,
    add_health_and_reflection,
    bind,
    drain,
    mark_serving,
    start_metrics,
    wait_for_signal,
)

log = logging.getLogger(__name__)

SERVICE_NAME = store_pb2.DESCRIPTOR.services_by_name["DeltaStore"].full_name


def open_backend(config: StoreConfig) -> Backend:
    """The backend the configuration names (S3 creates its bucket if allowed), encrypting
    at rest as ``config.encryption`` says: SSE-S3 and SSE-C are the S3 server's work; a
    local store with SSE-C seals every file itself (``EncryptedBackend``)."""
    encryption = config.encryption
    if config.backend is BackendKind.LOCAL:
        from store_svc.backends.local import LocalBackend  # noqa: PLC0415

        assert config.root is not None  # checked by StoreConfig
        local = LocalBackend(config.root)
        if encryption.mode is SseMode.C:
            from store_svc.backends.encrypted import EncryptedBackend  # noqa: PLC0415

            return EncryptedBackend(local, encryption.key())
        return local  # SSE-S3 on a local store is refused by StoreConfig
    from minio.sse import Sse, SseCustomerKey, SseS3  # noqa: PLC0415

    from store_svc.backends.s3 import S3Backend  # noqa: PLC0415

    sse: Sse | None = None
    if encryption.mode is SseMode.S3:
        sse = SseS3()
    elif encryption.mode is SseMode.C:
        sse = SseCustomerKey(encryption.key())
    s3 = config.s3
    assert s3 is not None  # checked by StoreConfig
    return S3Backend(
        s3.endpoint,
        s3.bucket,
        s3.access_key,
        s3.secret_key,
        secure=s3.secure,
        region=s3.region,
        create_bucket=s3.create_bucket,
        prefix=s3.prefix,
        sse=sse,
        ca_file=s3.ca_file,
    )


@dataclass
class StoreServer:
    """A built, not yet started, store server. ``port``/``metrics_port`` are the bound ones."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    repo: Repository
    metrics: StoreMetrics
    config: StoreConfig
    io: futures.ThreadPoolExecutor
    health_port: HealthPort | None = None
    metrics_port: int | None = None
    _metrics_http: WSGIServer | None = field(default=None, repr=False)

    def start(self) -> None:
        self._metrics_http, self.metrics_port = start_metrics(
            self.config.metrics_port, self.config.host, self.metrics.registry
        )
        self.server.start()
        if self.health_port is not None:
            self.health_port.server.start()
        mark_serving(self.health, SERVICE_NAME)

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish within ``grace``, then close."""
        grace = self.config.shutdown_grace_seconds if grace is None else grace
        drain(self.health, self.server, grace, self._metrics_http, self.health_port)
        self.io.shutdown(wait=True)
        self.repo.close()


def build_server(config: StoreConfig, backend: Backend | None = None) -> StoreServer:
    metrics = StoreMetrics()
    backend = InstrumentedBackend(backend or open_backend(config), metrics)
    repo = Repository(
        backend,
        max_chunk_bytes=config.max_chunk_bytes,
        compression=config.compression,
        signature_policy=config.signature_policy(),
    )

    def observe(method: str, code: grpc.StatusCode, seconds: float) -> None:
        metrics.rpc_requests.labels(method, code.name).inc()
        metrics.rpc_duration.labels(method).observe(seconds)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="store-rpc"),
        interceptors=[
            CallInterceptor(
                observe, open_tokens(config.auth_tokens), admission=Admission(config.limits)
            )
        ],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
    )
    io = futures.ThreadPoolExecutor(max_workers=config.io_threads, thread_name_prefix="store-io")
    add_to_server(DeltaStoreServicer(repo, config, metrics, io), server)
    health_servicer = add_health_and_reflection(server, SERVICE_NAME)
    port = bind(server, config.host, config.port, config.tls)
    health_port = HealthPort.open(health_servicer, config.host, config.health_port)
    return StoreServer(server, port, health_servicer, repo, metrics, config, io, health_port)


def serve(config: StoreConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    store = build_server(config)
    store.start()
    log.info(
        "delta store serving on %s:%d (metrics on %s), backend %s",
        config.host,
        store.port,
        store.metrics_port,
        config.backend.value,
    )
    wait_for_signal()
    store.stop()
    log.info("stopped")
