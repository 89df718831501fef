"""Plaintext views of one ciphertext file: read-only snapshots and the writer's working copy.

Atomic writes (old or new contents, never a mix, after a crash too): a file
opened for writing gets a *working copy*, a temp file beside it in the store
(``.kfs-tmp-<random>``).  The first change copies the committed ciphertext into it
(in-kernel ``copy_file_range``; an ``O_TRUNC`` writer starts empty).  Writes
land in bounded in-memory dirty chunks that spill, sealed, into the working
copy.  ``flush`` (close), ``fsync`` and ``release`` *commit*: seal what is
left, fix the last-chunk flags, truncate to the exact length, fsync, rename over
the file and fsync the directory.  Until that rename the committed file is
untouched, so kill -9 at any point leaves old or new contents; the orphan temp
file is removed at the next mount.  Memory stays bounded for large files, and a
commit costs one copy of the file (for secrets, nothing).

Read-only handles read the committed file they opened (snapshot isolation, as
with editors' write-temp-and-rename).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections import OrderedDict

from kfs.store import StoreDir
from kfs.vault.contentenc import (
    HEADER_SIZE,
    FormatError,
    Header,
    chunk_count,
    chunk_length,
    cipher_size,
    is_well_formed_length,
    plain_size,
)
from kfs.vault.cryptocore import OVERHEAD, CryptoCore, IntegrityError

TMP_PREFIX = ".kfs-tmp-"
DIRTY_LIMIT = 8 << 20  # plaintext bytes kept in memory per writer before spilling
CACHE_CHUNKS = 4


def _write_runs(fd: int, runs: list[tuple[int, list[bytes]]]) -> None:
    """pwritev each (offset, buffers) run, finishing short writes (large batches may be cut)."""
    for offset, iov in runs:
        while iov:
            done = os.pwritev(fd, iov, offset)
            offset += done
            while iov and done >= len(iov[0]):
                done -= len(iov[0])
                iov = iov[1:]
            if iov and done:
                iov = [iov[0][done:], *iov[1:]]


class ChunkError(Exception):
    """A chunk failed authentication; carries the chunk index for the event."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"chunk {index}: {reason}")
        self.index = index


def read_header(fd: int) -> Header:
    return Header.decode(os.pread(fd, HEADER_SIZE, 0))


class ChunkSource:
    """Decrypts chunks of one ciphertext fd, with a tiny cache for random reads."""

    def __init__(self, fd: int, header: Header, core_getter: object) -> None:
        self.fd = fd
        self.header = header
        self._core = core_getter  # callable -> CryptoCore (raises EACCES when locked)
        self._cache: OrderedDict[int, memoryview] = OrderedDict()

    def core(self) -> CryptoCore:
        return self._core()  # type: ignore[operator]

    def forget(self) -> None:
        self._cache.clear()

    def decrypt_range(self, first: int, last: int, lengths: list[int], flags: list[bool]) -> list[memoryview]:
        """Chunks first..last-1 (their plaintext lengths and last flags given), one pread.

        Chunks decrypted together land side by side in one buffer (views of it are
        returned), so a caller wanting the whole range can answer with a view of it.
        """
        found = {i: self._cache[i] for i in range(first, last) if i in self._cache}
        todo = [i for i in range(first, last) if i not in found]
        if todo:
            plain_buf = memoryview(bytearray(sum(lengths[i - first] for i in todo)))
            pos = 0
            start = self.header.chunk_offset(todo[0])
            end = self.header.chunk_offset(todo[-1]) + lengths[todo[-1] - first] + OVERHEAD
            blob = memoryview(os.pread(self.fd, end - start, start))
            core = self.core()
            for i in todo:
                off = self.header.chunk_offset(i) - start
                piece = blob[off:off + lengths[i - first] + OVERHEAD]  # a view: no copy
                if len(piece) != lengths[i - first] + OVERHEAD:
                    raise ChunkError(i, "missing bytes")
                plain = plain_buf[pos:pos + lengths[i - first]]
                try:
                    core.open_into(piece, self.header.aad(i, flags[i - first]), plain)
                except IntegrityError as e:
                    raise ChunkError(i, str(e)) from None
                found[i] = plain
                pos += len(plain)
            # keep only the tail: what the next small read most likely wants again
            for i in todo[-CACHE_CHUNKS:]:
                self._cache[i] = found[i]
            while len(self._cache) > CACHE_CHUNKS:
                self._cache.popitem(last=False)
        return [found[i] for i in range(first, last)]


class ReaderView:
    """A read-only handle's view: the committed file as it was at open."""

    def __init__(self, fd: int, core_getter: object) -> None:
        self.fd = fd
        try:
            header = read_header(fd)
        except (FormatError, OSError):
            os.close(fd)
            raise
        length = os.fstat(fd).st_size
        self.well_formed = is_well_formed_length(length, header.chunk_size)
        self.size = plain_size(length, header.chunk_size)
        self.source = ChunkSource(fd, header, core_getter)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.read_buffer(offset, size))

    def read_buffer(self, offset: int, size: int) -> bytes | memoryview:
        """`read` without the final copy (FUSE replies take any buffer)."""
        if not self.well_formed:
            raise ChunkError(chunk_count(self.size, self.source.header.chunk_size) - 1, "truncated or torn file")
        return read_plain(self.source, self.size, offset, size, lambda i, n: i == n - 1)

    def close(self) -> None:
        os.close(self.fd)


def read_plain(source: ChunkSource, size: int, offset: int, length: int, flag_of: object) -> bytes | memoryview:
    if offset >= size or length <= 0:
        return b""
    end = min(size, offset + length)
    n_chunks = chunk_count(size, source.header.chunk_size)
    cs = source.header.chunk_size
    first, last = offset // cs, (end - 1) // cs + 1
    lengths = [chunk_length(i, size, cs) for i in range(first, last)]
    flags = [flag_of(i, n_chunks) for i in range(first, last)]  # type: ignore[operator]
    chunks = source.decrypt_range(first, last, lengths, flags)
    head, tail = offset - first * cs, end - (last - 1) * cs
    if len(chunks) == 1:
        return chunks[0][head:tail]
    whole = chunks[0].obj
    if all(c.obj is whole for c in chunks) and len(whole) == sum(lengths):  # type: ignore[arg-type]
        # decrypted side by side in one buffer: answer with a view of it, no copy
        return memoryview(whole)[head:len(whole) - (lengths[-1] - tail)]  # type: ignore[arg-type]
    # trim the first and last chunk, then one join: a single copy of the answer
    return b"".join([memoryview(chunks[0])[head:], *chunks[1:-1], memoryview(chunks[-1])[:tail]])


class WorkingFile:
    """The shared state of a file open for writing (all writable handles of one path)."""

    def __init__(self, store: StoreDir, path: str, core_getter: object, chunk_size: int) -> None:
        self.store = store
        self.path = path
        self._core = core_getter
        self.new_chunk_size = chunk_size
        self.refs = 0
        self.detached = False  # unlinked or renamed over: commits go nowhere
        self.pending_times: tuple[int, int] | None = None
        fd = store.open_fd(path, os.O_RDONLY)
        try:
            self.header = read_header(fd)
        except (FormatError, OSError):
            os.close(fd)
            raise
        length = os.fstat(fd).st_size
        if not is_well_formed_length(length, self.header.chunk_size):
            os.close(fd)
            raise ChunkError(0, "truncated or torn file")
        self.fd = fd
        self.temp_name: str | None = None
        self.size = plain_size(length, self.header.chunk_size)
        self.phys = chunk_count(self.size, self.header.chunk_size)  # chunks present in fd
        self.flagged: set[int] = {self.phys - 1}  # chunks in fd sealed with the last flag
        self.dirty: dict[int, bytearray | memoryview] = {}
        self.source = ChunkSource(fd, self.header, core_getter)

    # ------------------------------------------------------------------ helpers
    @property
    def cs(self) -> int:
        return self.header.chunk_size

    @property
    def is_dirty(self) -> bool:
        return self.temp_name is not None

    def core(self) -> CryptoCore:
        return self._core()  # type: ignore[operator]

    def _stored_chunk(self, index: int) -> bytes | memoryview:
        """Chunk ``index`` as it is in the fd (zeros beyond what is physically there)."""
        if index >= self.phys:
            return b""
        if index == self.phys - 1 or index in self.flagged:
            # the physically last chunk may be partial: its length is what is on disk
            length = os.fstat(self.fd).st_size - self.header.chunk_offset(index) - OVERHEAD
            length = max(0, min(self.cs, length))
        else:
            length = self.cs
        return self.source.decrypt_range(index, index + 1, [length], [index in self.flagged])[0]

    def _chunk(self, index: int) -> bytearray:
        held = self.dirty.get(index)
        buf = bytearray(self._stored_chunk(index) if held is None else held)
        want = chunk_length(index, self.size, self.cs)
        if len(buf) < want:
            buf.extend(bytes(want - len(buf)))
        elif len(buf) > want:
            del buf[want:]
        return buf

    def ensure_working_copy(self, truncate_all: bool = False) -> None:
        """Start a working copy (blocking: a copy of the file unless ``truncate_all``)."""
        if self.temp_name is not None:
            if truncate_all:
                self._reset_empty()
            return
        name = f"{TMP_PREFIX}{secrets.token_hex(8)}"
        parent = self.path.rpartition("/")[0]
        temp_path = f"{parent}/{name}" if parent else name
        fd = self.store.open_fd(temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if not truncate_all:
                length = os.fstat(self.fd).st_size
                copied = 0
                while copied < length:
                    n = os.copy_file_range(self.fd, fd, length - copied, copied, copied)
                    if n == 0:
                        break
                    copied += n
        except BaseException:
            os.close(fd)
            self.store.unlink(temp_path)
            raise
        os.close(self.fd)
        self.fd = fd
        self.temp_name = temp_path
        if truncate_all:
            self.header = Header.new(self.new_chunk_size)
            os.pwrite(fd, self.header.encode(), 0)
            self._reset_empty()
        self.source = ChunkSource(fd, self.header, self._core)

    def _reset_empty(self) -> None:
        os.ftruncate(self.fd, HEADER_SIZE)
        self.size = 0
        self.phys = 0
        self.flagged = set()
        self.dirty = {}
        self.source.forget()

    # ------------------------------------------------------------------ plaintext ops
    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        end = min(self.size, offset + length)
        first, last = offset // self.cs, (end - 1) // self.cs + 1
        if not any(i in self.dirty or i >= self.phys - 1 or i in self.flagged for i in range(first, last)):
            return bytes(read_plain(self.source, self.size, offset, length, lambda i, n: False))
        data = b"".join(bytes(self._chunk(i)) for i in range(first, last))
        return data[offset - first * self.cs:end - first * self.cs]

    def write(self, offset: int, data: bytes) -> int:
        """Needs a working copy (`ensure_working_copy`) first."""
        assert self.temp_name is not None
        if not isinstance(data, bytes):  # dirty chunks keep views of it: it must not change
            data = bytes(data)
        end = offset + len(data)
        if end > self.size:
            self._grow(end)
        cs = self.cs
        view = memoryview(data)
        pos = offset
        while pos < end:
            index = pos // cs
            within = pos - index * cs
            take = min(cs - within, end - pos)
            piece = view[pos - offset:pos - offset + take]
            if within == 0 and take == chunk_length(index, self.size, cs):
                self.dirty[index] = piece  # type: ignore[assignment]  # a view of the request's bytes
            else:
                buf = self._chunk(index)
                buf[within:within + take] = piece
                self.dirty[index] = buf
            pos += take
        self.source.forget()
        if len(self.dirty) * cs > DIRTY_LIMIT:
            self.spill(keep_last=True)
        return len(data)

    def _grow(self, new_size: int) -> None:
        # The old partial last chunk must read as zero-padded from now on.
        old_last = chunk_count(self.size, self.cs) - 1
        if old_last not in self.dirty and chunk_length(old_last, self.size, self.cs) < self.cs:
            self.dirty[old_last] = self._chunk(old_last)
        self.size = new_size

    def truncate(self, new_size: int) -> None:
        assert self.temp_name is not None
        if new_size >= self.size:
            if new_size > self.size:
                self._grow(new_size)
            return
        n = chunk_count(new_size, self.cs)
        last = n - 1
        keep = self._chunk(last)
        self.size = new_size
        for index in [i for i in self.dirty if i >= n]:
            del self.dirty[index]
        if self.phys > n:
            self.phys = n
            os.ftruncate(self.fd, self.header.chunk_offset(n))
            self.flagged = {i for i in self.flagged if i < n}
        del keep[chunk_length(last, new_size, self.cs):]
        self.dirty[last] = keep
        self.source.forget()

    # ------------------------------------------------------------------ sealing
    def _seal_at(self, core: CryptoCore, index: int, plain: bytes | bytearray, last: bool) -> None:
        nonce, sealed = core.seal_parts(plain, self.header.aad(index, last))
        os.pwritev(self.fd, [nonce, sealed], self.header.chunk_offset(index))
        self._flag(index, last)

    def _flag(self, index: int, last: bool) -> None:
        if last:
            self.flagged.add(index)
        else:
            self.flagged.discard(index)

    def _fill_zeros(self, core: CryptoCore, upto: int) -> None:
        """Seal zero chunks for holes phys..upto-1 that nothing dirty covers."""
        n_last = chunk_count(self.size, self.cs) - 1
        for index in range(self.phys, upto):
            if index not in self.dirty:
                self._seal_at(core, index, bytes(chunk_length(index, self.size, self.cs)), index == n_last)
        self.phys = max(self.phys, upto)

    def spill(self, keep_last: bool) -> None:
        """Seal dirty chunks into the working copy, contiguous runs in one pwritev each."""
        core = self.core()
        n_last = chunk_count(self.size, self.cs) - 1
        run: list[bytes] = []
        run_start = run_next = -1
        iov_max = 512
        for index in sorted(self.dirty):
            if keep_last and index == n_last:
                continue
            if index != run_next or len(run) >= iov_max:
                if run:
                    _write_runs(self.fd, [(self.header.chunk_offset(run_start), run)])
                run, run_start = [], index
                self._fill_zeros(core, index)
            plain = self.dirty.pop(index)
            want = chunk_length(index, self.size, self.cs)
            if len(plain) != want:  # grown since it was dirtied (the gap reads as zeros) or shrunk
                plain = bytes(plain[:want]) + bytes(max(0, want - len(plain)))
            nonce, sealed = core.seal_parts(plain, self.header.aad(index, index == n_last))
            run += [nonce, sealed]
            self._flag(index, index == n_last)
            self.phys = max(self.phys, index + 1)
            run_next = index + 1
        if run:
            _write_runs(self.fd, [(self.header.chunk_offset(run_start), run)])
        self.source.forget()

    def commit(self) -> bool:
        """`prepare` then `publish` (tests and offline use)."""
        if not self.prepare():
            return False
        self.publish()
        return True

    def prepare(self) -> bool:
        """Seal everything into the working copy and make it durable (blocking, slow for big files).

        The committed file is untouched; False if there is nothing to commit.
        """
        if self.temp_name is None:
            return False
        core = self.core()
        n = chunk_count(self.size, self.cs)
        self.spill(keep_last=False)
        self._fill_zeros(core, n)
        for index in sorted(self.flagged - {n - 1}):
            if index < n:  # sealed as last while the file was shorter: reseal as inner
                plain = self._stored_chunk(index)
                self._seal_at(core, index, plain[:chunk_length(index, self.size, self.cs)], False)
        if n - 1 not in self.flagged:
            plain = self._stored_chunk(n - 1)
            self._seal_at(core, n - 1, plain, True)
        os.ftruncate(self.fd, cipher_size(self.size, self.cs))
        try:  # the file keeps its mode and owner across the replacement
            st = self.store.stat(self.path)
            os.fchmod(self.fd, stat.S_IMODE(st.st_mode))
            try:
                os.fchown(self.fd, st.st_uid, st.st_gid)
            except PermissionError:
                pass
        except FileNotFoundError:
            pass
        if self.pending_times is not None:
            os.utime(self.fd, ns=self.pending_times)
            self.pending_times = None
        os.fsync(self.fd)
        return True

    def publish(self) -> None:
        """Rename the prepared working copy over the file (quick: rename + directory fsync)."""
        if self.temp_name is None:
            return
        n = chunk_count(self.size, self.cs)
        if self.detached:  # unlinked or replaced meanwhile: the new contents have no name
            self._drop_temp()
        else:
            self.store.rename(self.temp_name, self.path)
            self.store.fsync_dir(self.path.rpartition("/")[0])
            self.temp_name = None
        self.phys = n
        self.flagged = {n - 1}
        self.source.forget()

    def _drop_temp(self) -> None:
        if self.temp_name is not None:
            try:
                self.store.unlink(self.temp_name)
            except FileNotFoundError:
                pass
            self.temp_name = None

    def close(self) -> None:
        if self.temp_name is not None:
            self._drop_temp()
        try:
            os.close(self.fd)
        except OSError as e:  # pragma: no cover
            if e.errno != errno.EBADF:
                raise
