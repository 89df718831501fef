"""vault/: files stored as AES-256-GCM ciphertext, read and written as plaintext.

Modules, one per concern (after gocryptfs's internal/): `cryptocore` (the
cipher), `contentenc` (header + chunk format), `keyfile` (the wrapped master
key), `lockstate` (key in memory, mlock, idle clock), `openfile` (plaintext
views and the atomic working copy), `cli` (``kfs vault ...``).  This module
maps the Area interface onto them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import trio

from kfs.bus import Bus
from kfs.config import VaultConfig
from kfs.control import ControlError
from kfs.fs.area import Area, Attr, AttrChanges, Ctx, Handle, SnapshotSink, SnapshotSource, fs_error
from kfs.store import StoreDir
from kfs.vault import keyfile
from kfs.vault.contentenc import (
    HEADER_SIZE,
    KEY_FILE,
    FormatError,
    Header,
    encrypt_bytes,
    plain_size,
    verify_fd,
)
from kfs.vault.cryptocore import CryptoCore, IntegrityError
from kfs.vault.lockstate import LockState
from kfs.vault.openfile import (
    REDO_PREFIX,
    REDO_TARGET_SUFFIX,
    TMP_PREFIX,
    ChunkError,
    ReaderView,
    WorkingFile,
    finish_rewrite,
)

log = logging.getLogger("kfs.vault")

#: names the mount never shows: the key file, working copies, staging dirs
HIDDEN_PREFIX = ".kfs-"
HIDDEN_SUFFIX = ".kfs-tmp"
RESTORE_PREFIX = ".kfs-restore-"
PLAN_FILE = "plan.json"
#: every failed unlock answers after this long, however fast PBKDF2 was
FAILURE_DELAY = 0.5
#: working copies of files bigger than this are started in a thread
INLINE_COPY_LIMIT = 1 << 20
#: decoded file headers kept (a few hundred bytes each)
HEADER_CACHE = 4096
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: the largest file that ``vault.read_secret`` hands out (it decrypts on the trio loop)
SECRET_MAX = 1 << 20


def hidden(name: str) -> bool:
    return name.startswith(HIDDEN_PREFIX) or name.endswith(HIDDEN_SUFFIX)


@dataclass
class VaultHandle(Handle):
    working: WorkingFile | None = None
    view: ReaderView | None = None
    #: the vault's change counter when this handle was opened (see VaultArea._changed)
    generation: int = -1


class VaultArea(Area):
    name = "vault"
    # Every change to vault/ goes through this area (the store is kfs's own), and each one
    # that the kernel does not see by itself is invalidated: a commit (size, mtime, data),
    # a truncate by path, a restore (by the snapshot code).  So the kernel may keep names
    # and attributes for long; `stat` loops and `ls -l` then cost no request.
    entry_timeout = 30.0
    attr_timeout = 30.0

    def __init__(self, bus: Bus, store: StoreDir, config: VaultConfig, opts: Any) -> None:
        super().__init__(bus)
        self.store = store
        self.config = config
        self.state = LockState(float(config.auto_lock_timeout))
        self.writers: dict[str, WorkingFile] = {}
        self._locks: dict[int, trio.Lock] = {}
        self._ns_lock = trio.Lock()
        self._chunk_sizes: dict[tuple[int, int, int], int] = {}
        #: decoded headers by their raw bytes (validated by comparing them, so never stale)
        self._headers: dict[bytes, Header] = {}
        #: open handles, so a lock can drop the plaintext they cache
        self.handles: dict[int, VaultHandle] = {}
        #: bumped by every change to any vault file or name (commit, writer open, truncate,
        #: rename, unlink, restore, lock): a reader opened since the last change reads what
        #: the page cache may hold, so it may fill the page cache beyond its request
        self.generation = 0
        self._passphrase: bytearray | None = getattr(opts, "passphrase", None)
        self.is_root = os.geteuid() == 0
        self.recent_events: deque[dict[str, Any]] = deque(maxlen=32)
        #: store inodes (st_dev, st_ino) being rewritten in place (a hard-linked file's commit):
        #: reads, opens and stats of them wait for the event (a half-copied chunk fails its tag)
        self._rewriting: dict[tuple[int, int], trio.Event] = {}
        self._remove_orphans("")

    # ------------------------------------------------------------------ life cycle
    def _remove_orphans(self, path: str) -> None:
        """Working copies left by a crash: the committed files beside them are intact."""
        try:
            names = self.store.listdir(path)
        except OSError:
            return
        for name in names:  # first: in-place rewrites of hard-linked files cut short
            rel = f"{path}/{name}" if path else name
            if name.startswith(REDO_PREFIX) and not name.endswith(REDO_TARGET_SUFFIX):
                try:
                    if finish_rewrite(self.store, rel):
                        self.count("rewrites_redone")
                except OSError as e:  # left for the next mount; that file reads as damaged meanwhile
                    log.error("vault: could not finish the rewrite %s: %s", rel, e)
                    self.count("rewrites_pending")
            elif name.startswith(REDO_PREFIX) and not self.store.exists(rel[:-len(REDO_TARGET_SUFFIX)]):
                try:  # died before the commit point: the old contents stand
                    self.store.unlink(rel)
                except FileNotFoundError:
                    pass
        for name in names:
            rel = f"{path}/{name}" if path else name
            if name.startswith(REDO_PREFIX):
                continue
            if name.startswith(RESTORE_PREFIX):  # a restore interrupted by a crash
                try:
                    plan = json.loads(self.store.read_bytes(f"{rel}/{PLAN_FILE}"))
                except (OSError, ValueError):
                    self._discard_stage(rel)  # died while staging: the old state stands
                else:
                    self._apply_plan(rel, plan)  # died while swapping: finish it
                    self.count("restores_rolled_forward")
            elif name.startswith(TMP_PREFIX) or name.endswith(HIDDEN_SUFFIX):
                try:
                    self.store.unlink(rel)
                    self.count("orphans_removed")
                except OSError:
                    pass
            elif not hidden(name) and self.store.exists(rel) and stat.S_ISDIR(self.store.stat(rel).st_mode):
                self._remove_orphans(rel)

    async def start(self, nursery: trio.Nursery) -> None:
        self._unprovide = self.bus.provide("vault.read_secret", self.read_secret)  # kfs/bus.py
        passphrase, self._passphrase = self._passphrase, None
        if passphrase is not None:
            try:
                await self._unlock(passphrase, "mount")
            except ControlError as e:
                log.warning("vault stays locked: %s", e)
            finally:
                passphrase[:] = bytes(len(passphrase))
        nursery.start_soon(self._idle_watch)

    async def stop(self) -> None:
        self.__dict__.pop("_unprovide", lambda: None)()
        await self._commit_all()
        # the kernel's caches of this mount go with it: nothing to invalidate (and the
        # session may already be gone, where an invalidation would only wait)
        if await self._lock(tell_kernel=False):
            self._publish("vault_locked", {"reason": "unmount"}, "vault")

    async def _idle_watch(self) -> None:
        while True:
            timeout = self.state.auto_lock_timeout
            await trio.sleep(min(1.0, timeout / 4) if timeout > 0 else 1.0)
            if self.state.should_auto_lock():
                await self._lock()
                self.count("auto_locks")
                log.info("vault auto-locked after %.0fs idle", timeout)
                self._publish("vault_locked", {"reason": "idle", "idle_s": timeout}, "vault")

    def status(self) -> dict[str, Any]:
        has_key = self.store.exists(KEY_FILE)
        state = "unlocked" if self.state.unlocked else ("locked" if has_key else "no key")
        out: dict[str, Any] = {
            "state": state,
            "counters": dict(self.counters),
            "unlock_failures": self.state.unlock_failures,
            "open_files": self.state.open_files,
            "auto_lock_timeout_s": self.state.auto_lock_timeout,
            "key_mlocked": self.state.mlocked if self.state.unlocked else None,
        }
        if not has_key:
            out["message"] = "no vault key: run `kfs vault init`"
        elif self.state.unlocked:
            out["message"] = f"key in memory, mlock {'held' if self.state.mlocked else 'FAILED'}"
            out["idle_s"] = round(self.state.idle_for(), 1)
        else:
            out["message"] = "locked: run `kfs vault unlock`"
        out["recent_events"] = list(self.recent_events)
        if self.state.unlock_failures:
            out["message"] += f"; {self.state.unlock_failures} failed unlock(s)"
        return out

    def _publish(self, topic: str, data: dict[str, Any], source: str = "vault") -> None:
        # also kept for `kfs vault status` (an audit trail that needs no stream)
        self.recent_events.append({"topic": topic, "time": round(time.time(), 3), **data})
        self.bus.publish(topic, data, source)

    # ------------------------------------------------------------------ keys
    def read_secret(self, path: str) -> bytes:
        """Bus service ``vault.read_secret``: the plaintext of vault file ``path``, for another area
        (the vectors embedder's API key).  PermissionError while locked, FileNotFoundError if absent.

        Runs on the trio loop (the key state is the loop's: a lock may wipe it at any await, and
        must never wipe it under a decrypt in a thread); a secret is small (one read and decrypt,
        at most SECRET_MAX bytes), so this does not hold the loop for long.  It reads the committed
        file and does not reset the idle clock: a service reading its key must not keep the vault
        unlocked forever.
        """
        parts = path.strip("/").split("/")
        if any(part in ("", ".", "..") or hidden(part) for part in parts):
            raise FileNotFoundError(errno.ENOENT, "no such vault file", path)
        if self.state.core is None:
            raise PermissionError(errno.EACCES, "the vault is locked", path)
        rel = "/".join(parts)
        st = self.store.stat(rel)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory, not a secret", path)
        if (st.st_dev, st.st_ino) in self._rewriting:  # a synchronous service cannot wait for it
            raise BlockingIOError(errno.EAGAIN, "being rewritten: try again", path)
        try:
            view = ReaderView(self.store.open_fd(rel, os.O_RDONLY | os.O_NOFOLLOW), self._core)
        except FormatError as e:
            raise self._integrity(rel, e) from None
        try:
            if view.size > SECRET_MAX:
                raise OSError(errno.EFBIG, f"a secret is at most {SECRET_MAX} bytes", path)
            self.count("secrets_served")
            return view.read(0, view.size)
        except ChunkError as e:
            raise self._integrity(rel, e) from None
        finally:
            view.close()

    async def _lock(self, tell_kernel: bool = True) -> bool:
        """Wipe the key and every plaintext copy kfs controls; True if it was unlocked.

        The key goes first (synchronously: no await between a lock decision and the
        wipe).  Then the decrypted chunks that open handles and writers keep, then the
        kernel's page cache of every vault file: an fd opened before the lock must not
        read plaintext from the page cache afterwards (reads reach us, and fail with
        EACCES).  Returns once the kernel has been told, so `kfs vault lock` means it.
        """
        if not self.state.lock():
            return False
        self._changed()
        for handle in list(self.handles.values()):
            if handle.view is not None:
                handle.view.forget()
        for writer in self.writers.values():
            writer.source.forget()
        invalidate_area = getattr(self.kernel, "invalidate_area", None)
        if not tell_kernel:
            pass
        elif callable(invalidate_area):
            # the core knows every inode of ours, unlinked-but-open ones too
            invalidate_area(self.name)
            await self._kernel_settled()
        elif self.kernel is not None:
            try:
                paths = set(await trio.to_thread.run_sync(self._ciphertext_files, False))
            except OSError as e:
                log.warning("vault lock: could not list files to invalidate: %s", e)
                paths = set()
            paths.update(handle.path for handle in self.handles.values())
            paths.update(self.writers)
            for path in paths:
                self.kernel.invalidate(self.name, path)
            await self._kernel_settled()
        return True

    async def _kernel_settled(self, limit: float = 2.0) -> None:
        """Wait (bounded) until the kernel notifier has sent what we queued.

        Uses the notifier's ``drain``; with a KernelCache that has none, watches its queue if any.
        """
        drain = getattr(self.kernel, "drain", None)
        if callable(drain):
            await trio.to_thread.run_sync(drain, limit)
            return
        pending = getattr(self.kernel, "_queue", None)
        if pending is None or not getattr(self.kernel, "active", False):
            return
        deadline = time.monotonic() + limit
        while not pending.empty() and time.monotonic() < deadline:
            await trio.sleep(0.002)
        await trio.sleep(0.005)  # the last item taken off the queue is being sent

    def _core(self) -> CryptoCore:
        core = self.state.core
        if core is None:
            raise fs_error(errno.EACCES, "vault is locked")
        return core

    async def _failed(self, started: float, reason: str) -> None:
        self.state.unlock_failures += 1
        self.count("unlock_failures")
        self._publish("vault_unlock_failed", {"failures": self.state.unlock_failures, "reason": reason}, "vault")
        await trio.sleep(max(0.0, FAILURE_DELAY - (time.monotonic() - started)))

    async def _unlock(self, passphrase: bytes | bytearray, how: str) -> None:
        started = time.monotonic()
        try:
            kf = keyfile.load(self.store)
        except keyfile.KeyFileError as e:
            raise ControlError(str(e)) from None
        if kf is None:
            raise ControlError("no vault key in this store: run `kfs vault init`")
        try:
            master = await trio.to_thread.run_sync(kf.unwrap, bytes(passphrase))
        except keyfile.WrongPassphrase:
            await self._failed(started, "wrong passphrase")
            raise ControlError("wrong vault passphrase") from None
        self.state.unlock(master)
        self.count("unlocks")
        self._publish("vault_unlocked", {"how": how, "mlocked": self.state.mlocked}, "vault")

    def _integrity(self, path: str, error: Exception) -> OSError:
        self.count("integrity_errors")
        chunk = error.index if isinstance(error, ChunkError) else None
        log.warning("vault integrity error in %s: %s", path, error)
        self._publish("vault_integrity_error", {"file": path, "chunk": chunk, "error": str(error)}, "vault")
        return fs_error(errno.EIO, f"{path}: {error}")

    # ------------------------------------------------------------------ control (kfs vault ...)
    async def control(self, command: str, args: dict[str, Any]) -> Any:
        if command == "status":
            return self.status()
        if command == "unlock":
            passphrase = str(args.get("passphrase", "")).encode()
            if self.state.unlocked:
                return {"state": "unlocked", "already": True}
            await self._unlock(passphrase, "cli")
            return {"state": "unlocked", "mlocked": self.state.mlocked}
        if command == "lock":
            await self._commit_all()
            if await self._lock():
                self.count("locks")
                self._publish("vault_locked", {"reason": "cli"}, "vault")
            return {"state": "locked"}
        if command == "init":
            if self.store.exists(KEY_FILE):
                raise ControlError("this vault already has a key (use `kfs vault passwd` to change the passphrase)")
            passphrase = str(args.get("passphrase", "")).encode()
            if not passphrase:
                raise ControlError("empty passphrase refused")
            iterations = int(args.get("iterations") or self.config.kdf_iterations)
            kf, master = await trio.to_thread.run_sync(keyfile.KeyFile.create, passphrase, iterations)
            await trio.to_thread.run_sync(keyfile.save, self.store, kf)
            self.state.unlock(master)
            self._publish("vault_unlocked", {"how": "init", "mlocked": self.state.mlocked}, "vault")
            return {"state": "unlocked", "created": True}
        if command == "passwd":
            started = time.monotonic()
            old = str(args.get("old", "")).encode()
            new = str(args.get("new", "")).encode()
            if not new:
                raise ControlError("empty passphrase refused")
            kf = keyfile.load(self.store)
            if kf is None:
                raise ControlError("no vault key in this store: run `kfs vault init`")
            iterations = int(args.get("iterations") or self.config.kdf_iterations)
            try:
                new_kf = await trio.to_thread.run_sync(kf.rewrap, old, new, iterations)
            except keyfile.WrongPassphrase:
                await self._failed(started, "wrong passphrase (passwd)")
                raise ControlError("wrong vault passphrase") from None
            await trio.to_thread.run_sync(keyfile.save, self.store, new_kf)
            self.count("passwd")
            return {"rewrapped": True}
        if command == "verify":
            core = self.state.core
            if core is None:
                raise ControlError("the vault is locked: unlock it first (or verify offline with --store)")
            await self._commit_all()
            checked, damaged = await trio.to_thread.run_sync(verify_store, self.store, core)
            for item in damaged:
                self._integrity(item["file"], IntegrityError(item["error"]))
            return {"checked": checked, "damaged": damaged}
        raise fs_error(errno.ENOSYS, f"vault has no command {command!r}")

    # ------------------------------------------------------------------ metadata
    def _check(self, path: str) -> None:
        if path and any(hidden(part) for part in path.split("/")):
            raise fs_error(errno.ENOENT)

    def _plain_size(self, path: str, st: os.stat_result) -> int:
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        chunk_size = self._chunk_sizes.get(key)
        if chunk_size is None:
            try:
                with self.store.opened(path, os.O_RDONLY) as fd:
                    chunk_size = Header.decode(os.pread(fd, HEADER_SIZE, 0)).chunk_size
            except (FormatError, OSError):
                return 0
            if len(self._chunk_sizes) > 4096:
                self._chunk_sizes.clear()
            self._chunk_sizes[key] = chunk_size
        return plain_size(st.st_size, chunk_size)

    def _attr(self, path: str, st: os.stat_result) -> Attr:
        attr = Attr.from_stat(st)
        if stat.S_ISREG(st.st_mode):
            writer = self._writer_of(path, st)
            if writer is None:
                attr.size = self._plain_size(path, st)
            else:
                attr.size = writer.size
                if writer.last_write_ns is not None:  # what the commit will set (see WorkingFile)
                    attr.mtime_ns = attr.ctime_ns = writer.last_write_ns
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in self._rewriting:  # the redo record's extra name is not the user's
                    attr.nlink -= 1
                if attr.nlink > 1:  # a hard link: the FUSE layer makes its names one inode by this
                    attr.identity = key
        return attr

    def _writer_of(self, path: str, st: os.stat_result) -> WorkingFile | None:
        """The writer of this file: opened through this name, or through another of its names."""
        writer = self.writers.get(path)
        if writer is None and st.st_nlink > 1 and self.handles:
            writer = self._writer_by_key((st.st_dev, st.st_ino))
        return writer

    def _writer_by_key(self, key: tuple[int, int]) -> WorkingFile | None:
        """The writer of this store inode, also one whose own name was unlinked (only linked files)."""
        for writer in self.writers.values():
            if writer.key == key:
                return writer
        for handle in self.handles.values():
            if handle.working is not None and handle.working.key == key:
                return handle.working
        return None

    async def _after_rewrite(self, path: str, st: os.stat_result) -> os.stat_result:
        """``st`` of ``path``, once no in-place rewrite of that inode is running."""
        while (done := self._rewriting.get((st.st_dev, st.st_ino))) is not None:
            await done.wait()
            st = self.store.stat(path)
        return st

    async def getattr(self, path: str) -> Attr:
        self._check(path)
        st = self.store.stat(path)
        if self._rewriting:
            st = await self._after_rewrite(path, st)
        return self._attr(path, st)

    async def readdir(self, path: str) -> list[tuple[str, Attr]]:
        self._check(path)
        out = []
        for name in self.store.listdir(path):
            if hidden(name):
                continue
            rel = f"{path}/{name}" if path else name
            try:
                out.append((name, self._attr(rel, self.store.stat(rel))))
            except FileNotFoundError:
                continue
        return out

    async def setattr(self, path: str, changes: AttrChanges, handle: Handle | None, ctx: Ctx) -> Attr:
        self._check(path)
        st = self.store.stat(path)
        if changes.size is not None:
            if stat.S_ISDIR(st.st_mode):
                raise fs_error(errno.EISDIR)
            await self._truncate(path, changes.size, handle)
        if changes.mode is not None:
            self.store.chmod(path, changes.mode)
        if changes.uid is not None or changes.gid is not None:
            uid = -1 if changes.uid is None else changes.uid
            gid = -1 if changes.gid is None else changes.gid
            self.store.chown(path, uid, gid)
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            st = self.store.stat(path)
            times = (st.st_atime_ns if changes.atime_ns is None else changes.atime_ns,
                     st.st_mtime_ns if changes.mtime_ns is None else changes.mtime_ns)
            self.store.utime(path, *times)
            writer = self._writer_of(path, st)
            if writer is not None and writer.is_dirty:
                writer.pending_times = times
                writer.last_write_ns = None
        return await self.getattr(path)

    async def _truncate(self, path: str, size: int, handle: Handle | None) -> None:
        self._core()
        self.state.touch()
        own = isinstance(handle, VaultHandle) and handle.working is not None
        writer = handle.working if own else self.writers.get(path)  # type: ignore[union-attr]
        temporary = writer is None
        if writer is None:
            writer = self._open_writer(path)
        assert writer is not None
        try:
            async with self._lock_of(writer):
                await self._ensure_copy(writer, truncate_all=size == 0)
                writer.truncate(size)
            if not own:  # truncate(2) by path takes effect now, not at someone else's close
                await self._commit(writer)
        finally:
            if temporary:
                self._drop_writer(writer)

    # ------------------------------------------------------------------ writers
    def _lock_of(self, writer: WorkingFile) -> trio.Lock:
        lock = self._locks.get(id(writer))
        if lock is None:
            lock = self._locks[id(writer)] = trio.Lock()
        return lock

    def _open_writer(self, path: str) -> WorkingFile:
        self._changed()
        writer = self.writers.get(path)
        if writer is None:
            try:
                writer = WorkingFile(self.store, path, self._core, self.config.chunk_size)
            except (FormatError, ChunkError) as e:
                raise self._integrity(path, e) from None
            # a hard link opened for writing through several names: one writer, as one inode
            shared = self._writer_by_key(writer.key) if writer.nlink_at_open > 1 else None
            if shared is None:
                self.writers[path] = writer
            else:
                writer.close()
                writer = shared
        writer.refs += 1
        return writer

    def _drop_writer(self, writer: WorkingFile) -> None:
        writer.refs -= 1
        if writer.refs > 0:
            return
        if self.writers.get(writer.path) is writer:
            del self.writers[writer.path]
        self._locks.pop(id(writer), None)
        writer.close()

    async def _ensure_copy(self, writer: WorkingFile, truncate_all: bool = False) -> None:
        if writer.is_dirty and not truncate_all:
            return
        if truncate_all or os.fstat(writer.fd).st_size <= INLINE_COPY_LIMIT:
            writer.ensure_working_copy(truncate_all)
        else:
            await trio.to_thread.run_sync(writer.ensure_working_copy, truncate_all)

    async def _commit(self, writer: WorkingFile) -> None:
        if not writer.is_dirty:
            return
        async with self._lock_of(writer):
            in_place = False
            try:
                # the slow part (sealing, fsync) holds only this file; the rename holds the namespace
                changed = await trio.to_thread.run_sync(writer.prepare)
                if changed:
                    async with self._ns_lock:
                        in_place = writer.in_place()
                        if in_place:
                            await self._rewrite_in_place(writer)
                        else:
                            await trio.to_thread.run_sync(writer.publish)
            except (ChunkError, IntegrityError) as e:
                raise self._integrity(writer.path, e) from None
        if changed:
            self._changed()
            self.count("commits")
            if in_place:
                self.count("commits_in_place")
            if self.kernel is None:
                pass
            elif not writer.detached:
                self.kernel.invalidate(self.name, writer.path)  # every name: they are one inode
            elif in_place:  # its own name is gone: the inode lives on under names we do not know
                invalidate_area = getattr(self.kernel, "invalidate_area", None)
                if callable(invalidate_area):
                    invalidate_area(self.name)

    async def _rewrite_in_place(self, writer: WorkingFile) -> None:
        """Commit a hard-linked file by copying over its inode (see kfs.vault.openfile).

        Reads, opens and stats of the inode wait until the copy is done; read-only handles
        of it then read the new version.
        """
        key = writer.key
        done = self._rewriting[key] = trio.Event()
        try:
            await trio.to_thread.run_sync(writer.publish_in_place)
        finally:
            del self._rewriting[key]
            for handle in self.handles.values():
                if handle.view is not None and handle.view.key == key:
                    try:
                        handle.view.reload()
                    except (FormatError, OSError) as e:  # its reads then fail, with EIO
                        log.warning("vault: could not reload %s after a rewrite: %s", handle.path, e)
            done.set()

    async def _commit_all(self) -> None:
        for writer in list(self.writers.values()):
            try:
                await self._commit(writer)
            except OSError as e:
                log.error("vault: could not commit %s: %s", writer.path, e)

    # ------------------------------------------------------------------ files
    async def open(self, path: str, flags: int, ctx: Ctx) -> Handle:
        self._check(path)
        self._core()
        self.state.touch()
        handle = VaultHandle(path, flags)
        if self._rewriting:
            await self._after_rewrite(path, self.store.stat(path))
        if not handle.writable:
            # the common case (a secret read again and again) costs: open, fstat, one
            # 192-byte pread; the header's JSON is decoded once per file version
            handle.view = self._reader(path)
            # while someone writes, this reader's snapshot must not land in the page cache
            # that the writer reads back from: it bypasses it
            handle.keep_cache = path not in self.writers and not (
                handle.view.linked and self._writer_by_key(handle.view.key) is not None)
            handle.direct_io = not handle.keep_cache
            handle.generation = self.generation
        elif stat.S_ISDIR(self.store.stat(path).st_mode):
            raise fs_error(errno.EISDIR)
        else:
            handle.working = self._open_writer(path)
            if flags & os.O_TRUNC:
                try:
                    async with self._lock_of(handle.working):
                        await self._ensure_copy(handle.working, truncate_all=True)
                except BaseException:
                    self._drop_writer(handle.working)
                    raise
        self.state.open_files += 1
        self.handles[id(handle)] = handle
        return handle

    def _reader(self, path: str) -> ReaderView:
        fd = self.store.open_fd(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise fs_error(errno.EISDIR)
            raw = os.pread(fd, HEADER_SIZE, 0)
            header = self._headers.get(raw)
            if header is None:
                header = Header.decode(raw)
                if len(self._headers) >= HEADER_CACHE:
                    del self._headers[next(iter(self._headers))]
                self._headers[raw] = header
        except FormatError as e:
            os.close(fd)
            raise self._integrity(path, e) from None
        except BaseException:
            os.close(fd)
            raise
        return ReaderView(fd, self._core, header, st)

    async def create(self, path: str, mode: int, flags: int, ctx: Ctx) -> Handle:
        parent, _, name = path.rpartition("/")
        if hidden(name):
            raise fs_error(errno.EPERM, "names starting with .kfs- are reserved")
        self._check(parent)
        core = self._core()
        self.state.touch()
        if self.store.exists(path):
            if flags & os.O_EXCL:
                raise fs_error(errno.EEXIST)
            return await self.open(path, flags, ctx)
        blob = encrypt_bytes(core, b"", self.config.chunk_size)
        # new secrets are private to their owner whatever the umask says
        perm = (mode & 0o700) or 0o600
        temp = f"{parent + '/' if parent else ''}{TMP_PREFIX}new-{os.urandom(6).hex()}"
        with self.store.opened(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, perm) as fd:
            os.write(fd, blob)
            os.fchmod(fd, perm)
            if self.is_root:
                os.fchown(fd, ctx.uid, ctx.gid)
        try:
            os.link(temp, path, src_dir_fd=self.store.fd, dst_dir_fd=self.store.fd)
        finally:
            self.store.unlink(temp)
        self.count("files_created")
        return await self.open(path, flags & ~os.O_TRUNC, ctx)

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        assert isinstance(handle, VaultHandle)
        if self.state.core is None:  # locked: nothing decrypted is served, cached or not
            raise fs_error(errno.EACCES, "vault is locked")
        self.state.touch()
        try:
            if self._rewriting:
                await self._wait_rewrite(handle)
            if handle.view is not None:
                data = handle.view.read_buffer(offset, size)
                if handle.generation == self.generation:
                    self._fill_page_cache(handle, offset, len(data))
                return data  # type: ignore[return-value]
            assert handle.working is not None
            # a commit may be sealing this file in a worker thread: wait for it
            async with self._lock_of(handle.working):
                return handle.working.read(offset, size)
        except ChunkError as e:
            raise self._integrity(handle.path, e) from None

    async def _wait_rewrite(self, handle: VaultHandle) -> None:
        key = handle.view.key if handle.view is not None else handle.working.key if handle.working else None
        while (done := self._rewriting.get(key)) is not None:  # type: ignore[arg-type]
            await done.wait()

    def _fill_page_cache(self, handle: VaultHandle, offset: int, length: int) -> None:
        """Give the kernel the rest of a chunk this read just decrypted (see `ReaderView.rest_of_chunk`).

        Only for handles opened since the last change (`generation`) and with no writer on
        the path: their data is what the page cache should hold.  The hook queues the store
        in the same FIFO as invalidations, so an invalidation queued by a later change
        always lands after it.
        """
        if self.kernel is None or not handle.keep_cache or handle.view is None:
            return
        store = self.kernel.store
        for at, piece in handle.view.rest_of_chunk(offset, length):
            store(self.name, handle.path, at, piece)
            self.count("pages_pushed", (len(piece) + 4095) // 4096)

    def _changed(self) -> None:
        self.generation += 1

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        assert isinstance(handle, VaultHandle)
        writer = handle.working
        if writer is None:
            raise fs_error(errno.EBADF)
        self._core()
        self.state.touch()
        async with self._lock_of(writer):
            try:
                await self._ensure_copy(writer)
                if handle.append:
                    offset = writer.size
                return writer.write(offset, data)
            except ChunkError as e:
                raise self._integrity(handle.path, e) from None

    async def flush(self, handle: Handle) -> None:
        assert isinstance(handle, VaultHandle)
        if handle.working is not None:
            await self._commit(handle.working)

    async def fsync(self, handle: Handle, datasync: bool) -> None:
        await self.flush(handle)

    async def release(self, handle: Handle) -> None:
        assert isinstance(handle, VaultHandle)
        self.state.open_files = max(0, self.state.open_files - 1)
        self.state.touch()
        self.handles.pop(id(handle), None)
        if handle.view is not None:
            handle.view.close()
            handle.view = None
        if handle.working is not None:
            writer, handle.working = handle.working, None
            try:
                if self.state.unlocked:
                    await self._commit(writer)
            finally:
                self._drop_writer(writer)

    # ------------------------------------------------------------------ namespace
    async def mkdir(self, path: str, mode: int, ctx: Ctx) -> Attr:
        parent, _, name = path.rpartition("/")
        if hidden(name):
            raise fs_error(errno.EPERM, "names starting with .kfs- are reserved")
        self._check(parent)
        self.store.mkdir(path, mode)
        if self.is_root:
            self.store.chown(path, ctx.uid, ctx.gid)
        return await self.getattr(path)

    async def rmdir(self, path: str) -> None:
        self._check(path)
        async with self._ns_lock:
            self.store.rmdir(path)
            self._changed()

    async def unlink(self, path: str) -> None:
        self._check(path)
        async with self._ns_lock:
            self.store.unlink(path)
            self._changed()
            writer = self.writers.pop(path, None)
            if writer is not None:
                writer.detached = True

    async def link(self, old: str, new: str) -> Attr:
        """A hard link is a store hard link: the names share one ciphertext inode.

        Its commits then rewrite that inode in place (`WorkingFile.publish_in_place`) rather than
        replace it by rename, which would split the link.
        """
        self._check(old)
        parent, _, name = new.rpartition("/")
        if hidden(name):
            raise fs_error(errno.EPERM, "names starting with .kfs- are reserved")
        self._check(parent)
        if not stat.S_ISREG(self.store.stat(old).st_mode):
            raise fs_error(errno.EPERM, "only files can be hard-linked")
        self._core()  # locked: EACCES, as for the vault's other writes
        self.state.touch()
        async with self._ns_lock:
            os.link(old, new, src_dir_fd=self.store.fd, dst_dir_fd=self.store.fd, follow_symlinks=False)
            self._changed()
        self.count("links")
        return await self.getattr(new)

    async def rename(self, old: str, new: str, flags: int) -> None:
        self._check(old)
        parent, _, name = new.rpartition("/")
        if hidden(name):
            raise fs_error(errno.EPERM, "names starting with .kfs- are reserved")
        self._check(parent)
        if flags & RENAME_EXCHANGE:
            raise fs_error(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        async with self._ns_lock:
            if flags & RENAME_NOREPLACE and self.store.exists(new):
                raise fs_error(errno.EEXIST)
            self.store.rename(old, new)
            self._changed()
            replaced = self.writers.pop(new, None)
            if replaced is not None:
                replaced.detached = True
            prefix = old + "/"
            for path, writer in list(self.writers.items()):
                if path == old or path.startswith(prefix):
                    del self.writers[path]
                    writer.path = new + path[len(old):]
                    self.writers[writer.path] = writer
                if writer.temp_name is not None and writer.temp_name.startswith(prefix):
                    # its working copy moved with the directory
                    writer.temp_name = new + writer.temp_name[len(old):]

    # ------------------------------------------------------------------ snapshots
    async def export_state(self, sink: SnapshotSink, scope: dict[str, Any]) -> None:
        """Ciphertext files and the key file only: plaintext never leaves the vault."""
        if scope.get("type", "full") != "full":
            return
        await self._commit_all()
        async with self._ns_lock:
            files = await trio.to_thread.run_sync(self._ciphertext_files, True)
            stats = {path: self.store.stat(path) for path in files}
        for path in files:
            if stats[path].st_nlink > 1:
                # a hard-linked file is committed in place, under the namespace lock: copy it
                # under that lock too, and as it is then, never half rewritten
                async with self._ns_lock:
                    length = self.store.stat(path).st_size
                    await trio.to_thread.run_sync(
                        lambda p=path, n=length: sink.add_store_file(p, self.store, p, n, compress=False))
                continue
            await trio.to_thread.run_sync(
                lambda p=path: sink.add_store_file(p, self.store, p, stats[p].st_size, compress=False))

    def _ciphertext_files(self, with_key: bool) -> list[str]:
        out = [p for p in self.store.walk_files() if not any(hidden(part) for part in p.split("/"))]
        if with_key and self.store.exists(KEY_FILE):
            out.append(KEY_FILE)
        return out

    async def restore_state(self, source: SnapshotSource) -> list[str]:
        """Replace the vault's files with the snapshot's, each swapped in by rename."""
        names = [n for n in source.names() if n == KEY_FILE or not any(hidden(p) for p in n.split("/"))]
        if not names:
            return []
        await self._commit_all()
        async with self._ns_lock:
            changed = await trio.to_thread.run_sync(self._restore_files, source, names)
            self._changed()
        self._chunk_sizes.clear()
        if KEY_FILE in names and await self._lock():
            # the snapshot's key may differ: ask for the passphrase again
            self._publish("vault_locked", {"reason": "restore"}, "vault")
        return changed

    def _restore_files(self, source: SnapshotSource, names: list[str]) -> list[str]:
        """Stage every file, write a plan, then swap by rename (rolled forward after a crash)."""
        stage = f"{RESTORE_PREFIX}{os.urandom(6).hex()}"
        self.store.mkdir(stage, 0o700)
        try:
            moves = []
            for i, name in enumerate(names):
                source.copy_to(name, self.store, f"{stage}/{i}")
                moves.append([str(i), name])
            wanted = set(names)
            plan = {"moves": moves, "delete": [p for p in self._ciphertext_files(False) if p not in wanted]}
            # the plan is the commit point: without it the stage is discarded, with it replayed
            self.store.write_atomic(f"{stage}/{PLAN_FILE}", json.dumps(plan).encode())
        except BaseException:
            self._discard_stage(stage)
            raise
        self._apply_plan(stage, plan)
        return [p for _, p in moves if p != KEY_FILE] + plan["delete"]

    def _apply_plan(self, stage: str, plan: dict[str, Any]) -> None:
        for staged, target in plan["moves"]:
            parent = target.rpartition("/")[0]
            if parent:
                self._makedirs(parent)
            try:
                self.store.rename(f"{stage}/{staged}", target)
            except FileNotFoundError:
                pass  # moved before a crash
        for path in plan["delete"]:
            try:
                self.store.unlink(path)
            except FileNotFoundError:
                pass
        self.store.fsync_dir("")
        self._discard_stage(stage)

    def _discard_stage(self, stage: str) -> None:
        for leftover in self.store.listdir(stage):
            self.store.unlink(f"{stage}/{leftover}")
        self.store.rmdir(stage)

    def _makedirs(self, path: str) -> None:
        so_far = ""
        for part in path.split("/"):
            so_far = f"{so_far}/{part}" if so_far else part
            if not self.store.exists(so_far):
                self.store.mkdir(so_far, 0o700)


def verify_store(store: StoreDir, core: CryptoCore) -> tuple[int, list[dict[str, str]]]:
    """Authenticate every chunk of every vault file (blocking)."""
    checked = 0
    damaged: list[dict[str, str]] = []
    for path in store.walk_files():
        if any(hidden(part) for part in path.split("/")):
            continue
        checked += 1
        try:
            with store.opened(path, os.O_RDONLY) as fd:
                verify_fd(core, fd)
        except (IntegrityError, FormatError) as e:
            damaged.append({"file": path, "error": str(e)})
        except OSError as e:
            damaged.append({"file": path, "error": e.strerror or str(e)})
    return checked, damaged
