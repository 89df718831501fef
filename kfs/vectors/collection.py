"""One collection's local state: settings (dimension, distance), queue, lock.

Settings live in the store's ``vectors/.collections/C.json`` (written
atomically): the dimension is fixed by the first accepted record, before that
record is acknowledged, so it survives a crash while the record is still
only in the queue.  ``C.drop`` marks a collection whose backend copy still has
to be deleted (``rmdir`` while the backend was busy or down).
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import trio

from kfs.store import StoreDir
from kfs.vectors.queue import CollectionQueue, Entry
from kfs.vectors.schema import Record


@dataclass
class Settings:
    dimension: int | None = None
    distance: str = "cosine"
    created: str = ""


class Collection:
    def __init__(self, name: str, settings: Settings, queue: CollectionQueue) -> None:
        self.name = name
        self.settings = settings
        self.queue = queue
        self.lock = trio.Lock()  # one writer or the sync agent at a time on the queue
        self.ensured = False  # exists in the backend (checked once per mount)
        self.removed = False  # rmdir'ed: the sync agent must not touch its queue any more
        self.backend_count: int | None = None
        self.last_sync: float | None = None
        self.accepted_at: dict[int, float] = {}  # seq -> monotonic time, for the sync lag
        self._syncing: trio.Event | None = None  # set when the fdatasync in flight is done
        self.fsyncs = 0
        #: bumped whenever writes are acknowledged: a search started earlier may not have seen them
        self.version = 0

    async def wait_durable(self, last_seq: int, epoch: int) -> None:
        """Group commit: return once the queue is fdatasynced up to ``last_seq``.  The first
        waiter runs one fdatasync (in a thread) for everything written so far; writers
        arriving meanwhile wait for it, then run the next one together.  EIO if a failed
        sync rolled this write back (it was never acknowledged)."""
        queue = self.queue
        while True:
            if queue.epoch != epoch:
                if last_seq <= queue.failed_at.get(epoch, 0):
                    return
                raise OSError(errno.EIO, os.strerror(errno.EIO), "vectors queue: fdatasync failed")
            if queue.synced[1] >= last_seq:
                return
            if self._syncing is not None:
                await self._syncing.wait()
                continue
            done = self._syncing = trio.Event()
            try:
                self.fsyncs += 1
                await trio.to_thread.run_sync(queue.sync)
            except OSError:
                async with self.lock:
                    await trio.to_thread.run_sync(queue.rollback)
                raise
            finally:
                self._syncing = None
                done.set()

    @property
    def dimension(self) -> int | None:
        return self.settings.dimension

    def overlay(self) -> dict[str, Record]:
        """Queued operations not yet in the backend, the latest per id (read-your-writes)."""
        out: dict[str, Record] = {}
        for entry in self.queue.pending:
            out.pop(entry.record.id, None)  # keep the latest last, in order
            out[entry.record.id] = entry.record
        return out

    def note_accepted(self, entries: list[Entry]) -> None:
        self.version += 1
        now = time.monotonic()
        for e in entries:
            self.accepted_at[e.seq] = now

    def lag_s(self) -> float:
        if not self.queue.pending:
            return 0.0
        first = self.queue.pending[0].seq
        since = self.accepted_at.get(first)
        return round(time.monotonic() - since, 3) if since is not None else 0.0

    def forget_applied(self, seq: int) -> None:
        for s in [s for s in self.accepted_at if s <= seq]:
            del self.accepted_at[s]


def load_settings(cdir: StoreDir, name: str) -> Settings:
    data: dict[str, Any] = json.loads(cdir.read_bytes(f"{name}.json"))
    return Settings(data.get("dimension"), data.get("distance", "cosine"), data.get("created", ""))


def save_settings(cdir: StoreDir, name: str, settings: Settings) -> None:
    cdir.write_atomic(f"{name}.json", json.dumps(asdict(settings)).encode())
