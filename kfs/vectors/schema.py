"""The record schema of vectors/C/records.jsonl, and collection names.

A line is either an upsert::

    {"id": UUID?, "embedding": [floats]?, "text": str?, "metadata": {...}?}

(``embedding`` or ``text`` required; ``document`` is accepted for ``text``),
or a delete: ``{"id": UUID, "delete": true}``.  ``metadata`` keeps any extra
key; the known ones are checked: ``agent_id`` UUID, ``timestamp`` RFC3339
(added, UTC, when missing), ``context`` chat|workflow|doc, ``tags`` list of
strings.  Anything else raises `SchemaError`, whose text is what the user sees.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import orjson

CONTEXTS = ("chat", "workflow", "doc")
#: metadata keys starting with this are kfs's own inside a backend.
RESERVED_PREFIX = "_kfs"

# Chroma: 3-512 chars of [A-Za-z0-9._-], alphanumeric at both ends, no "..", not an IPv4
# address.  Qdrant refuses path-like and some punctuation; Milvus wants [A-Za-z0-9_] and a
# letter or "_" first.  63 characters keeps every backend's limit.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)
_TOP_KEYS = {"id", "embedding", "text", "document", "metadata", "delete"}


class SchemaError(ValueError):
    """A record or name that kfs refuses (EINVAL); the message says why."""


def check_collection_name(name: str) -> None:
    if not _NAME.match(name):
        raise SchemaError(
            f"bad collection name {name!r}: 3-63 characters of letters, digits, '.', '_', '-', "
            "starting and ending with a letter or digit"
        )
    if ".." in name:
        raise SchemaError(f"bad collection name {name!r}: no '..'")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return
    raise SchemaError(f"bad collection name {name!r}: cannot be an IPv4 address")


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Record:
    """One validated operation on a collection."""

    id: str
    embedding: Any = None  # numpy float64 vector
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    delete: bool = False

    def to_json(self) -> dict[str, Any]:
        if self.delete:
            return {"id": self.id, "delete": True}
        out: dict[str, Any] = {"id": self.id}
        if self.embedding is not None:
            out["embedding"] = self.embedding
        if self.text is not None:
            out["text"] = self.text
        out["metadata"] = self.metadata
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Record:
        """A record kfs wrote itself (queue, snapshot): trusted, not re-validated."""
        embedding = obj.get("embedding")
        return cls(obj["id"], None if embedding is None else as_vector(embedding), obj.get("text"),
                   obj.get("metadata") or {}, bool(obj.get("delete")))


def _uuid(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"{what} must be a UUID string, got {json.dumps(value)[:40]}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise SchemaError(f"{what} must be a UUID, got {value[:60]!r}") from None


def _timestamp(value: Any) -> str:
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise SchemaError(f"metadata.timestamp must be RFC3339 (2025-06-21T20:55:00Z), got {str(value)[:40]!r}")
    try:
        datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise SchemaError(f"metadata.timestamp is not a real date: {value!r}") from None
    return value


def check_metadata(meta: Any) -> dict[str, Any]:
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise SchemaError("metadata must be a JSON object")
    meta = dict(meta)
    for key in meta:
        if key.startswith(RESERVED_PREFIX):
            raise SchemaError(f"metadata key {key!r} is reserved (prefix {RESERVED_PREFIX})")
    if "agent_id" in meta:
        meta["agent_id"] = _uuid(meta["agent_id"], "metadata.agent_id")
    if "timestamp" in meta:
        _timestamp(meta["timestamp"])
    else:
        meta["timestamp"] = now_rfc3339()
    if "context" in meta and meta["context"] not in CONTEXTS:
        raise SchemaError(f"metadata.context must be one of {'|'.join(CONTEXTS)}, got {meta['context']!r}")
    if "tags" in meta:
        tags = meta["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise SchemaError("metadata.tags must be a list of strings")
    return meta


def check_embedding(value: Any, dimension: int | None) -> Any:
    if not isinstance(value, list) or not value:
        raise SchemaError("embedding must be a non-empty list of numbers")
    if dimension is not None and len(value) != dimension:
        raise SchemaError(f"embedding has {len(value)} dimensions, the collection has {dimension}")
    # Set-of-types and sum() run in C: ~20x faster than a Python loop over 384 floats.
    if not set(map(type, value)) <= {float, int}:
        bad = next(x for x in value if type(x) not in (float, int))
        raise SchemaError(f"embedding must hold numbers only, got {json.dumps(bad)[:40]}")
    if not math.isfinite(sum(value)) and not all(math.isfinite(x) for x in value):
        raise SchemaError("embedding must hold finite numbers (no NaN or Infinity)")
    return as_vector(value)


def as_vector(value: Any) -> Any:
    """A float64 numpy array: 8 bytes a number instead of ~32 in a list (queued records stay in memory)."""
    return np.asarray(value, dtype=np.float64)


def parse_record(line: bytes | str, dimension: int | None, text_dimension: int | None) -> Record:
    """Validate one JSON line.  ``dimension``: the collection's (None = not fixed yet);
    ``text_dimension``: what the embedder produces (None = unknown until it runs)."""
    try:
        obj = orjson.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise SchemaError(f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SchemaError("a record must be a JSON object")
    unknown = set(obj) - _TOP_KEYS
    if unknown:
        raise SchemaError(f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_TOP_KEYS))})")
    if "delete" in obj:
        if obj["delete"] is not True:
            raise SchemaError('"delete" must be true')
        if set(obj) != {"id", "delete"}:
            raise SchemaError('a delete is {"id": ..., "delete": true} and nothing else')
        return Record(_uuid(obj["id"], "id"), delete=True)
    record_id = _uuid(obj["id"], "id") if "id" in obj else str(uuid.uuid4())
    text = obj.get("text", obj.get("document"))
    if "text" in obj and "document" in obj:
        raise SchemaError("give text or document, not both")
    if text is not None and not isinstance(text, str):
        raise SchemaError("text must be a string")
    embedding = None
    if "embedding" in obj:
        embedding = check_embedding(obj["embedding"], dimension)
    elif text is None or not text.strip():
        raise SchemaError("a record needs an embedding or a non-empty text")
    elif dimension is not None and text_dimension is not None and text_dimension != dimension:
        raise SchemaError(
            f"text would be embedded with {text_dimension} dimensions, the collection has {dimension}"
        )
    return Record(record_id, embedding, text, check_metadata(obj.get("metadata")))
