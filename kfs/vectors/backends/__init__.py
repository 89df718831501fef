"""Vector database backends behind one small interface (`base.Backend`)."""

from __future__ import annotations

from typing import Any

from kfs.vectors.backends.base import Backend, BackendError


def make_backend(config: Any, store_path: str) -> Backend:
    """The backend that ``vector_config.yaml`` names (imports are lazy: Chroma takes seconds)."""
    if config.provider == "chroma":
        from kfs.vectors.backends.chroma import ChromaBackend

        return ChromaBackend(config, store_path)
    if config.provider == "qdrant" and config.mode == "embedded":
        from kfs.vectors.backends.qdrant import QdrantEdgeBackend

        return QdrantEdgeBackend(config, store_path)
    if config.provider == "milvus":
        from kfs.vectors.backends.milvus import MilvusBackend

        return MilvusBackend(config, store_path)
    raise BackendError(f"provider {config.provider!r} in {config.mode} mode is not built yet "
                       "(chroma embedded and server, qdrant embedded, milvus are)")


__all__ = ["Backend", "BackendError", "make_backend"]
