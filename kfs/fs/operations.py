"""pyfuse3.Operations that only dispatch: inode -> (area, path), fh -> Handle.

Nothing here knows what an area stores.  What this layer does own:
  * inode numbers and lookup counts (`InodeTable`), file handle numbers, and
    hard links: names an area reports with one ``Attr.identity`` are one inode;
  * the mount's root directory, whose entries are the areas;
  * entry/attribute timeouts, per area;
  * robustness: every handler maps OSError to its errno and anything
    unexpected to EIO (logged), so one bad request never ends ``pyfuse3.main``;
  * kernel cache invalidation, sent from a separate thread (`KernelNotifier`).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pyfuse3
import trio

from kfs.bus import Bus
from kfs.fs.area import Area, Attr, AttrChanges, Ctx, Handle, fs_error
from kfs.fs.inodes import InodeTable, Node

log = logging.getLogger("kfs.fs")

NAME_MAX = 255
ROOT_TIMEOUT = 60.0

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_handler(func: F) -> F:
    """Answer OSError with its errno and anything unexpected with EIO, logged."""

    opcode = func.__name__

    @functools.wraps(func)
    async def wrapper(self: KfsOperations, *args: Any) -> Any:
        self.requests += 1
        by_op = self.requests_by_op
        by_op[opcode] = by_op.get(opcode, 0) + 1
        try:
            return await func(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            code = e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EIO
            raise pyfuse3.FUSEError(code) from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except BaseException as e:
            if isinstance(e, BaseExceptionGroup) and e.split(trio.Cancelled)[0] is not None:
                raise
            self.errors += 1
            log.exception("unexpected error in %s%r", func.__name__, args[:2])
            self.bus.publish("kfs_error", {"where": func.__name__, "error": repr(e)}, "fs")
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


#: Ctx objects by (uid, gid, pid, umask): an appender opens the same file as the same caller
#: again and again, and a dataclass costs microseconds to build (areas never modify a Ctx)
_CTX_CACHE: dict[tuple[int, int, int, int], Ctx] = {}
_CTX_CACHE_MAX = 1024


def _ctx(ctx: Any) -> Ctx:
    if ctx is None:
        return Ctx()
    key = (ctx.uid, ctx.gid, ctx.pid, getattr(ctx, "umask", 0o022))
    found = _CTX_CACHE.get(key)
    if found is None:
        if len(_CTX_CACHE) >= _CTX_CACHE_MAX:
            _CTX_CACHE.clear()
        found = _CTX_CACHE[key] = Ctx(*key)
    return found


def _name(raw: bytes) -> str:
    if len(raw) > NAME_MAX:
        raise fs_error(errno.ENAMETOOLONG)
    return os.fsdecode(raw)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class KernelNotifier:
    """Queues cache invalidations (and page-cache stores) and sends them from a thread of their own.

    Sending one from inside a request handler can deadlock the session (the
    kernel waits on locks that the in-flight request holds: a store waits for
    the page locks of a read we have not answered yet), so areas only enqueue;
    the thread calls pyfuse3.
    """

    def __init__(self, inodes: InodeTable) -> None:
        self._inodes = inodes
        self._queue: queue.SimpleQueue[tuple[str, int, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.active = False

    def start(self) -> None:
        self.active = True
        self._thread = threading.Thread(target=self._run, name="kfs-notify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.active = False
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=2)

    def invalidate(self, area: str, path: str, attr_only: bool = False) -> None:
        node = self._inodes.find(area, path)
        if node is not None and self.active:
            self._queue.put(("inode", node.inode, attr_only))

    def invalidate_entry(self, area: str, parent: str, name: str) -> None:
        node = self._inodes.find(area, parent)
        if node is not None and self.active:
            self._queue.put(("entry", node.inode, os.fsencode(name)))

    def store(self, area: str, path: str, offset: int, data: bytes | memoryview) -> None:
        """Put ``data`` into the kernel's page cache of ``path`` at ``offset`` (FUSE notify_store).

        For plaintext an area has just produced anyway (the vault decrypts whole chunks), so
        the kernel answers the next reads of it.  Queued in the same FIFO as invalidations: a
        change queued later always lands after it.  ``data`` must not change while queued.
        """
        node = self._inodes.find(area, path)
        if node is not None and self.active:
            self._queue.put(("store", node.inode, (offset, data)))

    def invalidate_area(self, area: str) -> None:
        """Drop the kernel's data and attributes of every inode of ``area`` it may cache.

        Files unlinked while still open included: they have no name left to invalidate by.
        Call on the trio thread (it walks the inode table).
        """
        if not self.active:
            return
        for node in self._inodes.nodes_of(area):
            self._queue.put(("inode", node.inode, False))

    def drain(self, limit: float) -> bool:
        """Block until everything queued so far has been sent (at most ``limit`` s); False on timeout.

        Blocks: call it from a worker thread (``trio.to_thread.run_sync(notifier.drain, 2.0)``).
        """
        if not self.active:
            return True
        sent = threading.Event()
        self._queue.put(("barrier", 0, sent))
        return sent.wait(limit)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, inode, arg = item
            try:
                if kind == "inode":
                    pyfuse3.invalidate_inode(inode, arg)
                elif kind == "store":
                    pyfuse3.notify_store(inode, *arg)
                elif kind == "barrier":
                    arg.set()
                else:
                    pyfuse3.invalidate_entry(inode, arg)
            except OSError as e:  # ENOENT: the kernel had already forgotten it
                if e.errno not in (errno.ENOENT, errno.EBADF):
                    log.warning("notify %s %s failed: %s", kind, inode, e)
            except Exception:
                log.exception("notify %s %s failed", kind, inode)


class KfsOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, areas: dict[str, Area], bus: Bus, statfs_fd: int) -> None:
        super().__init__()
        self.areas = areas
        self.bus = bus
        self.statfs_fd = statfs_fd
        self.inodes = InodeTable()
        self.notifier = KernelNotifier(self.inodes)
        for name in areas:
            self.inodes.pin_area(name)
        self._handles: dict[int, tuple[Area, Handle]] = {}
        self._dirs: dict[int, list[tuple[str, Attr, int]]] = {}
        self._next_fh = 1
        self.requests = 0
        #: requests per FUSE operation (lookup, getattr, open, ...): shows what a workload costs
        self.requests_by_op: dict[str, int] = {}
        self.errors = 0
        self.started = time.monotonic()
        self.root_attr = Attr.directory(0o755, os.getuid(), os.getgid())

    # ------------------------------------------------------------------ helpers
    def _resolve(self, inode: int) -> tuple[Area | None, str]:
        return self._resolve_node(self.inodes.get(inode))

    def _resolve_node(self, node: Node) -> tuple[Area | None, str]:
        if node.area == "":
            return None, ""
        if node.unlinked:
            raise fs_error(errno.ENOENT)
        return self.areas[node.area], node.path

    def _entry(self, inode: int, attr: Attr, area: Area | None) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode  # generation and st_rdev stay 0 (EntryAttributes starts zeroed)
        entry.entry_timeout = area.entry_timeout if area else ROOT_TIMEOUT
        entry.attr_timeout = area.attr_timeout if area else ROOT_TIMEOUT
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_size = attr.size
        entry.st_blksize = attr.blksize
        entry.st_blocks = (attr.size + 511) // 512
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    async def _child(self, parent_inode: int, raw_name: bytes) -> tuple[Area, str]:
        """The area and path of ``name`` inside directory ``parent_inode``."""
        name = _name(raw_name)
        area, parent = self._resolve(parent_inode)
        if area is None:
            if name not in self.areas:
                raise fs_error(errno.ENOENT if raw_name not in (b".", b"..") else errno.EPERM)
            return self.areas[name], ""
        return area, _join(parent, name)

    async def _remember(self, area: Area, path: str) -> pyfuse3.EntryAttributes:
        attr = await area.lookup(path)
        node = self.inodes.find(area.name, path)
        if node is None or node.identity is not attr.identity:  # new, or a linked file's name
            node = await self._node(area, path, attr)
        node.lookups += 1
        return self._entry(node.inode, attr, area)

    async def _node(self, area: Area, path: str, attr: Attr) -> Node:
        """The node of ``path`` (numbered if new): that of another name of the same file if any.

        The usual case is one dict lookup; identities (hard-linked files) cost more only for a
        name the table does not know yet.
        """
        inodes = self.inodes
        node = inodes.find(area.name, path)
        identity = attr.identity
        if node is not None and node.names is not None and identity != node.identity:
            # one name of a linked node is another file now (a snapshot restore replaced it):
            # it leaves that node and gets its own
            inodes.removed(area.name, path)
            node = None
        if node is None:
            if identity is not None:
                other = inodes.find_identity(area.name, identity)
                if other is not None and await self._still_is(area, other, identity):
                    inodes.add_name(other, path)
                    return other
            node = inodes.ensure(area.name, path)
        inodes.set_identity(node, identity)
        return node

    async def _still_is(self, area: Area, node: Node, identity: Any) -> bool:
        """Whether ``node``'s name still names the file ``identity`` (store inode numbers get reused)."""
        if node.unlinked:
            return False
        try:
            now = (await area.getattr(node.path)).identity
        except OSError:
            now = None
        if now != identity:
            self.inodes.set_identity(node, now)
            return False
        return True

    def _new_fh(self, area: Area, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = (area, handle)
        return fh

    def _handle(self, fh: int) -> tuple[Area, Handle]:
        try:
            return self._handles[fh]
        except KeyError:
            raise fs_error(errno.EBADF) from None

    @staticmethod
    def _file_info(fh: int, handle: Handle) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(
            fh=fh, direct_io=handle.direct_io, keep_cache=handle.keep_cache, nonseekable=handle.nonseekable
        )

    # ------------------------------------------------------------------ metadata
    @fuse_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        area, path = await self._child(parent_inode, name)
        return await self._remember(area, path)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            self.inodes.forget(inode, nlookup)

    @fuse_handler
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = self.inodes.get(inode)
        if node.unlinked and node.unlinked_attr is not None:
            # fstat of a file unlinked while open (Python's read() asks for it)
            return self._entry(inode, node.unlinked_attr, self.areas.get(node.area))
        area, path = self._resolve_node(node)
        attr = self.root_attr if area is None else await area.getattr(path)
        if attr.identity is not node.identity:  # (inline: getattr is a hot path, and None is None)
            self.inodes.set_identity(node, attr.identity)  # linked or unlinked since we last looked
        return self._entry(inode, attr, area)

    @fuse_handler
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        area, path = self._resolve(inode)
        if area is None:
            raise fs_error(errno.EPERM)
        changes = AttrChanges(
            mode=stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        handle = self._handles[fh][1] if fh is not None and fh in self._handles else None
        new = await area.setattr(path, changes, handle, _ctx(ctx))
        return self._entry(inode, new, area)

    @fuse_handler
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.statfs_fd)
        data = pyfuse3.StatvfsData()
        for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(data, key, getattr(st, key))
        data.f_namemax = NAME_MAX
        return data

    # ------------------------------------------------------------------ directories
    @fuse_handler
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        area, path = self._resolve(inode)
        if area is None:
            entries = [
                (name, await a.getattr(""), self.inodes.ensure(name, "").inode) for name, a in self.areas.items()
            ]
        else:
            attr = await area.getattr(path)
            if not attr.is_dir:
                raise fs_error(errno.ENOTDIR)
            listing = await area.readdir(path)
            ensure = self.inodes.ensure
            entries = [
                (name, a, ensure(area.name, _join(path, name)).inode if a.identity is None
                 else (await self._node(area, _join(path, name), a)).inode)
                for name, a in listing
            ]
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = entries
        return fh

    @fuse_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise fs_error(errno.EBADF)
        for index in range(start_id, len(entries)):
            name, attr, inode = entries[index]
            entry = self._entry(inode, attr, None)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @fuse_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        area, path = await self._child(parent_inode, name)
        if path == "":
            raise fs_error(errno.EEXIST)
        await area.mkdir(path, stat.S_IMODE(mode), _ctx(ctx))
        return await self._remember(area, path)

    @fuse_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        area, path = await self._child(parent_inode, name)
        if path == "":
            raise fs_error(errno.EBUSY)
        await area.rmdir(path)
        self.inodes.removed(area.name, path)

    @fuse_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        area, path = await self._child(parent_inode, name)
        if path == "":
            raise fs_error(errno.EISDIR)
        node = self.inodes.find(area.name, path)
        last_attr = await area.getattr(path) if node is not None and node.lookups > 0 else None
        await area.unlink(path)
        self.inodes.removed(area.name, path, last_attr)

    @fuse_handler
    async def rename(
        self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int, ctx: Any = None
    ) -> None:
        area_old, old = await self._child(parent_old, name_old)
        area_new, new = await self._child(parent_new, name_new)
        if area_old is not area_new:
            raise fs_error(errno.EXDEV)
        if old == "" or new == "":
            raise fs_error(errno.EBUSY)
        await area_old.rename(old, new, flags)
        self.inodes.renamed(area_old.name, old, new)

    @fuse_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.inodes.get(inode)
        area, old = self._resolve_node(node)
        if area is None or old == "":
            raise fs_error(errno.EPERM)  # the root and the area roots are directories
        new_area, new = await self._child(new_parent_inode, new_name)
        if new_area is not area:
            raise fs_error(errno.EXDEV)
        if new == "":
            raise fs_error(errno.EEXIST)
        attr = await area.link(old, new)
        # the new name is this node: the kernel gets the inode it already has (one st_ino, one
        # page cache); a link reply counts as a lookup
        self.inodes.add_name(node, new)
        self.inodes.set_identity(node, attr.identity)
        node.lookups += 1
        return self._entry(node.inode, attr, area)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    # ------------------------------------------------------------------ files
    @fuse_handler
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        area, path = self._resolve(inode)
        if area is None:
            raise fs_error(errno.EISDIR)
        handle = await area.open(path, flags, _ctx(ctx))
        return self._file_info(self._new_fh(area, handle), handle)

    @fuse_handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        area, path = await self._child(parent_inode, name)
        if path == "":
            raise fs_error(errno.EISDIR)
        handle = await area.create(path, stat.S_IMODE(mode), flags, _ctx(ctx))
        fh = self._new_fh(area, handle)
        try:
            entry = await self._remember(area, path)
        except BaseException:
            self._handles.pop(fh, None)
            await area.release(handle)
            raise
        return self._file_info(fh, handle), entry

    # read, write and flush hand back the area's coroutine for `fuse_handler` to await: one
    # coroutine less per request on the hottest paths (errors still surface inside the wrapper)
    @fuse_handler
    def read(self, fh: int, off: int, size: int) -> Coroutine[Any, Any, bytes]:
        area, handle = self._handle(fh)
        return area.read(handle, off, size)

    @fuse_handler
    def write(self, fh: int, off: int, buf: bytes) -> Coroutine[Any, Any, int]:
        area, handle = self._handle(fh)
        return area.write(handle, off, buf)

    @fuse_handler
    def flush(self, fh: int) -> Coroutine[Any, Any, None]:
        area, handle = self._handle(fh)
        return area.flush(handle)

    @fuse_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        area, handle = self._handle(fh)
        await area.fsync(handle, datasync)

    @fuse_handler
    async def release(self, fh: int) -> None:
        area, handle = self._handles.pop(fh, (None, None))
        if area is not None and handle is not None:
            await area.release(handle)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        uptime = time.monotonic() - self.started
        return {
            "requests": self.requests,
            "requests_per_s": round(self.requests / uptime, 1) if uptime > 0 else 0.0,
            "requests_by_op": dict(sorted(self.requests_by_op.items())),
            "errors": self.errors,
            "inodes": len(self.inodes),
            "open_handles": len(self._handles),
        }
