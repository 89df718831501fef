"""Rotation (size) and retention (age) of logs in the store.

Rotation renames ``NAME.log.jsonl`` to ``NAME.YYYYMMDDTHHMMSSZ.log.jsonl``
beside it (``-1``, ``-2`` ... appended to the stamp when two rotations fall in
the same second), makes it read-only (mode 0444) and lets the writer start a
fresh file at the old name with the same owner and mode.  A rename is atomic,
so a crash leaves either the old name or the rotated one, never a half file.

Retention deletes rotated files whose mtime is older than ``max_days``.
Active logs are never deleted.
"""

from __future__ import annotations

import os
import stat
import time

from kfs.logs.lines import ROTATED_NAME, is_log_name
from kfs.store import StoreDir

ROTATED_MODE = 0o444
#: store entries under logs/ that belong to kfs, not to users
PRIVATE_NAMES = frozenset({".logstash-spool"})


def rotated_path(store: StoreDir, path: str, now: float | None = None) -> str:
    parent, _, name = path.rpartition("/")
    base = name[: -len(".log.jsonl")]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    prefix = f"{parent}/" if parent else ""
    candidate = f"{prefix}{base}.{stamp}.log.jsonl"
    n = 0
    while store.exists(candidate):
        n += 1
        candidate = f"{prefix}{base}.{stamp}-{n}.log.jsonl"
    return candidate


def rotate(store: StoreDir, path: str, now: float | None = None) -> tuple[str, os.stat_result]:
    """Rename the active log ``path`` away, read-only; return (rotated path, the old file's stat)."""
    st = store.stat(path)
    target = rotated_path(store, path, now)
    store.rename(path, target)
    store.chmod(target, ROTATED_MODE)
    return target, st


def create_like(store: StoreDir, path: str, like: os.stat_result) -> None:
    """Create an empty active log at ``path`` with the owner and mode of ``like`` (if missing)."""
    try:
        fd = store.open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(like.st_mode))
    except FileExistsError:
        return
    try:
        if (like.st_uid, like.st_gid) != (os.getuid(), os.getgid()):
            os.fchown(fd, like.st_uid, like.st_gid)
    finally:
        os.close(fd)


def expired_rotated(store: StoreDir, max_days: float, now: float | None = None, path: str = "") -> list[str]:
    """Rotated logs under ``path`` whose mtime is older than ``max_days``."""
    cutoff = (time.time() if now is None else now) - max_days * 86400
    found: list[str] = []
    try:
        names = store.listdir(path)
    except FileNotFoundError:
        return found
    for name in names:
        if not path and name in PRIVATE_NAMES:
            continue
        rel = f"{path}/{name}" if path else name
        try:
            st = store.stat(rel)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            found.extend(expired_rotated(store, max_days, now, rel))
        elif stat.S_ISREG(st.st_mode) and is_log_name(name) and ROTATED_NAME.match(name) and st.st_mtime < cutoff:
            found.append(rel)
    return found


def apply_retention(store: StoreDir, max_days: float, now: float | None = None) -> list[str]:
    """Delete expired rotated logs; return what was deleted (runs in a worker thread)."""
    deleted = []
    for rel in expired_rotated(store, max_days, now):
        try:
            store.unlink(rel)
        except FileNotFoundError:
            continue
        deleted.append(rel)
    return deleted
