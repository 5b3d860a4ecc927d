"""Store configuration: one frozen dataclass, every tunable documented here."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from clients.key_files import read_key_file
from clients.tls import ServerTls
from clients.wire import HEAP_FRAME_BYTES
from store_svc.cas import CompressionPolicy
from store_svc.limits import Limits
from store_svc.signatures import SignaturePolicy, TrustedKeys

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
    ca_file: Path | None = None
    """PEM bundle of the CAs to trust for HTTPS to the endpoint (a private CA); None: the
    system's (which honours ``SSL_CERT_FILE``)."""


class SseMode(enum.Enum):
    """How the store has its objects encrypted at rest (``ServerSideEncryption``)."""

    NONE = "none"
    """Objects are stored as they are."""
    S3 = "s3"
    """SSE-S3: the S3 server encrypts every object with keys it manages itself (MinIO needs
    a KMS configured for it). The S3 backend only: a local folder has no server to do it."""
    C = "c"
    """SSE-C: objects are encrypted with the customer key in ``key_file``. On S3 the key
    travels with every request (so HTTPS is required) and the server encrypts; on the local
    backend the store encrypts each file itself with AES-256-GCM
    (``store_svc.backends.encrypted``)."""


@dataclass(frozen=True)
class ServerSideEncryption:
    """Encryption at rest done by the store side: the store process still sees plaintext
    (client-side sealing is what hides content from the store itself)."""

    mode: SseMode = SseMode.NONE
    key_file: Path | None = None
    """The SSE-C key: 32 bytes raw, 64 hex digits or base64 (``clients.key_files``), as a
    Kubernetes Secret mounted as a file holds it. Only with ``SseMode.C``."""

    def __post_init__(self) -> None:
        if self.mode is SseMode.C and self.key_file is None:
            raise ValueError("--sse c (SSE-C) needs --sse-key-file PATH holding a 256-bit key")
        if self.mode is not SseMode.C and self.key_file is not None:
            raise ValueError(
                f"--sse-key-file is used only with --sse c (SSE-C), not --sse {self.mode.value}"
            )

    def key(self) -> bytes:
        """The SSE-C key, read from ``key_file`` now (``KeyFileError``, a ``ValueError``
        naming the file, if it is absent or not one 256-bit key)."""
        if self.key_file is None:
            raise ValueError(f"--sse {self.mode.value} has no key")
        return read_key_file(self.key_file)


NO_ENCRYPTION = ServerSideEncryption()


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
    encryption: ServerSideEncryption = NO_ENCRYPTION
    """Server-side encryption of every stored object; by default none."""
    trusted_keys: Path | None = None
    """Folder of Ed25519 ``*.pub`` keys (``store_svc.signatures``): a manifest sent with a
    signature by any other key is refused; None: any valid signature is accepted."""
    require_signatures: bool = False
    """Refuse a manifest without a valid signature (by a trusted key, with ``trusted_keys``)."""

    def signature_policy(self) -> SignaturePolicy:
        """What CommitManifest accepts (``SignatureError`` for an unusable keys folder)."""
        trusted = TrustedKeys.load(self.trusted_keys) if self.trusted_keys else None
        return SignaturePolicy(trusted, self.require_signatures)

    def __post_init__(self) -> None:
        if self.backend is BackendKind.LOCAL and self.root is None:
            raise ValueError("the local backend needs --root DIR")
        if self.backend is BackendKind.S3 and self.s3 is None:
            raise ValueError("the s3 backend needs --endpoint, --bucket and credentials")
        if not 0 < self.max_frame_bytes <= self.max_chunk_bytes:
            raise ValueError("need 0 < max_frame_bytes <= max_chunk_bytes")
        if min(self.workers, self.io_threads, self.stream_window) < 1:
            raise ValueError("workers, io_threads and stream_window must be at least 1")
        self._check_encryption()

    def _check_encryption(self) -> None:
        mode = self.encryption.mode
        if self.backend is BackendKind.LOCAL and mode is SseMode.S3:
            raise ValueError(
                "--sse s3 (server-managed keys) needs the s3 backend; to encrypt a local "
                "store use --sse c with --sse-key-file PATH"
            )
        if self.backend is BackendKind.S3 and mode is SseMode.C:
            assert self.s3 is not None  # checked above
            if not self.s3.secure:
                # The key is a header of every request: over HTTP anyone on the path has it.
                raise ValueError(
                    "--sse c sends the key with every S3 request: it needs --secure (HTTPS "
                    "to the endpoint; MinIO and AWS refuse SSE-C over plain HTTP)"
                )

    @property
    def reply_frame_bytes(self) -> int:
        """Data bytes in each GetChunks frame: ``clients.wire``'s heap-sized frame (an
        embedded store shares the compressor's process and its pinned mmap threshold)."""
        return min(self.max_frame_bytes, HEAP_FRAME_BYTES)

    @property
    def max_message_bytes(self) -> int:
        """gRPC message cap: one frame plus room for its digest and offsets."""
        return self.max_frame_bytes + 64 * 1024
