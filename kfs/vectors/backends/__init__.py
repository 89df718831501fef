"""Vector database backends behind one small interface (`base.Backend`)."""

from __future__ import annotations

from typing import Any

from kfs.vectors.backends.base import Backend, BackendError


def make_backend(config: Any, store_path: str) -> Backend:
    """The backend that ``vector_config.yaml`` names (imports are lazy: Chroma takes seconds)."""
    if config.provider == "chroma":
        from kfs.vectors.backends.chroma import ChromaBackend

        return ChromaBackend(config, store_path)
    raise BackendError(f"provider {config.provider!r} is not built yet (chroma is)")


__all__ = ["Backend", "BackendError", "make_backend"]
