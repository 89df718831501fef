"""Real peers that tests start on 127.0.0.1 (nats-server, rsyslogd, `chroma run`): a free port,
waiting until the peer listens, and killing it by its PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_listening(proc: subprocess.Popen[bytes], port: int, what: str, timeout: float,
                         why_exited: Callable[[], str] = lambda: "") -> None:
    """Return once 127.0.0.1:``port`` accepts a connection; fail if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert proc.poll() is None, f"{what} exited: {why_exited()}"
            assert time.monotonic() < deadline, f"{what} did not listen on port {port}"
            time.sleep(0.05)


def kill(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """SIGKILL ``proc`` (ours: by its PID) and reap it; nothing if it already ended."""
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
