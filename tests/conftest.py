"""Shared fixtures: real kfs mounts in temporary directories, always unmounted.

``kfs_mount(config=..., passphrase=...)`` mounts a real kfs (pyfuse3,
/dev/fuse) through the real CLI and returns a `Mount`; every mount a test
makes is unmounted afterwards, failed test or not, and only the daemons the
tests started are ever killed, by PID.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def kfs_cli(*args: str, input: bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real ``kfs`` command (as ``python -m kfs``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [PYTHON, "-m", "kfs", *args], input=input.decode() if input is not None else None,
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO,
    )


def retained_events(path: Path) -> list[dict[str, Any]]:
    """Every event a stream file holds now: read with O_NONBLOCK until EAGAIN, not waiting for more."""
    import json

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return [json.loads(line) for line in data.splitlines()]


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def lazy_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


@dataclass
class Mount:
    root: Path
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    passphrase: str | None = None
    pid: int | None = None

    @property
    def path(self) -> Path:
        return self.root / "mnt"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    def write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        config = {filename: dict(values) for filename, values in self.config.items()}
        # Tests mount several kfs at once: each WebSocket broker takes a free port
        # unless the test chose one.
        streams = config.setdefault("streams.yaml", {})
        streams["websocket"] = {"port": 0, **(streams.get("websocket") or {})}
        for filename, values in config.items():
            (self.config_dir / filename).write_text(yaml.safe_dump(values))

    def env(self) -> dict[str, str]:
        return {"KFS_VAULT_PASSPHRASE": self.passphrase} if self.passphrase else {}

    def start(self, *extra: str) -> subprocess.CompletedProcess[str]:
        self.write_config()
        result = kfs_cli("mount", str(self.path), "--store", str(self.store), "--config",
                         str(self.config_dir), *extra, env=self.env())
        if result.returncode != 0:
            raise AssertionError(f"kfs mount failed: {result.stderr.strip()}")
        m = re.search(r"pid (\d+)", result.stdout)
        assert m, result.stdout
        self.pid = int(m.group(1))
        return result

    def cli(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = kfs_cli(*args, input=input, env=self.env())
        if check and result.returncode != 0:
            raise AssertionError(f"kfs {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def status(self) -> dict[str, Any]:
        import json

        return json.loads(self.cli("status", str(self.path), "--json").stdout)

    def stop(self) -> None:
        if self.pid is None:
            return
        result = kfs_cli("umount", str(self.path), timeout=150)
        if result.returncode != 0:
            self.kill9()
            raise AssertionError(f"kfs umount failed: {result.stderr.strip()}")
        self._wait_exit()
        self.pid = None

    def kill9(self) -> None:
        """Kill the daemon the hard way (a crash), then clear the dead mount."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait_exit()
            self.pid = None
        lazy_unmount(self.path)

    def restart(self, *extra: str) -> None:
        self.stop()
        self.start(*extra)

    def _wait_exit(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.pid is not None and time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)


@pytest.fixture
def kfs_mount(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    mounts: list[Mount] = []

    def make(config: dict[str, dict[str, Any]] | None = None, passphrase: str | None = None,
             start: bool = True, name: str = "kfs", extra: tuple[str, ...] = ()) -> Mount:
        mount = Mount(tmp_path / name, config or {}, passphrase)
        mount.root.mkdir(parents=True, exist_ok=True)
        mounts.append(mount)
        if start:
            mount.start(*extra)
        return mount

    yield make
    for mount in mounts:
        try:
            if mount.pid is not None:
                mount.stop()
        except Exception:
            mount.kill9()
        if is_mounted(mount.path):
            lazy_unmount(mount.path)
        assert not is_mounted(mount.path), f"{mount.path} left mounted"


@pytest.fixture
def mounted(kfs_mount: Callable[..., Mount]) -> Mount:
    """A kfs with the shipped defaults."""
    return kfs_mount()
