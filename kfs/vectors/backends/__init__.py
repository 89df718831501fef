"""Vector database backends behind one small interface (`base.Backend`)."""

from __future__ import annotations

from typing import Any

from kfs.vectors.backends.base import Backend, BackendError


def make_backend(config: Any, store_path: str, secrets: Any = None, store_fd: int | None = None) -> Backend:
    """The backend that ``vector_config.yaml`` names (imports are lazy: Chroma takes seconds).

    ``secrets`` (a `kfs.vectors.secrets.SecretReader`) reads a server's ``api_key``.  With
    ``store_fd`` (the daemon's descriptor behind ``store_path``), embedded Chroma runs in a child
    process (`isolated`: it holds the GIL for a whole upsert)."""
    if config.provider == "chroma":
        from kfs.vectors.backends.chroma import ChromaBackend

        if config.mode == "embedded" and store_fd is not None and getattr(config, "backend_process", True):
            from kfs.vectors.backends.isolated import IsolatedBackend

            return IsolatedBackend("kfs.vectors.backends.chroma", "ChromaBackend", config, store_path, store_fd)

        return ChromaBackend(config, store_path)
    if config.provider == "qdrant" and config.mode == "embedded":
        from kfs.vectors.backends.qdrant import QdrantEdgeBackend

        return QdrantEdgeBackend(config, store_path)
    if config.provider == "qdrant":  # server, or qdrant-client's local mode
        from kfs.vectors.backends.qdrant_server import QdrantClientBackend

        return QdrantClientBackend(config, store_path, secrets)
    if config.provider == "milvus":
        from kfs.vectors.backends.milvus import MilvusBackend

        return MilvusBackend(config, store_path)
    raise BackendError(f"provider {config.provider!r} in {config.mode} mode is not built yet "
                       "(chroma embedded and server, qdrant embedded, local and server, milvus are)")


__all__ = ["Backend", "BackendError", "make_backend"]
