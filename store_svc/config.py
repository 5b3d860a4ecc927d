"""Store configuration: one frozen dataclass, every tunable documented here."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from clients.tls import ServerTls
from clients.wire import HEAP_FRAME_BYTES
from store_svc.cas import CompressionPolicy
from store_svc.limits import Limits

MiB = 1 << 20
DEFAULT_LIMITS = Limits(max_bytes=4 << 30)


class BackendKind(enum.Enum):
    LOCAL = "local"
    """A folder on local disk: the embedded default."""
    S3 = "s3"
    """Any S3 API (MinIO in production) through the minio SDK."""


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    """host:port of the S3 API, without a scheme."""
    bucket: str
    access_key: str
    secret_key: str
    secure: bool = False
    """Use HTTPS to the endpoint."""
    region: str | None = None
    prefix: str = ""
    """Key prefix inside the bucket, so several stores can share one."""
    create_bucket: bool = True


@dataclass(frozen=True)
class StoreConfig:
    backend: BackendKind = BackendKind.LOCAL
    root: Path | None = None
    """Folder of the local backend."""
    s3: S3Settings | None = None
    host: str = "127.0.0.1"
    """Address the gRPC server binds; 0.0.0.0 in a container."""
    port: int = 50061
    """gRPC port; 0 picks a free one (tests)."""
    metrics_port: int = 9461
    """Prometheus /metrics HTTP port on ``host``; 0 picks a free one, -1 disables it."""
    tls: ServerTls | None = None
    """Serve TLS only (mutual when it names a client CA); None: plaintext."""
    health_port: int = -1
    """Plaintext port answering only the health service (probes that cannot speak TLS);
    -1: none, 0: any free one."""
    auth_tokens: Path | None = None
    """Tokens file (``store_svc.auth``): every call then needs a bearer token whose role
    allows it; None: no authentication."""
    max_frame_bytes: int = 2 * MiB
    """Largest data payload in one stream message, both directions."""
    max_chunk_bytes: int = 64 * MiB
    """Largest chunk accepted; a chunk is assembled in memory before it is verified."""
    compression: CompressionPolicy = CompressionPolicy.AUTO
    gc_grace_seconds: float = 3600.0
    """Unreferenced objects younger than this survive GC (uploads in flight)."""
    list_page_size: int = 1000
    """Default and largest page of ListRefs."""
    workers: int = 16
    """Threads serving RPCs: the number of calls handled at once."""
    io_threads: int = 32
    """Threads doing backend reads and writes on behalf of streams."""
    stream_window: int = 4
    """Chunks each stream writes or prefetches concurrently, overlapping network and storage."""
    shutdown_grace_seconds: float = 30.0
    """On SIGTERM, in-flight calls get this long to finish."""
    limits: Limits = DEFAULT_LIMITS
    """Streams and bytes in flight (``store_svc.limits``). By default only the bytes held
    by all streams are capped; a stream holds at most ``stream_window + 1`` chunks."""

    def __post_init__(self) -> None:
        if self.backend is BackendKind.LOCAL and self.root is None:
            raise ValueError("the local backend needs --root DIR")
        if self.backend is BackendKind.S3 and self.s3 is None:
            raise ValueError("the s3 backend needs --endpoint, --bucket and credentials")
        if not 0 < self.max_frame_bytes <= self.max_chunk_bytes:
            raise ValueError("need 0 < max_frame_bytes <= max_chunk_bytes")
        if min(self.workers, self.io_threads, self.stream_window) < 1:
            raise ValueError("workers, io_threads and stream_window must be at least 1")

    @property
    def reply_frame_bytes(self) -> int:
        """Data bytes in each GetChunks frame: ``clients.wire``'s heap-sized frame (an
        embedded store shares the compressor's process and its pinned mmap threshold)."""
        return min(self.max_frame_bytes, HEAP_FRAME_BYTES)

    @property
    def max_message_bytes(self) -> int:
        """gRPC message cap: one frame plus room for its digest and offsets."""
        return self.max_frame_bytes + 64 * 1024
