"""The sync agent: applies each collection's queue to the backend, in order.

``batched``: every ``sync_interval``, or as soon as a queue holds
``batch_size`` records.  ``streaming``: as soon as anything is queued.
Either way entries go in order, ``batch_size`` at a time, as idempotent
upserts (and deletes) by id; the checkpoint moves only after the backend
said yes.  A failing backend (server down) is retried with backoff; nothing
leaves the queue until it is applied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from kfs.vectors.backends.base import Backend, BackendError
from kfs.vectors.collection import Collection
from kfs.vectors.embedder import ApiKeyUnavailable, Embedder, EmbedderError
from kfs.vectors.queue import Entry
from kfs.vectors.search import embed_missing

log = logging.getLogger("kfs.vectors.sync")

RETRY_MIN = 0.5
RETRY_MAX = 5.0


class SyncAgent:
    def __init__(self, backend: Backend, embedder: Embedder, config: Any,
                 collections: Callable[[], list[Collection]], drops: Callable[[], list[str]],
                 drop_done: Callable[[str], None]) -> None:
        self.backend = backend
        self.embedder = embedder
        self.config = config
        self.collections = collections
        self.drops = drops
        self.drop_done = drop_done
        self._wake = trio.Event()
        self.last_error: str | None = None
        #: the last failure was the embedding endpoint's key (vault locked): the backend is fine
        self.waiting_for_key = False
        self.applied = 0
        self.batches = 0
        self.running = False
        self.suspect = False  # a read saw the backend fail: probe it until it answers again
        #: records of the batch the backend is applying right now (0: none); searches still run
        self.applying = 0

    def report_failure(self, error: str) -> None:
        """A read (export, search, stats) found the backend down: say so in the status until a
        probe or a sync gets through, even when nothing is queued for the agent to retry."""
        self.last_error = error
        self.waiting_for_key = False
        self.suspect = True
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # called from a worker thread (export, stats)
            trio.from_thread.run_sync(self._wake.set)
        else:
            self._wake.set()

    def notify(self, col: Collection | None = None) -> None:
        """Something was queued (or a collection created or removed)."""
        if col is None or self.config.sync_mode == "streaming" or col.queue.depth >= self.config.batch_size:
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, ready: trio.Event) -> None:
        await ready.wait()
        self.running = True
        backoff = RETRY_MIN
        while True:
            try:
                if self.suspect:
                    await trio.to_thread.run_sync(self.backend.list_collections)
                    self.suspect = False
                await self.sync_all(drain=True)
                self.last_error = None
                self.waiting_for_key = False
                backoff = RETRY_MIN
                wait = self.config.sync_interval if self.config.sync_mode == "batched" else 60.0
            except (BackendError, EmbedderError, OSError) as e:
                if str(e) != self.last_error:
                    log.warning("sync: %s (retrying)", e)
                self.last_error = str(e)
                self.waiting_for_key = isinstance(e, ApiKeyUnavailable)
                wait = backoff
                backoff = min(backoff * 2, RETRY_MAX)
            with trio.move_on_after(max(wait, 0.01)):
                await self._wake.wait()
            self._wake = trio.Event()

    async def sync_all(self, drain: bool) -> None:
        for name in self.drops():
            await trio.to_thread.run_sync(self.backend.drop_collection, name)
            self.drop_done(name)
        for col in self.collections():
            if not col.ensured:
                await trio.to_thread.run_sync(self.backend.ensure_collection, col.name, col.settings.distance,
                                               col.dimension)
                col.ensured = True
            while col.queue.applicable(1) and not col.removed:
                await self.apply_batch(col)
                if not drain:
                    break

    async def apply_batch(self, col: Collection) -> None:
        # Only entries already fdatasynced: an unacknowledged write may still be rolled back.
        batch = col.queue.applicable(self.config.batch_size)
        if not batch:
            return
        self.applying = len(batch)
        try:
            await trio.to_thread.run_sync(self._apply, col.name, batch)
        finally:
            self.applying = 0
        last = batch[-1].seq
        async with col.lock:
            if col.removed or (col.queue.pending and col.queue.pending[0].seq > last):
                return  # the collection was emptied (rmdir/restore) meanwhile
            await trio.to_thread.run_sync(col.queue.mark_applied, last)
        col.forget_applied(last)
        col.last_sync = time.time()
        col.backend_count = None
        self.applied += len(batch)
        self.batches += 1

    def _apply(self, name: str, batch: list[Entry]) -> None:
        """Runs of upserts and runs of deletes, in queue order (blocking)."""
        embed_missing([e.record for e in batch], self.embedder)
        run: list[Entry] = []
        for entry in batch:
            if run and run[-1].record.delete != entry.record.delete:
                self._apply_run(name, run)
                run = []
            run.append(entry)
        if run:
            self._apply_run(name, run)

    def _apply_run(self, name: str, run: list[Entry]) -> None:
        if run[0].record.delete:
            self.backend.delete(name, [e.record.id for e in run])
            return
        # The same id twice in one call: the backend may refuse it; the later one wins anyway.
        latest = {e.record.id: e.record for e in run}
        records = list(latest.values())
        self.backend.upsert(
            name, [r.id for r in records], [r.embedding for r in records],
            [r.metadata for r in records], [r.text for r in records],
        )
