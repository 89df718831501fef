"""The request loop's worker hand-off (kfs/fs/fuse_loop.py).

Fast tier: pyfuse3's worker loop re-enacted over a socketpair with the same
lock protocol (take the lock, wait readable, release, read one request, run
its handler).  Mount tier: stream readers that wait in the daemon hold workers
while appends, stats and listings keep being answered.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections import Counter

import trio
from conftest import Mount

from kfs.fs import fuse_loop


async def _worker_pool(requests: list[bytes], slow: set[bytes]) -> tuple[list[bytes], Counter[str]]:
    """Serve ``requests`` with pyfuse3's worker protocol; ``slow`` ones yield for a while."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    handoff = fuse_loop.HandOff()
    lock = fuse_loop._TrioForPyfuse3(handoff).Lock()
    served: list[bytes] = []
    steps: Counter[str] = Counter()
    release_slow = trio.Event()

    class CountSteps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            steps[task.name] += 1

    async def worker(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            async with lock:
                await trio.lowlevel.wait_readable(reader)
            data = reader.recv(2)  # requests are 2 bytes: one read is one request
            if data in slow:
                await release_slow.wait()  # a handler that waits (a stream read at its end)
            served.append(data)

    counter = CountSteps()
    trio.lowlevel.add_instrument(handoff)
    trio.lowlevel.add_instrument(counter)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(6):  # more workers than slow requests (pyfuse3 would start more)
                await nursery.start(worker)
            for request in requests:
                writer.send(request)
                # like a caller waiting for its answer (slow ones are not waited for)
                with trio.move_on_after(5):
                    while request not in slow and request not in served:
                        await trio.sleep(0)
            # every quick request was answered while the slow ones still held their workers
            quick_served_first = all(r in served for r in requests if r not in slow)
            release_slow.set()
            with trio.move_on_after(5):
                while len(served) < len(requests):
                    await trio.sleep(0.01)
            assert quick_served_first
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(counter)
        trio.lowlevel.remove_instrument(handoff)
        reader.close()
        writer.close()
    return served, steps


def test_requests_that_yield_do_not_stop_the_others_being_served() -> None:
    requests = [f"{i:02d}".encode() for i in range(40)]
    slow = {b"03", b"04", b"20"}
    served, _ = trio.run(_worker_pool, requests, slow)
    assert sorted(served) == sorted(requests)
    assert set(served[-len(slow):]) == slow  # the slow ones finished last, once released


def test_a_request_that_does_not_yield_takes_one_worker_step() -> None:
    requests = [f"{i:02d}".encode() for i in range(50)]
    served, steps = trio.run(_worker_pool, requests, set())
    assert served == requests
    worker_steps = sum(n for name, n in steps.items() if name.endswith(".worker"))
    # pyfuse3 with trio.Lock: two worker steps per request (the reader, then the next waiter)
    assert worker_steps < 1.5 * len(requests)


def test_blocked_stream_readers_do_not_stall_other_requests(kfs_mount) -> None:  # type: ignore[no-untyped-def]
    m: Mount = kfs_mount()
    stream = m.path / "streams" / "handoff"
    stream.write_text('{"n": 0}\n')
    readers_seen: list[int] = []

    def follow() -> None:
        # Reads at the end of the stream wait in the daemon (read_wait, then EINTR, which
        # os.read retries), each holding a worker, until the second event comes.
        fd = os.open(stream, os.O_RDONLY)
        try:
            seen = 0
            while seen < 2:
                seen += os.read(fd, 65536).count(b"\n")
            readers_seen.append(seen)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=follow, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    log = m.path / "logs" / "handoff.log.jsonl"
    try:
        for i in range(200):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, b'{"event": "step", "n": %d}\n' % i)
            finally:
                os.close(fd)
            os.stat(m.path / "logs")
        assert "handoff.log.jsonl" in os.listdir(m.path / "logs")
    finally:
        with open(stream, "a") as f:
            f.write('{"n": 1}\n')
        for t in threads:
            t.join(timeout=30)
    assert readers_seen == [2] * 6  # every follower got both events
    assert len(log.read_text().splitlines()) == 200
    out = subprocess.run(["tail", "-n", "1", str(log)], capture_output=True, text=True, check=True).stdout
    assert '"n": 199' in out or '"n":199' in out
