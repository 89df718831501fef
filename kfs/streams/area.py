"""streams/: live event pipes as files.

Tree (relative to the area):
  NAME               a stream: write JSON lines to publish, read to follow
  NAME.status        JSON: retained range, readers and their lag, bridges
  NAME@since/SEQ     replay from a seq (hidden from ls, found by lookup)
  NAME@since/TIME    replay from an RFC3339 time

The broker (`broker.py`) owns streams and publishing; `segments.py` the
retained history on disk; `reader.py` how a file read follows a stream;
`websocket.py` and `nats_bridge.py` the network faces; `acl.py` tokens and
roles.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from kfs.bus import Bus, Event
from kfs.config import StreamsConfig
from kfs.fs.area import Area, Attr, AttrChanges, Ctx, Handle, fs_error
from kfs.store import StoreDir
from kfs.streams.acl import Acl
from kfs.streams.broker import (
    BUILTIN_STREAMS,
    GENERATION_FILE,
    MAX_EVENT_BYTES,
    Broker,
    Stream,
    parse_event,
    parse_rfc3339,
    rfc3339,
    valid_name,
)
from kfs.streams.export import export_segments, is_conversation_stream
from kfs.streams.export import memory_events as stream_memory_events
from kfs.streams.reader import StreamHandle, read_stream

if TYPE_CHECKING:
    from kfs.daemon import MountOptions
    from kfs.streams.nats_bridge import NatsBridge
    from kfs.streams.websocket import WebSocketServer

SINCE_SUFFIX = "@since"
STATUS_SUFFIX = ".status"
NODE_ID_FILE = ".node-id"
#: bus topics that are not `system` events: logs/ publishes one `log_lines` per write; a
#: single `log_line` (someone else's) is taken too
LOG_LINES_TOPIC = "log_lines"
LOG_TOPIC = "log_line"
#: what we publish on the bus for every event of a user stream
STREAM_TOPIC = "stream_event"


def load_node_id(store: StoreDir) -> str:
    """This store's node id (origin of events sent to NATS), created once."""
    if store.exists(NODE_ID_FILE):
        node_id = store.read_bytes(NODE_ID_FILE).decode().strip()
        if node_id:
            return node_id
    node_id = uuid.uuid4().hex
    store.write_atomic(NODE_ID_FILE, node_id.encode() + b"\n")
    return node_id


class StreamsArea(Area):
    name: ClassVar[str] = "streams"
    # Contents change behind the kernel's back all the time.
    entry_timeout: ClassVar[float] = 0.0
    attr_timeout: ClassVar[float] = 0.0

    def __init__(self, bus: Bus, store: StoreDir, config: StreamsConfig, opts: MountOptions | None = None) -> None:
        super().__init__(bus)
        self.store = store
        self.config = config
        self.opts = opts
        self.node_id = load_node_id(store)
        self.broker = Broker(store, config.max_events, int(config.max_mb * 1024 * 1024), self.node_id)
        for extra in config.streams:
            self.broker.create(extra)
        self.acl = Acl(store, config.roles)
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.handles: set[StreamHandle] = set()
        # Bus events not yet published: those from other threads wait here for our pump task.
        self._inbox: deque[Event] = deque()
        self._inbox_wakeup = trio.Event()
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._loop_thread = threading.get_ident()
        self._unsubscribe = bus.subscribe(self._on_bus_event)
        # User streams' events go on the bus too (snapshot triggers watch them for names).
        self.broker.on_record = lambda name, seq, record: bus.publish(
            STREAM_TOPIC, {"stream": name, "seq": seq, "record": record}, "streams")
        self.bus_topics: dict[str, int] = {}
        self.websocket: WebSocketServer | None = None
        self.nats: NatsBridge | None = None
        self._stopped = False
        self._draining = False

    # ------------------------------------------------------------------ life cycle
    async def start(self, nursery: trio.Nursery) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        nursery.start_soon(self._pump_bus)
        if self.config.metrics_interval > 0:
            nursery.start_soon(self._metrics_loop)
        if self.config.websocket.enabled:
            from kfs.streams.websocket import WebSocketServer

            self.websocket = WebSocketServer(self.broker, self.acl, self.config.websocket)
            try:
                await nursery.start(self.websocket.serve)
            except (OSError, BaseExceptionGroup) as e:
                # Port taken (another mount?): the files still work; say so on `system`.
                failure = e
                if isinstance(e, BaseExceptionGroup):
                    matched, rest = e.split(OSError)
                    if matched is None or rest is not None:
                        raise
                    failure = matched.exceptions[0]
                self.publish_system("streams_websocket_failed", {"error": str(failure)})
                await self.websocket.stop()
                self.websocket = None
        if self.config.nats.url:
            from kfs.streams.nats_bridge import NatsBridge

            self.nats = NatsBridge(self.broker, self.store, self.config.nats, self.node_id)
            await nursery.start(self.nats.run)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._drain_inbox()
        if self.nats is not None:
            with trio.move_on_after(10):
                await self.nats.stop()
        if self.websocket is not None:
            await self.websocket.stop()
        self._unsubscribe()
        self.broker.close()

    def status(self) -> dict[str, Any]:
        counters = dict(self.counters)
        counters["published"] = self.broker.published
        counters["readers"] = len(self.handles)
        if self.websocket is not None:
            counters["ws_clients"] = len(self.websocket.clients)
        state: dict[str, Any] = {"state": "ready", "counters": counters, "streams": len(self.broker.streams)}
        if self.websocket is not None:
            state["websocket"] = {"host": self.config.websocket.host, "port": self.websocket.port,
                                  "denied": self.websocket.denied, "dropped": self.websocket.dropped}
        if self.nats is not None:
            state["nats"] = self.nats.state()
        return state

    # ------------------------------------------------------------------ bus intake
    def _on_bus_event(self, event: Event) -> None:
        """Bus subscriber (any thread): publishes at once on the trio loop, else hands to the pump."""
        if event.topic == STREAM_TOPIC:
            return  # our own events, already in their stream
        self._inbox.append(event)
        if threading.get_ident() == self._loop_thread:
            # On the loop (a logs/ write, a lock of the vault): publish now, inside the publisher's
            # request.  Waking the pump instead cost a scheduler pass per log write (~35 us, a
            # fifth of an open-append-close), and the event is on disk before the writer is
            # answered.
            self._drain_inbox()
            return
        if self._trio_token is not None:
            try:
                self._trio_token.run_sync_soon(self._inbox_wakeup.set)
            except trio.RunFinishedError:
                pass

    async def _pump_bus(self) -> None:
        while True:
            await self._inbox_wakeup.wait()
            self._inbox_wakeup = trio.Event()
            self._drain_inbox()

    def _drain_inbox(self) -> None:
        """Publish every event in the inbox, in order (on the trio loop).

        Not re-entered: an event published while we publish (a subscriber of ours reacting)
        joins the inbox and is taken by the loop already running.
        """
        if self._draining:
            return
        self._draining = True
        try:
            self._publish_inbox()
        finally:
            self._draining = False

    def _publish_inbox(self) -> None:
        # Log lines arrive as one `log_lines` event per logs/ write (a 128 KiB write is ~1,000
        # lines): each goes onto the logs stream as its bytes, stamped at the byte level, with
        # one disk write.  Single `log_line` events (published by hand) are batched the old way.
        log_bodies: list[dict[str, Any]] = []
        while self._inbox:
            event = self._inbox.popleft()
            topic = event.topic
            self.bus_topics[topic] = self.bus_topics.get(topic, 0) + 1
            if topic == LOG_LINES_TOPIC:
                if log_bodies:
                    self._publish_from_bus("logs", log_bodies)
                    log_bodies = []
                self._publish_log_lines(event.data)
            elif topic == LOG_TOPIC:
                record = event.data.get("record")
                body = dict(record) if isinstance(record, dict) else {"record": record}
                if "file" in event.data:
                    body.setdefault("file", event.data["file"])
                log_bodies.append(body)
            else:
                self._publish_from_bus("system", [self._system_body(event)])
        if log_bodies:
            self._publish_from_bus("logs", log_bodies)

    def _publish_log_lines(self, data: dict[str, Any]) -> None:
        records = data.get("records") or []
        raw = data.get("data", b"")
        extra = {"file": data["file"]} if "file" in data else {}
        try:
            self.broker.publish_objects("logs", raw, records, extra)
        except OSError as e:
            if e.errno != errno.EFBIG:
                self.count("bus_events_dropped", len(records))
                self.count(f"error_{errno.errorcode.get(e.errno or 0, 'EIO')}")
                return
            # A log line may be up to 16 MiB, an event 1 MiB: publish the others one by one.
            for line, record in zip(raw.split(b"\n"), records, strict=False):
                try:
                    self.broker.publish_objects("logs", line + b"\n", [record], extra)
                except OSError:
                    self.count("bus_events_dropped")
        except ValueError:  # data and records disagree: never from logs/, but keep every record
            bodies = [{**record, **{k: v for k, v in extra.items() if k not in record}} for record in records]
            self._publish_from_bus("logs", bodies)

    def _publish_from_bus(self, stream: str, bodies: list[dict[str, Any]]) -> None:
        try:
            self.broker.publish_many(stream, bodies)
        except OSError as e:
            self.count("bus_events_dropped", len(bodies))
            self.count(f"error_{errno.errorcode.get(e.errno or 0, 'EIO')}")

    @staticmethod
    def _system_body(event: Event) -> dict[str, Any]:
        body: dict[str, Any] = {"event": event.topic, "source": event.source, "timestamp": rfc3339(event.time_ns)}
        for key, value in event.data.items():
            body.setdefault(key, value)
        return body

    def publish_system(self, topic: str, data: dict[str, Any]) -> None:
        self.broker.publish("system", {"event": topic, "source": "streams", **data})

    async def _metrics_loop(self) -> None:
        last_published = self.broker.published
        last_time = time.monotonic()
        while True:
            await trio.sleep(self.config.metrics_interval)
            now = time.monotonic()
            rate = (self.broker.published - last_published) / max(now - last_time, 1e-9)
            last_published, last_time = self.broker.published, now
            streams = {}
            for name, stream in self.broker.streams.items():
                lags = [h.lag(stream) for h in self.handles if h.stream == name and h.kind == "stream"]
                streams[name] = {"seq": stream.log.next_seq - 1, "retained": stream.log.retained_events,
                                 "readers": len(lags), "max_lag": max(lags, default=0)}
            self.broker.publish("metrics", {
                "events_published": self.broker.published,
                "bytes_published": self.broker.bytes_published,
                "events_per_s": round(rate, 1),
                "rejected_writes": self.broker.rejected,
                "file_readers": len(self.handles),
                "ws_clients": len(self.websocket.clients) if self.websocket else 0,
                "bus_events": dict(self.bus_topics),
                "errors": self.bus_topics.get("kfs_error", 0),
                "streams": streams,
                "areas": self._areas_metrics(max((s["max_lag"] for s in streams.values()), default=0)),
            })

    # ------------------------------------------------------------------ metrics per area (metrics.py)
    #: every area of the mount, handed over by the daemon (``attach_peers``); read only for status()
    _peers: ClassVar[dict[str, Any]] = {}

    def attach_peers(self, areas: dict[str, Any]) -> None:
        self._peers = dict(areas)  # type: ignore[misc]

    def _areas_metrics(self, readers_max_lag: int) -> dict[str, dict[str, Any]]:
        from kfs.streams.metrics import areas_metrics

        out = areas_metrics({name: area.status for name, area in (self._peers or {self.name: self}).items()})
        if self.name in out:
            out[self.name]["backlog"]["readers_max_lag"] = readers_max_lag
        return out

    # ------------------------------------------------------------------ paths
    def _parse(self, path: str) -> tuple[str, str, str]:
        """(kind, stream name, since-arg) for a path; ENOENT when nothing is there."""
        if path == "":
            return "root", "", ""
        head, _, rest = path.partition("/")
        if head.endswith(SINCE_SUFFIX):
            name = head[: -len(SINCE_SUFFIX)]
            self.broker.get(name)
            if not rest:
                return "since_dir", name, ""
            if "/" in rest:
                raise fs_error(errno.ENOENT)
            return "since", name, rest
        if rest:
            raise fs_error(errno.ENOTDIR)
        if head.endswith(STATUS_SUFFIX) and head[: -len(STATUS_SUFFIX)] in self.broker.streams:
            return "status", head[: -len(STATUS_SUFFIX)], ""
        self.broker.get(head)
        return "stream", head, ""

    def _since_offset(self, stream: Stream, arg: str) -> int:
        if arg.isdigit():
            return stream.log.offset_of(int(arg))
        try:
            when = parse_rfc3339(arg)
        except ValueError:
            raise fs_error(errno.ENOENT, f"not a seq or an RFC3339 time: {arg!r}") from None
        return stream.log.offset_of(self.broker.seq_since_time(stream, when))

    def _stream_attr(self, stream: Stream, size: int | None = None) -> Attr:
        perm = 0o444 if stream.builtin else 0o644
        return Attr(stat.S_IFREG | perm, stream.log.end_offset if size is None else size, self.uid, self.gid, 1,
                    stream.modified_ns, stream.modified_ns, stream.created_ns)

    async def getattr(self, path: str) -> Attr:
        kind, name, arg = self._parse(path)
        if kind == "root":
            return Attr.directory(0o755, self.uid, self.gid)
        stream = self.broker.get(name)
        if kind == "since_dir":
            return Attr.directory(0o555, self.uid, self.gid, stream.created_ns)
        if kind == "status":
            attr = self._stream_attr(stream, len(self._status_bytes(stream)))
            attr.mode = stat.S_IFREG | 0o444
            return attr
        if kind == "since":
            offset = self._since_offset(stream, arg)
            attr = self._stream_attr(stream, stream.log.end_offset - offset)
            attr.mode = stat.S_IFREG | 0o444
            return attr
        return self._stream_attr(stream)

    async def readdir(self, path: str) -> list[tuple[str, Attr]]:
        kind, _, _ = self._parse(path)
        if kind == "since_dir":
            return []
        if kind != "root":
            raise fs_error(errno.ENOTDIR)
        out: list[tuple[str, Attr]] = []
        for name in sorted(self.broker.streams):
            stream = self.broker.streams[name]
            out.append((name, self._stream_attr(stream)))
            status = self._stream_attr(stream, len(self._status_bytes(stream)))
            status.mode = stat.S_IFREG | 0o444
            out.append((name + STATUS_SUFFIX, status))
        return out

    async def setattr(self, path: str, changes: AttrChanges, handle: Handle | None, ctx: Ctx) -> Attr:
        # touch, `>` (truncate) and chmod are accepted and change nothing: a
        # stream's history is only ever cut by retention.
        kind, _, _ = self._parse(path)
        if kind != "stream":
            raise fs_error(errno.EPERM)
        return await self.getattr(path)

    # ------------------------------------------------------------------ files
    async def open(self, path: str, flags: int, ctx: Ctx) -> Handle:
        kind, name, arg = self._parse(path)
        if kind in ("root", "since_dir"):
            raise fs_error(errno.EISDIR)
        stream = self.broker.get(name)
        handle = StreamHandle(path, flags, direct_io=True, stream=name, kind="stream",
                              open_next_seq=stream.log.next_seq, cursor_seq=stream.log.next_seq,
                              generation=stream.generation)
        if handle.writable:
            if kind != "stream" or stream.builtin:
                raise fs_error(errno.EPERM, "read-only")
        if kind == "status":
            handle.kind = "status"
            handle.status_bytes = self._status_bytes(stream)
        elif kind == "since":
            handle.base = self._since_offset(stream, arg)
            handle.open_next_seq = stream.log.seq_at(handle.base)[0]
        self.handles.add(handle)
        stream.readers.add(handle)
        return handle

    async def create(self, path: str, mode: int, flags: int, ctx: Ctx) -> Handle:
        if "/" in path or path.endswith(STATUS_SUFFIX) or "@" in path:
            raise fs_error(errno.EPERM)
        if path not in self.broker.streams:
            self.broker.create(path)
            self.count("streams_created")
        return await self.open(path, flags, ctx)

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        assert isinstance(handle, StreamHandle)
        if handle.kind == "status":
            return handle.status_bytes[offset: offset + size]
        return await read_stream(self.broker, handle, offset, size, self.config.read_wait, self.config.reader_max_lag)

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        assert isinstance(handle, StreamHandle)
        if handle.kind != "stream":
            raise fs_error(errno.EPERM)
        # Every write is an append whatever its offset; lines may arrive in pieces.
        pending = bytes(handle.write_buffer) + data
        complete_end = pending.rfind(b"\n") + 1
        lines = pending[:complete_end].split(b"\n")[:-1] if complete_end else []
        rest = pending[complete_end:]
        if len(rest) > MAX_EVENT_BYTES:
            self.broker.rejected += 1
            raise fs_error(errno.EFBIG, "event larger than 1 MiB")
        try:
            events = [parse_event(line) for line in lines if line.strip()]
        except OSError:
            self.broker.rejected += 1
            raise
        self.broker.publish_many(handle.stream, events)
        handle.write_buffer = bytearray(rest)
        self.count("writes")
        return len(data)

    async def flush(self, handle: Handle) -> None:
        assert isinstance(handle, StreamHandle)
        if handle.write_buffer:
            line = bytes(handle.write_buffer)
            handle.write_buffer = bytearray()
            if line.strip():
                try:
                    event = parse_event(line)
                except OSError:
                    self.broker.rejected += 1
                    raise
                self.broker.publish(handle.stream, event)

    async def fsync(self, handle: Handle, datasync: bool) -> None:
        assert isinstance(handle, StreamHandle)
        stream = self.broker.streams.get(handle.stream)
        if stream is not None:
            await trio.to_thread.run_sync(stream.log.sync)

    async def release(self, handle: Handle) -> None:
        assert isinstance(handle, StreamHandle)
        self.handles.discard(handle)
        stream = self.broker.streams.get(handle.stream)
        if stream is not None:
            stream.readers.discard(handle)
        if handle.write_buffer:
            try:
                await self.flush(handle)
            except OSError:
                pass  # close() already got its answer from flush

    # ------------------------------------------------------------------ namespace
    async def unlink(self, path: str) -> None:
        kind, name, _ = self._parse(path)
        if kind != "stream":
            raise fs_error(errno.EPERM)
        self.broker.delete(name)
        self.count("streams_deleted")

    async def mkdir(self, path: str, mode: int, ctx: Ctx) -> Attr:
        raise fs_error(errno.EPERM)

    async def rmdir(self, path: str) -> None:
        raise fs_error(errno.EPERM)

    async def rename(self, old: str, new: str, flags: int) -> None:
        raise fs_error(errno.EPERM)

    # ------------------------------------------------------------------ status file
    def stream_status(self, stream: Stream) -> dict[str, Any]:
        log = stream.log
        readers = []
        for handle in list(stream.readers):
            if isinstance(handle, StreamHandle) and handle.kind == "stream":
                readers.append({"kind": "file", "lag": handle.lag(stream), "gaps": handle.gaps,
                                "missed": handle.missed})
        if self.websocket is not None:
            readers.extend(self.websocket.readers_of(stream.name))
        out: dict[str, Any] = {
            "stream": stream.name,
            "builtin": stream.builtin,
            "generation": stream.generation,
            "first_seq": log.first_seq if log.retained_events else None,
            "last_seq": log.next_seq - 1 if log.next_seq > 1 else None,
            "retained_events": log.retained_events,
            "retained_bytes": log.retained_bytes,
            "start_offset": log.start_offset,
            "end_offset": log.end_offset,
            "segments": len(log.segments),
            "max_events": log.max_events,
            "max_mb": round(log.max_bytes / 1024 / 1024, 3),
            "readers": readers,
            "published_since_mount": stream.published,
        }
        out["bridge"] = self.nats.state() if self.nats is not None else {"nats": "off"}
        return out

    def _status_bytes(self, stream: Stream) -> bytes:
        return (json.dumps(self.stream_status(stream), indent=2) + "\n").encode()

    # ------------------------------------------------------------------ CLI
    async def control(self, command: str, args: dict[str, Any]) -> Any:
        if command == "ls":
            return [{"name": n, "builtin": s.builtin, "generation": s.generation, "last_seq": s.log.next_seq - 1,
                     "retained": s.log.retained_events, "bytes": s.log.retained_bytes,
                     "readers": len(s.readers)} for n, s in sorted(self.broker.streams.items())]
        if command == "publish":
            name = str(args.get("stream", ""))
            if name in BUILTIN_STREAMS:
                raise fs_error(errno.EPERM, f"{name} is a built-in stream (read-only)")
            lines = [line.encode() for line in str(args.get("data", "")).splitlines() if line.strip()]
            if not lines:
                raise fs_error(errno.EINVAL, "nothing to publish")
            if not valid_name(name):
                raise fs_error(errno.EINVAL, f"bad stream name {name!r}")
            try:
                events = [parse_event(line) for line in lines]
            except OSError as e:
                raise fs_error(errno.EINVAL, f"not a JSON object: {e.strerror}") from None
            if name not in self.broker.streams:
                self.broker.create(name)
            return {"seqs": self.broker.publish_many(name, events)}
        if command == "tail":
            stream = self._named(args)
            count = max(0, int(args.get("lines", 20)))
            first = max(stream.log.first_seq, stream.log.next_seq - count)
            return {"lines": [stream.log.line(seq).decode() for seq in range(first, stream.log.next_seq)],
                    "next_seq": stream.log.next_seq}
        if command == "status":
            return self.stream_status(self._named(args))
        if command == "token_create":
            info, secret = self.acl.create_token(str(args.get("role", "")), str(args.get("note", "")))
            self.publish_system("stream_token_created", {"id": info.id, "role": info.role})
            return {**info.public(), "token": secret}
        if command == "token_list":
            return [t.public() for t in self.acl.tokens]
        if command == "token_revoke":
            info = self.acl.revoke(str(args.get("id", "")))
            if self.websocket is not None:
                self.websocket.drop_token(info.id)
            self.publish_system("stream_token_revoked", {"id": info.id, "role": info.role})
            return info.public()
        return await super().control(command, args)

    def _named(self, args: dict[str, Any]) -> Stream:
        name = str(args.get("stream", ""))
        stream = self.broker.streams.get(name)
        if stream is None:
            raise fs_error(errno.ENOENT, f"no stream {name!r}")
        return stream

    # ------------------------------------------------------------------ snapshots
    async def export_state(self, sink: Any, scope: dict[str, Any]) -> None:
        """Retained history per `export.py`: all of it, one agent's events, or the conversation streams."""
        kind = scope.get("type")
        agent = scope.get("agent") if kind == "agent" else None
        conversation = kind == "conversation"
        window = int(scope.get("memory_window") or 0)
        memory = scope.get("memory_events") if conversation else None
        # Capture (segment, length) pairs and the memory window in one go on the loop (no await in
        # between: both end at the same event); the copy runs outside and later appends do not matter.
        plan: list[tuple[str, int]] = []
        for name, stream in self.broker.streams.items():
            if conversation and not is_conversation_stream(name):
                continue
            for seg in stream.log.segments:
                plan.append((f"{name}/{seg.name}", seg.size))
            if memory is not None and window > 0:
                log = stream.log
                lines = [log.line(seq) for seq in range(max(log.first_seq, log.next_seq - window), log.next_seq)]
                memory.extend(stream_memory_events(name, lines))
        await trio.to_thread.run_sync(export_segments, sink, self.store, plan, str(agent) if agent else None)

    async def restore_state(self, source: Any) -> list[str]:
        from kfs.streams.segments import SEGMENT_RE

        by_stream: dict[str, list[str]] = {}
        for entry in source.names():
            name, _, seg = entry.partition("/")
            if name and SEGMENT_RE.match(seg):
                by_stream.setdefault(name, []).append(seg)
        changed = []
        for name, segs in sorted(by_stream.items()):
            if name.startswith(".") or "@" in name:
                continue
            staging = f".restore-{name}"
            if self.store.exists(staging):
                await trio.to_thread.run_sync(_remove_tree, self.store, staging)
            self.store.mkdir(staging, 0o750)
            for seg in segs:
                await trio.to_thread.run_sync(source.copy_to, f"{name}/{seg}", self.store, f"{staging}/{seg}")
            old = self.broker.streams.get(name)
            if old is not None:
                # A restore rewinds the history of the same stream: its generation stays (a new one
                # would make NATS peers take the restored events again as a new incarnation).
                self.store.write_atomic(f"{staging}/{GENERATION_FILE}", b"%d\n" % old.generation, 0o640)
            self.store.fsync_dir(staging)
            old = self.broker.streams.pop(name, None)
            if old is not None:
                old.log.close()
                old.directory.close()
                self.store.rename(name, f".old-{name}")
            self.store.rename(staging, name)
            self.store.fsync_dir()
            if self.store.exists(f".old-{name}"):
                await trio.to_thread.run_sync(_remove_tree, self.store, f".old-{name}")
            stream = self.broker._load(name, builtin=name in BUILTIN_STREAMS)
            if old is not None:
                stream.readers = old.readers
                old.wake()
            changed.append(name)
        return changed


def _remove_tree(store: StoreDir, path: str) -> None:
    for entry in store.listdir(path):
        store.unlink(f"{path}/{entry}")
    store.rmdir(path)
