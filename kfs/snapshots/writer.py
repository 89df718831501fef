"""Writing a snapshot: a plain zip (readable by Info-ZIP ``unzip``) plus manifest.json.

Why a zip writer of our own instead of `zipfile`: `zipfile` compresses in the
thread that writes, one entry after another, so a snapshot would use one core.
Here entries are cut into 1 MiB chunks that a thread pool deflates in parallel
(``zlib`` releases the GIL), pigz-style: each chunk is a raw deflate stream
primed with the previous chunk's last 32 KiB as dictionary and ended with a
sync flush (the last one with Z_FINISH), so their concatenation is one valid
deflate stream.  The writer thread hashes (sha256 for the manifest, crc32 for
the zip) and writes the chunks in order, with a bounded number in flight:
memory stays bounded whatever the size of the state.

Per entry the method is chosen: ciphertext (``compress=False``), already
compressed formats and data whose first 64 KiB do not deflate are stored;
the rest is deflated at level 1 (with ISA-L, `isal`, when installed: the same
deflate format, three times zlib's speed at the same ratio).  zstd inside a zip (method 93) is not used:
Debian's ``unzip`` 6.0 cannot read it, and a snapshot must stay verifiable
with plain ``unzip`` and ``sha256sum``.

The sink (`SnapshotSink` of kfs.fs.area) only records what to write: a store
file is opened at once (the open descriptor pins the inode and, with its
length, the bytes the area captured), and the zip is written afterwards by
`SnapshotWriter.write` in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

try:  # ISA-L's deflate: same format, ~3x zlib's speed at the same ratio (level 1), GIL released
    from isal import isal_zlib as fast_zlib
except ImportError:  # pragma: no cover - isal is a dependency; zlib keeps it working without
    fast_zlib = zlib  # type: ignore[assignment]

CHUNK = 1 << 20
SAMPLE = 64 << 10
WINDOW = 32 << 10
IN_FLIGHT = 6                # chunks (or small entries) being deflated at once
DEFLATE_LEVEL = 1
ZIP64_LIMIT = 0xFFFFFFFF
#: pending store files keep a descriptor open; past this many the sink writes them out early
MAX_OPEN_FDS = 256

STORED, DEFLATED = 0, 8
FLAG_UTF8 = 0x800
INCOMPRESSIBLE_SUFFIXES = (
    ".zip", ".gz", ".tgz", ".zst", ".xz", ".bz2", ".7z", ".jpg", ".jpeg", ".png", ".gif", ".webp",
    ".mp3", ".mp4", ".mkv", ".enc", ".bin.enc", ".age", ".gpg",
)

MANIFEST = "manifest.json"
MEMORY_WINDOW = "memory_window.json"
FORMAT = "kfs-snapshot/1"


class SnapshotError(Exception):
    """A snapshot cannot be written or read; ``str()`` is one line for the user."""


@dataclass
class Entry:
    """One file of the zip, as the sink recorded it."""

    arcname: str
    compress: bool
    data: bytes | None = None
    fd: int = -1
    length: int = 0
    mtime: float = 0.0


@dataclass
class Written:
    """What the central directory and the manifest need about one written entry."""

    arcname: str
    offset: int
    method: int
    crc: int
    csize: int
    usize: int
    sha256: str
    dostime: tuple[int, int]
    zip64_local: bool = False


def dos_time(t: float) -> tuple[int, int]:
    lt = time.localtime(max(t, 315532800))  # zip cannot say before 1980
    return (lt.tm_hour << 11 | lt.tm_min << 5 | lt.tm_sec // 2,
            (lt.tm_year - 1980) << 9 | lt.tm_mon << 5 | lt.tm_mday)


def check_arcname(arcname: str) -> None:
    if (not arcname or arcname.startswith("/") or "\\" in arcname or "\0" in arcname
            or any(p in ("", ".", "..") for p in arcname.split("/"))):
        raise SnapshotError(f"bad name for a snapshot entry: {arcname!r}")


def deflate_chunk(chunk: bytes, primer: bytes, last: bool, level: int = DEFLATE_LEVEL) -> bytes:
    """Raw deflate of one chunk, continuing the stream that ``primer`` ended (pigz-style)."""
    if primer:
        comp = fast_zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, primer)
    else:
        comp = fast_zlib.compressobj(level, zlib.DEFLATED, -15)
    return comp.compress(chunk) + comp.flush(fast_zlib.Z_FINISH if last else fast_zlib.Z_SYNC_FLUSH)


def worth_deflating(arcname: str, sample: bytes) -> bool:
    if arcname.lower().endswith(INCOMPRESSIBLE_SUFFIXES):
        return False
    if len(sample) < 64:
        return True
    return len(fast_zlib.compress(sample[:SAMPLE], 1)) < 0.92 * min(len(sample), SAMPLE)


class Sink:
    """The `SnapshotSink` handed to one area: names go under ``<area>/``.  Thread-safe."""

    def __init__(self, writer: SnapshotWriter, prefix: str) -> None:
        self.writer = writer
        self.prefix = prefix

    def add_bytes(self, arcname: str, data: bytes, compress: bool = True) -> None:
        self.writer.add_bytes(f"{self.prefix}/{arcname}", bytes(data), compress)

    def add_store_file(self, arcname: str, store: Any, path: str, length: int | None = None,
                       compress: bool = True) -> None:
        fd = store.open_fd(path, os.O_RDONLY)
        self.writer.add_fd(f"{self.prefix}/{arcname}", fd, length, compress)


@dataclass
class SnapshotWriter:
    """Builds one zip in ``out_fd`` (already open, positioned at 0)."""

    out_fd: int
    compression: str = "auto"        # auto | stored | deflate
    workers: int = field(default_factory=lambda: max(2, os.cpu_count() or 2))
    max_entry_bytes: int | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Entry] = []
        self._names: set[str] = set()
        self._written: list[Written] = []
        self._pos = 0
        self._closed = False

    # -- the sink side ---------------------------------------------------------
    def add_bytes(self, arcname: str, data: bytes, compress: bool = True) -> None:
        self._add(Entry(arcname, compress, data=data, length=len(data), mtime=time.time()))

    def add_fd(self, arcname: str, fd: int, length: int | None, compress: bool = True) -> None:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotError(f"{arcname}: not a regular file")
            size = st.st_size if length is None else min(length, st.st_size)
            self._add(Entry(arcname, compress, fd=fd, length=size, mtime=st.st_mtime))
        except BaseException:
            os.close(fd)
            raise

    def _add(self, entry: Entry) -> None:
        check_arcname(entry.arcname)
        flush_now: list[Entry] = []
        with self._lock:
            if self._closed:
                raise SnapshotError("snapshot already written")
            if entry.arcname in self._names or entry.arcname == MANIFEST:
                if entry.fd >= 0:
                    os.close(entry.fd)
                raise SnapshotError(f"{entry.arcname}: added twice")
            self._names.add(entry.arcname)
            self._pending.append(entry)
            if sum(1 for e in self._pending if e.fd >= 0) > MAX_OPEN_FDS:
                flush_now, self._pending = self._pending, []
        if flush_now:  # too many descriptors open: write these out now (in the caller's thread)
            self._write_entries(flush_now)

    # -- the zip side ------------------------------------------------------------
    def write(self, manifest_for: Callable[[list[Written]], bytes],
              extra: list[tuple[str, Callable[[], bytes]]] | None = None) -> list[Written]:
        """Write every pending entry, the ``extra`` ones, then manifest.json and the directory.

        ``manifest_for(written)`` builds the manifest from the entries written.
        The caller fsyncs and renames.
        """
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, []
        self._write_entries(pending)
        for arcname, make in extra or []:
            data = make()
            self._write_entries([Entry(arcname, True, data=data, length=len(data), mtime=time.time())])
        manifest = manifest_for(list(self._written))
        self._write_entries([Entry(MANIFEST, True, data=manifest, length=len(manifest), mtime=time.time())])
        self._write_central_directory()
        return list(self._written)

    def abort(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, []
        for entry in pending:
            if entry.fd >= 0:
                os.close(entry.fd)

    @property
    def written(self) -> list[Written]:
        return list(self._written)

    def _out(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.out_fd, view, self._pos)
            self._pos += n
            view = view[n:]

    def _method(self, entry: Entry, sample: bytes) -> int:
        if not entry.compress or self.compression == "stored":
            return STORED
        if self.compression == "deflate":
            return DEFLATED
        return DEFLATED if worth_deflating(entry.arcname, sample) else STORED

    def _write_entries(self, entries: list[Entry]) -> None:
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kfs-zip")
        try:
            small: deque[tuple[Entry, Future[tuple[bytes, int, bytes, int, str]]]] = deque()
            for entry in entries:
                if entry.length <= CHUNK:
                    small.append((entry, pool.submit(self._prepare_small, entry)))
                    while len(small) > IN_FLIGHT:
                        self._write_small(*small.popleft())
                else:
                    while small:
                        self._write_small(*small.popleft())
                    try:
                        self._write_large(entry, pool)
                    finally:
                        os.close(entry.fd)
                        entry.fd = -1
            while small:
                self._write_small(*small.popleft())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # no worker may still use a descriptor
            for entry in entries:
                if entry.fd >= 0:
                    os.close(entry.fd)
                    entry.fd = -1
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_all(self, entry: Entry) -> bytes:
        if entry.data is not None:
            return entry.data
        try:
            parts = []
            left = entry.length
            offset = 0
            while left > 0:
                chunk = os.pread(entry.fd, min(left, CHUNK), offset)
                if not chunk:
                    break
                parts.append(chunk)
                offset += len(chunk)
                left -= len(chunk)
            return b"".join(parts)
        finally:
            os.close(entry.fd)
            entry.fd = -1

    def _prepare_small(self, entry: Entry) -> tuple[bytes, int, bytes, int, str]:
        """Read, hash and compress one small entry (runs in the pool)."""
        raw = self._read_all(entry)
        method = self._method(entry, raw)
        body = raw
        if method == DEFLATED:
            body = deflate_chunk(raw, b"", True)
            if len(body) >= len(raw) and entry.compress and self.compression == "auto":
                method, body = STORED, raw
        return raw, method, body, fast_zlib.crc32(raw), hashlib.sha256(raw).hexdigest()

    def _write_small(self, entry: Entry, future: Future[tuple[bytes, int, bytes, int, str]]) -> None:
        raw, method, body, crc, sha = future.result()
        self._check_size(entry.arcname, len(raw))
        info = Written(entry.arcname, self._pos, method, crc, len(body), len(raw), sha, dos_time(entry.mtime))
        self._out(self._local_header(info))
        self._out(body)
        self._written.append(info)

    def _check_size(self, arcname: str, size: int) -> None:
        if self.max_entry_bytes is not None and size > self.max_entry_bytes:
            raise SnapshotError(f"{arcname}: {size} bytes is over the limit for one entry")

    def _write_large(self, entry: Entry, pool: ThreadPoolExecutor) -> None:
        self._check_size(entry.arcname, entry.length)
        first = os.pread(entry.fd, min(CHUNK, entry.length), 0)
        method = self._method(entry, first[:SAMPLE])
        zip64 = entry.length >= 0xF0000000
        info = Written(entry.arcname, self._pos, method, 0, 0, 0, "", dos_time(entry.mtime), zip64_local=zip64)
        self._out(self._local_header(info))
        data_start = self._pos
        sha = hashlib.sha256()
        crc = 0
        usize = 0
        in_flight: deque[Future[bytes]] = deque()
        chunk = first
        primer = b""
        while chunk:
            usize += len(chunk)
            nxt = os.pread(entry.fd, min(CHUNK, entry.length - usize), usize) if usize < entry.length else b""
            sha.update(chunk)
            crc = fast_zlib.crc32(chunk, crc)
            if method == DEFLATED:
                in_flight.append(pool.submit(deflate_chunk, chunk, primer, not nxt))
                primer = chunk[-WINDOW:]
                while len(in_flight) >= IN_FLIGHT:
                    self._out(in_flight.popleft().result())
            else:
                self._out(chunk)
            chunk = nxt
        while in_flight:
            self._out(in_flight.popleft().result())
        if method == DEFLATED and usize == 0:
            self._out(deflate_chunk(b"", b"", True))
        info.crc, info.usize, info.csize, info.sha256 = crc, usize, self._pos - data_start, sha.hexdigest()
        # Patch the local header now that sizes and crc are known.
        end = self._pos
        self._pos = info.offset
        self._out(self._local_header(info))
        self._pos = end
        self._written.append(info)

    @staticmethod
    def _local_header(info: Written) -> bytes:
        name = info.arcname.encode()
        extra = b""
        csize, usize = info.csize, info.usize
        version = 20
        if info.zip64_local:
            extra = struct.pack("<HHQQ", 0x0001, 16, info.usize, info.csize)
            csize = usize = ZIP64_LIMIT
            version = 45
        return struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, version, FLAG_UTF8, info.method, info.dostime[0], info.dostime[1],
            info.crc, csize, usize, len(name), len(extra),
        ) + name + extra

    def _write_central_directory(self) -> None:
        cd_start = self._pos
        parts = []
        for info in self._written:
            name = info.arcname.encode()
            z64 = []
            usize = info.usize
            csize = info.csize
            offset = info.offset
            if usize >= ZIP64_LIMIT or info.zip64_local:
                z64.append(usize)
                usize = ZIP64_LIMIT
            if csize >= ZIP64_LIMIT or info.zip64_local:
                z64.append(csize)
                csize = ZIP64_LIMIT
            if offset >= ZIP64_LIMIT:
                z64.append(offset)
                offset = ZIP64_LIMIT
            extra = struct.pack(f"<HH{len(z64)}Q", 0x0001, 8 * len(z64), *z64) if z64 else b""
            version = 45 if z64 else 20
            parts.append(struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, 3 << 8 | version, version, FLAG_UTF8, info.method,
                info.dostime[0], info.dostime[1], info.crc, csize, usize, len(name), len(extra), 0, 0, 0,
                (stat.S_IFREG | 0o644) << 16, offset,
            ) + name + extra)
        self._out(b"".join(parts))
        cd_size = self._pos - cd_start
        count = len(self._written)
        if count >= 0xFFFF or cd_start >= ZIP64_LIMIT or cd_size >= ZIP64_LIMIT:
            eocd64 = self._pos
            self._out(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 3 << 8 | 45, 45, 0, 0, count, count,
                                  cd_size, cd_start))
            self._out(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
            self._out(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, ZIP64_LIMIT, ZIP64_LIMIT, 0))
        else:
            self._out(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_start, 0))


# --------------------------------------------------------------------------- files in the store
def temp_name(name: str) -> str:
    """Where ``NAME.zip`` is written until durable (hidden; removed at start if a crash left it)."""
    return f".{name}.zip.kfs-tmp"


def is_temp_name(filename: str) -> bool:
    return filename.startswith(".") and filename.endswith(".zip.kfs-tmp")


def commit(store: Any, fd: int, name: str) -> None:
    """fsync the temp zip, rename it to ``NAME.zip``, fsync the directory: durable from here."""
    os.fsync(fd)
    os.close(fd)
    store.rename(temp_name(name), f"{name}.zip")
    store.fsync_dir()


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def snapshot_time_name(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime(t))


def build_manifest(meta: dict[str, Any], written: list[Written]) -> bytes:
    import json

    files = [{"path": w.arcname, "size": w.usize, "sha256": w.sha256,
              "method": "deflate" if w.method == DEFLATED else "stored"} for w in written]
    body = {"format": FORMAT, **meta, "file_count": len(files),
            "total_size": sum(w.usize for w in written), "files": files}
    return (json.dumps(body, indent=1, sort_keys=False) + "\n").encode()
