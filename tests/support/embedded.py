"""``deltavault serve`` as a real child process: started on free loopback ports, its
addresses read from the line it prints, its memory high-water mark read from /proc."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE = (sys.executable, "-m", "clients.cli", "serve")


@dataclass
class EmbeddedServer:
    """The store (local folder ``root``) and a compressor in one process."""

    root: Path
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[str] | None = None
    store: str = ""
    compressor: str = ""
    banner: str = ""
    """The line the server printed: its addresses (and metrics port, if any)."""

    def __enter__(self) -> EmbeddedServer:
        args = [*SERVE, "--root", str(self.root), "--store-port", "0", "--compressor-port", "0"]
        self.process = subprocess.Popen(
            [*args, *self.extra_args], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.banner = self.process.stdout.readline()
        match = re.search(r"store=(\S+) compressor=(\S+)", line)
        if match is None:
            self.process.kill()
            raise RuntimeError(f"deltavault serve did not start: {line!r}")
        self.store, self.compressor = match.group(1), match.group(2)
        return self

    def peak_rss_bytes(self) -> int:
        """VmHWM of the server process: its resident-set high-water mark so far."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None
        return int(match.group(1)) * 1024

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, wait for the drain; the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            assert self.process is not None
            self.process.kill()
