"""Milvus through pymilvus; embedded = Milvus Lite (``milvus-lite``, a ``.db`` in the store).

Milvus collection names allow only letters, digits and ``_``: kfs names are
stored as ``kfs_`` + the name with ``_``, ``.`` and ``-`` escaped as ``_5f``,
``_2e``, ``_2d`` (reversible).  A collection needs its dimension when it is
created, so one made by ``mkdir`` is created at its first upsert.  Fields:
``id`` (primary key), ``embedding``, ``payload`` (the metadata, JSON),
``document``.  Scores become Chroma's distances (1-cos, squared L2, 1-dot).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kfs.vectors.backends.base import BackendError, LockedBackend, StoredRecord

PREFIX = "kfs_"
_ESCAPES = {"_": "_5f", ".": "_2e", "-": "_2d"}
_METRICS = {"cosine": "COSINE", "l2": "L2", "ip": "IP"}


def milvus_name(name: str) -> str:
    return PREFIX + "".join(_ESCAPES.get(c, c) for c in name)


def kfs_name(stored: str) -> str | None:
    if not stored.startswith(PREFIX):
        return None
    out, rest = [], stored[len(PREFIX):]
    reverse = {v: k for k, v in _ESCAPES.items()}
    i = 0
    while i < len(rest):
        if rest[i] == "_":
            c = reverse.get(rest[i:i + 3])
            if c is None:
                return None
            out.append(c)
            i += 3
        else:
            out.append(rest[i])
            i += 1
    return "".join(out)


def _import_client() -> Any:
    """``import pymilvus`` without letting it reset the daemon's logging.

    pymilvus calls ``logging.config.dictConfig`` at import, which closes every
    existing handler: the daemon's log file descriptor would be closed under it
    (and its number reused by another file).  Applied incrementally, the same
    config only sets pymilvus's levels.
    """
    import logging.config

    original = logging.config.dictConfig

    def incremental(config: dict[str, Any]) -> None:
        original({"version": config.get("version", 1), "incremental": True,
                  "loggers": {name: {"level": v.get("level", "WARNING")}
                              for name, v in config.get("loggers", {}).items()}})

    logging.config.dictConfig = incremental  # type: ignore[assignment]
    try:
        from pymilvus import MilvusClient
    finally:
        logging.config.dictConfig = original
    return MilvusClient


class MilvusBackend(LockedBackend):
    name = "milvus"

    def __init__(self, config: Any, store_path: str) -> None:
        self.mode = config.mode
        self.uri = f"{store_path}/milvus.db" if config.mode == "embedded" else f"http://{config.host}:{config.port}"
        self.label = "milvus (embedded, Milvus Lite)" if config.mode == "embedded" else f"milvus ({self.uri})"
        super().__init__()
        self._distance: dict[str, str] = {}
        self._loaded: set[str] = set()

    def connect(self) -> None:
        with self._lock:
            if self._client is None:
                try:
                    MilvusClient = _import_client()
                    self._client = MilvusClient(self.uri)
                except ImportError as e:
                    raise BackendError(f"milvus: pymilvus/milvus-lite not installed ({e})") from None
                except Exception as e:
                    raise BackendError(f"milvus: cannot connect to {self.uri}: {e}") from e

    def _forget(self) -> None:
        self._loaded.clear()

    def _exists(self, name: str) -> bool:
        """Whether the collection exists, loaded for queries (a reopened database has them released)."""
        if name in self._loaded:
            return True
        if not self._client.has_collection(milvus_name(name)):
            return False
        self._client.load_collection(milvus_name(name))
        self._loaded.add(name)
        return True

    def list_collections(self) -> list[str]:
        names = self._call(lambda: self._client.list_collections())
        return sorted(n for n in (kfs_name(s) for s in names) if n)

    def ensure_collection(self, name: str, distance: str, dimension: int | None) -> None:
        def run() -> None:
            self._distance[name] = distance
            if dimension is not None and not self._exists(name):
                self._create(name, dimension)

        self._call(run)

    def _create(self, name: str, dimension: int) -> None:
        from pymilvus import DataType  # already imported by connect()

        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dimension)
        schema.add_field("payload", DataType.JSON)
        schema.add_field("document", DataType.VARCHAR, max_length=65535, nullable=True)
        index = self._client.prepare_index_params()
        index.add_index("embedding", index_type="FLAT", metric_type=_METRICS[self._distance.get(name, "cosine")])
        self._client.create_collection(milvus_name(name), schema=schema, index_params=index)
        self._loaded.add(name)

    def drop_collection(self, name: str) -> None:
        def run() -> None:
            if self._exists(name):
                self._client.drop_collection(milvus_name(name))
            self._loaded.discard(name)

        self._call(run)

    def upsert(self, name: str, ids: Sequence[str], embeddings: Sequence[Sequence[float]],
               metadatas: Sequence[dict[str, Any]], documents: Sequence[str | None]) -> None:
        def run() -> None:
            if not self._exists(name):
                self._create(name, len(embeddings[0]))
            rows = [{"id": ids[i], "embedding": [float(x) for x in embeddings[i]], "payload": metadatas[i],
                     "document": documents[i]} for i in range(len(ids))]
            self._client.upsert(milvus_name(name), rows)

        self._call(run)

    def delete(self, name: str, ids: Sequence[str]) -> None:
        def run() -> None:
            if self._exists(name):
                self._client.delete(milvus_name(name), ids=list(ids))

        self._call(run)

    def count(self, name: str) -> int:
        def run() -> int:
            if not self._exists(name):
                return 0
            got = self._client.query(milvus_name(name), filter="", output_fields=["count(*)"])
            return int(got[0]["count(*)"])

        return int(self._call(run))

    def page(self, name: str, cursor: Any, limit: int) -> tuple[list[StoredRecord], Any]:
        """``cursor``: pymilvus's query iterator (offset paging stops at 16,384 records)."""

        def run() -> tuple[list[StoredRecord], Any]:
            it = cursor
            if it is None:
                if not self._exists(name):
                    return [], None
                it = self._client.query_iterator(milvus_name(name), batch_size=limit, filter="",
                                                 output_fields=["id", "embedding", "payload", "document"])
            rows = it.next()
            if not rows:
                it.close()
                return [], None
            out = [StoredRecord(r["id"], r["embedding"], dict(r.get("payload") or {}), r.get("document"))
                   for r in rows]
            if len(rows) < limit:
                it.close()
                return out, None
            return out, it

        return self._call(run)  # type: ignore[no-any-return]

    def query(self, name: str, embedding: Sequence[float], k: int) -> list[StoredRecord]:
        def run() -> list[StoredRecord]:
            if not self._exists(name):
                return []
            got = self._client.search(milvus_name(name), data=[[float(x) for x in embedding]], limit=k,
                                      output_fields=["payload", "document"])
            metric = self._distance.get(name, "cosine")
            out = []
            for hit in got[0]:
                entity = hit.get("entity") or {}
                score = float(hit["distance"])
                distance = score if metric == "l2" else 1.0 - score
                out.append(StoredRecord(str(hit["id"]), None, dict(entity.get("payload") or {}),
                                        entity.get("document"), distance))
            return out

        return self._call(run)  # type: ignore[no-any-return]
