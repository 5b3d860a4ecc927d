"""Child processes of tests and benchmarks: loopback ports for them, and a guarantee that
they never outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal
import socket

_PR_SET_PDEATHSIG = 1
# Resolved here, in the parent: the child, between fork and exec, only calls it.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """``preexec_fn`` of a child: the kernel sends it SIGKILL when the thread that started
    it exits (the parent's main thread, for the servers here), so a parent killed without
    cleaning up (SIGKILL, a timeout) leaves no server running."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
