"""vectors/: each directory is a vector collection; records in, search results out.

::

    vectors/C/records.jsonl      append = upsert (or {"id":..., "delete": true}); read = export
    vectors/C/search/<query>     any name is a query: nearest records as JSON Lines
    vectors/C/collection.json    count, dimension, backend, queue depth, sync lag

Writes are validated (`schema`), appended and fsynced to the collection's
queue in the store (`queue`) and acknowledged; the sync agent (`sync`) applies
them to the backend (`backends`).  Reads merge the backend with the queue, so
a reader always sees what was acknowledged.  The backend and the embedder block:
they run in worker threads, and a read never waits for them longer than
`READ_WAIT` (pyfuse3 has no FUSE interrupts): it answers EINTR and the
caller's retry picks up the answer, which the handle keeps.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from kfs.fs.area import Area, Attr, AttrChanges, Ctx, Handle, SnapshotSink, SnapshotSource, fs_error
from kfs.store import StoreDir
from kfs.vectors.backends import Backend, BackendError, make_backend
from kfs.vectors.backends.isolated import BadQuery, ChannelUnavailable
from kfs.vectors.collection import Collection, Settings, load_settings, save_settings
from kfs.vectors.embedder import ApiKeyUnavailable, Embedder, EmbedderError, MiniLMEmbedder, make_embedder
from kfs.vectors.memory import MemorySync
from kfs.vectors.queue import CollectionQueue, Entry
from kfs.vectors.schema import Record, SchemaError, check_collection_name, now_rfc3339, parse_record
from kfs.vectors.search import Query, backend_k, export_chunks, merge, of_agent, parse_query, result_line, run_query
from kfs.vectors.secrets import SecretReader
from kfs.vectors.sync import SyncAgent

log = logging.getLogger("kfs.vectors")

READ_WAIT = 0.25  # seconds a read may wait for a worker thread before answering EINTR
RECORDS = "records.jsonl"
#: hidden store file that a snapshot export streams records through (never a collection: dot name)
SNAPSHOT_SPOOL = ".snapshot-export"
STATS = "collection.json"
SEARCH = "search"
MAX_LINE = 64 << 20
#: queued records that a search ranks in on the trio loop; more: in a worker thread
INLINE_MERGE = 64
#: searches started at LOOKUP, waiting for the OPEN that follows it: how many, and for how long
PREFETCH_KEEP = 16
PREFETCH_AGE = 2.0


class Background:
    """A blocking call running in a worker thread, whose answer outlives one read request."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Prefetch:
    """A search started when the kernel looked its name up: the OPEN that follows takes it."""

    def __init__(self, col: Collection, bg: Background) -> None:
        self.col = col
        self.bg = bg
        self.version = col.version
        self.started = time.monotonic()

    def fresh(self, col: Collection) -> bool:
        """Still what a search started now would answer: same collection, no write acknowledged
        since (read-your-writes), and recent."""
        return col is self.col and col.version == self.version and time.monotonic() - self.started < PREFETCH_AGE


class VectorsArea(Area):
    name = "vectors"
    entry_timeout = 1.0
    attr_timeout = 1.0

    def __init__(self, bus: Any, store: StoreDir, config: Any, opts: Any = None) -> None:
        super().__init__(bus)
        # onnxruntime reads this when it is first imported (by the embedder, or by chromadb).
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        self.store = store
        self.config = config
        self.qdir = store.subdir(".queue", mode=0o700)
        self.cdir = store.subdir(".collections", mode=0o700)
        # qdrant-client's local mode has its own format: never in qdrant-edge's directory
        db_name = {"embedded": f".{config.provider}", "local": f".{config.provider}-local"}.get(config.mode)
        self.db_dir = store.subdir(db_name, mode=0o700) if db_name else None
        # Chroma and Qdrant want a path: the store dir's descriptor as seen by this process, never the mount.
        db_path = f"/proc/self/fd/{self.db_dir.fd}" if self.db_dir is not None else ""
        # API keys in the vault are read through the bus (kfs/vectors/secrets.py)
        self.secrets = SecretReader(bus)
        try:
            self.backend: Backend = make_backend(config, db_path, self.secrets,
                                                 self.db_dir.fd if self.db_dir is not None else None)
            self.embedder: Embedder = make_embedder(config, self.secrets)
        except (BackendError, EmbedderError) as e:
            # An OSError stops the mount with one line (kfs: cannot mount ...: <this>).
            raise fs_error(errno.EINVAL, f"vector_config.yaml: {e}") from None
        for i, rule in enumerate(config.memory_sync):
            try:
                check_collection_name(rule.collection)
            except SchemaError as e:
                raise fs_error(errno.EINVAL, f"vector_config.yaml: memory_sync[{i}].collection: {e}") from None
        self.collections: dict[str, Collection] = {}
        self.drops: set[str] = set()
        for name in self.cdir.listdir():
            if name.endswith(".json") and not name.startswith("."):
                self._load_collection(name[: -len(".json")])
            elif name.endswith(".drop"):
                self.drops.add(name[: -len(".drop")])
        self.ready = trio.Event()
        self.backend_error: str | None = None
        self.sync = SyncAgent(self.backend, self.embedder, config, lambda: list(self.collections.values()),
                              lambda: sorted(self.drops), self._drop_done)
        self.memory = MemorySync(bus, config.memory_sync, self._memory_accept)
        self._nursery: trio.Nursery | None = None
        self._prefetched: dict[str, Prefetch] = {}  # path -> search begun at its LOOKUP
        self._unsubscribe_vault: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ life cycle
    def _load_collection(self, name: str) -> Collection:
        queue = CollectionQueue(self.qdir, name)
        queue.load()
        try:
            settings = load_settings(self.cdir, name)
        except (OSError, ValueError):
            settings = Settings(self.config.dimension, self.config.distance, now_rfc3339())
        col = Collection(name, settings, queue)
        col.note_accepted(queue.pending)
        self.collections[name] = col
        return col

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.secrets.bind()
        # records waiting for a vault key go as soon as the vault is unlocked, not at the next retry
        self._unsubscribe_vault = self.bus.subscribe(lambda _event: self.sync.wake(), ["vault_unlocked"])
        nursery.start_soon(self._connect)
        nursery.start_soon(self.sync.run, self.ready)
        self.memory.start(nursery)

    async def _connect(self) -> None:
        """Import and open the backend in a thread (Chroma takes seconds), then adopt its collections."""
        delay = 0.5
        while True:
            try:
                await trio.to_thread.run_sync(self.backend.connect)
                names = await trio.to_thread.run_sync(self.backend.list_collections)
                break
            except BackendError as e:
                self.backend_error = str(e)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.backend_error = None
        for name in names:
            if name in self.collections or name in self.drops:
                continue
            try:
                check_collection_name(name)
                page, _ = await trio.to_thread.run_sync(self.backend.page, name, None, 1)
            except (SchemaError, BackendError):
                continue  # a name the mount could not show, or gone meanwhile
            dim = len(page[0].embedding) if page and page[0].embedding is not None else self.config.dimension
            settings = Settings(dim, self.config.distance, now_rfc3339())
            await trio.to_thread.run_sync(save_settings, self.cdir, name, settings)
            col = self._load_collection(name)
            col.ensured = True
        self.ready.set()

    async def stop(self) -> None:
        """Drain every queue into the backend (if it answers), then close."""
        if self.ready.is_set():
            try:
                with trio.move_on_after(50):
                    await self.memory.flush()
                    await self.sync.sync_all(drain=True)
            except (BackendError, EmbedderError, OSError) as e:
                log.warning("vectors: queue kept for the next mount: %s", e)
        self._unsubscribe_vault()
        for col in self.collections.values():
            col.queue.close()
        await trio.to_thread.run_sync(self.backend.close)

    def status(self) -> dict[str, Any]:
        cols = {
            name: {"queue_depth": c.queue.depth, "sync_lag_s": c.lag_s(), "dimension": c.dimension}
            for name, c in sorted(self.collections.items())
        }
        state = "ready" if self.ready.is_set() else "connecting"
        if self.sync.waiting_for_key and not self.backend_error:
            state = "embedding key unavailable (queueing)"
        elif self.backend_error or self.sync.last_error:
            state = "backend unavailable (queueing)"
        depth = sum(c.queue.depth for c in self.collections.values())
        lag = max((c.lag_s() for c in self.collections.values()), default=0.0)
        return {
            "state": state,
            "message": f"{len(cols)} collections, queue {depth}, lag {lag}s, {self.backend_label}",
            "backend": self.backend_label,
            "sync_mode": self.config.sync_mode,
            "queue_depth": depth,
            "sync_lag_s": lag,
            "last_error": self.backend_error or self.sync.last_error,
            "applied": self.sync.applied,
            "applying": self.sync.applying,
            # group commit: fewer fdatasyncs than queue writes means concurrent writes shared them
            "queue_fdatasyncs": sum(c.fsyncs for c in self.collections.values()),
            "collections": cols,
            "counters": dict(self.counters),
        }

    @property
    def backend_label(self) -> str:
        return str(getattr(self.backend, "label", self.backend.name))

    # ------------------------------------------------------------------ helpers
    def _start(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Background:
        """Run ``fn(*args)`` in the area's nursery; its answer outlives the read that asked for it."""
        bg = Background()

        async def run() -> None:
            try:
                bg.result = await fn(*args)
            except Exception as e:
                bg.error = e
            finally:
                bg.done.set()

        assert self._nursery is not None, "area not started"
        self._nursery.start_soon(run)
        return bg

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> Background:
        """`_start` for blocking work: in a worker thread."""
        return self._start(trio.to_thread.run_sync, fn, *args)

    async def _bounded(self, bg: Background) -> Any:
        """Wait up to READ_WAIT for ``bg``; EINTR if not done (the caller retries and finds it)."""
        with trio.move_on_after(READ_WAIT):
            await bg.done.wait()
        if not bg.done.is_set():
            raise fs_error(errno.EINTR, "still working: retry")
        if isinstance(bg.error, SchemaError):
            raise fs_error(errno.EINVAL, str(bg.error))
        if isinstance(bg.error, ApiKeyUnavailable) and bg.error.locked:
            raise fs_error(errno.EACCES, str(bg.error))
        if isinstance(bg.error, BackendError | EmbedderError):
            log.warning("vectors: read failed: %s", bg.error)
            if isinstance(bg.error, BackendError):
                self.sync.report_failure(str(bg.error))
            raise fs_error(errno.EIO, str(bg.error))
        if bg.error is not None:
            raise bg.error
        return bg.result

    def _split(self, path: str) -> tuple[Collection | None, list[str]]:
        parts = path.split("/") if path else []
        if not parts:
            return None, []
        col = self.collections.get(parts[0])
        if col is None:
            raise fs_error(errno.ENOENT)
        return col, parts[1:]

    def _ensure_in_backend(self, col: Collection) -> None:
        if not col.ensured:
            if col.name in self.drops:  # rmdir then mkdir: the old copy goes first
                self.backend.drop_collection(col.name)
                self._drop_done(col.name)
            self.backend.ensure_collection(col.name, col.settings.distance, col.dimension)
            col.ensured = True

    def _drop_done(self, name: str) -> None:
        self.drops.discard(name)
        try:
            self.cdir.unlink(f"{name}.drop")
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ metadata
    async def getattr(self, path: str) -> Attr:
        col, rest = self._split(path)
        if col is None or not rest:
            return Attr.directory(0o755)
        if rest == [SEARCH]:
            return Attr.directory(0o555)
        if rest == [RECORDS]:
            return Attr.regular(0, 0o644)
        if rest == [STATS] or (len(rest) == 2 and rest[0] == SEARCH):
            return Attr.regular(0, 0o444)
        raise fs_error(errno.ENOENT)

    async def lookup(self, path: str) -> Attr:
        """A query's name is looked up right before it is opened (``cat search/q``: LOOKUP, then
        OPEN): start the search now, so it runs while the kernel and the reader make the OPEN."""
        attr = await self.getattr(path)
        col, rest = self._split(path)
        if col is not None and len(rest) == 2 and rest[0] == SEARCH and self._nursery is not None:
            try:
                query = parse_query(rest[1], self.config.search_k)
            except SchemaError:
                return attr  # the open says EINVAL
            while len(self._prefetched) >= PREFETCH_KEEP:  # looked up, never opened (stat, ls -l)
                del self._prefetched[next(iter(self._prefetched))]
            self._prefetched.pop(path, None)
            self._prefetched[path] = Prefetch(col, self._start(self._search_async, col, query))
            self.count("searches_started_at_lookup")
        return attr

    async def readdir(self, path: str) -> list[tuple[str, Attr]]:
        col, rest = self._split(path)
        if col is None:
            return [(name, Attr.directory(0o755)) for name in sorted(self.collections)]
        if not rest:
            return [(RECORDS, await self.getattr(f"{path}/{RECORDS}")),
                    (STATS, await self.getattr(f"{path}/{STATS}")),
                    (SEARCH, Attr.directory(0o555))]
        if rest == [SEARCH]:
            return []
        raise fs_error(errno.ENOTDIR)

    async def setattr(self, path: str, changes: AttrChanges, handle: Handle | None, ctx: Ctx) -> Attr:
        attr = await self.getattr(path)
        if changes.size is not None or changes.mode is not None or changes.uid is not None \
                or changes.gid is not None:
            raise fs_error(errno.EPERM, "records are appended or deleted by id, never truncated")
        return attr  # touch: nothing to change

    # ------------------------------------------------------------------ namespace
    async def mkdir(self, path: str, mode: int, ctx: Ctx) -> Attr:
        if "/" in path:
            raise fs_error(errno.EPERM, "only collections are directories")
        if path in self.collections:
            raise fs_error(errno.EEXIST)
        try:
            check_collection_name(path)
        except SchemaError as e:
            raise fs_error(errno.EINVAL, str(e)) from None
        settings = Settings(self.config.dimension, self.config.distance, now_rfc3339())
        await trio.to_thread.run_sync(save_settings, self.cdir, path, settings)
        queue = CollectionQueue(self.qdir, path)
        await trio.to_thread.run_sync(queue.load)
        self.collections[path] = Collection(path, settings, queue)
        self.count("collections_created")
        self.sync.wake()
        return Attr.directory(0o755)

    async def rmdir(self, path: str) -> None:
        col, rest = self._split(path)
        if col is None or rest:
            raise fs_error(errno.EPERM if rest == [SEARCH] else errno.ENOTDIR)
        async with col.lock:
            col.removed = True
            del self.collections[col.name]
            # The drop marker first: a crash from here on still deletes the backend's copy.
            await trio.to_thread.run_sync(self.cdir.write_atomic, f"{col.name}.drop", b"")
            self.drops.add(col.name)
            await trio.to_thread.run_sync(col.queue.destroy)
            await trio.to_thread.run_sync(self.cdir.unlink, f"{col.name}.json")
        self.count("collections_removed")
        self.sync.wake()

    async def unlink(self, path: str) -> None:
        await self.getattr(path)
        raise fs_error(errno.EPERM, 'delete records with {"id": ..., "delete": true}; rmdir removes a collection')

    async def rename(self, old: str, new: str, flags: int) -> None:
        raise fs_error(errno.EPERM)

    # ------------------------------------------------------------------ files
    async def create(self, path: str, mode: int, flags: int, ctx: Ctx) -> Handle:
        col, rest = self._split(path)
        if col is None or rest == [RECORDS]:
            raise fs_error(errno.EEXIST)
        raise fs_error(errno.EPERM, "a collection holds records.jsonl, collection.json and search/ only")

    async def open(self, path: str, flags: int, ctx: Ctx) -> Handle:
        col, rest = self._split(path)
        attr = await self.getattr(path)
        if col is None or attr.is_dir:
            raise fs_error(errno.EISDIR)
        handle = Handle(path, flags, direct_io=True)
        if rest == [RECORDS]:
            if flags & os.O_TRUNC:
                raise fs_error(errno.EPERM, "records.jsonl is never truncated")
            handle.extra.update(col=col, tail=b"")
            return handle
        if handle.writable:
            raise fs_error(errno.EACCES)
        if rest == [STATS]:
            handle.extra["bg"] = self._spawn(self._stats, col)
            return handle
        try:
            query = parse_query(rest[1], self.config.search_k)
        except SchemaError as e:
            raise fs_error(errno.EINVAL, str(e)) from None
        self.count("queries")
        early = self._prefetched.pop(path, None)
        if early is not None and early.fresh(col):
            handle.extra["bg"] = early.bg
        else:  # opened again within the kernel's entry timeout (no LOOKUP), or written to since
            handle.extra["bg"] = self._start(self._search_async, col, query)
        return handle

    async def _search_async(self, col: Collection, query: Query) -> bytes:
        """A search: awaited on the backend process's searches channel where there is one (no
        worker thread: embedding and query are one round trip to the child), else in a thread."""
        overlay = col.overlay()  # before the backend answers: see search.merge
        asearch = getattr(self.backend, "asearch", None)
        local = isinstance(self.embedder, MiniLMEmbedder)  # the child can run the same model
        todo = [r for r in overlay.values() if not r.delete and r.embedding is None and r.text]
        if asearch is not None and col.ensured and (local or (query.text is None and not todo)):
            try:
                vector, vectors, found = await asearch(
                    col.name, query.vector, query.text, backend_k(query, overlay), col.dimension,
                    self.embedder.model if local else None, [r.text for r in todo])
            except ChannelUnavailable:
                pass  # no child right now: the thread path's call starts one
            except BadQuery as e:
                raise SchemaError(str(e)) from None
            else:
                for record, embedding in zip(todo, vectors, strict=True):
                    record.embedding = embedding  # as embed_missing does: the sync agent reuses it
                args = (col.settings.distance, vector, found, overlay, query.k)
                ranked = merge(*args) if len(overlay) <= INLINE_MERGE else await trio.to_thread.run_sync(merge, *args)
                self.count("searches_awaited")
                return b"".join(result_line(r) for r in ranked)
        return await trio.to_thread.run_sync(self._search, col, query, overlay)

    def _search(self, col: Collection, query: Query, overlay: dict[str, Record] | None = None) -> bytes:
        self._ensure_in_backend(col)
        found = run_query(self.backend, self.embedder, col.name, col.settings.distance, col.dimension,
                          col.overlay() if overlay is None else overlay, query)
        return b"".join(result_line(r) for r in found)

    def _stats(self, col: Collection) -> bytes:
        try:
            self._ensure_in_backend(col)
            count: int | None = self.backend.count(col.name)
            col.backend_count = count
        except BackendError as e:
            count = None  # the backend is down: the rest (queue depth, lag, last_error) still says a lot
            self.sync.report_failure(str(e))
        return (json.dumps(self._stats_dict(col, count), indent=2) + "\n").encode()

    def _stats_dict(self, col: Collection, count: int | None) -> dict[str, Any]:
        overlay = col.overlay()
        return {
            "name": col.name,
            "backend": self.backend_label,
            "dimension": col.dimension,
            "distance": col.settings.distance,
            "count": count,
            "count_exact": not overlay,
            "queued_upserts": sum(1 for r in overlay.values() if not r.delete),
            "queued_deletes": sum(1 for r in overlay.values() if r.delete),
            "queue_depth": col.queue.depth,
            "sync_lag_s": col.lag_s(),
            "sync_mode": self.config.sync_mode,
            "last_sync": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(col.last_sync)) if col.last_sync else None,
            "backend_reachable": not (self.backend_error or (self.sync.last_error and not self.sync.waiting_for_key)),
            "last_error": self.backend_error or self.sync.last_error,
            "embedding_model": self.embedder.model,
            "created": col.settings.created,
        }

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        if "col" in handle.extra:
            return await self._read_export(handle, offset, size)
        data = handle.extra.get("data")
        if data is None:
            data = handle.extra["data"] = await self._bounded(handle.extra["bg"])
        return data[offset: offset + size]

    async def _read_export(self, handle: Handle, offset: int, size: int) -> bytes:
        """Stream the export: one backend page at a time, then the queued records."""
        st = handle.extra
        col: Collection = st["col"]
        if "gen" not in st or offset < st["start"]:
            overlay = col.overlay()

            def chunks() -> Any:
                try:
                    self._ensure_in_backend(col)
                    yield from export_chunks(self.backend, col.name, overlay, True)
                    return
                except BackendError as e:
                    failed = e
                # The backend is down: still hand out what only the queue holds (read-your-writes),
                # then fail the read with EIO so nobody takes this for the whole collection.
                self.sync.report_failure(str(failed))
                yield from export_chunks(self.backend, col.name, overlay, False)
                raise failed

            st.update(gen=chunks(), buf=b"", start=0, eof=False, bg=None)
        while offset + size > st["start"] + len(st["buf"]) and not st["eof"]:
            if st.get("error") is not None:
                # The export failed after handing out what it had (backend down): now say so, once.
                error, st["error"], st["eof"] = st["error"], None, True
                raise error
            if st["bg"] is None:
                st["bg"] = self._spawn(next, st["gen"], None)
            bg = st["bg"]
            try:
                chunk = await self._bounded(bg)
            except OSError as e:
                if e.errno == errno.EINTR:
                    raise
                st["bg"] = None
                if offset < st["start"] + len(st["buf"]):
                    st["error"] = e  # first return the bytes already here; the next read fails
                    break
                raise
            st["bg"] = None
            if chunk is None:
                st["eof"] = True
            else:
                st["buf"] += chunk
        cut = offset - st["start"]
        if cut > 0:
            st["buf"] = st["buf"][cut:]
            st["start"] = offset
        return st["buf"][:size]

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        col: Collection | None = handle.extra.get("col")
        if col is None or not handle.writable:
            raise fs_error(errno.EBADF)
        # Every write is an append, whatever its offset (the kernel's idea of the size is 0).
        self.count("write_requests")
        buf = handle.extra["tail"] + data
        cut = buf.rfind(b"\n")
        if cut < 0:
            if len(buf) > MAX_LINE:
                raise fs_error(errno.EINVAL, "record line too long")
            handle.extra["tail"] = buf
            return len(data)
        lines = [line for line in buf[:cut].split(b"\n") if line.strip()]
        if lines:
            await self._accept_lines(col, lines)
        handle.extra["tail"] = buf[cut + 1:]
        return len(data)

    async def flush(self, handle: Handle) -> None:
        col: Collection | None = handle.extra.get("col")
        tail = handle.extra.get("tail", b"")
        if col is not None and tail.strip():
            handle.extra["tail"] = b""
            await self._accept_lines(col, [tail])

    async def fsync(self, handle: Handle, datasync: bool) -> None:
        return None  # every acknowledged write is already fsynced in the queue

    async def release(self, handle: Handle) -> None:
        handle.extra.clear()

    # ------------------------------------------------------------------ the write path
    async def _accept_lines(self, col: Collection, lines: list[bytes]) -> None:
        text_dim = self.embedder.dimension

        def parse() -> list[Record]:
            dim = col.dimension
            records = []
            for number, line in enumerate(lines, 1):
                try:
                    record = parse_record(line, dim, text_dim)
                except SchemaError as e:
                    raise SchemaError(f"line {number}: {e}") from None
                if dim is None and not record.delete:
                    dim = len(record.embedding) if record.embedding is not None else text_dim
                records.append(record)
            return records

        try:
            started = time.perf_counter()
            records = await trio.to_thread.run_sync(parse)
            self.count("parse_ms", round((time.perf_counter() - started) * 1000))
        except SchemaError as e:
            self.count("records_rejected")
            log.info("vectors/%s/records.jsonl: refused: %s", col.name, e)
            raise fs_error(errno.EINVAL, str(e)) from None
        await self._accept_records(col, records)

    async def _accept_records(self, col: Collection, records: list[Record]) -> list[Entry]:
        """Queue durably (group-committed fdatasync) and hand to the sync agent; EINVAL if the
        dimension changed meanwhile."""
        async with col.lock:
            if col.removed:
                raise fs_error(errno.ENOENT)

            def commit() -> list[Entry]:
                for r in records:
                    if r.embedding is not None and col.dimension is not None and len(r.embedding) != col.dimension:
                        raise SchemaError(
                            f"embedding has {len(r.embedding)} dimensions, the collection has {col.dimension}")
                if col.dimension is None:
                    first = next((r for r in records if not r.delete), None)
                    if first is not None:
                        dim = len(first.embedding) if first.embedding is not None else self.embedder.dimension
                        if dim is not None:
                            col.settings.dimension = dim
                            save_settings(self.cdir, col.name, col.settings)
                return col.queue.write(records)

            try:
                started = time.perf_counter()
                entries = await trio.to_thread.run_sync(commit)
                epoch = col.queue.epoch
            except SchemaError as e:
                self.count("records_rejected")
                raise fs_error(errno.EINVAL, str(e)) from None
        if not entries:
            return entries
        # Outside the lock: concurrent writers' appends share one fdatasync (group commit).
        await col.wait_durable(entries[-1].seq, epoch)
        self.count("queue_commit_ms", round((time.perf_counter() - started) * 1000))
        col.note_accepted(entries)
        self.count("records_accepted", len(entries))
        self.sync.notify(col)
        return entries

    async def _memory_accept(self, name: str, records: list[Record]) -> None:
        if name not in self.collections:
            await self.mkdir(name, 0o755, Ctx())
        await self._accept_records(self.collections[name], records)

    # ------------------------------------------------------------------ control (kfs vectors ...)
    async def control(self, command: str, args: dict[str, Any]) -> Any:
        if command == "status":
            return self.status()
        if command == "ls":
            return [self._stats_dict(c, c.backend_count) for _, c in sorted(self.collections.items())]
        if command == "query":
            col = self.collections.get(str(args.get("collection")))
            if col is None:
                raise fs_error(errno.ENOENT, f"no collection {args.get('collection')!r}")
            k = int(args.get("k") or self.config.search_k)
            vector = args.get("vector")
            query = Query(k, text=args.get("text"), vector=vector)
            if not query.text and not vector:
                raise fs_error(errno.EINVAL, "give --text or --vector")
            try:
                data = await trio.to_thread.run_sync(self._search, col, query)
            except SchemaError as e:
                raise fs_error(errno.EINVAL, str(e)) from None
            except (BackendError, EmbedderError) as e:
                raise fs_error(errno.EIO, str(e)) from None
            return [json.loads(line) for line in data.splitlines()]
        if command == "sync":
            await self.sync.sync_all(drain=True)
            return self.status()
        return await super().control(command, args)

    # ------------------------------------------------------------------ snapshots
    async def export_state(self, sink: SnapshotSink, scope: dict[str, Any]) -> None:
        """Every collection as ``C/settings.json`` + ``C/records.jsonl`` (queued records included).

        An ``agent`` snapshot keeps only the records whose ``metadata.agent_id`` is that agent
        (filtered page by page), and leaves out collections with none of them.
        """
        agent = scope.get("agent") if scope.get("type") == "agent" else None
        keep = of_agent(str(agent)) if agent else None
        for name, col in sorted(self.collections.items()):
            overlay = col.overlay()

            def dump(name: str = name, col: Collection = col, overlay: dict[str, Record] = overlay) -> int:
                self._ensure_in_backend(col)
                return self._spool_export(sink, f"{name}/{RECORDS}",
                                          export_chunks(self.backend, col.name, overlay, True, keep))

            kept = await trio.to_thread.run_sync(dump)
            if kept == 0:
                if keep is not None:
                    continue
                sink.add_bytes(f"{name}/{RECORDS}", b"")  # a full snapshot lists empty collections too
            settings = {"name": name, "dimension": col.dimension, "distance": col.settings.distance,
                        "created": col.settings.created, "backend": self.backend.name}
            sink.add_bytes(f"{name}/settings.json", json.dumps(settings, indent=2).encode())

    def _spool_export(self, sink: SnapshotSink, arcname: str, chunks: Iterator[bytes]) -> int:
        """Write ``chunks`` through a hidden store file into the snapshot (memory: one page); returns bytes.

        An empty export adds nothing.  The sink opens the file at once, so it is unlinked right after.
        """
        size = 0
        try:
            with self.store.opened(SNAPSHOT_SPOOL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) as fd:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                    size += len(chunk)
            if size:
                sink.add_store_file(arcname, self.store, SNAPSHOT_SPOOL, size)
        finally:
            try:
                self.store.unlink(SNAPSHOT_SPOOL)
            except FileNotFoundError:
                pass
        return size

    async def restore_state(self, source: SnapshotSource) -> list[str]:
        """Re-create each collection of the snapshot; its records go through the durable queue."""
        names = sorted({n.split("/", 1)[0] for n in source.names() if n.endswith("/settings.json")})
        changed: list[str] = []
        for name in list(self.collections):
            if name not in names:
                await self.rmdir(name)
                changed.append(name)
        for name in names:
            settings = json.loads(source.read_bytes(f"{name}/settings.json"))
            if name in self.collections:
                await self.rmdir(name)
            await self.mkdir(name, 0o755, Ctx())
            col = self.collections[name]
            col.settings.dimension = settings.get("dimension")
            col.settings.distance = settings.get("distance", col.settings.distance)
            await trio.to_thread.run_sync(save_settings, self.cdir, name, col.settings)
            raw = source.read_bytes(f"{name}/records.jsonl") if f"{name}/records.jsonl" in source.names() else b""
            batch: list[Record] = []
            for line in raw.splitlines():
                if line.strip():
                    batch.append(Record.from_json(json.loads(line)))
                if len(batch) >= 1000:
                    await self._accept_records(col, batch)
                    batch = []
            if batch:
                await self._accept_records(col, batch)
            changed += [name, f"{name}/{RECORDS}", f"{name}/{STATS}"]
        self.sync.wake()
        return changed
