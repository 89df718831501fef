"""The store: the real bytes on disk, reached only through directory descriptors.

The daemon never touches its own mountpoint by path, and never builds
``store + "/" + path`` strings: every call is relative to an open ``dir_fd``,
so a path's length is never the store's prefix plus the mount's.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from kfs.fs.area import Attr, fs_error

NAME_MAX = 255


def check_relpath(path: str) -> None:
    """Refuse paths that could leave the directory they are relative to."""
    if path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise fs_error(errno.EINVAL, f"bad relative path {path!r}")


class StoreDir:
    """One directory of the store (an area's subdirectory), as an open dir_fd."""

    def __init__(self, fd: int, label: str) -> None:
        self.fd = fd
        self.label = label  # for messages only; never used to reach files

    @classmethod
    def open(cls, path: str, create: bool = True, mode: int = 0o700) -> StoreDir:
        if create:
            os.makedirs(path, mode=mode, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(fd, path)

    def subdir(self, name: str, create: bool = True, mode: int = 0o700) -> StoreDir:
        check_relpath(name)
        if create:
            try:
                os.mkdir(name, mode, dir_fd=self.fd)
            except FileExistsError:
                pass
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        return StoreDir(fd, f"{self.label}/{name}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- metadata ---------------------------------------------------------------
    def stat(self, path: str) -> os.stat_result:
        if path == "":
            return os.stat(self.fd)
        return os.stat(path, dir_fd=self.fd, follow_symlinks=False)

    def attr(self, path: str) -> Attr:
        return Attr.from_stat(self.stat(path))

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except FileNotFoundError:
            return False
        return True

    def listdir(self, path: str = "") -> list[str]:
        fd = self.fd if path == "" else os.open(path, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        try:
            return sorted(os.listdir(fd))
        finally:
            if fd != self.fd:
                os.close(fd)

    def walk_files(self, path: str = "") -> Iterator[str]:
        """Every regular file below ``path``, as relative paths, sorted."""
        for name in self.listdir(path):
            rel = f"{path}/{name}" if path else name
            st = self.stat(rel)
            if stat.S_ISDIR(st.st_mode):
                yield from self.walk_files(rel)
            elif stat.S_ISREG(st.st_mode):
                yield rel

    # -- files ------------------------------------------------------------------
    def open_fd(self, path: str, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode, dir_fd=self.fd)

    def read_bytes(self, path: str) -> bytes:
        fd = self.open_fd(path, os.O_RDONLY)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write_atomic(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Write a whole file durably: temp file, fsync, rename, fsync the directory."""
        parent, _, name = path.rpartition("/")
        tmp = f"{parent + '/' if parent else ''}.{name}.kfs-tmp"
        fd = self.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self.fsync_dir(parent)

    def fsync_dir(self, path: str = "") -> None:
        fd = self.fd if path == "" else os.open(path, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        try:
            os.fsync(fd)
        finally:
            if fd != self.fd:
                os.close(fd)

    # -- namespace --------------------------------------------------------------
    def mkdir(self, path: str, mode: int = 0o755) -> None:
        os.mkdir(path, mode, dir_fd=self.fd)

    def rmdir(self, path: str) -> None:
        os.rmdir(path, dir_fd=self.fd)

    def unlink(self, path: str) -> None:
        os.unlink(path, dir_fd=self.fd)

    def rename(self, old: str, new: str) -> None:
        os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def chmod(self, path: str, mode: int) -> None:
        if path == "":
            os.chmod(self.fd, mode)
        else:
            os.chmod(path, mode, dir_fd=self.fd)

    def chown(self, path: str, uid: int, gid: int) -> None:
        if path == "":
            os.chown(self.fd, uid, gid)
        else:
            os.chown(path, uid, gid, dir_fd=self.fd, follow_symlinks=False)

    def utime(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        if path == "":
            os.utime(self.fd, ns=(atime_ns, mtime_ns))
        else:
            os.utime(path, ns=(atime_ns, mtime_ns), dir_fd=self.fd, follow_symlinks=False)

    @contextmanager
    def opened(self, path: str, flags: int, mode: int = 0o600) -> Iterator[int]:
        fd = self.open_fd(path, flags, mode)
        try:
            yield fd
        finally:
            os.close(fd)
