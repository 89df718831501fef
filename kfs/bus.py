"""The in-daemon event bus: areas publish, streams/triggers/metrics subscribe.

Publishing is synchronous and never blocks: each subscriber is a callable run
inline, and must not block or wait: it records the event (append to a buffer,
``send_nowait`` on a channel it owns) or, when that is cheaper than waking a
task of its own, does its short work at once (the streams area stores log lines
on the ``logs`` stream inside the logs/ write that published them).  That way
nothing published is lost between publisher and subscriber, and no area has to
import another.

Topics used so far (``data`` is a JSON-serialisable dict):
  log_lines           {"file": "kai.log.jsonl", "data": b"...", "count": N, "records": [{...}, ...]}
                      one per accepted write of logs/: ``data`` is the N stored lines exactly as
                      appended to the log (validated, timestamped, each a JSON object ending in
                      ``}\\n``; bytes, not JSON), ``records`` the same lines parsed, in order
  log_line            {"file": "kai.log.jsonl", "record": {...}}   one per stored line, delivered
                      only to subscribers that name ``log_line`` (`publish_named`): a per-line
                      event costs the hot path; subscribers to every topic get ``log_lines``
  log_rotated         {"file": ..., "rotated_to": ...}
  vault_locked / vault_unlocked / vault_unlock_failed / vault_integrity_error
  snapshot_created / snapshot_restored
  kfs_error           {"where": ..., "error": ...}   (daemon diagnostics)
  stream_event        {"stream": ..., "seq": ..., "record": {...}}   (every event of a user stream)

Request/reply, for an area that needs an answer from another (still no import):
``bus.provide(service, fn)`` registers the one provider of ``service`` (a second
one raises ValueError) and returns a callable that unregisters it;
``bus.request(service, **args)`` calls it synchronously, in the caller's thread,
and returns its answer or raises its exception; with no provider registered it
raises `NoProvider` (a LookupError).  A provider must answer quickly (it may be
called on the trio loop).  A provider whose state belongs to the trio loop is
called on the loop: a caller in a worker thread goes through
``trio.from_thread.run_sync(bus.request, ...)``.

Services provided so far:
  vault.read_secret   (path: str) -> bytes   the plaintext of vault file ``path`` (relative
                      to vault/); PermissionError while the vault is locked, FileNotFoundError
                      when there is no such file; called on the trio loop.
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


def _deliver(handlers: list[Subscriber], event: Event) -> None:
    for handler in handlers:
        try:
            handler(event)
        except Exception:  # a broken subscriber must not break the publisher
            log.exception("bus subscriber %r failed on %s", handler, event.topic)


class NoProvider(LookupError):
    """``bus.request`` of a service that nobody provides (its area is not mounted or not started)."""


class Bus:
    def __init__(self) -> None:
        self._subscribers: list[tuple[frozenset[str] | None, Subscriber]] = []
        #: topic -> its handlers, rebuilt on (un)subscribe: publish runs once per log line
        self._routes: dict[str, list[Subscriber]] = {}
        self._named_routes: dict[str, list[Subscriber]] = {}
        self.published = 0
        self._providers: dict[str, Callable[..., Any]] = {}

    def subscribe(self, handler: Subscriber, topics: list[str] | None = None) -> Callable[[], None]:
        """Call ``handler`` for each event (of ``topics``, or all); returns an unsubscribe."""
        entry = (frozenset(topics) if topics is not None else None, handler)
        self._subscribers.append(entry)
        self._routes.clear()
        self._named_routes.clear()

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)
                self._routes.clear()
                self._named_routes.clear()

        return unsubscribe

    def _handlers(self, topic: str) -> list[Subscriber]:
        handlers = self._routes.get(topic)
        if handlers is None:
            handlers = [h for topics, h in self._subscribers if topics is None or topic in topics]
            self._routes[topic] = handlers
        return handlers

    def has_subscribers(self, topic: str) -> bool:
        """Whether a handler named ``topic`` when it subscribed (subscribers to everything do not count)."""
        return bool(self._named_handlers(topic))

    def _named_handlers(self, topic: str) -> list[Subscriber]:
        handlers = self._named_routes.get(topic)
        if handlers is None:
            handlers = [h for topics, h in self._subscribers if topics is not None and topic in topics]
            self._named_routes[topic] = handlers
        return handlers

    def publish_named(self, topic: str, data: dict[str, Any], source: str = "") -> None:
        """Like `publish`, but only to handlers that named ``topic`` (for per-item convenience topics)."""
        handlers = self._named_handlers(topic)
        if handlers:
            self.published += 1
            _deliver(handlers, Event(topic, data, source))

    def publish(self, topic: str, data: dict[str, Any], source: str = "") -> None:
        self.published += 1
        handlers = self._handlers(topic)
        if handlers:
            _deliver(handlers, Event(topic, data, source))

    def provide(self, service: str, fn: Callable[..., Any]) -> Callable[[], None]:
        """Make ``fn`` answer ``request(service, ...)``; returns the call that unregisters it."""
        if service in self._providers:
            raise ValueError(f"bus service {service!r} already has a provider")
        self._providers[service] = fn

        def unregister() -> None:
            if self._providers.get(service) is fn:
                del self._providers[service]

        return unregister

    def request(self, service: str, **args: Any) -> Any:
        """The answer of ``service``'s provider (its exceptions propagate); `NoProvider` if none."""
        fn = self._providers.get(service)
        if fn is None:
            raise NoProvider(f"nothing provides {service!r} (is its area mounted?)")
        return fn(**args)
