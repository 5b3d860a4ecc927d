"""Compressor configuration: one frozen dataclass, every tunable documented here."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from clients.tls import ServerTls
from clients.wire import HEAP_FRAME_BYTES
from store_svc.limits import UNLIMITED, Limits

MiB = 1 << 20


class Device(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"
    """CUDA when a GPU is visible, else CPU."""


@dataclass(frozen=True)
class CompressorConfig:
    store: str = "127.0.0.1:50061"
    """host:port of the delta store the compressor writes to."""
    host: str = "127.0.0.1"
    """Address the gRPC server binds; 0.0.0.0 in a container."""
    port: int = 50062
    """gRPC port; 0 picks a free one (tests)."""
    metrics_port: int = 9462
    """Prometheus /metrics HTTP port on ``host``; 0 picks a free one, -1 disables it."""
    tls: ServerTls | None = None
    """Serve TLS only (mutual when it names a client CA); None: plaintext."""
    health_port: int = -1
    """Plaintext port answering only the health service (probes that cannot speak TLS);
    -1: none, 0: any free one."""
    auth_tokens: Path | None = None
    """Tokens file (``store_svc.auth``): every call then needs a bearer token whose role
    allows it; None: no authentication."""
    device: Device = Device.AUTO
    max_frame_bytes: int = 4 * MiB
    """Largest data payload in one stream message."""
    max_tensor_bytes: int = 8 << 30
    """Largest single tensor accepted (it is assembled in memory)."""
    max_inflight_bytes: int = 16 << 30
    """Unfinished tensor bytes one stream may hold (a base waiting for its fine-tune)."""
    limits: Limits = UNLIMITED
    """Streams, and unfinished tensor bytes, in flight per client and in all
    (``store_svc.limits``); unlimited by default (``workers`` bounds the streams)."""
    spill_dir: Path | None = None
    """Where model-wide allocation keeps factors between its two passes; None: the temp dir."""
    workers: int = 8
    """Threads serving RPCs: the streams handled at once."""
    torch_threads: int = 0
    """Intra-op threads for the numeric work; 0: every core. Each concurrent stream runs its
    own team of this many threads, so lower it when several streams compress at once
    (oversubscribed cores collapse torch's throughput by 10x or more)."""
    shutdown_grace_seconds: float = 60.0
    """On SIGTERM, in-flight streams get this long to finish."""
    store_timeout_seconds: float = 300.0
    """Deadline of each call to the store."""
    signing_key: Path | None = None
    """Ed25519 private key (PEM, ``deltavault keys generate``) that signs every manifest
    this compressor commits (``store_svc.signatures``); None: manifests go unsigned."""

    def __post_init__(self) -> None:
        if not 0 < self.max_frame_bytes <= self.max_tensor_bytes:
            raise ValueError("need 0 < max_frame_bytes <= max_tensor_bytes")
        if self.workers < 1 or self.torch_threads < 0:
            raise ValueError("workers must be at least 1 and torch_threads at least 0")

    @property
    def max_message_bytes(self) -> int:
        """gRPC message cap: one frame plus room for its name, shape and offsets."""
        return self.max_frame_bytes + 64 * 1024

    @property
    def reply_frame_bytes(self) -> int:
        """Data bytes in each frame the server sends (Reconstruct): ``clients.wire``'s
        heap-sized frame, where serializing costs ~32 us instead of ~4 ms at 4 MiB."""
        return min(self.max_frame_bytes, HEAP_FRAME_BYTES)

    @property
    def threads(self) -> int:
        """The intra-op thread count the server sets."""
        return self.torch_threads or os.cpu_count() or 1
