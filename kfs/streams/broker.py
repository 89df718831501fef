"""The broker: named streams, publishing, and waking whoever follows them.

Publishing is synchronous and cheap: validate, stamp (``seq``, ``stream``,
``timestamp``), ``os.write`` to the stream's active segment, then wake the
readers.  Followers (file readers, WebSocket clients, the NATS bridge) never
get a queue of their own here: each keeps a cursor (a seq or a byte offset)
into the retained history and reads from it, so a slow one costs nothing to a
writer or to the others; its lag is bounded where it reads (`reader.py`,
`websocket.py`).
"""

from __future__ import annotations

import errno
import json
import operator
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import accumulate, repeat
from typing import Any

import orjson
import trio

from kfs.fs.area import fs_error
from kfs.store import StoreDir
from kfs.streams.segments import SegmentLog

BUILTIN_STREAMS = ("system", "logs", "metrics")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
#: a single event may not exceed this (the kernel splits large writes; we reassemble up to it)
MAX_EVENT_BYTES = 1 << 20
#: field naming the node an event came from, on events bridged in from NATS
ORIGIN_FIELD = "kfs_origin"

#: fields kfs stamps on every event; an event's own are dropped
RESERVED_FIELDS = ("seq", "stream", ORIGIN_FIELD)
#: in a stream's directory: its generation (see `Stream.generation`)
GENERATION_FILE = ".generation"

#: called for every event published: (stream name, seq, stored line, origin node or None)
Listener = Callable[[str, int, bytes, str | None], None]
#: called once per publish: (stream name, first seq, number of events, origin node or None)
BatchListener = Callable[[str, int, int, str | None], None]


#: between the objects of a burst encoded in one orjson call (split on it after)
_SEPARATOR = orjson.Fragment(b"\x00")
#: what stands between two objects in that call's output: JSON text never holds a raw NUL
_ENCODED_BETWEEN = b"},\x00,{"
#: what stands between two stored object lines (valid JSON holds no raw newline)
_LINES_BETWEEN = b"}\n{"


def _members_of(extra: dict[str, Any]) -> bytes:
    """``extra``'s members as they follow others inside a stored object: ``,"key":value`` each."""
    return b"".join(b"," + orjson.dumps(key) + b":" + orjson.dumps(value) for key, value in extra.items())


def _seq_widths(first: int, count: int, fixed: int) -> list[int]:
    """``fixed`` + the number of digits of each seq from ``first`` on, ``count`` of them (no loop per
    seq: the width only changes at powers of ten)."""
    widths: list[int] = []
    seq, end = first, first + count
    while seq < end:
        digits = len(str(seq))
        upto = min(end, 10 ** digits)
        widths += repeat(fixed + digits, upto - seq)
        seq = upto
    return widths


def _load_generation(directory: StoreDir) -> int:
    """The stream's generation, created (durably) the first time its directory is loaded."""
    try:
        text = directory.read_bytes(GENERATION_FILE).decode().strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    generation = time.time_ns()
    directory.write_atomic(GENERATION_FILE, b"%d\n" % generation, 0o640)
    return generation


def valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and not name.endswith(".status") and "@" not in name


class _SecondCache:
    """The formatted date and time of one second: stamping is per event, strftime is slow."""

    second = -1
    prefix = ""


def rfc3339(time_ns: int | None = None) -> str:
    """RFC 3339 UTC with microseconds and ``Z`` (the second's part formatted once per second)."""
    ns = time.time_ns() if time_ns is None else time_ns
    second, rest = divmod(ns, 1_000_000_000)
    if second != _SecondCache.second:
        _SecondCache.prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _SecondCache.second = second
    return f"{_SecondCache.prefix}{rest // 1000:06d}Z"


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch of an RFC3339 time (``Z`` or an offset); ValueError if not one."""
    value = text.strip().replace("z", "Z")
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def encode_event(event: dict[str, Any]) -> bytes:
    """One compact JSON line (UTF-8 kept as is); orjson first, it is ~10x json's speed."""
    try:
        return orjson.dumps(event) + b"\n"
    except (TypeError, orjson.JSONEncodeError):
        pass  # e.g. integers beyond 64 bits: json handles them
    try:
        return (json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise fs_error(errno.EINVAL, f"cannot encode event: {e}") from None


def parse_event(line: bytes) -> dict[str, Any]:
    """One line as a JSON object, or EINVAL (orjson first; json takes what it declines, e.g. big ints)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            raise fs_error(errno.EINVAL, f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise fs_error(errno.EINVAL, "an event must be a JSON object")
    return obj


@dataclass
class Stream:
    name: str
    builtin: bool
    log: SegmentLog
    directory: StoreDir
    changed: trio.Event = field(default_factory=trio.Event)
    created_ns: int = field(default_factory=time.time_ns)
    modified_ns: int = field(default_factory=time.time_ns)
    #: open file readers (reader.StreamReader) and WebSocket subscribers, for status
    readers: set[Any] = field(default_factory=set)
    published: int = 0
    #: which incarnation of the name this is: a stream deleted and created again restarts its
    #: seqs at 1, so (generation, seq) is what names an event for good.  The creation time in
    #: nanoseconds (kept in GENERATION_FILE): a later incarnation has a larger one.
    generation: int = 0

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Broker:
    def __init__(self, store: StoreDir, max_events: int, max_bytes: int, node_id: str) -> None:
        self.store = store
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.node_id = node_id
        self.streams: dict[str, Stream] = {}
        self.listeners: list[Listener] = []
        self.batch_listeners: list[BatchListener] = []
        #: called with (stream, seq, stamped event) for user streams (the area puts them on the bus)
        self.on_record: Callable[[str, int, dict[str, Any]], None] | None = None
        self.published = 0
        self.bytes_published = 0
        self.rejected = 0
        for name in store.listdir():
            if valid_name(name) and not name.startswith("."):
                self._load(name, builtin=name in BUILTIN_STREAMS)
        for name in BUILTIN_STREAMS:
            if name not in self.streams:
                self._load(name, builtin=True)

    def _load(self, name: str, builtin: bool) -> Stream:
        directory = self.store.subdir(name, mode=0o750)
        stream = Stream(name, builtin, SegmentLog.open(directory, self.max_events, self.max_bytes), directory)
        stream.generation = _load_generation(directory)
        try:
            st = directory.stat("")
            stream.created_ns = st.st_ctime_ns
            stream.modified_ns = st.st_mtime_ns
        except OSError:
            pass
        self.streams[name] = stream
        return stream

    # ------------------------------------------------------------------ namespace
    def get(self, name: str) -> Stream:
        stream = self.streams.get(name)
        if stream is None:
            raise fs_error(errno.ENOENT)
        return stream

    def create(self, name: str) -> Stream:
        """The stream ``name``, created if new (EINVAL for a bad name)."""
        stream = self.streams.get(name)
        if stream is not None:
            return stream
        if not valid_name(name) or name.startswith("."):
            raise fs_error(errno.EINVAL, f"bad stream name {name!r}")
        stream = self._load(name, builtin=False)
        self.store.fsync_dir()
        return stream

    def delete(self, name: str) -> None:
        stream = self.get(name)
        if stream.builtin:
            raise fs_error(errno.EPERM, f"{name} is a built-in stream")
        del self.streams[name]
        stream.log.destroy()
        stream.directory.close()
        for leftover in self.store.listdir(name):
            self.store.unlink(f"{name}/{leftover}")
        self.store.rmdir(name)
        self.store.fsync_dir()
        stream.wake()

    # ------------------------------------------------------------------ publish
    def publish(self, name: str, event: dict[str, Any], origin: str | None = None) -> int:
        """Stamp, store and announce one event; returns its seq."""
        return self.publish_many(name, [event], origin)[0]

    def publish_many(self, name: str, events: list[dict[str, Any]], origin: str | None = None) -> list[int]:
        """Stamp every event (all or nothing), store them with one write, announce them."""
        stream = self.streams.get(name) or self.create(name)
        first = stream.log.next_seq
        now = rfc3339()
        stamped_all: list[dict[str, Any]] = []
        lines: list[bytes] = []
        reserved = ("seq", "stream", ORIGIN_FIELD)
        for i, event in enumerate(events):
            # seq and stream are ours; kfs_origin marks events bridged from another node
            if "seq" in event or "stream" in event or ORIGIN_FIELD in event:
                event = {key: value for key, value in event.items() if key not in reserved}
            stamped: dict[str, Any] = {"seq": first + i, "stream": name, "timestamp": now, **event}
            if stamped["timestamp"] is None:
                stamped["timestamp"] = now
            if origin is not None:
                stamped[ORIGIN_FIELD] = origin
            line = encode_event(stamped)
            if len(line) > MAX_EVENT_BYTES:
                raise fs_error(errno.EFBIG, "event larger than 1 MiB")
            stamped_all.append(stamped)
            lines.append(line)
        if not lines:
            return []
        self._commit(stream, first, lines, origin, stamped_all)
        return list(range(first, first + len(lines)))

    def _commit(self, stream: Stream, first: int, lines: list[bytes], origin: str | None,
                stamped: list[dict[str, Any]] | None) -> None:
        """Store stamped lines with one write per segment, then announce them."""
        self._commit_block(stream, first, b"".join(lines), list(map(len, lines)), origin, stamped, lines)

    def _commit_block(self, stream: Stream, first: int, block: bytes, sizes: list[int], origin: str | None,
                      stamped: list[dict[str, Any]] | None, lines: list[bytes] | None = None) -> None:
        """Store a burst of stamped lines (one buffer, ``sizes`` its lines' lengths), then announce it.

        ``lines`` (the same lines one by one) is built here only if a per-line listener needs it.
        """
        name = stream.name
        stream.log.append_block(block, sizes)
        count = len(sizes)
        stream.published += count
        stream.modified_ns = time.time_ns()
        self.published += count
        self.bytes_published += len(block)
        for batch_listener in list(self.batch_listeners):
            batch_listener(name, first, count, origin)
        listeners = list(self.listeners)
        announce_records = self.on_record is not None and not stream.builtin
        if listeners or announce_records:
            if lines is None:
                starts = list(accumulate(sizes, initial=0))
                lines = list(map(block.__getitem__, map(slice, starts, starts[1:])))
            for i, line in enumerate(lines):
                for listener in listeners:
                    listener(name, first + i, line, origin)
                if announce_records:
                    record = stamped[i] if stamped is not None else json.loads(line)
                    self.on_record(name, first + i, record)  # type: ignore[misc]
        stream.wake()

    def publish_objects(self, name: str, data: bytes, records: list[dict[str, Any]],
                        extra: dict[str, Any] | None = None) -> range:
        """Publish lines that are already validated JSON objects, stamped at the byte level.

        ``data`` holds ``len(records)`` lines, each exactly one JSON object from ``{`` to
        ``}\\n``, with a non-null ``timestamp`` (as logs/ stores them); ``records`` are the
        same lines parsed, in order (not modified).  Each line is stored as
        ``{"seq":N,"stream":NAME,`` + its own members + ``extra``'s members it lacks + ``}``:
        the fields `publish_many` would store, the writer's bytes kept, one write per
        burst, and no Python bytecode per line.  Lines that carry a reserved field (or
        whose members are spelt with escapes, or lack a usable timestamp) are re-encoded
        from their records instead, still in C loops.  Returns the seqs (EFBIG: nothing
        published when a line would exceed `MAX_EVENT_BYTES`; ValueError: ``data`` is not
        ``len(records)`` such lines).

        Either way the burst becomes each line's members (one split of one buffer), rendered
        into the stored burst by one ``%`` (`_render`): no bytes object per line beyond those.
        """
        stream = self.streams.get(name) or self.create(name)
        count = len(records)
        if not count:
            return range(0)
        extra = extra or {}
        first = stream.log.next_seq
        head = b'{"seq":%d,"stream":' + orjson.dumps(name).replace(b"%", b"%%") + b","
        # Every key of the burst, gathered once (one C loop, cheaper than a key set test per record).
        # Lines that bring their own seq (apps number their log lines) are re-encoded: cutting the
        # member out of the bytes exactly (counts, splits, a comparison; all C loops) was
        # measured slower than orjson re-encoding the burst.
        keys = set().union(*records)
        if self._needs_reencode(records, keys, extra):
            members, tail = self._reencoded_members(records, keys, extra)
        else:
            members, tail = self._stored_members(data, count), _members_of(extra)
        block, sizes = self._render(head, members, tail + b"}\n", first)
        if len(block) > MAX_EVENT_BYTES and max(sizes) > MAX_EVENT_BYTES:  # (no line is longer than its burst)
            raise fs_error(errno.EFBIG, "event larger than 1 MiB")
        self._commit_block(stream, first, block, sizes, None, None)
        return range(first, first + count)

    @staticmethod
    def _needs_reencode(records: list[dict[str, Any]], keys: set[str], extra: dict[str, Any]) -> bool:
        """Must these lines (``keys``: all their keys) go through their records?  Asked of the
        records (escapes cannot fool them), not of the bytes."""
        if not keys.isdisjoint(RESERVED_FIELDS) or not keys.isdisjoint(extra):
            return True
        # Missing or null: publish_many stamps those with the time of publishing.
        return None in map(dict.get, records, repeat("timestamp", len(records)))

    @staticmethod
    def _stored_members(data: bytes, count: int) -> list[bytes]:
        """Each stored line's members, without its braces and newline: one split of the burst
        (a valid JSON line holds no raw newline, so ``}\\n{`` is only ever between two lines)."""
        if data[:1] != b"{" or data[-2:] != b"}\n":
            raise ValueError("data and records disagree")
        members = data.split(_LINES_BETWEEN)
        if len(members) != count:
            raise ValueError("data and records disagree")
        members[0] = members[0][1:]
        members[-1] = members[-1][:-2]
        return members

    @staticmethod
    def _reencoded_members(records: list[dict[str, Any]], keys: set[str],
                           extra: dict[str, Any]) -> tuple[list[bytes], bytes]:
        """Each line's members encoded from its record (reserved fields dropped), in C loops, and
        the tail (``extra``'s members) that goes after every line's members.  ``keys``: all the
        records' keys (a field that no record holds costs no loop)."""
        count = len(records)
        bodies = list(map(dict.copy, records))
        for key in keys.intersection(RESERVED_FIELDS):
            deque(map(dict.pop, bodies, repeat(key, count), repeat(None, count)), 0)
        stamp_now = None in map(dict.get, bodies, repeat("timestamp", count))
        if stamp_now or not keys.isdisjoint(extra):
            # A line that holds an extra member keeps its own, and a timestamp stamped now goes
            # after the extra members (publish_many's order): the members go into each body.
            for key, value in extra.items():
                deque(map(dict.setdefault, bodies, repeat(key, count), repeat(value, count)), 0)
            tail = b""
        else:
            tail = _members_of(extra)  # the same bytes after every line: rendered, not encoded per body
        if stamp_now:
            now = rfc3339()
            for body in bodies:
                if body.get("timestamp") is None:
                    body["timestamp"] = now
        try:
            # One orjson call for the burst, a raw NUL between the objects (JSON text never holds
            # one: strings escape it), then one split.  One call per object would cost a 1 KiB
            # buffer each, and that malloc churn shows up as page faults (measured: a third of
            # the daemon's time on a burst of log lines).
            items: list[Any] = [_SEPARATOR] * (2 * count - 1)
            items[::2] = bodies
            members = orjson.dumps(items).split(_ENCODED_BETWEEN)
            if len(members) != count:
                raise ValueError("separator count")
            members[0] = members[0][2:]  # the list's "[" and the first object's "{"
            members[-1] = members[-1][:-2]  # the last object's "}" and the list's "]"
        except (TypeError, ValueError, orjson.JSONEncodeError):
            members = [encode_event(body)[1:-2] for body in bodies]  # e.g. integers beyond 64 bits
        return members, tail

    @staticmethod
    def _render(head: bytes, members: list[bytes], tail: bytes, first: int) -> tuple[bytes, list[int]]:
        """The stored burst (per line: ``head`` with its seq, its members, ``tail``) and its lines' sizes.

        ``head`` holds one ``%d`` (any other ``%`` doubled); ``members`` and ``tail`` are plain
        bytes.  One ``%`` over the line format repeated once per line, with the seqs and the
        members as its arguments: measured cheaper than joining the members into a template,
        and the writer's bytes are never read as a format, so nothing in them needs escaping.
        """
        count = len(members)
        if count == 1:  # one line (an `echo >>`): none of the burst machinery
            line = b"".join((head % first, members[0], tail))
            return line, [len(line)]
        fixed = len(head) - 2 + len(tail)  # "%d" becomes the seq's digits
        sizes = list(map(operator.add, map(len, members), _seq_widths(first, count, fixed)))
        arguments: list[Any] = [None] * (2 * count)
        arguments[::2] = range(first, first + count)
        arguments[1::2] = members
        line_format = head + b"%s" + tail.replace(b"%", b"%%")
        return (line_format * count) % tuple(arguments), sizes

    def publish_lines(self, name: str, lines: list[bytes], origin: str | None = None) -> list[int]:
        """Validate every line first, then publish them all (all or nothing)."""
        events = [parse_event(line) for line in lines if line.strip()]
        return self.publish_many(name, events, origin)

    # ------------------------------------------------------------------ reading
    def seq_since_time(self, stream: Stream, when: float) -> int:
        """The first retained seq whose timestamp is at or after ``when`` (bisect)."""
        log = stream.log
        lo, hi = log.first_seq, log.next_seq
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                stamp = parse_rfc3339(json.loads(log.line(mid)).get("timestamp", ""))
            except (ValueError, TypeError, AttributeError, KeyError):
                stamp = 0.0
            if stamp < when:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def close(self) -> None:
        for stream in self.streams.values():
            try:
                stream.log.sync()
            except OSError:
                pass
            stream.log.close()
