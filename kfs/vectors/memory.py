"""Agent memory sync: bus events (e.g. chat log lines) embedded into a collection.

``vector_config.yaml``::

    memory_sync:
      - collection: agent_memory     # created if missing
        topic: log_line              # bus topic (log_line carries {"file", "record"})
        match: {context: chat}       # every key must equal the event record's
        text_field: message          # the text to embed

The bus subscriber only records (publish is synchronous); a task hands the
records to the area's durable write path about every `FLUSH_EVERY` seconds,
so they follow the collection's batched or streaming mode from there.  Ids
are derived from the event's content (uuid5), so a replayed event is not
stored twice.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from kfs.vectors.schema import CONTEXTS, Record, SchemaError, check_metadata

log = logging.getLogger("kfs.vectors.memory")

FLUSH_EVERY = 0.5
NAMESPACE = uuid.UUID("3b0f4f5e-7c61-4f0e-9a53-6b1b0f5f6a10")


def event_record(data: dict[str, Any]) -> dict[str, Any]:
    record = data.get("record")
    return record if isinstance(record, dict) else data


def to_record(rule: Any, source: dict[str, Any]) -> Record | None:
    text = source.get(rule.text_field)
    if not isinstance(text, str) or not text.strip():
        return None
    meta: dict[str, Any] = {}
    for key in ("agent_id", "timestamp", "tags"):
        if key in source:
            meta[key] = source[key]
    if source.get("context") in CONTEXTS:
        meta["context"] = source["context"]
    meta["source"] = rule.topic
    try:
        meta = check_metadata(meta)
    except SchemaError:
        meta = check_metadata({k: v for k, v in meta.items() if k in ("context", "source")})
    record_id = str(uuid.uuid5(NAMESPACE, json.dumps(source, sort_keys=True, default=str)))
    return Record(record_id, None, text, meta)


class MemorySync:
    def __init__(self, bus: Any, rules: list[Any],
                 accept: Callable[[str, list[Record]], Awaitable[Any]]) -> None:
        self.rules = rules
        self.accept = accept
        self.buffer: list[tuple[str, Record]] = []
        self.synced = 0
        self.unsubscribe = None
        if rules:
            topics = sorted({r.topic for r in rules})
            self.unsubscribe = bus.subscribe(self._on_event, topics)

    def _on_event(self, event: Any) -> None:
        source = event_record(event.data)
        for rule in self.rules:
            if rule.topic != event.topic:
                continue
            if all(str(source.get(k)) == str(v) for k, v in rule.match.items()):
                record = to_record(rule, source)
                if record is not None:
                    self.buffer.append((rule.collection, record))

    def start(self, nursery: trio.Nursery) -> None:
        if self.rules:
            nursery.start_soon(self._run)

    async def _run(self) -> None:
        while True:
            await trio.sleep(FLUSH_EVERY)
            try:
                await self.flush()
            except OSError as e:
                log.warning("memory sync: %s (retrying)", e)

    async def flush(self) -> None:
        while self.buffer:
            batch, self.buffer = self.buffer, []
            by_collection: dict[str, list[Record]] = {}
            for name, record in batch:
                by_collection.setdefault(name, []).append(record)
            for name, records in by_collection.items():
                try:
                    await self.accept(name, records)
                    self.synced += len(records)
                except OSError:
                    self.buffer = [(name, r) for r in records] + self.buffer
                    raise
