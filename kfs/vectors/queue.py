"""The durable local queue: every accepted record, fsynced, before write() returns.

One append-only file per collection in the store's ``vectors/.queue/``
(``C.jsonl``: one ``{"seq": n, "record": {...}}`` per line) and a checkpoint
(``C.applied``: the last sequence number the backend has).  The sync agent
applies entries in order; upserts by id are idempotent, so replaying entries
that were applied just before a crash changes nothing.  Once everything is
applied the file is emptied (atomically), so it never grows without bound.

A crash can leave a torn last line (a write that was never acknowledged):
loading drops it and truncates it off, so the next append starts clean.

Group commit: a writer appends with ``write()`` (no sync, under the
collection lock, microseconds) and then waits until ``sync()`` has covered
its last sequence number (``Collection.wait_durable``, outside the lock).
Concurrent writers' appends thus share one ``fdatasync``; each write is still
acknowledged only after its own bytes are on disk.  ``fdatasync`` is enough:
it flushes the file size too (the metadata needed to read the data back),
only timestamps are left out.  The sync agent applies only synced entries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import orjson

from kfs.store import StoreDir
from kfs.vectors.schema import Record

COMPACT_BYTES = 4 << 20  # empty the file once applied and at least this big


@dataclass
class Entry:
    seq: int
    record: Record


class CollectionQueue:
    """The queue of one collection.  Blocking file I/O: call from a worker thread,
    one call at a time per collection (the area holds a lock)."""

    def __init__(self, qdir: StoreDir, name: str) -> None:
        self.qdir = qdir
        self.name = name
        self.file = f"{name}.jsonl"
        self.mark = f"{name}.applied"
        self.pending: list[Entry] = []
        self.applied_seq = 0
        self.next_seq = 1
        self.size = 0
        self._fd = -1
        self.written: tuple[int, int] = (0, 0)  # (file size, last seq) after the latest write()
        self.synced: tuple[int, int] = (0, 0)  # the same, as far as fdatasync has covered
        self.epoch = 0  # bumped when a failed sync rolled unsynced writes back
        self.failed_at: dict[int, int] = {}  # epoch -> the last seq that was durable when it failed

    # -- life cycle -------------------------------------------------------------
    def load(self) -> None:
        """Read the checkpoint and the not-yet-applied entries (after a crash too)."""
        try:
            self.applied_seq = int(self.qdir.read_bytes(self.mark).decode().strip() or 0)
        except (FileNotFoundError, ValueError):
            self.applied_seq = 0
        self._fd = self.qdir.open_fd(self.file, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        data = b""
        while chunk := os.pread(self._fd, 1 << 20, len(data)):
            data += chunk
        good = 0
        last_seq = self.applied_seq
        self.pending = []
        while good < len(data):
            end = data.find(b"\n", good)
            if end < 0:  # no newline: a torn, unacknowledged write
                break
            line = data[good:end]
            if line.strip():
                try:
                    obj = orjson.loads(line)
                    entry = Entry(int(obj["seq"]), Record.from_json(obj["record"]))
                except (ValueError, KeyError, TypeError):
                    break
                last_seq = max(last_seq, entry.seq)
                if entry.seq > self.applied_seq:
                    self.pending.append(entry)
            good = end + 1
        if good < len(data):
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
        self.size = good
        self.next_seq = last_seq + 1
        self.written = self.synced = (good, last_seq)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def destroy(self) -> None:
        self.close()
        for name in (self.file, self.mark):
            try:
                self.qdir.unlink(name)
            except FileNotFoundError:
                pass

    # -- the write path ---------------------------------------------------------
    def append(self, records: list[Record]) -> list[Entry]:
        """Append and sync: once this returns, the records survive kill -9."""
        entries = self.write(records)
        try:
            self.sync()
        except OSError:
            self.rollback()
            raise
        return entries

    def write(self, records: list[Record]) -> list[Entry]:
        """Append without syncing (group commit: ``sync()`` follows before anything is acknowledged)."""
        entries = [Entry(self.next_seq + i, r) for i, r in enumerate(records)]
        numpy = orjson.OPT_SERIALIZE_NUMPY
        blob = b"".join(orjson.dumps({"seq": e.seq, "record": e.record.to_json()}, option=numpy) + b"\n"
                        for e in entries)
        view = memoryview(blob)
        written = 0
        try:
            while written < len(blob):
                written += os.write(self._fd, view[written:])
        except OSError:
            # Not acknowledged: cut off whatever part landed, so nothing half-written replays.
            os.ftruncate(self._fd, self.size)
            raise
        self.size += len(blob)
        self.next_seq += len(entries)
        self.pending.extend(entries)
        self.written = (self.size, self.next_seq - 1)  # one assignment: readers in other threads see a pair
        return entries

    def sync(self) -> tuple[int, int]:
        """fdatasync everything written so far; returns what is now durable (size, last seq)."""
        target = self.written
        if target[1] > self.synced[1]:
            os.fdatasync(self._fd)
            if target[1] > self.synced[1]:
                self.synced = target
        return self.synced

    def rollback(self) -> None:
        """A sync failed: drop every write it did not cover (none was acknowledged).  Their
        writers see the epoch change and fail; the file is cut back to what is durable."""
        size, seq = self.synced
        self.failed_at[self.epoch] = seq
        self.epoch += 1
        try:
            os.ftruncate(self._fd, size)
        except OSError:
            pass  # the load after a crash drops nothing it should keep: entries past a failed sync were refused
        self.size = size
        self.next_seq = seq + 1
        self.pending = [e for e in self.pending if e.seq <= seq]
        self.written = self.synced

    def applicable(self, limit: int) -> list[Entry]:
        """Up to ``limit`` pending entries that are durable (the sync agent applies only those)."""
        last = self.synced[1]
        out: list[Entry] = []
        for e in self.pending:
            if e.seq > last or len(out) >= limit:
                break
            out.append(e)
        return out

    # -- the sync agent ---------------------------------------------------------
    def mark_applied(self, seq: int) -> None:
        """The backend has everything up to ``seq``.  No fsync needed: losing this
        checkpoint (or finding it empty after a crash) only replays idempotent upserts,
        and skipping the fsync keeps the collection lock, which writers need, short."""
        self.applied_seq = seq
        self.pending = [e for e in self.pending if e.seq > seq]
        tmp = f".{self.mark}.tmp"
        fd = self.qdir.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, str(seq).encode())
        finally:
            os.close(fd)
        self.qdir.rename(tmp, self.mark)
        if not self.pending and self.size >= COMPACT_BYTES:
            self.compact()

    def compact(self) -> None:
        """Everything is applied: start an empty file (the checkpoint keeps the numbering)."""
        self.qdir.write_atomic(self.file + ".new", b"")
        self.qdir.rename(self.file + ".new", self.file)
        os.close(self._fd)
        self._fd = self.qdir.open_fd(self.file, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = 0
        self.written = self.synced = (0, self.next_seq - 1)

    @property
    def depth(self) -> int:
        return len(self.pending)
