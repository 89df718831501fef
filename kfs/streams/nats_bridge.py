"""The NATS bridge: every local event out to ``<prefix>.NAME``, other nodes' events in.

nats-py is asyncio-only, so it runs on one asyncio loop in a thread of its
own; the trio side talks to it through futures (``run_coroutine_threadsafe``
plus a trio event set from the done-callback) and the asyncio side calls
back with ``TrioToken.run_sync_soon`` / ``trio.from_thread``.

Outbound never sits on the write path: a trio task keeps, per stream, the
last seq that NATS has taken (``streams/.nats-cursors.json``) and sends what
the retained history holds after it, in batches.  An outage just stops the
cursor; the backlog goes out when NATS returns (or after a kfs restart).
Events that came in from another node carry ``kfs_origin`` and are never
sent back out (no echo loops); inbound messages whose ``Kfs-Origin`` header is
this node are dropped, and per (origin, stream) only seqs above the last one
taken are appended (redeliveries are not duplicated).

JetStream mode creates (or reuses) a stream over ``<prefix>.>`` with the
configured max age, publishes with ``Nats-Msg-Id`` (the server drops
duplicates) and reads through a durable pull consumer per node, acking after
the local append, so it resumes where it stopped after a NATS restart.
Built-in streams (system, logs, metrics) go out but are not appended into
from other nodes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from collections.abc import Coroutine
from typing import Any

import trio

from kfs.config import NatsConfig
from kfs.store import StoreDir
from kfs.streams.broker import BUILTIN_STREAMS, ORIGIN_FIELD, Broker, valid_name

log = logging.getLogger("kfs.streams.nats")

CURSORS_FILE = ".nats-cursors.json"
ORIGIN_HEADER = "Kfs-Origin"
BATCH = 512


class NatsBridge:
    def __init__(self, broker: Broker, store: StoreDir, config: NatsConfig, node_id: str) -> None:
        self.broker = broker
        self.store = store
        self.config = config
        self.node_id = node_id
        self.prefix = config.subject_prefix.rstrip(".")
        self.js_stream = self.prefix.upper().replace(".", "_").replace(">", "").replace("*", "") or "KFS"
        self.cursors: dict[str, int] = {}
        self.inbound_seen: dict[str, dict[str, int]] = {}
        self._above: dict[str, set[int]] = {}
        self._load_state()
        for name, stream in broker.streams.items():
            # Streams that predate the bridge: start at their head, not their whole history.
            self.cursors.setdefault(name, stream.log.next_seq - 1)
        self._dirty = False
        self.connected = False
        self.sent = 0
        self.received = 0
        self.dropped_echo = 0
        self.last_error = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.nc: Any = None
        self.js: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._wakeup = trio.Event()
        self._stopping = False
        broker.listeners.append(self._on_event)

    # ------------------------------------------------------------------ state file
    def _load_state(self) -> None:
        if not self.store.exists(CURSORS_FILE):
            return
        try:
            data = json.loads(self.store.read_bytes(CURSORS_FILE))
            self.cursors = {str(k): int(v) for k, v in data.get("out", {}).items()}
            self.inbound_seen = {str(o): {str(s): int(q) for s, q in v.items()} for o, v in data.get("in", {}).items()}
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("%s unreadable (%s): starting from the streams' heads", CURSORS_FILE, e)

    def _save_state(self) -> None:
        data = {"out": self.cursors, "in": self.inbound_seen}
        self.store.write_atomic(CURSORS_FILE, json.dumps(data).encode())
        self._dirty = False

    def state(self) -> dict[str, Any]:
        backlog = 0
        for name, stream in self.broker.streams.items():
            backlog += max(0, stream.log.next_seq - 1 - self.cursors.get(name, 0))
        return {"nats": "connected" if self.connected else "disconnected", "url": self.config.url,
                "jetstream": self.config.jetstream, "sent": self.sent, "received": self.received,
                "backlog": backlog, "dropped_echo": self.dropped_echo, "last_error": self.last_error}

    # ------------------------------------------------------------------ life cycle
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kfs-nats", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._connect_and_consume(), self.loop)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._outbound)
            nursery.start_soon(self._save_loop)
            task_status.started()

    async def stop(self) -> None:
        self._stopping = True
        if self.connected:
            with trio.move_on_after(5):
                await self._send_pending()
        if self._dirty:
            self._save_state()
        if self.loop is not None:
            if self.nc is not None:
                try:
                    await self._call(self._close(), timeout=5)
                except Exception:
                    pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self.thread is not None:
                await trio.to_thread.run_sync(self.thread.join, 5)
        if self._on_event in self.broker.listeners:
            self.broker.listeners.remove(self._on_event)

    async def _close(self) -> None:
        try:
            await asyncio.wait_for(self.nc.close(), 3)
        except Exception:
            pass

    async def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run ``coro`` on the asyncio loop and wait for it from trio."""
        assert self.loop is not None and self._token is not None
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        done = trio.Event()
        token = self._token
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        with trio.move_on_after(timeout) as scope:
            await done.wait()
        if scope.cancelled_caught:
            future.cancel()
            raise TimeoutError("NATS call timed out")
        return future.result()

    def _wake(self) -> None:
        self._wakeup.set()

    def _on_event(self, name: str, seq: int, line: bytes, origin: str | None) -> None:
        if origin is None:
            self._wakeup.set()

    # ------------------------------------------------------------------ outbound (trio)
    async def _outbound(self) -> None:
        while True:
            sent_any = False
            if self.connected:
                try:
                    sent_any = await self._send_pending()
                except Exception as e:  # NATS went away mid-batch: keep the cursor, retry
                    self.last_error = f"publish: {e!r}"
                    await trio.sleep(0.5)
                    continue
            if not sent_any:
                self._wakeup = trio.Event()
                with trio.move_on_after(1.0):
                    await self._wakeup.wait()

    async def _send_pending(self) -> bool:
        sent_any = False
        for name, stream in list(self.broker.streams.items()):
            log_ = stream.log
            cursor = max(self.cursors.get(name, 0), log_.first_seq - 1)
            while cursor + 1 < log_.next_seq:
                batch: list[tuple[str, bytes, dict[str, str]]] = []
                seq = cursor + 1
                while seq < log_.next_seq and len(batch) < BATCH:
                    line = log_.line(seq)
                    if f'"{ORIGIN_FIELD}":'.encode() not in line or ORIGIN_FIELD not in json.loads(line):
                        headers = {ORIGIN_HEADER: self.node_id}
                        if self.config.jetstream:
                            headers["Nats-Msg-Id"] = f"{self.node_id}:{name}:{seq}"
                        batch.append((f"{self.prefix}.{name}", line[:-1], headers))
                    seq += 1
                if batch:
                    await self._call(self._publish_batch(batch))
                    self.sent += len(batch)
                    sent_any = True
                cursor = seq - 1
                self.cursors[name] = cursor
                self._dirty = True
        return sent_any

    async def _publish_batch(self, batch: list[tuple[str, bytes, dict[str, str]]]) -> None:
        if self.nc is None or not self.nc.is_connected:
            raise ConnectionError("not connected")
        if self.config.jetstream:
            futures = [await self.js.publish_async(subject, data, headers=headers, wait_stall=5)
                       for subject, data, headers in batch]
            await asyncio.wait_for(asyncio.gather(*futures), 10)
        else:
            for subject, data, headers in batch:
                await self.nc.publish(subject, data, headers=headers)
            await self.nc.flush(timeout=5)

    async def _save_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            if self._dirty:
                await trio.to_thread.run_sync(self._save_state)

    # ------------------------------------------------------------------ inbound (trio side)
    def _append(self, messages: list[tuple[str, bytes, str]]) -> None:
        """Append other nodes' events (runs on the trio loop)."""
        prefix = self.prefix + "."
        for subject, data, origin in messages:
            if origin == self.node_id:
                self.dropped_echo += 1
                continue
            name = subject[len(prefix):] if subject.startswith(prefix) else ""
            if not valid_name(name) or name in BUILTIN_STREAMS:
                continue
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            remote_seq = event.get("seq")
            if isinstance(remote_seq, int) and self._seen_before(origin or "?", name, remote_seq):
                continue  # a redelivery
            try:
                self.broker.publish(name, event, origin=origin or "?")
                self.received += 1
                self._dirty = True
            except OSError as e:
                self.last_error = f"append: {e}"

    def _seen_before(self, origin: str, name: str, seq: int) -> bool:
        """Record ``seq`` of (origin, stream); True if it was taken already.

        A watermark (every seq up to it taken) plus the set of seqs taken above
        it: JetStream may redeliver an unacked message after newer ones, and
        that one must still get in.
        """
        key = f"{origin}/{name}"
        watermark = self.inbound_seen.setdefault(origin, {}).get(name)
        above = self._above.setdefault(key, set())
        if watermark is None:
            watermark = seq - 1  # first sight: whatever came before is not ours to wait for
        if seq <= watermark or seq in above:
            return True
        above.add(seq)
        while watermark + 1 in above:
            watermark += 1
            above.discard(watermark)
        if len(above) > 10_000:  # a hole that never fills: give up on it
            watermark = min(above)
            above.discard(watermark)
            while watermark + 1 in above:
                watermark += 1
                above.discard(watermark)
        self.inbound_seen[origin][name] = watermark
        return False

    # ------------------------------------------------------------------ asyncio side
    async def _connect_and_consume(self) -> None:
        import nats

        async def disconnected() -> None:
            self.connected = False

        async def reconnected() -> None:
            self.connected = True
            assert self._token is not None
            self._token.run_sync_soon(self._wake)

        async def error(e: Exception) -> None:
            self.last_error = repr(e)

        while not self._stopping:
            try:
                self.nc = await nats.connect(
                    servers=[self.config.url], token=self.config.token, name=f"kfs-{self.node_id[:8]}",
                    allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                    connect_timeout=2, disconnected_cb=disconnected, reconnected_cb=reconnected,
                    error_cb=error,
                )
                break
            except Exception as e:
                self.last_error = f"connect: {e!r}"
                await asyncio.sleep(1.0)
        if self._stopping:
            return
        if self.config.jetstream:
            self.js = self.nc.jetstream()
            await self._ensure_js_stream()
        self.connected = True
        assert self._token is not None
        self._token.run_sync_soon(self._wake)
        if self.config.jetstream:
            await self._consume_jetstream()
        else:
            await self.nc.subscribe(f"{self.prefix}.>", cb=self._on_core_message)

    async def _ensure_js_stream(self) -> None:
        while not self._stopping:
            try:
                await self.js.add_stream(name=self.js_stream, subjects=[f"{self.prefix}.>"],
                                         max_age=float(self.config.jetstream_max_age), storage="file")
                return
            except Exception as e:
                if "already in use" in str(e) or "exists" in str(e):
                    return
                self.last_error = f"jetstream stream: {e!r}"
                await asyncio.sleep(1.0)

    async def _on_core_message(self, msg: Any) -> None:
        origin = (msg.headers or {}).get(ORIGIN_HEADER, "")
        assert self._token is not None
        self._token.run_sync_soon(self._append, [(msg.subject, msg.data, origin)])

    async def _consume_jetstream(self) -> None:
        import nats.errors
        import trio.from_thread

        sub = None
        while not self._stopping:
            try:
                if sub is None:
                    sub = await self.js.pull_subscribe(f"{self.prefix}.>", durable=f"kfs-{self.node_id}",
                                                       stream=self.js_stream)
                msgs = await sub.fetch(BATCH, timeout=5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as e:
                self.last_error = f"jetstream fetch: {e!r}"
                await asyncio.sleep(0.5)
                continue
            items = [(m.subject, m.data, (m.headers or {}).get(ORIGIN_HEADER, "")) for m in msgs]
            token = self._token
            # Append on the trio loop (from a worker thread, so this loop keeps running), then ack.
            await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(trio.from_thread.run_sync, self._append, items, trio_token=token))
            for m in msgs:
                try:
                    await m.ack()
                except Exception as e:
                    self.last_error = f"ack: {e!r}"
