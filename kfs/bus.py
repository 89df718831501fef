"""The in-daemon event bus: areas publish, streams/triggers/metrics subscribe.

Publishing is synchronous and never blocks: each subscriber is a callable run
inline, and must only record the event (append to a buffer, ``send_nowait`` on
a channel it owns).  That way nothing published is lost between publisher and
subscriber, and no area has to import another.

Topics used so far (``data`` is a JSON-serialisable dict):
  log_line            {"file": "kai.log.jsonl", "record": {...}}
  log_rotated         {"file": ..., "rotated_to": ...}
  vault_locked / vault_unlocked / vault_unlock_failed / vault_integrity_error
  snapshot_created / snapshot_restored
  kfs_error           {"where": ..., "error": ...}   (daemon diagnostics)
  stream_event        {"stream": ..., "seq": ..., "record": {...}}   (every event of a user stream)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kfs.bus")


@dataclass(slots=True)
class Event:  # not frozen: frozen dataclasses cost ~2x to build, and this is per log line
    topic: str
    data: dict[str, Any]
    source: str = ""
    time_ns: int = field(default_factory=time.time_ns)


Subscriber = Callable[[Event], None]


class Bus:
    def __init__(self) -> None:
        self._subscribers: list[tuple[frozenset[str] | None, Subscriber]] = []
        #: topic -> its handlers, rebuilt on (un)subscribe: publish runs once per log line
        self._routes: dict[str, list[Subscriber]] = {}
        self.published = 0

    def subscribe(self, handler: Subscriber, topics: list[str] | None = None) -> Callable[[], None]:
        """Call ``handler`` for each event (of ``topics``, or all); returns an unsubscribe."""
        entry = (frozenset(topics) if topics is not None else None, handler)
        self._subscribers.append(entry)
        self._routes.clear()

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)
                self._routes.clear()

        return unsubscribe

    def _handlers(self, topic: str) -> list[Subscriber]:
        handlers = self._routes.get(topic)
        if handlers is None:
            handlers = [h for topics, h in self._subscribers if topics is None or topic in topics]
            self._routes[topic] = handlers
        return handlers

    def publish(self, topic: str, data: dict[str, Any], source: str = "") -> None:
        self.published += 1
        handlers = self._handlers(topic)
        if not handlers:
            return
        event = Event(topic, data, source)
        for handler in handlers:
            try:
                handler(event)
            except Exception:  # a broken subscriber must not break the publisher
                log.exception("bus subscriber %r failed on %s", handler, topic)
