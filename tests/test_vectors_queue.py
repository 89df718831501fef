"""The queue's group commit without FUSE: writes share one fdatasync, a failed sync refuses them all."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest
import trio

from kfs.store import StoreDir
from kfs.vectors.collection import Collection, Settings
from kfs.vectors.queue import CollectionQueue, Entry
from kfs.vectors.schema import Record


def records(n: int, value: float = 1.0) -> list[Record]:
    return [Record(str(uuid.uuid4()), [value], None, {}) for _ in range(n)]


def open_queue(tmp_path: Path) -> tuple[StoreDir, CollectionQueue]:
    qdir = StoreDir.open(str(tmp_path / "q"))
    q = CollectionQueue(qdir, "c")
    q.load()
    return qdir, q


def test_unsynced_writes_are_not_applicable_until_synced(tmp_path: Path) -> None:
    qdir, q = open_queue(tmp_path)
    q.write(records(3))
    assert q.depth == 3 and q.applicable(10) == []  # the sync agent must not apply unacknowledged writes
    assert q.sync() == (q.size, 3)
    assert [e.seq for e in q.applicable(2)] == [1, 2]
    q.close()
    q2 = CollectionQueue(qdir, "c")
    q2.load()
    assert [e.seq for e in q2.pending] == [1, 2, 3] and q2.synced[1] == 3


def test_concurrent_writers_share_one_fdatasync(tmp_path: Path) -> None:
    _, q = open_queue(tmp_path)
    col = Collection("c", Settings(1), q)
    acknowledged: list[int] = []

    async def main() -> None:
        written: list[tuple[list[Entry], int]] = []
        # Five writers append (under the lock, as the area does) before any of them waits.
        for _ in range(5):
            async with col.lock:
                written.append((await trio.to_thread.run_sync(q.write, records(10)), q.epoch))

        async def wait(entries: list[Entry], epoch: int) -> None:
            await col.wait_durable(entries[-1].seq, epoch)
            acknowledged.append(entries[-1].seq)

        async with trio.open_nursery() as nursery:
            for entries, epoch in written:
                nursery.start_soon(wait, entries, epoch)

    trio.run(main)
    assert sorted(acknowledged) == [10, 20, 30, 40, 50]
    assert col.fsyncs == 1  # one fdatasync covered all five writes
    assert q.synced[1] == 50 and len(q.applicable(100)) == 50


def test_rolled_back_writes_are_refused_and_gone(tmp_path: Path) -> None:
    qdir, q = open_queue(tmp_path)
    col = Collection("c", Settings(1), q)
    q.append(records(2))  # durable
    size_durable = q.size
    lost = q.write(records(3, 2.0))
    epoch = q.epoch
    q.rollback()  # what a failed fdatasync does

    async def main() -> None:
        await col.wait_durable(2, 0)  # the durable part still counts as acknowledged
        with pytest.raises(OSError) as err:
            await col.wait_durable(lost[-1].seq, epoch)
        assert err.value.errno == errno.EIO

    trio.run(main)
    assert [e.seq for e in q.pending] == [1, 2] and q.size == size_durable
    q.append(records(1, 3.0))  # numbering goes on from the durable part
    assert q.pending[-1].seq == 3
    q.close()
    q2 = CollectionQueue(qdir, "c")
    q2.load()
    assert [e.record.embedding.tolist() if hasattr(e.record.embedding, "tolist") else e.record.embedding
            for e in q2.pending] == [[1.0], [1.0], [3.0]]


def test_checkpoint_lost_only_replays(tmp_path: Path) -> None:
    qdir, q = open_queue(tmp_path)
    q.append(records(4))
    q.mark_applied(3)
    q.close()
    (tmp_path / "q" / "c.applied").write_bytes(b"")  # a crash before the unsynced checkpoint reached disk
    q2 = CollectionQueue(qdir, "c")
    q2.load()
    assert [e.seq for e in q2.pending] == [1, 2, 3, 4]  # replays idempotent upserts, loses nothing
