"""snapshots/: ``mkdir NAME`` takes a snapshot, ``NAME/`` browses it read-only, ``rmdir NAME`` deletes it.

A snapshot is ``NAME.zip`` in the store's ``snapshots/``: one folder per area
(what each area's ``export_state`` wrote through the sink), ``manifest.json``
and, for conversation snapshots, ``memory_window.json``.  This area never
imports another: the daemon hands it the other areas (`attach_peers`) and it
only calls their ``export_state`` / ``restore_state`` hooks and their kernel
cache invalidation.

``mkdir`` returns once the zip is durable.  pyfuse3 has no FUSE interrupt
support, so a ``mkdir`` of a large state is uninterruptible (even by kill -9)
until the zip is written: that is the contract (returns when durable); the
work itself runs in worker threads, so the rest of the mount keeps answering.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import time
from typing import Any

import trio

from kfs import __version__
from kfs.bus import Bus
from kfs.config import SnapshotsConfig
from kfs.fs.area import Area, Attr, AttrChanges, Ctx, Handle, fs_error
from kfs.snapshots import reader, restore, triggers, writer
from kfs.snapshots.writer import MEMORY_WINDOW, SnapshotError, SnapshotWriter
from kfs.store import StoreDir

log = logging.getLogger("kfs.snapshots")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@-]{0,199}$")
TRIGGER_RE = re.compile(r"^(manual|timer|event:[A-Za-z0-9_.:-]{1,100})$")
TYPES = ("full", "agent", "conversation")


def check_name(name: str) -> None:
    if not NAME_RE.match(name) or name.endswith(".kfs-tmp"):
        raise fs_error(errno.EINVAL, f"bad snapshot name {name!r} (letters, digits and . _ : + @ - only)")


def has_hook(area: Area, hook: str) -> bool:
    """Whether ``area`` implements a snapshot hook (the base class's default does nothing)."""
    return getattr(type(area), hook, None) is not getattr(Area, hook)


class SnapshotsArea(Area):
    name = "snapshots"
    entry_timeout = 1.0
    attr_timeout = 1.0

    def __init__(self, bus: Bus, store: StoreDir, config: SnapshotsConfig, opts: Any = None) -> None:
        super().__init__(bus)
        self.store = store
        self.config = config
        self.opts = opts
        self.peers: dict[str, Area] = {}
        self.uid, self.gid = os.getuid(), os.getgid()
        self._creating: set[str] = set()
        self._open: dict[str, reader.Snapshot] = {}
        self._meta: dict[tuple[str, int], dict[str, Any]] = {}
        self._create_lock = trio.Lock()
        self._restore_lock = trio.Lock()
        self._watcher = triggers.EventWatcher(config.on_events)
        self._debounce = triggers.Debouncer(float(config.event_debounce))
        self._unsubscribe: Any = None
        self.last_error = ""
        for filename in store.listdir():
            if writer.is_temp_name(filename):  # a create that a crash cut short: never visible, now gone
                store.unlink(filename)
                self.count("stale_temp_removed")

    def attach_peers(self, areas: dict[str, Area]) -> None:
        """The daemon hands over every area after building them (the only way we reach them)."""
        self.peers = {name: area for name, area in areas.items() if area is not self}

    # ------------------------------------------------------------------ life cycle
    async def start(self, nursery: trio.Nursery) -> None:
        if self.config.interval:
            nursery.start_soon(self._timer_loop)
        if self.config.on_events:
            self._unsubscribe = self.bus.subscribe(self._watcher.on_event)
            nursery.start_soon(self._event_loop)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for snap in self._open.values():
            snap.close()
        self._open.clear()

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"state": "ready", "counters": dict(self.counters)}
        journal = restore.read_journal(self.store)
        if journal is not None:
            status["state"] = "restore interrupted"
            status["message"] = (f"restore of {journal.get('snapshot')} was interrupted: "
                                 f"run `kfs snapshot restore MOUNTPOINT {journal.get('snapshot')}` to finish it")
        elif self.last_error:
            status["message"] = self.last_error
        return status

    # ------------------------------------------------------------------ the store's zips
    def _exists(self, name: str) -> bool:
        return self.store.exists(f"{name}.zip")

    def _names(self) -> list[str]:
        return [f[:-4] for f in self.store.listdir() if f.endswith(".zip") and not f.startswith(".")]

    async def _snapshot(self, name: str) -> reader.Snapshot:
        """The open zip of snapshot ``name`` (cached while the file is the same)."""
        try:
            st = self.store.stat(f"{name}.zip")
        except FileNotFoundError:
            raise fs_error(errno.ENOENT) from None
        snap = self._open.get(name)
        if snap is not None and (snap.st.st_ino, snap.st.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
            return snap
        try:
            snap = await trio.to_thread.run_sync(reader.open_snapshot, self.store, name)
        except SnapshotError as e:
            raise fs_error(errno.EIO, str(e)) from None
        old = self._open.pop(name, None)
        if old is not None:
            old.close()
        if len(self._open) > 32:
            self._open.pop(next(iter(self._open))).close()
        self._open[name] = snap
        return snap

    def _forget(self, name: str) -> None:
        snap = self._open.pop(name, None)
        if snap is not None:
            snap.close()

    async def metadata(self, name: str) -> dict[str, Any]:
        """name, created, type, trigger, size, files of one snapshot (from its manifest, cached)."""
        st = self.store.stat(f"{name}.zip")
        key = (name, st.st_ino)
        if key not in self._meta:
            snap = await self._snapshot(name)
            try:
                manifest = await trio.to_thread.run_sync(lambda: snap.manifest)
            except SnapshotError as e:
                manifest = {"error": str(e)}
            self._meta[key] = {
                "name": name, "created": manifest.get("created", writer.rfc3339(st.st_mtime)),
                "created_ts": st.st_mtime if "created_ts" not in manifest else manifest["created_ts"],
                "type": manifest.get("type", "?"), "trigger": manifest.get("trigger", "?"),
                "files": manifest.get("file_count", 0), "size": st.st_size,
                **({"error": manifest["error"]} if "error" in manifest else {}),
            }
        return self._meta[key]

    # ------------------------------------------------------------------ create
    async def create_snapshot(self, name: str, type_: str = "full", agent: str | None = None,
                              trigger: str = "manual", note: str | None = None) -> dict[str, Any]:
        check_name(name)
        if type_ not in TYPES:
            raise fs_error(errno.EINVAL, f"unknown snapshot type {type_!r} (full, agent, conversation)")
        if type_ == "agent" and not agent:
            raise fs_error(errno.EINVAL, "an agent snapshot needs an agent id (--agent)")
        if name in self._creating or self._exists(name):
            raise fs_error(errno.EEXIST, f"snapshot {name} already exists")
        self._creating.add(name)
        started = time.time()
        try:
            async with self._create_lock:
                summary = await self._write_snapshot(name, type_, agent, trigger, note, started)
        except SnapshotError as e:
            self.count("create_failed")
            self.last_error = str(e)
            raise fs_error(errno.EIO, str(e)) from None
        finally:
            self._creating.discard(name)
        self.count("created")
        if self.kernel is not None:
            self.kernel.invalidate_entry(self.name, "", name)
            self.kernel.invalidate(self.name, "", attr_only=True)
        self.bus.publish("snapshot_created", summary, self.name)
        log.info("snapshot %s created (%s, %s): %s files, %s bytes in %.2fs", name, type_, trigger,
                 summary["files"], summary["size"], summary["seconds"])
        return summary

    async def _write_snapshot(self, name: str, type_: str, agent: str | None, trigger: str,
                              note: str | None, started: float) -> dict[str, Any]:
        fd = self.store.open_fd(writer.temp_name(name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        zw = SnapshotWriter(fd, self.config.compression)
        committed = False
        try:
            scope: dict[str, Any] = {"type": type_, "agent": agent, "memory_window": self.config.memory_window}
            memory_events: list[dict[str, Any]] = []
            if type_ == "conversation":
                scope["memory_events"] = memory_events
            hooks: dict[str, str] = {}
            for area_name, area in self.peers.items():
                if not has_hook(area, "export_state"):
                    hooks[area_name] = "no snapshot hooks"
                    continue
                try:
                    await area.export_state(writer.Sink(zw, area_name), scope)
                except Exception as e:  # whatever an area raises, the snapshot fails cleanly (EIO)
                    log.exception("%s: export_state failed", area_name)
                    raise SnapshotError(f"{area_name} could not export its state: {e}") from None
                hooks[area_name] = "exported"
            extra = []
            if type_ == "conversation":
                window = memory_window(memory_events, self.config.memory_window)
                extra.append((MEMORY_WINDOW, lambda: window))
            meta = {
                "name": name, "created": writer.rfc3339(started), "created_ts": round(started, 3),
                "type": type_, "trigger": trigger, "kfs_version": __version__,
                "source_host": socket.gethostname(),
                "scope": {"type": type_, "agent": agent, "memory_window": self.config.memory_window},
                "areas": hooks, **({"note": note} if note else {}),
            }

            def finish() -> list[writer.Written]:
                written = zw.write(lambda w: writer.build_manifest(meta, w), extra)
                writer.commit(self.store, fd, name)
                return written

            written = await trio.to_thread.run_sync(finish)
            committed = True
        finally:
            if not committed:
                zw.abort()
                try:
                    os.close(fd)
                except OSError:
                    pass
                try:
                    self.store.unlink(writer.temp_name(name))
                except FileNotFoundError:
                    pass
        size = self.store.stat(f"{name}.zip").st_size
        return {"name": name, "type": type_, "trigger": trigger, "files": len(written),
                "bytes": sum(w.usize for w in written), "size": size,
                "seconds": round(time.time() - started, 3), "areas": hooks}

    def auto_name(self, now: float | None = None) -> str:
        base = writer.snapshot_time_name(time.time() if now is None else now)
        name, n = base, 1
        while name in self._creating or self._exists(name):
            name = f"{base}-{n}"
            n += 1
        return name

    async def delete(self, name: str) -> None:
        check_name(name)
        if name in self._creating:
            raise fs_error(errno.EBUSY, f"snapshot {name} is being written")
        try:
            self.store.unlink(f"{name}.zip")
        except FileNotFoundError:
            raise fs_error(errno.ENOENT, f"no snapshot {name}") from None
        self.store.fsync_dir()
        self._forget(name)
        self.count("deleted")
        if self.kernel is not None:
            self.kernel.invalidate(self.name, name)
            self.kernel.invalidate_entry(self.name, "", name)
        self.bus.publish("snapshot_deleted", {"name": name}, self.name)

    # ------------------------------------------------------------------ restore
    async def restore(self, name: str) -> dict[str, Any]:
        check_name(name)
        async with self._restore_lock:
            snap = await self._snapshot(name)
            try:
                listed = await trio.to_thread.run_sync(reader.check_for_restore, snap)
            except SnapshotError as e:
                self.count("restore_refused")
                raise fs_error(errno.EINVAL, f"refused: {e}") from None
            kind = snap.manifest.get("type", "full")
            if kind != "full":
                raise fs_error(errno.EINVAL, f"{name} is an {kind} snapshot: restore takes full snapshots "
                                             "(browse or unzip this one instead)")
            folders = restore.area_folders(snap)
            targets = [a for a in folders if a in self.peers and has_hook(self.peers[a], "restore_state")]
            skipped = [a for a in folders if a not in targets]
            journal = restore.read_journal(self.store)
            if journal is not None and journal.get("snapshot") != name:
                raise fs_error(errno.EBUSY, f"the restore of {journal.get('snapshot')} was interrupted: finish it "
                                            f"first (kfs snapshot restore MOUNTPOINT {journal.get('snapshot')})")
            if journal is None:
                safety = await self.create_snapshot(f"pre-restore-{writer.snapshot_time_name(time.time())}",
                                                    note=f"safety snapshot before restoring {name}")
                journal = {"snapshot": name, "safety": safety["name"], "areas": targets, "done": [],
                           "started": writer.rfc3339(time.time())}
                await trio.to_thread.run_sync(restore.write_journal, self.store, journal)
            changed_total = 0
            for area_name in targets:
                if area_name in journal["done"]:
                    continue
                area = self.peers[area_name]
                source = restore.Source(snap, area_name, listed)
                try:
                    changed = await area.restore_state(source)
                except OSError as e:
                    raise fs_error(errno.EIO, f"{area_name} could not restore: {e.strerror or e}; "
                                              f"run `kfs snapshot restore MOUNTPOINT {name}` again") from None
                self._invalidate(area, area_name, changed or [])
                changed_total += len(changed or [])
                journal["done"].append(area_name)
                await trio.to_thread.run_sync(restore.write_journal, self.store, journal)
            await trio.to_thread.run_sync(restore.clear_journal, self.store)
        self.count("restored")
        result = {"name": name, "safety": journal.get("safety"), "areas": targets, "skipped": skipped,
                  "changed": changed_total}
        self.bus.publish("snapshot_restored", result, self.name)
        log.info("snapshot %s restored: %s", name, result)
        return result

    def _invalidate(self, area: Area, area_name: str, paths: list[str]) -> None:
        kernel = area.kernel or self.kernel
        if kernel is None:
            return
        kernel.invalidate(area_name, "")
        for path in paths:
            kernel.invalidate(area_name, path)
            parent, _, base = path.rpartition("/")
            kernel.invalidate_entry(area_name, parent, base)

    # ------------------------------------------------------------------ triggers
    async def _timer_loop(self) -> None:
        interval = float(self.config.interval or 0)
        while True:
            await trio.sleep(interval)
            await self._auto_snapshot("timer")

    async def _event_loop(self) -> None:
        while True:
            await trio.sleep(0.2)
            now = time.monotonic()
            while self._watcher.seen:
                name = self._watcher.seen.popleft()
                trigger = self._debounce.seen(name, now)
                if trigger is not None:
                    await self._auto_snapshot(f"event:{trigger}")
            pending = self._debounce.due(time.monotonic())
            if pending is not None:
                await self._auto_snapshot(f"event:{pending}")

    async def _auto_snapshot(self, trigger: str) -> None:
        try:
            await self.create_snapshot(self.auto_name(), trigger=trigger)
            await self.prune()
        except OSError as e:
            self.last_error = f"{trigger} snapshot failed: {e.strerror or e}"
            log.warning("%s", self.last_error)

    async def prune(self) -> list[str]:
        """Apply retention to timer and event snapshots (manual ones are never pruned)."""
        entries = []
        for name in self._names():
            try:
                meta = await self.metadata(name)
            except OSError:
                continue
            entries.append((name, float(meta["created_ts"]), str(meta["trigger"])))
        doomed = triggers.to_prune(entries, self.config.keep_last, self.config.keep_daily, self.config.keep_weekly)
        for name in doomed:
            try:
                await self.delete(name)
                self.count("pruned")
            except OSError:
                pass
        return doomed

    # ------------------------------------------------------------------ CLI commands
    async def control(self, command: str, args: dict[str, Any]) -> Any:
        if command == "ls":
            return [await self.metadata(n) for n in self._names()]
        if command == "create":
            name = args.get("name") or self.auto_name()
            trigger = str(args.get("trigger") or "manual")
            if not TRIGGER_RE.match(trigger):
                raise fs_error(errno.EINVAL, f"bad trigger {trigger!r} (manual, timer or event:NAME)")
            return await self.create_snapshot(str(name), str(args.get("type") or "full"), args.get("agent"),
                                              trigger=trigger)
        if command == "verify":
            snap = await self._snapshot(_arg(args, "name"))
            problems = await trio.to_thread.run_sync(reader.verify, snap)
            return {"name": snap.name, "ok": not problems, "problems": problems,
                    "files": len(snap.files) - 1}
        if command == "diff":
            a = await self._snapshot(_arg(args, "a"))
            b = await self._snapshot(_arg(args, "b"))
            try:
                ma = await trio.to_thread.run_sync(lambda: a.manifest)
                mb = await trio.to_thread.run_sync(lambda: b.manifest)
            except SnapshotError as e:
                raise fs_error(errno.EIO, str(e)) from None
            return reader.diff(ma, mb)
        if command == "restore":
            return await self.restore(_arg(args, "name"))
        if command == "rm":
            await self.delete(_arg(args, "name"))
            return {"deleted": args["name"]}
        if command == "prune":
            return {"pruned": await self.prune()}
        return await super().control(command, args)

    # ------------------------------------------------------------------ FUSE: metadata
    def _dir_attr(self, perm: int, mtime_ns: int | None = None) -> Attr:
        return Attr.directory(perm, self.uid, self.gid, mtime_ns)

    async def getattr(self, path: str) -> Attr:
        if path == "":
            return self._dir_attr(0o755, self.store.stat("").st_mtime_ns)
        name, _, inner = path.partition("/")
        if name in self._creating:
            raise fs_error(errno.ENOENT)
        snap = await self._snapshot(name)
        if inner == "":
            return self._dir_attr(0o555, snap.st.st_mtime_ns)
        info = snap.files.get(inner)
        if info is not None:
            mtime_ns = int(time.mktime((*info.date_time, 0, 0, -1)) * 1e9)
            return Attr.regular(info.file_size, 0o444, self.uid, self.gid, mtime_ns)
        if inner in snap.dirs:
            return self._dir_attr(0o555, snap.st.st_mtime_ns)
        raise fs_error(errno.ENOENT)

    async def readdir(self, path: str) -> list[tuple[str, Attr]]:
        if path == "":
            out = []
            for name in self._names():
                if name in self._creating:
                    continue
                try:
                    out.append((name, self._dir_attr(0o555, self.store.stat(f"{name}.zip").st_mtime_ns)))
                except FileNotFoundError:
                    continue
            return out
        name, _, inner = path.partition("/")
        snap = await self._snapshot(name)
        children = snap.dirs.get(inner)
        if children is None:
            raise fs_error(errno.ENOTDIR if inner in snap.files else errno.ENOENT)
        out = []
        for child, is_dir in sorted(children.items()):
            child_path = f"{path}/{child}"
            out.append((child, await self.getattr(child_path) if not is_dir else self._dir_attr(0o555)))
        return out

    async def setattr(self, path: str, changes: AttrChanges, handle: Handle | None, ctx: Ctx) -> Attr:
        raise fs_error(errno.EROFS)

    # ------------------------------------------------------------------ FUSE: files
    async def open(self, path: str, flags: int, ctx: Ctx) -> Handle:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise fs_error(errno.EROFS)
        name, _, inner = path.partition("/")
        snap = await self._snapshot(name)
        info = snap.files.get(inner)
        if info is None:
            raise fs_error(errno.EISDIR if inner in snap.dirs else errno.ENOENT)
        try:
            entry = await trio.to_thread.run_sync(reader.EntryReader, snap, info)
        except SnapshotError as e:
            raise fs_error(errno.EIO, str(e)) from None
        # No keep_cache: a deleted snapshot re-created under the same name reuses the inode.
        return Handle(path, flags, extra={"reader": entry})

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        entry: reader.EntryReader = handle.extra["reader"]
        try:
            return await trio.to_thread.run_sync(entry.read, offset, size)
        except (*reader.READ_ERRORS, ValueError) as e:
            raise fs_error(errno.EIO, str(e)) from None

    async def release(self, handle: Handle) -> None:
        entry = handle.extra.get("reader")
        if entry is not None:
            await trio.to_thread.run_sync(entry.close)

    async def create(self, path: str, mode: int, flags: int, ctx: Ctx) -> Handle:
        raise fs_error(errno.EROFS)

    # ------------------------------------------------------------------ FUSE: namespace
    async def mkdir(self, path: str, mode: int, ctx: Ctx) -> Attr:
        if "/" in path:
            raise fs_error(errno.EROFS)
        await self.create_snapshot(path, trigger="manual")
        return await self.getattr(path)

    async def rmdir(self, path: str) -> None:
        if "/" in path:
            raise fs_error(errno.EROFS)
        await self.delete(path)

    async def unlink(self, path: str) -> None:
        if "/" not in path and self._exists(path):
            raise fs_error(errno.EISDIR)
        raise fs_error(errno.EROFS)

    async def rename(self, old: str, new: str, flags: int) -> None:
        if "/" in new:
            raise fs_error(errno.EPERM)   # nothing moves into a snapshot
        if "/" in old:
            raise fs_error(errno.EROFS)
        check_name(new)
        if not self._exists(old) or old in self._creating:
            raise fs_error(errno.ENOENT)
        if self._exists(new) or new in self._creating:
            raise fs_error(errno.EEXIST)
        self.store.rename(f"{old}.zip", f"{new}.zip")
        self.store.fsync_dir()
        self._forget(old)


def memory_window(events: list[dict[str, Any]], size: int) -> bytes:
    """memory_window.json: the last ``size`` events the areas gave, oldest first."""
    import json

    ordered = sorted((e for e in events if isinstance(e, dict)), key=lambda e: str(e.get("timestamp", "")))
    window = ordered[-size:] if size else []
    return (json.dumps({"size": size, "count": len(window), "events": window}, indent=1) + "\n").encode()


def _arg(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise fs_error(errno.EINVAL, f"missing {key}")
    check_name(value)
    return value

