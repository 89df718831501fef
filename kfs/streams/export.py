"""What streams/ puts in a snapshot: which streams, which events, and the memory window.

- ``full``: every stream's retained segments, byte for byte.
- ``agent``: every stream, but each segment keeps only the events of that agent
  (``agent`` or ``agent_id`` at the top level or inside ``metadata``); a segment
  with none of them is left out.  Same names and format as a full snapshot.
- ``conversation``: the conversation streams (every user stream, such as ``chat``;
  not the built-in ``system``, ``logs`` and ``metrics``) whole, and their last N
  events as memory events for ``memory_window.json``.

Filtered segments are spooled through a hidden file of the streams store (opened
by the snapshot sink, then unlinked) so memory stays bounded by one segment,
whatever the size of the history.  Blocking: run in a worker thread.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kfs.store import StoreDir
from kfs.streams.broker import BUILTIN_STREAMS

#: the hidden spool file (a dot name: the broker never loads it as a stream)
SPOOL = ".snapshot-export"
#: keys that name the agent an event belongs to
AGENT_KEYS = ("agent", "agent_id")


def is_conversation_stream(name: str) -> bool:
    """User streams hold conversations; the built-in ones are kfs's own chatter."""
    return name not in BUILTIN_STREAMS


def _same_agent(value: Any, agent: str) -> bool:
    if isinstance(value, str):
        return value == agent
    # an id written as a JSON number still names the agent
    return isinstance(value, int) and not isinstance(value, bool) and str(value) == agent


def event_of_agent(event: dict[str, Any], agent: str) -> bool:
    """Whether ``event`` carries ``agent``/``agent_id`` (top level or in ``metadata``) equal to ``agent``."""
    holders = (event, event.get("metadata"))
    return any(isinstance(holder, dict) and any(_same_agent(holder.get(key), agent) for key in AGENT_KEYS)
               for holder in holders)


def agent_needle(agent: str) -> bytes:
    """The bytes the agent id appears as inside a stored JSON line (a cheap pre-filter before parsing)."""
    return json.dumps(agent, ensure_ascii=False)[1:-1].encode()


def filter_lines(data: bytes, agent: str) -> bytes:
    """The complete JSON lines of ``data`` that belong to ``agent``, in order."""
    needle = agent_needle(agent)
    kept: list[bytes] = []
    for line in data.splitlines(keepends=True):
        if needle not in line or not line.endswith(b"\n"):
            continue
        try:
            event = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(event, dict) and event_of_agent(event, agent):
            kept.append(line)
    return b"".join(kept)


def clear_spool(store: StoreDir) -> None:
    """A spool left by a crash during an export."""
    try:
        store.unlink(SPOOL)
    except FileNotFoundError:
        pass


def export_segments(sink: Any, store: StoreDir, plan: list[tuple[str, int]], agent: str | None) -> None:
    """Add each ``(NAME/segment, length)`` of ``plan`` to ``sink``, filtered to ``agent`` if given.

    A segment that retention removed since the plan was taken is skipped: it is
    older than the snapshot's point anyway.
    """
    clear_spool(store)
    for arcname, length in plan:
        if agent is None:
            try:
                sink.add_store_file(arcname, store, arcname, length)
            except FileNotFoundError:
                pass
            continue
        try:
            with store.opened(arcname, os.O_RDONLY) as fd:
                data = os.pread(fd, length, 0)  # one segment: bounded by the stream's segment size
        except FileNotFoundError:
            continue
        kept = filter_lines(data, agent)
        if not kept:
            continue
        try:
            with store.opened(SPOOL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) as out:
                view = memoryview(kept)
                while view:
                    view = view[os.write(out, view):]
            sink.add_store_file(arcname, store, SPOOL, len(kept))  # the sink holds it open from here
        finally:
            clear_spool(store)


def memory_events(name: str, lines: list[bytes]) -> list[dict[str, Any]]:
    """Stored lines of stream ``name`` as snapshot memory events, oldest first."""
    events: list[dict[str, Any]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            events.append({"timestamp": str(record.get("timestamp", "")), "area": "streams",
                           "source": name, "record": record})
    return events
