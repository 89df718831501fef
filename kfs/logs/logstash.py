"""The Logstash forwarder: every stored line, over TCP json_lines, through an on-disk spool.

Spool (``logs/.logstash-spool/`` in the store): segment files named by the
global byte offset of their first byte (``00000000000000000000.seg``), each
holding whole lines, plus ``committed``, the offset up to which Logstash has
the lines.  The write path appends each stored batch to the current segment
with one ``os.write`` *before* the log itself, so a line in a log is always in
the spool too (kill -9 included) and a writer never waits on the network.

Sender (one trio task): connect with exponential backoff up to
``reconnect_max``, send from the committed offset on, in order.  TCP has no
application acknowledgement and json_lines none either, so a byte counts as
delivered once it was sent ``replay_window`` seconds ago on a connection that
is still up; when the connection drops (send error, or the peer closing it),
the sender rewinds to the committed offset and sends again what might have
been lost in flight.  Delivery is therefore at least once, in order: after an
outage the receiver may see the last few lines twice, never a gap.

When the unsent backlog exceeds ``spool_max_mb``, the oldest whole segments
are dropped (counted as ``dropped_bytes``): the bound on disk use wins over
completeness, as with Logstash's own persistent queue.
"""

from __future__ import annotations

import bisect
import collections
import logging
import os
from typing import Any

import trio

from kfs.config import LogstashConfig
from kfs.store import StoreDir

log = logging.getLogger("kfs.logs.logstash")

SPOOL_DIR = ".logstash-spool"
SEGMENT_BYTES = 16 << 20
SEND_CHUNK = 256 << 10
COMMIT_INTERVAL = 0.25


def _segment_name(start: int) -> str:
    return f"{start:020d}.seg"


class Spool:
    """Segmented append-only byte log with a committed offset; all calls are quick file I/O."""

    def __init__(self, store: StoreDir, max_bytes: int = 0, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.dir = store.subdir(SPOOL_DIR, mode=0o700)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.dropped_bytes = 0
        self.committed = self._read_committed()
        self.starts: list[int] = sorted(
            int(name[:-4]) for name in self.dir.listdir() if name.endswith(".seg") and name[:-4].isdigit()
        )
        if self.starts:
            last = self.starts[-1]
            self.head = last + self.dir.stat(_segment_name(last)).st_size
        else:
            self.head = self.committed
        self.committed = min(self.committed, self.head)
        self._fd = -1
        self._current_start = -1
        self._read_fds: dict[int, int] = {}

    def _read_committed(self) -> int:
        try:
            return int(self.dir.read_bytes("committed").decode().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    @property
    def depth(self) -> int:
        """Bytes spooled but not yet confirmed delivered."""
        return self.head - self.committed

    def append(self, data: bytes) -> None:
        if self._fd < 0 or (self.head - self._current_start) >= self.segment_bytes:
            self._roll()
        written = os.write(self._fd, data)
        while written < len(data):
            written += os.write(self._fd, memoryview(data)[written:])
        self.head += len(data)
        if self.max_bytes and self.depth > self.max_bytes + self.segment_bytes:
            self._drop_oldest()

    def _roll(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        start = self.head
        last = self.starts[-1] if self.starts else -1
        if self._current_start < 0 and last >= 0 and self.head - last < self.segment_bytes:
            start = last  # first append of this run: continue the unfinished last segment
        elif last != start:
            self.starts.append(start)
        self._fd = self.dir.open_fd(_segment_name(start), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._current_start = start

    def _drop_oldest(self) -> None:
        while len(self.starts) > 1 and self.depth > self.max_bytes:
            start = self.starts[1]
            self.dropped_bytes += start - max(self.committed, self.starts[0])
            self.committed = start
            self._remove_segment(self.starts.pop(0))
        log.warning("logstash spool over %d bytes: dropped the oldest lines (%d bytes so far)",
                    self.max_bytes, self.dropped_bytes)

    def _remove_segment(self, start: int) -> None:
        fd = self._read_fds.pop(start, None)
        if fd is not None:
            os.close(fd)
        try:
            self.dir.unlink(_segment_name(start))
        except FileNotFoundError:
            pass

    def read(self, offset: int, size: int = SEND_CHUNK) -> bytes:
        """Whole lines from ``offset`` (at least one line if any is there), about ``size`` bytes."""
        if offset >= self.head:
            return b""
        index = bisect.bisect_right(self.starts, offset) - 1
        if index < 0:
            raise ValueError(f"spool offset {offset} is before the oldest segment")
        start = self.starts[index]
        fd = self._read_fds.get(start)
        if fd is None:
            fd = self._read_fds[start] = self.dir.open_fd(_segment_name(start), os.O_RDONLY)
        segment_end = self.starts[index + 1] if index + 1 < len(self.starts) else self.head
        want = min(size, segment_end - offset)
        while True:
            data = os.pread(fd, want, offset - start)
            if len(data) == segment_end - offset:
                return data  # a segment ends on a line boundary
            cut = data.rfind(b"\n")
            if cut >= 0:
                return data[:cut + 1]
            if len(data) < want:  # the segment is shorter than the index says: stop at what is there
                return b""
            want = min(want * 2, segment_end - offset)

    def save_committed(self, offset: int) -> None:
        """Persist the committed offset (temp file, fsync, rename): may run in a worker thread."""
        self.dir.write_atomic("committed", str(offset).encode())

    def forget_before(self, offset: int) -> None:
        """Everything before ``offset`` is delivered: advance, delete segments wholly before it."""
        if offset <= self.committed:
            return
        self.committed = offset
        while len(self.starts) > 1 and self.starts[1] <= offset and self.starts[0] != self._current_start:
            self._remove_segment(self.starts.pop(0))

    def commit(self, offset: int) -> None:
        self.save_committed(offset)
        self.forget_before(offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        self.dir.close()


class Forwarder:
    def __init__(self, store: StoreDir, config: LogstashConfig) -> None:
        self.config = config
        self.spool = Spool(store, int(config.spool_max_mb * (1 << 20)))
        self.state = "starting"
        self.sent = self.spool.committed
        self.connects = 0
        self.failures = 0
        self.last_error = ""
        self._inflight: collections.deque[tuple[float, int]] = collections.deque()
        self._data = trio.Event()
        self._committing = False

    # -- write path (sync, on the trio loop) ------------------------------------
    def append(self, data: bytes) -> None:
        self.spool.append(data)
        self._data.set()

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "target": f"{self.config.host}:{self.config.port}",
            "spool_bytes": self.spool.depth,
            "spool_segments": len(self.spool.starts),
            "dropped_bytes": self.spool.dropped_bytes,
            "connects": self.connects,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    # -- background -------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._commit_loop)
            await self._connect_loop()

    async def _connect_loop(self) -> None:
        backoff = 0.1
        while True:
            if self.sent >= self.spool.head:
                self.state = "idle" if self.state != "connected" else self.state
            await self._wait_for_data()
            try:
                stream = await trio.open_tcp_stream(self.config.host, self.config.port)
            except OSError as e:
                self._failed(f"connect: {e.strerror or e}")
                await trio.sleep(backoff)
                backoff = min(backoff * 2, max(float(self.config.reconnect_max), 0.1))
                continue
            backoff = 0.1
            self.connects += 1
            self.state = "connected"
            log.info("logstash: connected to %s:%s", self.config.host, self.config.port)
            async with stream:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_close, stream, nursery.cancel_scope)
                    await self._pump(stream, nursery.cancel_scope)
            # Whatever was sent recently may not have reached the peer: send it again.
            self._inflight.clear()
            self.sent = self.spool.committed
            await trio.sleep(backoff)

    def _failed(self, why: str) -> None:
        self.failures += 1
        if why != self.last_error:
            log.warning("logstash %s:%s: %s (spooling)", self.config.host, self.config.port, why)
        self.last_error = why
        self.state = "disconnected"

    async def _wait_for_data(self) -> None:
        while self.sent >= self.spool.head:
            self._data = trio.Event()
            await self._data.wait()

    async def _watch_close(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while await stream.receive_some(65536):
                pass  # json_lines peers send nothing back; ignore whatever comes
            self._failed("peer closed the connection")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._failed(f"receive: {e}")
        scope.cancel()

    async def _pump(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while True:
                await self._wait_for_data()
                self.sent = max(self.sent, self.spool.committed)  # the spool may have dropped old lines
                chunk = self.spool.read(self.sent)
                if not chunk:
                    await trio.sleep(0.05)
                    continue
                await stream.send_all(chunk)
                self.sent += len(chunk)
                self._inflight.append((trio.current_time(), self.sent))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._failed(f"send: {e}")
        scope.cancel()

    async def _commit_loop(self) -> None:
        window = float(self.config.replay_window)
        while True:
            await trio.sleep(COMMIT_INTERVAL)
            await self.commit_delivered(window)

    async def commit_delivered(self, window: float) -> None:
        if self.state != "connected":
            return
        cutoff = trio.current_time() - window
        target = 0
        while self._inflight and self._inflight[0][0] <= cutoff:
            target = self._inflight.popleft()[1]
        if target > self.spool.committed and not self._committing:
            self._committing = True
            try:
                await trio.to_thread.run_sync(self.spool.save_committed, target)
            finally:
                self._committing = False
            self.spool.forget_before(target)

    def close(self) -> None:
        self.spool.close()
