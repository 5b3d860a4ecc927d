"""Every Prometheus collector of the compressor, on one registry per server."""

from __future__ import annotations

import resource

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_RATIO_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
_BITS_BUCKETS = (0.03125, 0.0625, 0.125, 0.25, 0.5, 1, 1.5, 2, 3, 4, 8, 16, 32)


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CompressorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpc_requests = Counter(
            "deltavault_compressor_rpc_requests_total",
            "RPCs handled, by method and status code.",
            ["grpc_method", "grpc_code"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            "deltavault_compressor_rpc_duration_seconds",
            "RPC handling time, by method.",
            ["grpc_method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tensors = Counter(
            "deltavault_compressor_tensors_total",
            "Tensors processed, by storage kind (compressed, lossless, zero).",
            ["kind"],
            registry=r,
        )
        self.received_bytes = Counter(
            "deltavault_compressor_received_bytes_total",
            "Tensor bytes received from clients.",
            registry=r,
        )
        self.stored_bytes = Counter(
            "deltavault_compressor_stored_bytes_total",
            "Encoded bytes the compressor sent to the store (new chunks only).",
            registry=r,
        )
        self.bits_per_weight = Histogram(
            "deltavault_compressor_bits_per_weight",
            "Exact stored bits per weight of each compressed tensor.",
            buckets=_BITS_BUCKETS,
            registry=r,
        )
        self.ratio = Histogram(
            "deltavault_compressor_achieved_ratio",
            "Achieved compression ratio (against the fp16 delta) of each compressed tensor.",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.method_seconds = Histogram(
            "deltavault_compressor_method_seconds",
            "Time to encode one tensor, by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight_streams = Gauge(
            "deltavault_compressor_inflight_streams",
            "Compress, Reconstruct and Plan streams being served.",
            registry=r,
        )
        self.peak_rss = Gauge(
            "deltavault_compressor_peak_rss_bytes",
            "Resident-set high-water mark of the process.",
            registry=r,
        )
        self.peak_rss.set_function(lambda: float(peak_rss_bytes()))
