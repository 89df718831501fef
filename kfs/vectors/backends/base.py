"""The interface every vector backend implements.

Methods are blocking (they talk to a database): the area calls them through
``trio.to_thread``.  Records cross this boundary as `StoredRecord`; metadata is
the user's, whole: backends keep it losslessly however they store it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kfs.vectors.schema import RESERVED_PREFIX

META_KEY = RESERVED_PREFIX + "_meta"


class BackendError(Exception):
    """The backend failed or cannot be reached; the sync agent retries later."""


@dataclass
class StoredRecord:
    id: str
    embedding: Any  # a sequence of floats (a numpy row from Chroma)
    metadata: dict[str, Any]
    document: str | None = None
    distance: float | None = None


INT64 = range(-(1 << 63), 1 << 63)


def flatten_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Scalar keys stay filterable; when that is not the whole object (lists, objects, nulls,
    integers beyond 64 bits), the whole object rides along as JSON too (lossless).

    Scalar-only metadata is stored once: the JSON copy would double what Chroma indexes
    (measured: ~25% of its upsert rate for a 3-key record)."""
    flat: dict[str, Any] = {
        k: v for k, v in metadata.items()
        if isinstance(v, str | float | bool) or (isinstance(v, int) and v in INT64)
    }
    if not flat or len(flat) != len(metadata):
        flat[META_KEY] = json.dumps(metadata, separators=(",", ":"))
    return flat


def unflatten_metadata(flat: dict[str, Any] | None) -> dict[str, Any]:
    if not flat:
        return {}
    if META_KEY in flat:
        return json.loads(flat[META_KEY])
    return dict(flat)  # written by someone else than kfs


class Backend:
    """A vector database.  ``distance`` is "cosine", "l2" or "ip" (fixed per collection)."""

    name = "base"

    def connect(self) -> None:
        """Import the client library and open the database (slow: called in a thread)."""

    def close(self) -> None:
        """Release the database."""

    def list_collections(self) -> list[str]:
        raise NotImplementedError

    def ensure_collection(self, name: str, distance: str, dimension: int | None) -> None:
        """Create ``name`` if missing (``dimension`` None: not known yet; a backend that needs it
        creates the collection at its first upsert)."""
        raise NotImplementedError

    def drop_collection(self, name: str) -> None:
        raise NotImplementedError

    def upsert(self, name: str, ids: Sequence[str], embeddings: Sequence[Sequence[float]],
               metadatas: Sequence[dict[str, Any]], documents: Sequence[str | None]) -> None:
        raise NotImplementedError

    def delete(self, name: str, ids: Sequence[str]) -> None:
        raise NotImplementedError

    def count(self, name: str) -> int:
        raise NotImplementedError

    def page(self, name: str, cursor: Any, limit: int) -> tuple[list[StoredRecord], Any]:
        """Up to ``limit`` records with embeddings from ``cursor`` (None: the start), and the
        cursor of the next page (None: that was the last)."""
        raise NotImplementedError

    def query(self, name: str, embedding: Sequence[float], k: int) -> list[StoredRecord]:
        """The ``k`` nearest records, nearest first, with ``distance`` set."""
        raise NotImplementedError


class LockedBackend(Backend):
    """A backend around one client library object: one call at a time under a lock (not every
    client is thread-safe), the library's exceptions as `BackendError` naming the backend, and a
    `close` that closes the client and forgets what was cached about its collections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: Any = None

    def _forget(self) -> None:
        """Drop what is cached about collections (closed; or a failure may have made it stale)."""

    def _failed(self) -> None:
        """A call failed (a restarted or shared server?): by default, the cache stays."""

    def _call(self, fn: Any, *args: Any) -> Any:
        self.connect()
        with self._lock:
            try:
                return fn(*args)
            except BackendError:
                raise
            except Exception as e:
                self._failed()
                raise BackendError(f"{self.name}: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:
                    pass
            self._client = None
            self._forget()
