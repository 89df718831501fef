"""Chroma, embedded (PersistentClient in the store) or a server (``chroma run``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kfs.vectors.backends.base import (
    BackendError,
    LockedBackend,
    StoredRecord,
    flatten_metadata,
    unflatten_metadata,
)


class ChromaBackend(LockedBackend):
    name = "chroma"

    def __init__(self, config: Any, store_path: str) -> None:
        self.mode = config.mode
        self.host = config.host
        self.port = config.port
        self.path = store_path
        super().__init__()  # one call at a time: Chroma's embedded client is not documented as thread-safe
        self._collections: dict[str, Any] = {}

    @property
    def label(self) -> str:
        return "chroma (embedded)" if self.mode == "embedded" else f"chroma (server {self.host}:{self.port})"

    def connect(self) -> None:
        with self._lock:
            if self._client is not None:
                return
            try:
                import chromadb
                from chromadb.config import Settings

                settings = Settings(anonymized_telemetry=False)
                if self.mode == "embedded":
                    self._client = chromadb.PersistentClient(path=self.path, settings=settings)
                else:
                    self._client = chromadb.HttpClient(host=self.host, port=self.port, settings=settings)
            except Exception as e:  # server down, bad path: the caller retries
                raise BackendError(f"chroma: cannot connect: {e}") from e

    def _failed(self) -> None:
        # A restarted server forgets nothing, but our collection handles may be stale.
        self._collections.clear()

    def _collection(self, name: str) -> Any:
        col = self._collections.get(name)
        if col is None:
            col = self._client.get_collection(name, embedding_function=None)
            self._collections[name] = col
        return col

    def close(self) -> None:
        self._collections.clear()
        self._client = None

    def list_collections(self) -> list[str]:
        def run() -> list[str]:
            return sorted(c if isinstance(c, str) else c.name for c in self._client.list_collections())

        return self._call(run)

    def ensure_collection(self, name: str, distance: str, dimension: int | None) -> None:
        def run() -> None:
            self._collections[name] = self._client.get_or_create_collection(
                name, metadata={"hnsw:space": distance}, embedding_function=None
            )

        self._call(run)

    def drop_collection(self, name: str) -> None:
        def run() -> None:
            self._collections.pop(name, None)
            try:
                self._client.delete_collection(name)
            except Exception as e:
                if "does not exist" not in str(e) and "NotFound" not in type(e).__name__:
                    raise

        self._call(run)

    def upsert(self, name: str, ids: Sequence[str], embeddings: Sequence[Sequence[float]],
               metadatas: Sequence[dict[str, Any]], documents: Sequence[str | None]) -> None:
        flat = [flatten_metadata(m) for m in metadatas]

        def run() -> None:
            self._collection(name).upsert(
                # One 2-D float32 array: Chroma validates it faster than a list of lists.
                ids=list(ids), embeddings=np.asarray(np.stack([np.asarray(e) for e in embeddings]), dtype=np.float32),
                metadatas=flat, documents=list(documents),
            )

        self._call(run)

    def delete(self, name: str, ids: Sequence[str]) -> None:
        self._call(lambda: self._collection(name).delete(ids=list(ids)))

    def count(self, name: str) -> int:
        return int(self._call(lambda: self._collection(name).count()))

    def page(self, name: str, cursor: Any, limit: int) -> tuple[list[StoredRecord], Any]:
        offset = int(cursor or 0)
        got = self._call(lambda: self._collection(name).get(
            limit=limit, offset=offset, include=["embeddings", "metadatas", "documents"]))
        embeddings = got.get("embeddings")
        out = []
        for i, record_id in enumerate(got["ids"]):
            emb = None if embeddings is None else embeddings[i]  # numpy float32 row
            out.append(StoredRecord(record_id, emb, unflatten_metadata((got.get("metadatas") or [None])[i]),
                                    (got.get("documents") or [None] * (i + 1))[i]))
        return out, (offset + len(out) if len(out) == limit else None)

    def query(self, name: str, embedding: Sequence[float], k: int) -> list[StoredRecord]:
        def run() -> Any:
            # n_results above the collection's size is fine: Chroma returns what it has.
            return self._collection(name).query(query_embeddings=[list(embedding)], n_results=k,
                                                include=["metadatas", "documents", "distances"])

        got = self._call(run)
        out = []
        metas = (got.get("metadatas") or [[]])[0]
        docs = (got.get("documents") or [[]])[0]
        for i, record_id in enumerate(got["ids"][0]):
            out.append(StoredRecord(record_id, None, unflatten_metadata(metas[i] if metas else None),
                                    docs[i] if docs else None, float(got["distances"][0][i])))
        return out
