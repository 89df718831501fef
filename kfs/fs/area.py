"""The Area interface: what the FUSE layer calls, on paths relative to an area.

The FUSE layer (`kfs.fs.operations`) knows nothing about secrets, logs or
vectors.  It maps inodes to ``(area, relative path)`` and file handles to the
`Handle` objects that areas return, then calls one of the methods below.
Paths are ``str`` relative to the area's root, ``""`` being the root itself,
components joined with ``/``.  Errors are raised as ``OSError(errno, ...)``
(or `pyfuse3.FUSEError`); anything else is a bug that the FUSE layer turns
into EIO and logs.

Every method is async and runs on the trio loop of the daemon: keep per-call
work small, and push blocking work (PBKDF2, Chroma, zip, large fsyncs) through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import trio

    from kfs.bus import Bus


def fs_error(code: int, detail: str = "") -> OSError:
    """An OSError carrying ``code`` that the FUSE layer answers as that errno."""
    return OSError(code, detail or errno.errorcode.get(code, str(code)))


@dataclass
class Attr:
    """The stat fields an area reports for one path (inode numbers are the FUSE layer's)."""

    mode: int
    size: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    #: st_blksize, the preferred I/O size: stdio and Python size their buffers by it, so a larger
    #: value means fewer FUSE requests for buffered writers (logs/ uses 128 KiB)
    blksize: int = 4096
    #: what this file is whatever its name, for areas with hard links (the vault: the store
    #: file's (st_dev, st_ino) while it has several names): names with one identity are one
    #: kernel inode.  None (the default, every other area): a file is its path.
    identity: Hashable | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @classmethod
    def directory(cls, perm: int = 0o755, uid: int = 0, gid: int = 0, mtime_ns: int | None = None) -> Attr:
        now = time.time_ns() if mtime_ns is None else mtime_ns
        return cls(stat.S_IFDIR | perm, 0, uid, gid, 2, now, now, now)

    @classmethod
    def regular(
        cls, size: int, perm: int = 0o644, uid: int = 0, gid: int = 0, mtime_ns: int | None = None
    ) -> Attr:
        now = time.time_ns() if mtime_ns is None else mtime_ns
        return cls(stat.S_IFREG | perm, size, uid, gid, 1, now, now, now)

    @classmethod
    def from_stat(cls, st: Any) -> Attr:
        return cls(
            st.st_mode, st.st_size, st.st_uid, st.st_gid, st.st_nlink,
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
        )


@dataclass
class Ctx:
    """Who is asking: the calling process's uid, gid, pid and umask."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


@dataclass
class AttrChanges:
    """A setattr request: only the fields that are not None change."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


@dataclass
class Handle:
    """One open file.  Areas subclass it to keep per-open state.

    ``direct_io`` bypasses the kernel page cache (streams, anything whose
    contents change behind the kernel's back); ``keep_cache`` keeps cached pages
    across opens (immutable files); ``nonseekable`` for pipes.
    """

    path: str
    flags: int
    direct_io: bool = False
    keep_cache: bool = False
    nonseekable: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)

    @property
    def writable(self) -> bool:
        return (self.flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)

    @property
    def nonblocking(self) -> bool:
        return bool(self.flags & os.O_NONBLOCK)


class KernelCache(Protocol):
    """What an area may ask of the kernel: forget cached data for its paths, or hold some.

    Calls are queued and sent from a separate thread, never from inside a
    request handler (that deadlocks the session), so they are safe anywhere.
    """

    def invalidate(self, area: str, path: str, attr_only: bool = False) -> None: ...

    def invalidate_entry(self, area: str, parent: str, name: str) -> None: ...

    def store(self, area: str, path: str, offset: int, data: bytes | memoryview) -> None: ...


class SnapshotSink(Protocol):
    """Where an area writes its state for a snapshot (implemented in kfs/snapshots).

    ``arcname`` is relative to the area's folder in the zip (``logs/...``
    is added by the sink).  ``compress=False`` for data that does not
    compress (ciphertext).  Calls may come from a worker thread.
    """

    def add_bytes(self, arcname: str, data: bytes, compress: bool = True) -> None: ...

    def add_store_file(self, arcname: str, store: Any, path: str, length: int | None = None,
                       compress: bool = True) -> None:
        """Copy ``path`` of a `kfs.store.StoreDir` (its first ``length`` bytes) in bounded memory."""
        ...


class SnapshotSource(Protocol):
    """A snapshot's files for one area, already checked (no zip-slip, sizes bounded)."""

    def names(self) -> list[str]: ...

    def read_bytes(self, name: str) -> bytes: ...

    def copy_to(self, name: str, store: Any, path: str) -> None:
        """Write entry ``name`` to ``path`` of a `kfs.store.StoreDir`, fsynced, in bounded memory."""
        ...


class Area:
    """Base class for an area.  Defaults refuse everything with EROFS/ENOENT."""

    name: ClassVar[str] = ""
    #: kernel cache lifetimes for this area's entries and attributes, in seconds.
    #: 0 where contents change behind the kernel's back.
    entry_timeout: ClassVar[float] = 1.0
    attr_timeout: ClassVar[float] = 1.0

    def __init__(self, bus: Bus, kernel: KernelCache | None = None) -> None:
        self.bus = bus
        self.kernel = kernel
        self.counters: dict[str, int] = {}

    # -- life cycle ---------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        """Start background tasks (flushers, timers, servers) in ``nursery``."""

    async def stop(self) -> None:
        """Drain queues and make everything durable: the daemon is stopping."""

    def status(self) -> dict[str, Any]:
        """State and counters for ``kfs status`` (JSON-serialisable)."""
        return {"state": "ready", "counters": dict(self.counters)}

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    async def control(self, command: str, args: dict[str, Any]) -> Any:
        """Handle an area-specific CLI command (``kfs vault unlock`` ...)."""
        raise fs_error(errno.ENOSYS, f"{self.name} has no command {command!r}")

    # -- metadata -------------------------------------------------------------
    async def getattr(self, path: str) -> Attr:
        if path == "":
            return Attr.directory(0o755)
        raise fs_error(errno.ENOENT)

    async def lookup(self, path: str) -> Attr:
        """Like getattr, for a name the kernel looks up (may find hidden names)."""
        return await self.getattr(path)

    async def readdir(self, path: str) -> list[tuple[str, Attr]]:
        if path == "":
            return []
        raise fs_error(errno.ENOTDIR)

    async def setattr(self, path: str, changes: AttrChanges, handle: Handle | None, ctx: Ctx) -> Attr:
        raise fs_error(errno.EROFS)

    # -- files ----------------------------------------------------------------
    async def open(self, path: str, flags: int, ctx: Ctx) -> Handle:
        raise fs_error(errno.EROFS)

    async def create(self, path: str, mode: int, flags: int, ctx: Ctx) -> Handle:
        raise fs_error(errno.EROFS)

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        raise fs_error(errno.EBADF)

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        raise fs_error(errno.EBADF)

    async def flush(self, handle: Handle) -> None:
        return None

    async def fsync(self, handle: Handle, datasync: bool) -> None:
        return None

    async def release(self, handle: Handle) -> None:
        return None

    # -- namespace ------------------------------------------------------------
    async def mkdir(self, path: str, mode: int, ctx: Ctx) -> Attr:
        raise fs_error(errno.EROFS)

    async def rmdir(self, path: str) -> None:
        raise fs_error(errno.EROFS)

    async def unlink(self, path: str) -> None:
        raise fs_error(errno.EROFS)

    async def rename(self, old: str, new: str, flags: int) -> None:
        raise fs_error(errno.EROFS)

    async def link(self, old: str, new: str) -> Attr:
        """Make ``new`` another name of the file ``old`` (link(2)); the file's attributes after it.

        Return an `Attr` whose ``identity`` is the same for every name of the file, so the FUSE
        layer makes them one kernel inode.  Refused (EPERM) unless an area supports links.
        """
        raise fs_error(errno.EPERM)

    # -- snapshots (kfs/snapshots calls these; no snapshot code in areas) -----
    async def export_state(self, sink: SnapshotSink, scope: dict[str, Any]) -> None:
        """Write this area's state into a snapshot.

        ``scope``: {"type": "full"|"agent"|"conversation", "agent": id or None,
        "memory_window": N}.  Capture a consistent point quickly (hold the area's
        write path only for that), then copy outside the hold.
        For ``conversation`` snapshots ``scope["memory_events"]`` is a list:
        an area holding conversation events (logs, streams) appends its last N
        as dicts ``{"timestamp": RFC3339, "area": name, "source": file or
        stream, "record": {...}}``; the snapshot keeps the newest N of all of
        them, by timestamp, in ``memory_window.json``.
        """

    async def restore_state(self, source: SnapshotSource) -> list[str]:
        """Replace this area's state atomically from a snapshot; return changed paths.

        Old or new state after a crash, never a mix.  The caller invalidates the
        kernel's caches for the returned paths and publishes snapshot_restored.
        """
        return []


class EmptyArea(Area):
    """An area whose issue has not landed yet: lists empty, refuses writes (EROFS)."""

    def __init__(self, name: str, bus: Bus, kernel: KernelCache | None = None) -> None:
        super().__init__(bus, kernel)
        self.name = name  # type: ignore[misc]

    def status(self) -> dict[str, Any]:
        return {"state": "not built yet"}
