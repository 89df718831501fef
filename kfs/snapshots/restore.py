"""Restoring: the `SnapshotSource` an area restores from, and the cross-area journal.

Atomicity inside an area is the area's job (its ``restore_state`` builds the
new state aside and swaps).  Across areas a small journal,
``snapshots/.restore-journal.json`` in the store, records which snapshot is
being restored and which areas are done: a crash half-way leaves it behind,
``kfs status`` and the next ``kfs snapshot restore`` say so, and running the
same restore again finishes it (each area's restore replaces its whole state,
so doing one twice is harmless).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import zipfile
from typing import Any

from kfs.snapshots.reader import READ_ERRORS, Snapshot

JOURNAL = ".restore-journal.json"


class Source:
    """A snapshot's files for one area (names relative to the area's folder).

    The zip was checked with `check_for_restore` before any area sees this.
    Every read is checked against the manifest's sha256: a corrupt entry
    raises OSError(EIO) and the area aborts its swap.  Blocking: call it from a
    worker thread.  ``manifest`` and ``scope`` (type, agent) are there for
    areas that restore a partial snapshot by merging.
    """

    def __init__(self, snap: Snapshot, area: str, listed: dict[str, dict[str, Any]]) -> None:
        self.snap = snap
        self.area = area
        self.prefix = f"{area}/"
        self.listed = listed
        self.manifest = snap.manifest
        self.scope = dict(snap.manifest.get("scope") or {"type": snap.manifest.get("type", "full")})

    def names(self) -> list[str]:
        return sorted(p[len(self.prefix):] for p in self.snap.files if p.startswith(self.prefix))

    def size(self, name: str) -> int:
        return self._info(name).file_size

    def _info(self, name: str) -> zipfile.ZipInfo:
        info = self.snap.files.get(self.prefix + name)
        if info is None:
            raise FileNotFoundError(errno.ENOENT, f"{self.prefix + name}: not in the snapshot")
        return info

    def _expect(self, name: str) -> str:
        return str(self.listed.get(self.prefix + name, {}).get("sha256", ""))

    def read_bytes(self, name: str) -> bytes:
        info = self._info(name)
        try:
            with self.snap.lock:
                data = self.snap.zf.read(info)
        except READ_ERRORS as e:
            raise OSError(errno.EIO, f"{self.prefix + name}: damaged in the zip ({e})") from None
        if hashlib.sha256(data).hexdigest() != self._expect(name):
            raise OSError(errno.EIO, f"{self.prefix + name}: sha256 differs from manifest.json")
        return data

    def copy_to(self, name: str, store: Any, path: str) -> None:
        """Write entry ``name`` to ``path`` of a StoreDir (parents made), fsynced, checked.

        Atomic per file: written to a hidden temp name beside ``path``, checked
        against the manifest's sha256, fsynced, then renamed over ``path``: a
        crash leaves the old file or the new one, never a mix.
        """
        info = self._info(name)
        parent, _, base = path.rpartition("/")
        if parent:
            _makedirs(store, parent)
        tmp = f"{parent + '/' if parent else ''}.{base}.kfs-restore"
        digest = hashlib.sha256()
        fd = store.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:  # keep the permissions of the file it replaces
                os.fchmod(fd, stat.S_IMODE(store.stat(path).st_mode))
            except FileNotFoundError:
                pass
            with self.snap.lock:
                stream = self.snap.zf.open(info)
            with stream:
                while True:
                    with self.snap.lock:
                        chunk = stream.read(1 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as e:
            os.close(fd)
            store.unlink(tmp)
            if isinstance(e, READ_ERRORS):
                raise OSError(errno.EIO, f"{self.prefix + name}: damaged in the zip ({e})") from None
            raise
        os.close(fd)
        if digest.hexdigest() != self._expect(name):
            store.unlink(tmp)
            raise OSError(errno.EIO, f"{self.prefix + name}: sha256 differs from manifest.json")
        store.rename(tmp, path)
        store.fsync_dir(parent)


def _makedirs(store: Any, path: str) -> None:
    so_far = ""
    for part in path.split("/"):
        so_far = f"{so_far}/{part}" if so_far else part
        try:
            store.mkdir(so_far, 0o755)
        except FileExistsError:
            pass


def area_folders(snap: Snapshot) -> list[str]:
    """The areas a snapshot holds: the top-level folders of its zip."""
    return sorted({p.split("/", 1)[0] for p in snap.files if "/" in p})


# --------------------------------------------------------------------------- journal
def read_journal(store: Any) -> dict[str, Any] | None:
    try:
        return json.loads(store.read_bytes(JOURNAL))
    except FileNotFoundError:
        return None
    except ValueError:
        return {"snapshot": "?", "done": [], "areas": []}


def write_journal(store: Any, journal: dict[str, Any]) -> None:
    store.write_atomic(JOURNAL, (json.dumps(journal) + "\n").encode())


def clear_journal(store: Any) -> None:
    try:
        store.unlink(JOURNAL)
    except FileNotFoundError:
        return
    store.fsync_dir()
