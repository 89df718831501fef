"""In-memory and in-directory stand-ins for the snapshots area's sink and source.

Area unit tests call export_state/restore_state without the zip writer; these
implement the same protocols (kfs/fs/area.py SnapshotSink, SnapshotSource).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class MemorySink:
    """Keeps each entry's bytes and whether the area asked for compression."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.compressed: dict[str, bool] = {}

    def add_bytes(self, arcname: str, data: bytes, compress: bool = True) -> None:
        self.files[arcname] = data
        self.compressed[arcname] = compress

    def add_store_file(self, arcname: str, store: Any, path: str, length: int | None = None,
                       compress: bool = True) -> None:
        # Read at once, as the real sink opens at once (the caller may unlink right after).
        self.add_bytes(arcname, store.read_bytes(path)[:length], compress)


class DirSink(MemorySink):
    """Also writes each entry into a directory, laid out as the zip would be."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def add_bytes(self, arcname: str, data: bytes, compress: bool = True) -> None:
        super().add_bytes(arcname, data, compress)
        (self.root / arcname).parent.mkdir(parents=True, exist_ok=True)
        (self.root / arcname).write_bytes(data)


class MemorySource:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def names(self) -> list[str]:
        return sorted(self.files)

    def read_bytes(self, name: str) -> bytes:
        return self.files[name]

    def copy_to(self, name: str, store: Any, path: str) -> None:
        store.write_atomic(path, self.read_bytes(name))


class DirSource(MemorySource):
    """Every file below ``root`` is an entry."""

    def __init__(self, root: Path) -> None:
        super().__init__({str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()})
