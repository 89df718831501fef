"""Qdrant, embedded: qdrant-edge-py (Qdrant's own engine in-process), one shard per collection.

(The server mode, on qdrant-client, is `qdrant_server`; the record mapping below is shared.)

Shards live in the store's ``vectors/.qdrant/<collection>/``.  A shard needs its
dimension when it is created, so a collection made by ``mkdir`` gets its shard
at the first upsert.  Payload = the record's metadata, plus ``_kfs_doc`` for the
text; scores are turned into Chroma's distances (1-cos, squared L2, 1-dot) so
that ranking with the queued records is the same whatever the backend.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from typing import Any

from kfs.vectors.backends.base import BackendError, LockedBackend, StoredRecord
from kfs.vectors.schema import RESERVED_PREFIX

DOC_KEY = RESERVED_PREFIX + "_doc"
NORM_KEY = RESERVED_PREFIX + "_norm"  # Qdrant normalises cosine vectors: keep the length to export them as given


def point_fields(metadata: dict[str, Any], document: str | None, embedding: Sequence[float],
                 cosine: bool) -> tuple[list[float], dict[str, Any]]:
    """A record as Qdrant's (vector, payload): the metadata, whole, is the payload (Qdrant keeps any
    JSON and filters on it), plus the text and, for cosine, the vector's length.  Ids are kfs's
    canonical UUIDs, which Qdrant takes as they are."""
    payload = dict(metadata)
    if document is not None:
        payload[DOC_KEY] = document
    vector = [float(x) for x in embedding]
    if cosine:
        payload[NORM_KEY] = math.sqrt(sum(x * x for x in vector))
    return vector, payload


def stored_record(point: Any, with_vector: bool) -> StoredRecord:
    """A Qdrant point (edge or client: both have id, payload, vector) as a `StoredRecord`."""
    payload = dict(point.payload or {})
    document = payload.pop(DOC_KEY, None)
    norm = payload.pop(NORM_KEY, None)
    vector = point.vector if with_vector else None
    if vector is not None and norm is not None:
        vector = [x * norm for x in vector]
    return StoredRecord(str(point.id), vector, payload, document)


def score_distance(metric: str, score: float) -> float:
    """Qdrant's score as Chroma's distance (1-cos, squared L2, 1-dot): the same numbers whatever
    the backend, so the backend's answers rank right beside queued records."""
    return score * score if metric == "l2" else 1.0 - score


def scored_records(points: Sequence[Any], metric: str) -> list[StoredRecord]:
    """Query hits as records, each with its score turned into kfs's distance."""
    out = []
    for point in points:
        record = stored_record(point, False)
        record.distance = score_distance(metric, float(point.score))
        out.append(record)
    return out


class QdrantBackend(LockedBackend):
    """What both Qdrant backends (qdrant-edge here, qdrant-client in `qdrant_server`) share: reads
    of a collection that may not exist yet (made by mkdir, created at its first upsert), as records."""

    name = "qdrant"

    def _count(self, name: str) -> int | None:
        """Points in ``name``; None if it does not exist yet."""
        raise NotImplementedError

    def _scroll(self, name: str, cursor: Any, limit: int) -> tuple[Sequence[Any], Any] | None:
        """Up to ``limit`` points with vectors from ``cursor``, and the next cursor; None: no collection."""
        raise NotImplementedError

    def _nearest(self, name: str, vector: list[float], k: int) -> tuple[Sequence[Any], str] | None:
        """The ``k`` nearest points and the collection's distance; None: no collection."""
        raise NotImplementedError

    def count(self, name: str) -> int:
        return int(self._call(lambda: self._count(name) or 0))

    def page(self, name: str, cursor: Any, limit: int) -> tuple[list[StoredRecord], Any]:
        def run() -> tuple[list[StoredRecord], Any]:
            got = self._scroll(name, cursor, limit)
            if got is None:
                return [], None
            points, nxt = got
            return [stored_record(p, True) for p in points], nxt

        return self._call(run)  # type: ignore[no-any-return]

    def query(self, name: str, embedding: Sequence[float], k: int) -> list[StoredRecord]:
        def run() -> list[StoredRecord]:
            got = self._nearest(name, [float(x) for x in embedding], k)
            return [] if got is None else scored_records(*got)

        return self._call(run)  # type: ignore[no-any-return]


class QdrantEdgeBackend(QdrantBackend):
    label = "qdrant (embedded, qdrant-edge)"

    def __init__(self, config: Any, store_path: str) -> None:
        super().__init__()
        self.path = store_path
        self._shards: dict[str, Any] = {}
        self._distance: dict[str, str] = {}
        self._q: Any = None

    def connect(self) -> None:
        with self._lock:
            if self._q is None:
                try:
                    import qdrant_edge
                except ImportError as e:
                    raise BackendError(f"qdrant: qdrant-edge-py is not installed ({e})") from None
                self._q = qdrant_edge

    def _dir(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _shard(self, name: str) -> Any:
        """The open shard, loading it from disk; None if it has no data yet."""
        shard = self._shards.get(name)
        if shard is None and os.path.isdir(self._dir(name)) and os.listdir(self._dir(name)):
            shard = self._q.EdgeShard.load(self._dir(name))
            self._shards[name] = shard
        return shard

    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                try:
                    shard.flush()
                    shard.close()
                except Exception:
                    pass
            self._shards.clear()

    def list_collections(self) -> list[str]:
        if not os.path.isdir(self.path):
            return []
        return sorted(n for n in os.listdir(self.path) if not n.startswith(".") and os.path.isdir(self._dir(n)))

    def _metric(self, distance: str) -> Any:
        d = self._q.Distance
        return {"cosine": d.Cosine, "l2": d.Euclid, "ip": d.Dot}[distance]

    def ensure_collection(self, name: str, distance: str, dimension: int | None) -> None:
        def run() -> None:
            self._distance[name] = distance
            os.makedirs(self._dir(name), exist_ok=True)
            if dimension is not None and self._shard(name) is None:
                self._create(name, dimension)

        self._call(run)

    def _create(self, name: str, dimension: int) -> Any:
        q = self._q
        config = q.EdgeConfig(vectors=q.EdgeVectorParams(size=dimension, distance=self._metric(
            self._distance.get(name, "cosine"))))
        shard = q.EdgeShard.create(self._dir(name), config)
        self._shards[name] = shard
        return shard

    def drop_collection(self, name: str) -> None:
        def run() -> None:
            shard = self._shards.pop(name, None)
            if shard is not None:
                shard.close()
            shutil.rmtree(self._dir(name), ignore_errors=True)

        self._call(run)

    def upsert(self, name: str, ids: Sequence[str], embeddings: Sequence[Sequence[float]],
               metadatas: Sequence[dict[str, Any]], documents: Sequence[str | None]) -> None:
        def run() -> None:
            q = self._q
            shard = self._shard(name) or self._create(name, len(embeddings[0]))
            cosine = self._distance.get(name, "cosine") == "cosine"
            points = []
            for i, record_id in enumerate(ids):
                vector, payload = point_fields(metadatas[i], documents[i], embeddings[i], cosine)
                points.append(q.Point(record_id, vector, payload))
            shard.update(q.UpdateOperation.upsert_points(points))

        self._call(run)

    def delete(self, name: str, ids: Sequence[str]) -> None:
        def run() -> None:
            shard = self._shard(name)
            if shard is not None:
                shard.update(self._q.UpdateOperation.delete_points(list(ids)))

        self._call(run)

    def _count(self, name: str) -> int | None:
        shard = self._shard(name)
        return None if shard is None else int(shard.count(self._q.CountRequest()))

    def _scroll(self, name: str, cursor: Any, limit: int) -> tuple[Sequence[Any], Any] | None:
        shard = self._shard(name)
        if shard is None:
            return None
        return shard.scroll(self._q.ScrollRequest(offset=cursor, limit=limit, with_payload=True,  # type: ignore[no-any-return]
                                                  with_vector=True))

    def _nearest(self, name: str, vector: list[float], k: int) -> tuple[Sequence[Any], str] | None:
        shard = self._shard(name)
        if shard is None:
            return None
        q = self._q
        found = shard.query(q.QueryRequest(limit=k, query=q.Query.Nearest(vector), with_payload=True))
        return found, self._distance.get(name, "cosine")
