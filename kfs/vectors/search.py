"""Queries (``search/<text>``) and exports (reading ``records.jsonl``).

Both are read-your-writes: the backend's answer is merged with the queued
operations that the backend has not seen yet (the collection's overlay): a
queued delete hides a record, a queued upsert replaces or adds one.
Blocking (backend, embedder): run in a worker thread.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from kfs.vectors.backends.base import Backend, StoredRecord
from kfs.vectors.embedder import Embedder
from kfs.vectors.schema import Record, SchemaError, check_embedding

EXPORT_PAGE = 500
_K_PREFIX = re.compile(r"^k=(\d{1,4}) (.*)$", re.DOTALL)
MAX_K = 1000


@dataclass
class Query:
    k: int
    text: str | None = None
    vector: list[float] | None = None


def parse_query(name: str, default_k: int) -> Query:
    """``[k=N ]text`` or ``[k=N ][x, y, ...]`` (a JSON vector)."""
    k = default_k
    if m := _K_PREFIX.match(name):
        k = int(m.group(1))
        name = m.group(2)
    if not 1 <= k <= MAX_K:
        raise SchemaError(f"k must be 1..{MAX_K}")
    if not name.strip():
        raise SchemaError("empty query")
    if name.startswith("[") and name.endswith("]"):
        try:
            value = json.loads(name)
        except ValueError:
            value = None
        if isinstance(value, list):
            return Query(k, vector=check_embedding(value, None))
    return Query(k, text=name)


def distances(metric: str, query: Any, matrix: Any) -> Any:
    """The same numbers the backend reports (Chroma: 1-cos, squared L2, 1-dot), one per row."""
    q = np.asarray(query, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64).reshape(-1, q.shape[0])
    if metric == "cosine":
        norms = np.linalg.norm(m, axis=1) * np.linalg.norm(q)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where(norms > 0, (m @ q) / norms, 0.0)
        return 1.0 - cos
    if metric == "l2":
        return ((m - q) ** 2).sum(axis=1)
    return 1.0 - m @ q


def distance(metric: str, a: Sequence[float], b: Sequence[float]) -> float:
    return float(distances(metric, a, [b])[0])


def embed_missing(records: list[Record], embedder: Embedder) -> None:
    """Give text-only records their embedding (cached on the record: the sync agent reuses it)."""
    todo = [r for r in records if r.embedding is None and not r.delete and r.text]
    if todo:
        for record, vector in zip(todo, embedder.embed([r.text or "" for r in todo]), strict=True):
            record.embedding = vector


def result_line(r: StoredRecord) -> bytes:
    out: dict[str, Any] = {"id": r.id, "distance": round(r.distance or 0.0, 6), "metadata": r.metadata}
    if r.document is not None:
        out["document"] = r.document
    return orjson.dumps(out) + b"\n"


def run_query(backend: Backend, embedder: Embedder, name: str, metric: str, dimension: int | None,
              overlay: dict[str, Record], query: Query) -> list[StoredRecord]:
    vector = query.vector
    if vector is None:
        vector = embedder.embed([query.text or ""])[0]
    if dimension is not None and len(vector) != dimension:
        raise SchemaError(f"the query has {len(vector)} dimensions, the collection has {dimension}")
    pending = [r for r in overlay.values() if not r.delete]
    embed_missing(pending, embedder)
    found = backend.query(name, vector, backend_k(query, overlay)) if dimension is not None else []
    return merge(metric, vector, found, overlay, query.k)


def backend_k(query: Query, overlay: dict[str, Record]) -> int:
    """Ask for more than k: queued deletes and updates may hide some of the backend's answers."""
    return query.k + len(overlay)


def merge(metric: str, vector: Sequence[float], found: list[StoredRecord], overlay: dict[str, Record],
          k: int) -> list[StoredRecord]:
    """The backend's nearest records with the queued ones ranked in (read-your-writes): a queued
    delete or update hides the backend's copy; queued upserts are scored here."""
    results = [r for r in found if r.id not in overlay]
    pending = [r for r in overlay.values()
               if not r.delete and r.embedding is not None and len(r.embedding) == len(vector)]
    if pending:
        scores = distances(metric, vector, np.stack([np.asarray(r.embedding, dtype=np.float64) for r in pending]))
        for r, score in zip(pending, scores, strict=True):
            results.append(StoredRecord(r.id, None, r.metadata, r.text, float(score)))
    results.sort(key=lambda r: r.distance or 0.0)
    return results[:k]


def export_line(record_id: str, embedding: Sequence[float] | None, metadata: dict[str, Any],
                text: str | None) -> bytes:
    out: dict[str, Any] = {"id": record_id}
    if embedding is not None:
        out["embedding"] = embedding  # a float32 numpy row prints as 0.1, not 0.10000000149011612
    if text is not None:
        out["text"] = text
    out["metadata"] = metadata
    return orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def export_chunks(backend: Backend, name: str, overlay: dict[str, Record], in_backend: bool,
                  keep: Callable[[dict[str, Any]], bool] | None = None) -> Iterator[bytes]:
    """The collection as JSON Lines, one page of the backend at a time (bounded memory).

    ``keep`` (given a record's metadata) selects records, page by page (agent snapshots).
    """
    def wanted(metadata: dict[str, Any]) -> bool:
        return keep is None or keep(metadata)

    cursor: Any = None
    while in_backend:
        page, cursor = backend.page(name, cursor, EXPORT_PAGE)
        yield b"".join(export_line(r.id, r.embedding, r.metadata, r.document) for r in page
                       if r.id not in overlay and wanted(r.metadata))
        if cursor is None:
            break
    yield b"".join(
        export_line(r.id, r.embedding, r.metadata, r.text) for r in overlay.values()
        if not r.delete and wanted(r.metadata)
    )


def of_agent(agent: str) -> Callable[[dict[str, Any]], bool]:
    """A ``keep`` for `export_chunks`: records whose ``metadata.agent_id`` (or ``agent``) is ``agent``.

    ``agent_id`` is stored as a canonical UUID (schema.py), so ``agent`` given in another
    spelling of the same UUID (capitals, no hyphens) matches it too.
    """
    try:
        canonical = str(uuid.UUID(agent))
    except ValueError:
        canonical = agent

    def keep(metadata: dict[str, Any]) -> bool:
        return any(_same_id(metadata.get(key), agent) or _same_id(metadata.get(key), canonical)
                   for key in ("agent_id", "agent"))

    return keep


def _same_id(value: Any, agent: str) -> bool:
    if isinstance(value, str):
        return value == agent
    # an id stored as a JSON number still names the agent
    return isinstance(value, int) and not isinstance(value, bool) and str(value) == agent
