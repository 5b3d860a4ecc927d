"""A deltavault service (``python -m store_svc``, ``python -m compressor_svc``) as a real
child process on a loopback port: ready when its gRPC health service says SERVING, its
memory and CPU read from /proc, and stopped for sure.

The child runs in a session of its own, so a Ctrl-C at the terminal reaches only the parent,
which then stops it (SIGTERM, then SIGKILL past a bound); and it gets SIGKILL from the kernel
if the parent dies without doing so (``PR_SET_DEATHSIG``), so no server outlives its run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.children import die_with_parent, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_LOG_TAIL_CHARS = 3000


def proc_status_bytes(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (``VmRSS``, ``VmHWM``) in bytes; None once the
    process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (/proc/<pid>/stat); None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()  # the name, in parentheses, may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass
class ServiceProcess:
    """One service process; ``target`` is its ``127.0.0.1:port``, ``log`` its stderr."""

    name: str
    process: subprocess.Popen[bytes]
    target: str
    log: Path
    metrics_port: int
    exit_code: int | None = None
    """Set by :meth:`stop`: the exit status (negative: killed by that signal)."""

    @classmethod
    def start(
        cls,
        name: str,
        module: str,
        args: list[str],
        port: int,
        *,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> ServiceProcess:
        """Run ``python -m module --port port *args`` with stdout and stderr to ``log`` and
        its Prometheus /metrics on a free loopback port."""
        metrics_port = free_port()
        ports = ["--port", str(port), "--metrics-port", str(metrics_port)]
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", module, *ports, *args],
                cwd=REPO_ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509  (calls only prctl)
            )
        return cls(name, process, f"127.0.0.1:{port}", log, metrics_port)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_serving(self, timeout: float = 120.0) -> None:
        """Block until the health service answers SERVING; RuntimeError, with the end of
        the log, if the process exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and self.process.poll() is None:
                with contextlib.suppress(grpc.RpcError):  # not listening yet
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start serving; its log ends:\n{self.log_tail()}")

    def metrics(self) -> str:
        """Its /metrics page, in the Prometheus text format."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def rss_bytes(self) -> int | None:
        return proc_status_bytes(self.pid, "VmRSS")

    def peak_rss_bytes(self) -> int | None:
        """VmHWM: the resident-set high-water mark so far."""
        return proc_status_bytes(self.pid, "VmHWM")

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the services drain), SIGKILL if still running after ``timeout``; the
        exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.exit_code = self.process.returncode
        return self.exit_code

    def log_lines(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            return len(self.log.read_text(errors="replace").splitlines())
        return 0

    def log_tail(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        return ""
