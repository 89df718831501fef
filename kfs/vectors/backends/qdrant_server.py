"""Qdrant through qdrant-client: a Qdrant server (``mode: server``), or qdrant-client's local mode.

``mode: server`` connects to ``host``/``port`` (REST; ``https``, and ``api_key`` read from the
vault or elsewhere, see `kfs.vectors.secrets`).  ``mode: local`` runs qdrant-client's
in-process implementation of the same client API (``QdrantClient(path=...)`` in the store's
``vectors/.qdrant/``): pure Python and slow (a SQLite commit per point), for small sets and for
testing the server code path here, where no Qdrant server can be installed.  Local mode commits
each point to SQLite on its own; kfs switches those SQLite files to WAL with synchronous=NORMAL
(about 20x faster here): a commit survives a crash of kfs (kill -9), and like a Qdrant server's
own write-ahead log (not fsynced per write by default) the last writes may not survive a power
loss of the machine.

Records map to points exactly as in the embedded (qdrant-edge) backend (`qdrant.point_fields`,
`qdrant.stored_record`, `qdrant.scored_records`).  A collection needs its dimension when it is
created, so one made by ``mkdir`` is created at its first upsert.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

from kfs.vectors.backends.base import BackendError
from kfs.vectors.backends.qdrant import QdrantBackend, point_fields
from kfs.vectors.secrets import SecretReader, SecretRef, SecretUnavailable

log = logging.getLogger("kfs.vectors.qdrant")

#: seconds a server call may take before it fails (the sync agent retries; reads answer EIO)
TIMEOUT = 10
_METRICS = {"cosine": "Cosine", "l2": "Euclid", "ip": "Dot"}


class QdrantClientBackend(QdrantBackend):
    def __init__(self, config: Any, store_path: str, secrets: SecretReader | None = None) -> None:
        self.mode = config.mode
        self.host = config.host
        self.port = config.port
        self.https = bool(getattr(config, "https", False))
        api_key = getattr(config, "api_key", None)
        self.api_key_ref = SecretRef.parse(api_key) if api_key else None
        self.secrets = secrets or SecretReader(None)
        self.path = store_path
        super().__init__()  # one call at a time: qdrant-client's local mode is not thread-safe
        self._models: Any = None
        #: collection -> distance ("cosine", "l2", "ip"), as the collection was created with
        self._metric: dict[str, str] = {}
        self._wanted: dict[str, str] = {}  # ensure_collection's distance, for the first upsert

    @property
    def label(self) -> str:
        if self.mode == "local":
            return "qdrant-client (local mode)"
        return f"qdrant-client (server {'https' if self.https else 'http'}://{self.host}:{self.port})"

    def connect(self) -> None:
        with self._lock:
            if self._client is not None:
                return
            try:
                from qdrant_client import QdrantClient, models
            except ImportError as e:
                raise BackendError(f"qdrant: qdrant-client is not installed ({e})") from None
            try:
                if self.mode == "local":
                    self._client = QdrantClient(path=self.path)
                    for name in list(getattr(self._client._client, "collections", {})):
                        self._tune_local(name)
                else:
                    api_key = self.secrets.read(self.api_key_ref) if self.api_key_ref else None
                    if api_key and not self.https:
                        log.warning("qdrant: the api_key goes to %s:%s over plain http (https: false)",
                                    self.host, self.port)
                    with warnings.catch_warnings():  # said once above, in kfs's log
                        warnings.simplefilter("ignore", UserWarning)
                        self._client = QdrantClient(host=self.host, port=self.port, https=self.https,
                                                    api_key=api_key, timeout=TIMEOUT, check_compatibility=False)
            except SecretUnavailable as e:
                raise BackendError(f"qdrant: api_key {e}") from None
            except Exception as e:
                raise BackendError(f"qdrant: cannot connect: {type(e).__name__}: {e}") from e
            self._models = models

    def _forget(self) -> None:
        self._metric.clear()

    def _failed(self) -> None:
        self._forget()  # a restarted or shared server: ask again

    def _distance_of(self, name: str) -> str | None:
        """The collection's distance (None: it does not exist yet)."""
        metric = self._metric.get(name)
        if metric is None:
            if not self._client.collection_exists(name):
                return None
            params = self._client.get_collection(name).config.params.vectors
            by_value = {v: k for k, v in _METRICS.items()}
            metric = by_value.get(getattr(params.distance, "value", str(params.distance)), "cosine")
            self._metric[name] = metric
        return metric

    def _create(self, name: str, dimension: int) -> str:
        distance = self._wanted.get(name, "cosine")
        m = self._models
        self._client.create_collection(name, vectors_config=m.VectorParams(
            size=dimension, distance=m.Distance(_METRICS[distance])))
        self._metric[name] = distance
        self._tune_local(name)
        return distance

    def _tune_local(self, name: str) -> None:
        """Local mode: the collection's SQLite file in WAL, synchronous=NORMAL (see the module doc).
        Reaches into qdrant-client's local implementation; when that has changed, stays as it is."""
        if self.mode != "local":
            return
        try:
            connection = self._client._client.collections[name].storage.storage
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
        except Exception:  # another qdrant-client version: slower, not wrong
            pass

    def list_collections(self) -> list[str]:
        return self._call(lambda: sorted(c.name for c in self._client.get_collections().collections))

    def ensure_collection(self, name: str, distance: str, dimension: int | None) -> None:
        def run() -> None:
            self._wanted[name] = distance
            if dimension is not None and self._distance_of(name) is None:
                self._create(name, dimension)

        self._call(run)

    def drop_collection(self, name: str) -> None:
        def run() -> None:
            self._metric.pop(name, None)
            self._client.delete_collection(name)  # False, not an error, when it is not there

        self._call(run)

    def upsert(self, name: str, ids: Sequence[str], embeddings: Sequence[Sequence[float]],
               metadatas: Sequence[dict[str, Any]], documents: Sequence[str | None]) -> None:
        def run() -> None:
            metric = self._distance_of(name) or self._create(name, len(embeddings[0]))
            vectors, payloads = [], []
            for i in range(len(ids)):
                vector, payload = point_fields(metadatas[i], documents[i], embeddings[i], metric == "cosine")
                vectors.append(vector)
                payloads.append(payload)
            # wait=True: acknowledged means applied, so the sync agent may move its checkpoint
            self._client.upsert(name, points=self._models.Batch(ids=list(ids), vectors=vectors, payloads=payloads),
                                wait=True)

        self._call(run)

    def delete(self, name: str, ids: Sequence[str]) -> None:
        def run() -> None:
            if self._distance_of(name) is not None:
                self._client.delete(name, points_selector=self._models.PointIdsList(points=list(ids)), wait=True)

        self._call(run)

    def _count(self, name: str) -> int | None:
        if self._distance_of(name) is None:
            return None
        return int(self._client.count(name, exact=True).count)

    def _scroll(self, name: str, cursor: Any, limit: int) -> tuple[Sequence[Any], Any] | None:
        if self._distance_of(name) is None:
            return None
        return self._client.scroll(name, limit=limit, offset=cursor, with_payload=True,  # type: ignore[no-any-return]
                                   with_vectors=True)

    def _nearest(self, name: str, vector: list[float], k: int) -> tuple[Sequence[Any], str] | None:
        metric = self._distance_of(name)
        if metric is None:
            return None
        return self._client.query_points(name, query=vector, limit=k, with_payload=True).points, metric
