"""Reading a snapshot: index the zip for browsing, check it, verify it, diff manifests.

Everything here is blocking (zip parsing, hashing): the area calls it through
``trio.to_thread``.  The zip is opened through the store's dir_fd, never by a
path string, and served without extracting it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

from kfs.snapshots.writer import MANIFEST, SnapshotError, check_arcname

#: restore refuses entries bigger than this, and zips whose entries promise more than this in total
MAX_ENTRY_BYTES = 64 << 30
#: what a damaged entry raises while it is read
READ_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, zipfile.LargeZipFile)
#: a deflated entry that claims to expand more than this much is a zip bomb
MAX_RATIO = 2000


@dataclass
class Snapshot:
    """One open snapshot zip: its central directory, directories implied by it, and manifest."""

    name: str
    zf: zipfile.ZipFile
    raw: io.BufferedReader
    st: os.stat_result
    files: dict[str, zipfile.ZipInfo] = field(default_factory=dict)
    dirs: dict[str, dict[str, bool]] = field(default_factory=dict)   # dir -> {child: is_dir}
    lock: threading.Lock = field(default_factory=threading.Lock)
    _manifest: dict[str, Any] | None = None

    def close(self) -> None:
        self.zf.close()
        self.raw.close()

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            if MANIFEST not in self.files:
                raise SnapshotError(f"{self.name}: no manifest.json in the zip")
            with self.lock:
                data = self.zf.read(MANIFEST)
            try:
                manifest = json.loads(data)
            except ValueError:
                raise SnapshotError(f"{self.name}: manifest.json is not valid JSON") from None
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
                raise SnapshotError(f"{self.name}: manifest.json has no file list")
            self._manifest = manifest
        return self._manifest

    def data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a stored entry's bytes start in the zip (after its local header)."""
        header = os.pread(self.raw.fileno(), 30, info.header_offset)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise SnapshotError(f"{self.name}: bad local header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len


def open_snapshot(store: Any, name: str) -> Snapshot:
    """Open ``NAME.zip`` of the store's snapshots directory (a `StoreDir`)."""
    fd = store.open_fd(f"{name}.zip", os.O_RDONLY)
    raw = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        zf = zipfile.ZipFile(raw)
    except zipfile.BadZipFile as e:
        raw.close()
        raise SnapshotError(f"{name}: not a valid zip ({e})") from None
    except BaseException:
        raw.close()
        raise
    snap = Snapshot(name, zf, raw, st)
    snap.dirs[""] = {}
    for info in zf.infolist():
        path = info.filename.rstrip("/")
        if not path or not _safe_name(path):
            continue  # never served; restore refuses the whole zip (see check_for_restore)
        parts = path.split("/")
        for i in range(len(parts)):
            parent = "/".join(parts[:i])
            child_is_dir = info.is_dir() or i < len(parts) - 1
            snap.dirs.setdefault(parent, {})[parts[i]] = child_is_dir
            if child_is_dir:
                snap.dirs.setdefault("/".join(parts[: i + 1]), {})
        if not info.is_dir():
            snap.files[path] = info
    return snap


def _safe_name(path: str) -> bool:
    try:
        check_arcname(path)
    except SnapshotError:
        return False
    return True


def is_symlink(info: zipfile.ZipInfo) -> bool:
    return (info.create_system == 3) and stat.S_ISLNK(info.external_attr >> 16)


def check_for_restore(snap: Snapshot, max_entry: int = MAX_ENTRY_BYTES) -> dict[str, dict[str, Any]]:
    """Refuse a zip that could write outside its area or blow up, before anything changes.

    Returns the manifest's files by path.  Checked: every name relative and
    free of ``..``, ``\\`` and empty parts; no symlinks, devices or duplicate
    names; sizes bounded, compression ratios sane; every entry in the manifest
    with the same size, and the other way round.
    """
    manifest = snap.manifest
    listed: dict[str, dict[str, Any]] = {}
    for item in manifest["files"]:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise SnapshotError(f"{snap.name}: manifest.json has a malformed file entry")
        listed[item["path"]] = item
    seen: set[str] = set()
    total = 0
    for info in snap.zf.infolist():
        name = info.filename
        if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
            raise SnapshotError(f"{snap.name}: absolute path in the zip: {name!r}")
        if not _safe_name(name.rstrip("/") if info.is_dir() else name):
            raise SnapshotError(f"{snap.name}: unsafe path in the zip: {name!r}")
        if is_symlink(info):
            raise SnapshotError(f"{snap.name}: symlink in the zip: {name!r}")
        mode = info.external_attr >> 16
        if info.create_system == 3 and mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise SnapshotError(f"{snap.name}: special file in the zip: {name!r}")
        if name in seen:
            raise SnapshotError(f"{snap.name}: {name!r} is in the zip twice")
        seen.add(name)
        if info.is_dir():
            continue
        if info.file_size > max_entry:
            raise SnapshotError(f"{snap.name}: {name!r} is oversized ({info.file_size} bytes)")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_RATIO * max(info.compress_size, 1024):
            raise SnapshotError(f"{snap.name}: {name!r} expands {info.file_size // max(info.compress_size, 1)}x"
                                " (zip bomb)")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise SnapshotError(f"{snap.name}: {name!r} uses an unsupported compression method")
        total += info.file_size
        if name == MANIFEST:
            continue
        item = listed.get(name)
        if item is None:
            raise SnapshotError(f"{snap.name}: {name!r} is in the zip but not in manifest.json")
        if item.get("size") != info.file_size:
            raise SnapshotError(f"{snap.name}: {name!r} size differs from manifest.json")
    if total > max_entry:
        raise SnapshotError(f"{snap.name}: the zip expands to {total} bytes, over the limit")
    missing = [p for p in listed if p not in snap.files]
    if missing:
        raise SnapshotError(f"{snap.name}: {missing[0]!r} is in manifest.json but not in the zip")
    return listed


def verify(snap: Snapshot) -> list[str]:
    """Re-hash every entry against the manifest; the differences, one line each (empty: good)."""
    problems: list[str] = []
    try:
        listed = {item["path"]: item for item in snap.manifest["files"]}
    except (SnapshotError, KeyError, TypeError) as e:
        return [str(e)]
    for path, item in listed.items():
        info = snap.files.get(path)
        if info is None:
            problems.append(f"missing: {path}")
            continue
        digest = hashlib.sha256()
        size = 0
        try:
            with snap.lock, snap.zf.open(info) as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile, zlib.error) as e:
            problems.append(f"unreadable: {path} ({e})")
            continue
        if size != item.get("size"):
            problems.append(f"size differs: {path} ({size} != {item.get('size')})")
        elif digest.hexdigest() != item.get("sha256"):
            problems.append(f"sha256 differs: {path}")
    for path in snap.files:
        if path != MANIFEST and path not in listed:
            problems.append(f"not in manifest: {path}")
    return problems


def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[str]]:
    """Files added, removed and changed from manifest ``a`` to manifest ``b``."""
    fa = {item["path"]: item for item in a.get("files", [])}
    fb = {item["path"]: item for item in b.get("files", [])}
    return {
        "added": sorted(set(fb) - set(fa)),
        "removed": sorted(set(fa) - set(fb)),
        "changed": sorted(p for p in set(fa) & set(fb)
                          if (fa[p].get("sha256"), fa[p].get("size")) != (fb[p].get("sha256"), fb[p].get("size"))),
    }


class EntryReader:
    """Reads of one browsed file: stored entries by pread, deflated ones through one stream."""

    def __init__(self, snap: Snapshot, info: zipfile.ZipInfo) -> None:
        self.snap = snap
        self.info = info
        self.lock = threading.Lock()
        self._offset = snap.data_offset(info) if info.compress_type == zipfile.ZIP_STORED else -1
        self._stream: Any = None
        self._pos = 0

    def read(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.info.file_size - offset))
        if size == 0:
            return b""
        if self._offset >= 0:
            return os.pread(self.snap.raw.fileno(), size, self._offset + offset)
        with self.lock, self.snap.lock:
            if self._stream is None or offset < self._pos:
                if self._stream is not None:
                    self._stream.close()
                self._stream = self.snap.zf.open(self.info)
                self._pos = 0
            if offset > self._pos:
                self._stream.seek(offset)
                self._pos = offset
            data = self._stream.read(size)
            self._pos += len(data)
            return data

    def close(self) -> None:
        with self.lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
