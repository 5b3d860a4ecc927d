"""TLS for deltavault's gRPC channels: PEM files on disk, as cert-manager writes them.

- :class:`ServerTls`: a service's certificate and key, and optionally a CA whose
  client certificates it requires (mutual TLS). The files are re-read when they change, at
  the next handshake, so a rotated certificate takes effect without a restart.
- :class:`ClientTls`: the CA a client trusts and, for mutual TLS, its own certificate
  and key, and the name to expect on the server's certificate when it is not the address
  dialled (a port-forward to localhost, say). :meth:`ClientTls.from_env` reads
  ``DELTAVAULT_TLS_CA``, ``_CERT``, ``_KEY`` and ``_SERVER_NAME``: every client (the SDK,
  the CLI, the compressor's own store client) uses TLS when one of them is set.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

CLIENT_ENV_PREFIX = "DELTAVAULT_TLS_"


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"the TLS {what} {path} is not PEM")
    return data


@dataclass(frozen=True)
class ServerTls:
    """A server's PEM certificate chain and key; ``client_ca``: require client
    certificates signed by it."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = (_read(self.key, "key"), _read(self.cert, "certificate"))
        roots = None if self.client_ca is None else _read(self.client_ca, "client CA")
        return grpc.ssl_server_certificate_configuration([pair], roots)

    def _stamp(self) -> tuple[float, ...]:
        files = [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])
        return tuple(f.stat().st_mtime for f in files)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that reload the files when their modification times change."""
        initial = self._configuration()
        seen = [self._stamp()]
        lock = threading.Lock()

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            with lock:
                try:
                    stamp = self._stamp()
                    if stamp == seen[0]:
                        return None
                    configuration = self._configuration()
                except (OSError, ValueError) as exc:
                    # Mid-rotation a file may be missing or half-written: keep the old pair.
                    log.warning("TLS files not reloaded: %s", exc)
                    return None
                seen[0] = stamp
                log.info("TLS certificate reloaded from %s", self.cert)
                return configuration

        return grpc.dynamic_ssl_server_credentials(
            initial,
            # gRPC documents None as "keep the current certificate"; its stubs omit it.
            fetch,  # type: ignore[arg-type]
            require_client_authentication=self.client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """The CA a client trusts (None: the system's), for mutual TLS its PEM certificate
    chain and key, and ``server_name``: the name the server's certificate must carry when
    it differs from the host dialled."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    @classmethod
    def from_env(cls) -> ClientTls | None:
        """TLS from ``DELTAVAULT_TLS_{CA,CERT,KEY,SERVER_NAME}``, or None when none is set."""
        ca, cert, key, server_name = (
            os.environ.get(CLIENT_ENV_PREFIX + name) or None
            for name in ("CA", "CERT", "KEY", "SERVER_NAME")
        )
        if not any((ca, cert, key, server_name)):
            return None

        def path(value: str | None) -> Path | None:
            return Path(value) if value else None

        return cls(path(ca), path(cert), path(key), server_name)

    @property
    def channel_options(self) -> list[tuple[str, str]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca is None else _read(self.ca, "CA"),
            private_key=None if self.key is None else _read(self.key, "key"),
            certificate_chain=None if self.cert is None else _read(self.cert, "certificate"),
        )
