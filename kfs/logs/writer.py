"""Per-file append writers: one O_APPEND descriptor per active log, shared by its open handles.

A batch of complete lines goes to the store file in a single ``os.write`` on
an O_APPEND descriptor, before the FUSE write is answered: once ``write()``
returns in the caller, the lines are in the store's page cache and survive a
kill -9 of the daemon, and no partial line is ever in the file (the kernel
appends one write whole; the trio loop runs one handler at a time anyway).

The size is cached per file (for rotation) and refreshed with ``fstat``
whenever a handle opens the file, so growth behind our back (the daemon's own
``kfsd.log.jsonl``) is picked up without a ``stat`` per write.

A file whose last handle closed stays open, idle, for the next opener (up to
`IDLE_FILES` of them, least recently used closed first): an agent that opens,
appends one line and closes costs one ``fstat`` then, not ``openat`` + ``fstat``
+ ``close``.  The ``fstat`` also notices a file unlinked behind our back (no
links left): that descriptor is dropped and the path opened afresh.
"""

from __future__ import annotations

import os

from kfs.store import StoreDir

#: how many log files with no open handle keep their descriptor for the next opener
IDLE_FILES = 32


class LogFile:
    """An active log being written: its store descriptor, cached size and users."""

    def __init__(self, store: StoreDir, path: str, fd: int) -> None:
        self.store = store
        self.path = path
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.users = 0

    def refresh(self) -> os.stat_result:
        st = os.fstat(self.fd)
        self.size = st.st_size
        return st

    def append(self, data: bytes) -> None:
        """Append ``data`` (complete lines) with one write; loop only on a short write (disk full)."""
        written = os.write(self.fd, data)
        if written != len(data):
            view = memoryview(data)[written:]
            while view:
                n = os.write(self.fd, view)
                written += n
                view = view[n:]
        self.size += written

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Writers:
    """The open LogFiles of an area, by relative path: opened on first use, kept idle after the last user."""

    def __init__(self, store: StoreDir) -> None:
        self.store = store
        #: every open LogFile, in use or idle (insertion order = least recently released first)
        self.files: dict[str, LogFile] = {}
        self.idle = 0

    def acquire(self, path: str, create_mode: int | None = None) -> LogFile:
        log = self.files.get(path)
        if log is not None and log.refresh().st_nlink == 0:  # unlinked behind our back
            self.forget(path)
            log = None
        if log is None:
            flags = os.O_WRONLY | os.O_APPEND
            if create_mode is not None:
                flags |= os.O_CREAT
            log = LogFile(self.store, path, self.store.open_fd(path, flags, create_mode or 0o644))
            self.files[path] = log
        elif log.users == 0:
            self.idle -= 1
        log.users += 1
        return log

    def in_use(self) -> int:
        return len(self.files) - self.idle

    def release(self, log: LogFile) -> None:
        log.users -= 1
        if log.users > 0:
            return
        if self.files.get(log.path) is not log:  # unlinked or replaced meanwhile
            log.close()
            return
        # Idle, most recently released last: move it to the end of the dict's order.
        del self.files[log.path]
        self.files[log.path] = log
        self.idle += 1
        if self.idle > IDLE_FILES:
            for path, oldest in self.files.items():
                if oldest.users == 0:
                    del self.files[path]
                    self.idle -= 1
                    oldest.close()
                    break

    def forget(self, path: str) -> None:
        """``path`` was unlinked: open handles keep writing to the old file, new opens get a new one."""
        log = self.files.pop(path, None)
        if log is not None and log.users <= 0:
            self.idle -= 1
            log.close()

    def reopen(self, log: LogFile) -> None:
        """After a rotation renamed the file away: point ``log`` at a fresh file at ``log.path``."""
        new_fd = self.store.open_fd(log.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        old_fd, log.fd = log.fd, new_fd
        os.close(old_fd)
        log.refresh()

    def close_all(self) -> None:
        for log in self.files.values():
            log.close()
        self.files.clear()
        self.idle = 0
