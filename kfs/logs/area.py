"""logs/: append-only JSON Lines, validated, rotated, retained, forwarded.

What the FUSE layer sees (docs/logs.md has the user's view):
  * only ``*.log.jsonl`` files (EINVAL on create otherwise); directories allowed;
  * every write is an append: on an O_APPEND handle whatever the offset the
    kernel chose (its idea of the size goes stale when kfs adds a timestamp),
    on other handles only at or past the end (EPERM below it);
  * lines are assembled per open handle and stored whole, one ``os.write``
    per batch of complete lines; a write with any bad line fails as a whole
    (EINVAL) and stores nothing;
  * truncation (O_TRUNC or setattr size) of a non-empty log: EPERM.

Attributes are cached for 1 s: after every WRITE the kernel (5.16+) itself
drops the cached size and mtime, so the next ``stat`` asks us and sees the
stored size, timestamps included (measured: with attr_timeout 0 an
open-append-close cycle took 9 requests, now 5).  What changes without a
WRITE is invalidated explicitly: rotation, and the daemon's own
kfsd.log.jsonl (polled).  Writable handles use direct I/O, so the page cache
never holds bytes that differ from what was stored; read-only handles use the
page cache (the kernel drops it when it sees size or mtime change).
``st_blksize`` is 128 KiB: Python's default buffering and ``cat`` size their
buffers by it, so a buffered writer sends 32 times fewer requests than at 4 KiB.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from kfs.config import LoggingConfig, resolve_data_path
from kfs.fs.area import Area, Attr, AttrChanges, Ctx, Handle, SnapshotSink, SnapshotSource, fs_error
from kfs.logs import rotation
from kfs.logs.lines import MAX_LINE_BYTES, LineError, LineValidator, is_log_name, is_rotated_name, plausible_start
from kfs.logs.logstash import Forwarder
from kfs.logs.writer import LogFile, Writers
from kfs.store import StoreDir

if TYPE_CHECKING:
    from kfs.bus import Bus

log = logging.getLogger("kfs.logs")

#: the daemon appends its own diagnostics here through its own descriptor: never rotated by us
DAEMON_LOG = "kfsd.log.jsonl"
DAEMON_LOG_POLL = 0.5
WRITE_ACCESS = (os.O_WRONLY, os.O_RDWR)
#: for conversation snapshots: how much of each log's tail is read to find its last records
MEMORY_TAIL_BYTES = 4 << 20


@dataclass
class LogHandle(Handle):
    log: LogFile | None = None
    read_fd: int = -1
    #: the start of a line still being written: b"" (no allocation per open) or a bytearray
    pending: bytearray | bytes = b""
    #: for handles without O_APPEND: where the caller's next sequential write lands
    next_offset: int = -1


#: st_blksize of logs: Python's default buffering and cat size their buffers by it (fewer FUSE requests)
LOG_BLKSIZE = 128 << 10


def _attr(st: os.stat_result) -> Attr:
    return Attr(st.st_mode, st.st_size, st.st_uid, st.st_gid, st.st_nlink,
                st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, LOG_BLKSIZE)


def _hidden(path: str) -> bool:
    return path.split("/", 1)[0] in rotation.PRIVATE_NAMES


class LogsArea(Area):
    name = "logs"
    entry_timeout = 1.0
    attr_timeout = 1.0

    def __init__(self, bus: Bus, store: StoreDir, config: LoggingConfig, opts: Any = None) -> None:
        super().__init__(bus)
        self.store = store
        self.config = config
        self.validator = LineValidator(config.level)
        self.writers = Writers(store)
        self.rotate_bytes = int(config.rotate_size_mb * (1 << 20))
        self.forwarder = Forwarder(store, config.logstash) if config.logstash is not None else None
        self.lines = 0
        self.bytes = 0
        self.rejected = 0
        self.filtered = 0
        self.rotations = 0
        self.retention_deleted = 0
        self.partial_dropped = 0
        self.fsyncs = 0

    # -- life cycle ---------------------------------------------------------------
    async def start(self, nursery: trio.Nursery) -> None:
        self._create_default_log()
        nursery.start_soon(self._retention_loop)
        nursery.start_soon(self._watch_daemon_log)
        if self.forwarder is not None:
            nursery.start_soon(self.forwarder.run)

    def _create_default_log(self) -> None:
        """``output`` (the agents' default log, ``/data/logs/kai.log.jsonl``) exists from the start."""
        rel = resolve_data_path(self.config.output)
        if not rel.startswith("logs/"):
            return
        rel = rel[len("logs/"):]
        if "/" in rel or not is_log_name(rel) or is_rotated_name(rel) or _hidden(rel):
            log.warning("logging.yaml output %r is not a log file directly in logs/: not created", self.config.output)
            return
        try:
            os.close(self.store.open_fd(rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            pass
        except OSError as e:
            log.warning("cannot create %s: %s", rel, e)

    async def stop(self) -> None:
        files = list(self.writers.files.values())
        await trio.to_thread.run_sync(lambda: [f.fsync() for f in files if f.fd >= 0])
        if self.forwarder is not None:
            await self.forwarder.commit_delivered(float(self.forwarder.config.replay_window))

    def status(self) -> dict[str, Any]:
        counters = {
            "lines": self.lines, "bytes": self.bytes, "rejected_writes": self.rejected,
            "filtered_lines": self.filtered, "rotations": self.rotations,
            "retention_deleted": self.retention_deleted, "partial_lines_dropped": self.partial_dropped,
            "fsyncs": self.fsyncs, "open_logs": self.writers.in_use(),
        }
        result: dict[str, Any] = {"state": "ready", "counters": counters}
        if self.forwarder is not None:
            result["logstash"] = self.forwarder.status()
            counters["logstash_spool_bytes"] = self.forwarder.spool.depth
        return result

    async def _retention_loop(self) -> None:
        while True:
            if self.config.max_days > 0:
                try:
                    deleted = await trio.to_thread.run_sync(rotation.apply_retention, self.store,
                                                            float(self.config.max_days))
                except OSError as e:
                    log.warning("retention check failed: %s", e)
                    deleted = []
                for rel in deleted:
                    self.retention_deleted += 1
                    parent, _, name = rel.rpartition("/")
                    if self.kernel is not None:
                        self.kernel.invalidate_entry(self.name, parent, name)
                    log.info("retention: deleted %s (older than %d days)", rel, self.config.max_days)
            await trio.sleep(max(float(self.config.retention_check_interval), 0.05))

    async def _watch_daemon_log(self) -> None:
        """kfsd.log.jsonl grows behind the kernel's back (the daemon writes it directly): tell the kernel."""
        last = -1
        while True:
            try:
                size = self.store.stat(DAEMON_LOG).st_size
            except OSError:
                size = -1
            if size != last and last != -1 and self.kernel is not None:
                self.kernel.invalidate(self.name, DAEMON_LOG, attr_only=True)
            last = size
            await trio.sleep(DAEMON_LOG_POLL)

    # -- metadata -----------------------------------------------------------------
    async def getattr(self, path: str) -> Attr:
        logfile = self.writers.files.get(path)
        if logfile is not None:
            # A log being written (or idle after its last writer): fstat its descriptor, no path walk.
            st = os.fstat(logfile.fd)
            if st.st_nlink:
                return _attr(st)
        if _hidden(path):
            raise fs_error(errno.ENOENT)
        return _attr(self.store.stat(path))

    async def readdir(self, path: str) -> list[tuple[str, Attr]]:
        if _hidden(path):
            raise fs_error(errno.ENOENT)
        entries = []
        for name in self.store.listdir(path):
            if not path and name in rotation.PRIVATE_NAMES:
                continue
            rel = f"{path}/{name}" if path else name
            try:
                st = self.store.stat(rel)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                entries.append((name, _attr(st)))
        return entries

    async def setattr(self, path: str, changes: AttrChanges, handle: Handle | None, ctx: Ctx) -> Attr:
        if _hidden(path):
            raise fs_error(errno.ENOENT)
        st = self.store.stat(path)
        read_only = stat.S_ISREG(st.st_mode) and is_rotated_name(path.rpartition("/")[2])
        if changes.size is not None and changes.size != st.st_size:
            raise fs_error(errno.EPERM, "logs are append-only")
        if changes.mode is not None:
            if read_only:
                raise fs_error(errno.EPERM, "rotated logs are read-only")
            self.store.chmod(path, changes.mode)
        if changes.uid is not None or changes.gid is not None:
            self.store.chown(path, -1 if changes.uid is None else changes.uid,
                             -1 if changes.gid is None else changes.gid)
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            self.store.utime(path, st.st_atime_ns if changes.atime_ns is None else changes.atime_ns,
                             st.st_mtime_ns if changes.mtime_ns is None else changes.mtime_ns)
        return _attr(self.store.stat(path))

    # -- files --------------------------------------------------------------------
    async def open(self, path: str, flags: int, ctx: Ctx) -> Handle:
        if path.split("/", 1)[0] in rotation.PRIVATE_NAMES:
            raise fs_error(errno.ENOENT)
        name = path.rpartition("/")[2]
        access = flags & os.O_ACCMODE
        if access in WRITE_ACCESS:
            # The hot path (an appender's open): no stat, the writer's fstat answers for the size,
            # and opening a directory for writing fails with EISDIR by itself.
            if not is_log_name(name) or is_rotated_name(name):
                if stat.S_ISDIR(self.store.stat(path).st_mode):  # ENOENT, EISDIR, then the name
                    raise fs_error(errno.EISDIR)
                if is_rotated_name(name):
                    raise fs_error(errno.EPERM, "rotated logs are read-only")
                raise fs_error(errno.EINVAL, "only *.log.jsonl files can be written")
            logfile = self.writers.acquire(path)
            if flags & os.O_TRUNC and logfile.size > 0:
                self.writers.release(logfile)
                raise fs_error(errno.EPERM, "logs are append-only")
            handle = LogHandle(path, flags, direct_io=True, log=logfile)
            if access == os.O_RDWR:
                try:
                    handle.read_fd = self.store.open_fd(path, os.O_RDONLY)
                except BaseException:
                    self.writers.release(logfile)
                    raise
            return handle
        if stat.S_ISDIR(self.store.stat(path).st_mode):
            raise fs_error(errno.EISDIR)
        handle = LogHandle(path, flags, keep_cache=is_rotated_name(name))
        handle.read_fd = self.store.open_fd(path, os.O_RDONLY)
        return handle

    async def create(self, path: str, mode: int, flags: int, ctx: Ctx) -> Handle:
        name = path.rpartition("/")[2]
        if _hidden(path):
            raise fs_error(errno.EPERM, "reserved name")
        if not is_log_name(name):
            raise fs_error(errno.EINVAL, "names in logs/ must end in .log.jsonl")
        if is_rotated_name(name):
            raise fs_error(errno.EPERM, "that name is reserved for rotated logs")
        try:
            fd = self.store.open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & ~ctx.umask & 0o7777)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
        else:
            try:
                if (ctx.uid, ctx.gid) != (os.getuid(), os.getgid()):
                    os.fchown(fd, ctx.uid, ctx.gid)
            finally:
                os.close(fd)
        return await self.open(path, flags & ~os.O_CREAT & ~os.O_EXCL, ctx)

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        fd = handle.read_fd if isinstance(handle, LogHandle) else -1
        if fd < 0:
            raise fs_error(errno.EBADF)
        return os.pread(fd, size, offset)

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        assert isinstance(handle, LogHandle)
        logfile = handle.log
        if logfile is None:
            raise fs_error(errno.EBADF)
        if not handle.flags & os.O_APPEND and offset != handle.next_offset and offset < logfile.size:
            # Not an appender and not continuing its own sequential writes: an overwrite.
            raise fs_error(errno.EPERM, "logs are append-only")
        pending = handle.pending
        cut = data.rfind(b"\n")
        if cut < 0:
            if len(pending) + len(data) > MAX_LINE_BYTES:
                self._reject(handle, "line too long")
            if not pending:
                if not plausible_start(data):
                    self._reject(handle, "not a JSON object")
                handle.pending = bytearray(data)
            else:
                pending += data  # a bytearray once it holds anything: grows in place
            handle.next_offset = offset + len(data)
            return len(data)
        if cut + 1 == len(data):
            complete = b"".join((pending, data)) if pending else data
        else:  # one copy (a view, then one join), not a slice and a concatenation
            complete = b"".join((pending, memoryview(data)[: cut + 1]))
        rest = data[cut + 1:]
        if rest and not plausible_start(rest):
            self._reject(handle, "not a JSON object")
        try:
            batch = self.validator.process(complete)
        except LineError as e:
            self._reject(handle, str(e))
        self._store(logfile, batch.data, batch.records, batch.filtered)
        if rest or pending:
            handle.pending = bytearray(rest)
        handle.next_offset = offset + len(data)
        return len(data)

    def _reject(self, handle: LogHandle, why: str) -> NoReturn:
        # The broken line is dropped whole (its earlier pieces too): the next write starts a fresh line.
        handle.pending = bytearray()
        self.rejected += 1
        raise fs_error(errno.EINVAL, why)

    def _store(self, logfile: LogFile, data: bytes, records: list[dict[str, Any]], filtered: int) -> None:
        if data:
            if self.forwarder is not None:
                # Spool first: a line in the log is then always in the spool, kill -9 included.
                self.forwarder.append(data)
            logfile.append(data)
            self.bytes += len(data)
        self.lines += len(records)
        self.filtered += filtered
        path = logfile.path
        if records:
            # One bus event per write (the streams area appends its bytes to the `logs` stream
            # as they are); per-line events only for subscribers that asked for them by name.
            bus = self.bus
            bus.publish("log_lines", {"file": path, "data": data, "count": len(records), "records": records},
                        "logs")
            if bus.has_subscribers("log_line"):
                for record in records:
                    bus.publish_named("log_line", {"file": path, "record": record}, "logs")
        if self.rotate_bytes and logfile.size >= self.rotate_bytes and path != DAEMON_LOG:
            self._rotate(logfile)

    def _rotate(self, logfile: LogFile) -> None:
        try:
            rotated, st = rotation.rotate(self.store, logfile.path)
            rotation.create_like(self.store, logfile.path, st)
            self.writers.reopen(logfile)
        except OSError as e:
            log.warning("rotating %s failed: %s", logfile.path, e)
            return
        self.rotations += 1
        self.bus.publish("log_rotated", {"file": logfile.path, "rotated_to": rotated}, "logs")
        if self.kernel is not None:
            self.kernel.invalidate(self.name, logfile.path, attr_only=False)

    def _commit_partial(self, handle: LogHandle, final: bool) -> None:
        """A line without its newline when the file is closed: stored if it is a JSON object."""
        if not handle.pending or handle.log is None:
            return
        try:
            batch = self.validator.process(bytes(handle.pending) + b"\n")
        except LineError:
            if final:
                self.partial_dropped += 1
                log.warning("%s: dropped an unfinished line that is not a JSON object (%d bytes)",
                            handle.path, len(handle.pending))
                handle.pending = bytearray()
            return
        handle.pending = bytearray()
        self._store(handle.log, batch.data, batch.records, batch.filtered)

    async def flush(self, handle: Handle) -> None:
        # close(): a complete object without its newline is stored now, so a reader right after
        # close() sees it; anything else waits for release (another descriptor may finish it).
        if isinstance(handle, LogHandle) and handle.pending:
            self._commit_partial(handle, final=False)

    async def fsync(self, handle: Handle, datasync: bool) -> None:
        if not isinstance(handle, LogHandle) or handle.log is None:
            return
        fd = handle.log.fd
        spool_fd = self.forwarder.spool._fd if self.forwarder is not None else -1

        def sync() -> None:
            if spool_fd >= 0:
                os.fsync(spool_fd)
            (os.fdatasync if datasync else os.fsync)(fd)

        await trio.to_thread.run_sync(sync)
        self.fsyncs += 1

    async def release(self, handle: Handle) -> None:
        if not isinstance(handle, LogHandle):
            return
        try:
            self._commit_partial(handle, final=True)
        finally:
            if handle.read_fd >= 0:
                os.close(handle.read_fd)
                handle.read_fd = -1
            if handle.log is not None:
                self.writers.release(handle.log)
                handle.log = None

    # -- namespace ------------------------------------------------------------------
    async def mkdir(self, path: str, mode: int, ctx: Ctx) -> Attr:
        if _hidden(path):
            raise fs_error(errno.EPERM, "reserved name")
        self.store.mkdir(path, mode & ~ctx.umask & 0o7777)
        if (ctx.uid, ctx.gid) != (os.getuid(), os.getgid()):
            self.store.chown(path, ctx.uid, ctx.gid)
        return _attr(self.store.stat(path))

    async def rmdir(self, path: str) -> None:
        if _hidden(path):
            raise fs_error(errno.ENOENT)
        self.store.rmdir(path)

    async def unlink(self, path: str) -> None:
        if _hidden(path):
            raise fs_error(errno.ENOENT)
        if stat.S_ISDIR(self.store.stat(path).st_mode):
            raise fs_error(errno.EISDIR)
        self.store.unlink(path)
        self.writers.forget(path)

    async def rename(self, old: str, new: str, flags: int) -> None:
        raise fs_error(errno.EPERM, "logs cannot be renamed (rotation names them)")

    # -- snapshots --------------------------------------------------------------------
    def _files_for(self, scope: dict[str, Any]) -> list[tuple[str, int]]:
        agent = scope.get("agent")
        chosen = []
        for rel in self.store.walk_files():
            if _hidden(rel) or not is_log_name(rel.rpartition("/")[2]):
                continue
            if scope.get("type") == "agent" and agent and agent not in rel:
                continue
            chosen.append((rel, self.store.stat(rel).st_size))
        return chosen

    async def export_state(self, sink: SnapshotSink, scope: dict[str, Any]) -> None:
        # Sizes taken in one go on the loop, between two writes: every file ends on a whole line.
        files = self._files_for(scope)
        memory = scope.get("memory_events") if scope.get("type") == "conversation" else None
        window = int(scope.get("memory_window") or 0)

        def copy() -> None:
            for rel, size in files:
                sink.add_store_file(rel, self.store, rel, length=size)
                if memory is not None and window > 0 and rel != DAEMON_LOG:
                    memory.extend(self._last_records(rel, size, window))

        await trio.to_thread.run_sync(copy)

    def _last_records(self, rel: str, size: int, count: int) -> list[dict[str, Any]]:
        """The last ``count`` records of a log (up to ``size``), as snapshot memory events."""
        start = max(0, size - MEMORY_TAIL_BYTES)
        with self.store.opened(rel, os.O_RDONLY) as fd:
            data = os.pread(fd, size - start, start)
        lines = data.split(b"\n")
        if start > 0:
            lines = lines[1:]  # the first one may be cut
        events: list[dict[str, Any]] = []
        for line in reversed(lines):
            if len(events) >= count:
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                events.append({"timestamp": record.get("timestamp", ""), "area": self.name,
                               "source": rel, "record": record})
        events.reverse()
        return events

    async def restore_state(self, source: SnapshotSource) -> list[str]:
        # The daemon's own diagnostics are its history, not the agents' state: a restore keeps them.
        names = [n for n in source.names()
                 if is_log_name(n.rpartition("/")[2]) and not _hidden(n) and n != DAEMON_LOG]

        def restore() -> None:
            for name in names:
                parent = name.rpartition("/")[0]
                if parent:
                    self._mkdirs(parent)
                source.copy_to(name, self.store, name)

        await trio.to_thread.run_sync(restore)
        for name in names:
            logfile = self.writers.files.get(name)
            if logfile is not None:
                self.writers.reopen(logfile)
        return names

    def _mkdirs(self, parent: str) -> None:
        so_far = ""
        for part in parent.split("/"):
            so_far = f"{so_far}/{part}" if so_far else part
            try:
                self.store.mkdir(so_far, 0o755)
            except FileExistsError:
                pass
