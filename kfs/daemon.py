"""One mount's life: open the store, build the areas, mount, serve, drain, unmount.

Everything runs in one trio nursery: ``pyfuse3.main``, each area's background
tasks, the control socket and the signal watcher.  SIGTERM, SIGINT and
``kfs umount`` all take the same path: stop accepting, drain every area, then
unmount.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from kfs import __version__
from kfs.bus import Bus
from kfs.config import Config
from kfs.control import ControlError, serve
from kfs.fs import fuse_loop
from kfs.fs.area import Area, EmptyArea
from kfs.fs.operations import KfsOperations
from kfs.paths import control_socket_path
from kfs.store import StoreDir

log = logging.getLogger("kfs.daemon")

# mallopt(3) parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Nothing leaves the machine unless configured to (set before chromadb/onnxruntime load).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

#: the areas, in the order of the tree: (name, module, class, config attribute)
AREAS: list[tuple[str, str, str, str]] = [
    ("vault", "kfs.vault.area", "VaultArea", "vault"),
    ("logs", "kfs.logs.area", "LogsArea", "logging"),
    ("snapshots", "kfs.snapshots.area", "SnapshotsArea", "snapshots"),
    ("vectors", "kfs.vectors.area", "VectorsArea", "vectors"),
    ("streams", "kfs.streams.area", "StreamsArea", "streams"),
]


@dataclass
class MountOptions:
    mountpoint: str
    store: str
    config: Config
    config_dir: str | None = None
    foreground: bool = False
    allow_other: bool = False
    passphrase: bytearray | None = None
    debug: bool = False


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class StoreLogHandler(logging.Handler):
    """Appends diagnostics to the store's logs/kfsd.log.jsonl, through the store's fd."""

    def __init__(self, logs_dir: StoreDir) -> None:
        super().__init__()
        self.fd = logs_dir.open_fd("kfsd.log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.setFormatter(JsonLinesFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode())
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        super().close()


def setup_logging(store: StoreDir, foreground: bool, debug: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.addHandler(StoreLogHandler(store.subdir("logs", mode=0o755)))
    if foreground:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(JsonLinesFormatter())
        root.addHandler(stderr)


def build_areas(opts: MountOptions, store: StoreDir, bus: Bus) -> dict[str, Area]:
    """Instantiate each area: ``Class(bus, store_subdir, area_config, options)``.

    An area whose module is not there yet is an `EmptyArea` (lists empty, EROFS).
    """
    areas: dict[str, Area] = {}
    for name, module_name, class_name, config_attr in AREAS:
        area_config = getattr(opts.config, config_attr)
        if name == "vault" and not opts.config.vault.enabled:
            continue
        try:
            module = importlib.import_module(module_name)
            cls = getattr(module, class_name)
        except (ImportError, AttributeError):
            areas[name] = EmptyArea(name, bus)
            continue
        areas[name] = cls(bus, store.subdir(name, mode=0o755), area_config, opts)
    # An area that works on the others (snapshots) gets them here, without importing them.
    for area in areas.values():
        attach = getattr(area, "attach_peers", None)
        if callable(attach):
            attach(areas)
    return areas


def keep_heap_for_requests() -> None:
    """Stop glibc returning memory to the kernel after every large FUSE buffer.

    Each write request hands the daemon a buffer of up to 1 MiB (max_write).  With
    glibc's defaults such buffers are mmapped, or the heap top is trimmed, and freed
    again per request: a page-fault storm that showed as the daemon's biggest system
    time under log bursts.  Serving them from a heap kept warm costs a few MiB of RSS.
    """
    if os.environ.get("KFS_MALLOC") == "default":  # to compare against glibc's defaults
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


#: kernel readahead for the mount, KiB (KFS_READAHEAD_KB overrides; 0 keeps the kernel's)
READAHEAD_KB = 1024


def raise_readahead(mountpoint: str) -> int | None:
    """Let the kernel read ahead 1 MiB on sequential reads of this mount instead of 128 KiB.

    libfuse negotiates max_readahead 128 KiB at INIT, so a sequential reader of a vault
    file or a log (the areas served through the page cache) waits for one 128 KiB request
    at a time.  The mount's readahead window lives in its backing device info and may be
    raised once INIT is answered: measured on the vault, sequential reads went from
    ~1.0 to ~1.38 GB/s and daemon CPU per MiB fell by a quarter (fewer, fuller requests).
    Random readers are unaffected (the kernel reads ahead only on sequential patterns).
    Direct-I/O files (streams/) never read ahead.  Best effort: returns the KiB set, or
    None when sysfs is read-only or absent.
    """
    kb = int(os.environ.get("KFS_READAHEAD_KB", READAHEAD_KB))
    if kb <= 0:
        return None
    try:
        dev = os.stat(mountpoint).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.info("kept the kernel's readahead for %s: %s", mountpoint, e.strerror or e)
        return None
    return kb


class Daemon:
    def __init__(self, opts: MountOptions) -> None:
        self.opts = opts
        self.store = StoreDir.open(opts.store, mode=0o700)
        self.bus = Bus()
        self.areas: dict[str, Area] = {}
        self.ops: KfsOperations | None = None
        self.started = time.time()
        self._stopping = False
        self.readahead_kb: int | None = None
        self._cancel: trio.CancelScope | None = None
        # Resolved now: once mounted, touching the mountpoint by path calls into ourselves.
        self.control_path = control_socket_path(opts.mountpoint)

    async def run(self, on_ready: Any = None) -> None:
        keep_heap_for_requests()
        setup_logging(self.store, self.opts.foreground, self.opts.debug)
        self.areas = build_areas(self.opts, self.store, self.bus)
        self.ops = KfsOperations(self.areas, self.bus, self.store.fd)
        for area in self.areas.values():
            area.kernel = self.ops.notifier
        options = set(pyfuse3.default_options)
        options |= {f"fsname=kfs:{self.opts.store}", "subtype=kfs", "default_permissions"}
        if self.opts.allow_other:
            options.add("allow_other")
        if self.opts.debug:
            options.add("debug")
        pyfuse3.init(self.ops, self.opts.mountpoint, options)
        self.ops.notifier.start()
        log.info("mounted %s (store %s, kfs %s)", self.opts.mountpoint, self.opts.store, __version__)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                for area in self.areas.values():
                    await area.start(nursery)
                nursery.start_soon(self._fuse_main)
                await nursery.start(serve, self.control_path, self.handle_command)
                nursery.start_soon(self._watch_signals)
                # stat answers only once INIT is done, which would reset the window (so: a thread).
                self.readahead_kb = await trio.to_thread.run_sync(raise_readahead, self.opts.mountpoint)
                self.bus.publish("kfs_mounted", {"mountpoint": self.opts.mountpoint}, "daemon")
                if on_ready is not None:
                    on_ready()
        finally:
            self.ops.notifier.stop()
            try:
                pyfuse3.close(unmount=True)
            except Exception:
                log.exception("unmount failed")
            log.info("unmounted %s", self.opts.mountpoint)

    async def _fuse_main(self) -> None:
        # Stream readers each hold a worker for up to read_wait: allow many at once.
        # fuse_loop.serve is pyfuse3.main with one scheduler pass per request instead of two.
        await fuse_loop.serve(min_tasks=4, max_tasks=512)
        # main() returns when the kernel unmounted us (fusermount -u): stop too.
        await self.shutdown()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %s: stopping", signal.Signals(signum).name)
                await self.shutdown()
                return

    async def shutdown(self) -> None:
        """Drain every area, then stop FUSE and the nursery (idempotent)."""
        if self._stopping:
            return
        self._stopping = True
        for area in self.areas.values():
            try:
                with trio.move_on_after(60):
                    await area.stop()
            except Exception:
                log.exception("stopping %s failed", area.name)
        try:
            pyfuse3.terminate()
        except Exception:
            pass
        if self._cancel is not None:
            self._cancel.cancel()

    def status(self) -> dict[str, Any]:
        assert self.ops is not None
        return {
            "mountpoint": self.opts.mountpoint,
            "store": self.opts.store,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "fuse": self._fuse_status(),
            "bus_events": self.bus.published,
            "areas": {name: area.status() for name, area in self.areas.items()},
        }

    def _fuse_status(self) -> dict[str, Any]:
        assert self.ops is not None
        status = self.ops.status()
        status["readahead_kb"] = self.readahead_kb
        direct = fuse_loop.current_direct
        if direct is not None:
            # requests waited for without a trio scheduler pass, and those that went through trio
            status["waits"] = {"direct": direct.direct, "via_trio": direct.via_trio, "yields": direct.yields}
            if direct.spin is not None:
                status["waits"].update(direct.spin.state())
        return status

    async def handle_command(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "status":
            return self.status()
        if cmd == "umount":
            # Answer first, then stop: the CLI waits for the mount to go away.
            trio.lowlevel.spawn_system_task(self.shutdown)
            return {"stopping": True}
        area_name, _, sub = cmd.partition(".")
        area = self.areas.get(area_name)
        if area is None or not sub:
            raise ControlError(f"unknown command {cmd!r}")
        try:
            return await area.control(sub, args)
        except OSError as e:
            if e.errno == errno.ENOSYS:
                raise ControlError(f"unknown command {cmd!r}") from None
            raise
