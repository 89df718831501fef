"""Automatic snapshots: the interval timer, major-change events on the bus, retention.

Bus subscribers must only record (publish is synchronous and may come from a
worker thread), so `EventWatcher.on_event` appends the event name to a
thread-safe deque; the trigger task in the area drains it.

Debounce: the first matching event takes a snapshot at once; events seen during
the next ``event_debounce`` are folded into one more snapshot at the end of
that window, so a burst costs two snapshots at most and the last change is
always captured.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from kfs.bus import Event


class EventWatcher:
    """Records bus events whose record carries ``event`` in ``names``."""

    def __init__(self, names: list[str]) -> None:
        self.names = set(names)
        self.seen: deque[str] = deque(maxlen=10_000)

    def on_event(self, event: Event) -> None:
        if event.topic == "log_lines":  # one event per logs/ write, its records in order
            data = event.data.get("data", b"")
            # Bytes first (C speed): a name not in them is in no record, unless spelt with escapes.
            if self.names and (b"\\u" in data or any(n.encode() in data for n in self.names)):
                for record in event.data.get("records", ()):
                    name = match_event({"record": record}, self.names)
                    if name is not None:
                        self.seen.append(name)
            return
        name = match_event(event.data, self.names)
        if name is not None:
            self.seen.append(name)


def match_event(data: dict[str, Any], names: set[str]) -> str | None:
    """The configured event name in a bus event: ``log_line`` and stream events carry ``record``."""
    if not names or not isinstance(data, dict):
        return None
    for candidate in (data.get("record"), data.get("event"), data):
        if isinstance(candidate, dict):
            value = candidate.get("event")
            if isinstance(value, str) and value in names:
                return value
    return None


@dataclass
class Debouncer:
    window: float
    last_taken: float = -1e18
    pending: str | None = None

    def seen(self, name: str, now: float) -> str | None:
        """An event arrived: the trigger name to snapshot now, or None (folded for later)."""
        if now - self.last_taken >= self.window:
            self.last_taken = now
            self.pending = None
            return name
        self.pending = name
        return None

    def due(self, now: float) -> str | None:
        """At the end of a window with folded events: the trigger to snapshot now."""
        if self.pending is not None and now - self.last_taken >= self.window:
            name, self.pending = self.pending, None
            self.last_taken = now
            return name
        return None


def is_automatic(trigger: str) -> bool:
    return trigger == "timer" or trigger.startswith("event:")


def to_prune(snapshots: list[tuple[str, float, str]], keep_last: int, keep_daily: int,
             keep_weekly: int) -> list[str]:
    """Names of automatic snapshots to delete: ``snapshots`` is (name, created, trigger).

    Kept: the newest ``keep_last``; the newest of each of the ``keep_daily``
    most recent days that have one; the newest of each of the ``keep_weekly``
    most recent ISO weeks.  Manual snapshots are never returned.
    """
    auto = sorted((s for s in snapshots if is_automatic(s[2])), key=lambda s: (s[1], s[0]), reverse=True)
    keep: set[str] = {s[0] for s in auto[:keep_last]}
    for bucket_of, count in ((_day, keep_daily), (_iso_week, keep_weekly)):
        buckets: list[str] = []
        for name, created, _ in auto:
            bucket = bucket_of(created)
            if bucket in buckets:
                continue
            if len(buckets) >= count:
                break
            buckets.append(bucket)
            keep.add(name)
    return [s[0] for s in auto if s[0] not in keep]


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def _iso_week(t: float) -> str:
    import datetime

    year, week, _ = datetime.datetime.fromtimestamp(t, datetime.UTC).isocalendar()
    return f"{year}-W{week:02d}"
