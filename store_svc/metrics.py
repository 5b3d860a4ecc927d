"""Every Prometheus collector of the store, on one registry per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpc_requests = Counter(
            "deltavault_store_rpc_requests_total",
            "RPCs handled, by method and status code.",
            ["grpc_method", "grpc_code"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            "deltavault_store_rpc_duration_seconds",
            "RPC handling time, by method.",
            ["grpc_method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.received_bytes = Counter(
            "deltavault_store_received_bytes_total",
            "Chunk bytes received from clients.",
            registry=r,
        )
        self.sent_bytes = Counter(
            "deltavault_store_sent_bytes_total", "Chunk bytes sent to clients.", registry=r
        )
        self.chunks_written = Counter(
            "deltavault_store_chunks_written_total", "Chunks newly stored.", registry=r
        )
        self.chunks_deduplicated = Counter(
            "deltavault_store_chunks_deduplicated_total",
            "Uploaded chunks that were already stored.",
            registry=r,
        )
        self.gc_runs = Counter(
            "deltavault_store_gc_runs_total",
            "Garbage collections, by mode.",
            ["mode"],
            registry=r,
        )
        self.gc_freed_bytes = Counter(
            "deltavault_store_gc_freed_bytes_total", "Stored bytes removed by GC.", registry=r
        )
        self.backend_errors = Counter(
            "deltavault_store_backend_errors_total",
            "Failed backend operations, by operation and kind (unavailable, permanent).",
            ["operation", "kind"],
            registry=r,
        )
