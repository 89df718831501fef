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

Hard links: a file whose store inode has several names cannot be replaced by
rename (that would split the link).  Its commit *rewrites in place* instead,
with a redo record so kill -9 still leaves old or new contents:

1. the sealed, fsynced working copy is prepared as above; the committed inode
   gets one more name, ``.kfs-redo-<id>-target`` (whatever becomes of its
   other names meanwhile, the redo finds it);
2. the working copy is renamed to ``.kfs-redo-<id>`` and the directory fsynced:
   the commit point;
3. the working copy is copied over the committed inode (``copy_file_range``,
   ``ftruncate``, its mtime, ``fsync``);
4. the ``-target`` name goes, then the record.

At mount (`finish_rewrite`): a record with its target is redone (the copy is
idempotent); a record alone was finished (the target name goes only after the
copy's fsync) and is deleted; a target alone (died before step 2) is deleted,
the old contents stand.  Read-only handles of such a file see a commit at once
(they read the same inode; the vault reloads them), as on a local disk.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time

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
#: an in-place rewrite of a hard-linked file: the record (sealed new contents) and its target
REDO_PREFIX = ".kfs-redo-"
REDO_TARGET_SUFFIX = "-target"
DIRTY_LIMIT = 2 << 20  # plaintext bytes kept in memory per writer before spilling (sealed runs stay cache-sized)
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


def writable_fd(fd: int) -> int:
    """A new write descriptor for the file ``fd`` is open on (read-only, or of unknown mode).

    Through /proc/self/fd, so it reaches the inode whatever its names are now.  A file whose
    mode refuses writes (chmod 0400, daemon not root) gets the owner's write bit for the open.
    """
    path = f"/proc/self/fd/{fd}"
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except PermissionError:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.fchmod(fd, mode | stat.S_IWUSR)
        try:
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        finally:
            os.fchmod(fd, mode)


def copy_over(src: int, dst: int) -> None:
    """Make the file ``dst`` a durable copy of ``src``: bytes, length and times (blocking)."""
    st = os.fstat(src)
    length = st.st_size
    copied = 0
    while copied < length:
        n = os.copy_file_range(src, dst, length - copied, copied, copied)
        if n == 0:
            raise OSError(errno.EIO, "working copy shorter than it was")
        copied += n
    os.ftruncate(dst, length)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.fsync(dst)


def _rewrite_after_commit_point(store: StoreDir, src: int, dst: int, record: str) -> None:
    """Steps 3 and 4 of an in-place rewrite (module doc): copy the record's contents ``src`` over
    the committed inode ``dst``, then drop the target's name and the record."""
    copy_over(src, dst)
    store.unlink(record + REDO_TARGET_SUFFIX)
    store.unlink(record)


def finish_rewrite(store: StoreDir, record: str) -> bool:
    """Finish the in-place rewrite whose record is ``record`` (at mount); True if a copy was redone."""
    try:
        fd = store.open_fd(record + REDO_TARGET_SUFFIX, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:  # the copy was durable before the target's name went
        store.unlink(record)
        return False
    try:
        dst = writable_fd(fd)
        try:
            src = store.open_fd(record, os.O_RDONLY)
            try:
                _rewrite_after_commit_point(store, src, dst, record)
            finally:
                os.close(src)
        finally:
            os.close(dst)
    finally:
        os.close(fd)
    return True


class ChunkError(Exception):
    """A chunk failed authentication; carries the chunk index for the event."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"chunk {index}: {reason}")
        self.index = index


def read_header(fd: int) -> Header:
    return Header.decode(os.pread(fd, HEADER_SIZE, 0))


class ChunkSource:
    """Decrypts chunks of one ciphertext fd, keeping the last few for reads that come back.

    The hot paths are short on purpose: one FUSE read is one call here, and every
    Python line costs on the request's critical path.  A read inside one chunk
    is one dict lookup, one pread, one decrypt (the chunk is returned as the
    ``bytes`` the cipher made, no further copy).
    """

    def __init__(self, fd: int, header: Header, core_getter: object) -> None:
        self.fd = fd
        self.header = header
        self._core = core_getter  # callable -> CryptoCore (raises EACCES when locked)
        self._cache: dict[int, bytes | memoryview] = {}  # insertion order = age (oldest first)
        self._file_id = header.file_id
        self._stride = header.stride
        #: the index of the chunk `chunk` last decrypted (not served from the cache)
        self.decrypted = -1

    def core(self) -> CryptoCore:
        return self._core()  # type: ignore[operator]

    def forget(self) -> None:
        self._cache.clear()

    def _keep(self, index: int, plain: bytes | memoryview) -> None:
        cache = self._cache
        cache[index] = plain
        if len(cache) > CACHE_CHUNKS:
            del cache[next(iter(cache))]

    def chunk(self, index: int, length: int, last: bool) -> bytes | memoryview:
        """The plaintext of chunk ``index`` (``length`` bytes, sealed with flag ``last``)."""
        hit = self._cache.get(index)
        if hit is not None and len(hit) == length:
            return hit
        core = self.core()  # EACCES when locked, before any I/O
        self.decrypted = index
        start = HEADER_SIZE + index * self._stride
        blob = os.pread(self.fd, length + OVERHEAD, start)
        if len(blob) != length + OVERHEAD:
            raise ChunkError(index, "missing bytes")
        aad = self._file_id + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")
        try:
            plain = core.open(blob, aad)
        except IntegrityError as e:
            raise ChunkError(index, str(e)) from None
        self._keep(index, plain)
        return plain

    def aads(self, first: int, last: int, flagged: int) -> list[bytes]:
        """AAD of chunks first..last-1; chunk ``flagged`` (if in range) is sealed as the last one."""
        file_id = self._file_id
        return [file_id + i.to_bytes(8, "big") + (b"\x01" if i == flagged else b"\x00") for i in range(first, last)]

    def decrypt_run(self, first: int, last: int, lengths: list[int], flagged: int) -> memoryview:
        """Chunks first..last-1 decrypted side by side into one new buffer, from one pread.

        ``lengths``: their plaintext lengths; chunk ``flagged`` is sealed as last (-1: none).
        """
        core = self.core()
        total = sum(lengths)
        start = HEADER_SIZE + first * self._stride
        blob = memoryview(os.pread(self.fd, (last - 1 - first) * self._stride + lengths[-1] + OVERHEAD, start))
        out = memoryview(bytearray(total))
        try:
            core.open_run(blob, self._stride, lengths, self.aads(first, last, flagged), out)
        except IntegrityError as e:
            index = first + (e.position or 0)
            raise ChunkError(index, str(e)) from None
        # keep only the tail: what the next small read most likely wants again
        cs = self.header.chunk_size
        for i in range(max(first, last - CACHE_CHUNKS), last):
            at = (i - first) * cs
            self._keep(i, out[at:at + lengths[i - first]])
        return out

    def decrypt_range(self, first: int, last: int, lengths: list[int], flagged: int) -> list[memoryview]:
        """Chunks first..last-1 (their plaintext lengths given), cached ones reused, the rest decrypted.

        Chunk ``flagged`` is the one sealed with the last flag (-1: none in range).
        """
        cache = self._cache
        if not any(i in cache for i in range(first, last)):
            whole = self.decrypt_run(first, last, lengths, flagged)
            cs = self.header.chunk_size
            return [whole[(i - first) * cs:(i - first) * cs + lengths[i - first]] for i in range(first, last)]
        out: list[memoryview] = []
        for i in range(first, last):
            length = lengths[i - first]
            hit = cache.get(i)
            if hit is not None and len(hit) == length:
                out.append(memoryview(hit))
            else:
                out.append(self.decrypt_run(i, i + 1, [length], flagged))
        return out


class ReaderView:
    """A read-only handle's view: the committed file as it was at open.

    ``header`` and ``st`` (the fd's fstat) may come from the caller's caches: a
    secret opened again and again then costs no header read or JSON decode.
    """

    def __init__(self, fd: int, core_getter: object, header: Header | None = None,
                 st: os.stat_result | None = None) -> None:
        self.fd = fd
        self._core = core_getter
        try:
            if header is None:
                header = read_header(fd)
            if st is None:
                st = os.fstat(fd)
        except (FormatError, OSError):
            os.close(fd)
            raise
        #: the store inode read, as the vault's `Attr.identity` names it
        self.key = (st.st_dev, st.st_ino)
        self.linked = st.st_nlink > 1
        self._load(header, st.st_size)

    def _load(self, header: Header, length: int) -> None:
        self.header = header
        self.well_formed = is_well_formed_length(length, header.chunk_size)
        self.size = plain_size(length, header.chunk_size)
        self._cs = header.chunk_size
        self._n_chunks = chunk_count(self.size, header.chunk_size)
        self.source = ChunkSource(self.fd, header, self._core)
        #: one bit per chunk: decrypted for this handle before (see `rest_of_chunk`)
        self._seen: bytearray | None = None

    def reload(self) -> None:
        """The inode was rewritten in place (a hard-linked file's commit): read its new version."""
        self._load(read_header(self.fd), os.fstat(self.fd).st_size)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.read_buffer(offset, size))

    def read_buffer(self, offset: int, size: int) -> bytes | memoryview:
        """`read` without the final copy (FUSE replies take any buffer)."""
        if not self.well_formed:
            raise ChunkError(self._n_chunks - 1, "truncated or torn file")
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        cs = self._cs
        index = offset // cs
        if (end - 1) // cs != index:
            return read_plain(self.source, self.size, offset, size, self._n_chunks - 1)
        # inside one chunk (random reads, small files): no lists, no join
        last = index == self._n_chunks - 1
        base = index * cs
        plain = self.source.chunk(index, self.size - base if last else cs, last)
        if offset == base and end - base == len(plain):
            return plain
        return memoryview(plain)[offset - base:end - base]

    def forget(self) -> None:
        """Drop decrypted chunks (the vault was locked)."""
        self.source.forget()

    def rest_of_chunk(self, offset: int, length: int) -> list[tuple[int, memoryview]]:
        """The parts of the chunk a read at ``offset`` has just decrypted that it did not return.

        A random read pays for decrypting its whole chunk (GCM authenticates chunks, not
        pages); handing the rest to the kernel's page cache makes the next reads in that
        chunk free.  Empty unless the read was inside one chunk and decrypted it just now,
        and only from the second time a chunk is decrypted for this handle: reads that
        never come back to a chunk (a scan, a cold random pass) would only pay for the
        push, so, like the kernel's read-ahead, it waits until access shows locality.
        """
        index = offset // self._cs
        if self.source.decrypted != index:
            return []
        self.source.decrypted = -1
        seen = self._seen
        if seen is None:
            seen = self._seen = bytearray((self._n_chunks + 7) // 8)
        byte, bit = index >> 3, 1 << (index & 7)
        if not seen[byte] & bit:
            seen[byte] |= bit
            return []
        plain = self.source._cache.get(index)
        if plain is None:
            return []
        base = index * self._cs
        view = memoryview(plain)
        out = []
        if offset > base:
            out.append((base, view[:offset - base]))
        end = offset + length - base
        if end < len(view):
            out.append((base + end, view[end:]))
        return out

    def close(self) -> None:
        self.source.forget()
        os.close(self.fd)


def read_plain(source: ChunkSource, size: int, offset: int, length: int, flagged: int) -> bytes | memoryview:
    """Plaintext [offset, offset+length) of a file of ``size`` bytes; chunk ``flagged`` is sealed as last."""
    if offset >= size or length <= 0:
        return b""
    end = min(size, offset + length)
    cs = source.header.chunk_size
    first, last = offset // cs, (end - 1) // cs + 1
    lengths = [cs] * (last - first)
    lengths[-1] = chunk_length(last - 1, size, cs)
    head, tail = offset - first * cs, end - (last - 1) * cs
    if not any(i in source._cache for i in range(first, last)):
        # the sequential case: decrypted side by side in one buffer, answered with a view of it
        whole = source.decrypt_run(first, last, lengths, flagged)
        return whole[head:len(whole) - (lengths[-1] - tail)]
    chunks = source.decrypt_range(first, last, lengths, flagged)
    if len(chunks) == 1:
        return chunks[0][head:tail]
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
        #: when the plaintext last changed: the file's mtime from then on, as on a local disk
        #: (not the commit's time), so attributes the kernel cached during the writes
        #: stay true after the commit
        self.last_write_ns: int | None = None
        fd = store.open_fd(path, os.O_RDONLY)
        try:
            self.header = read_header(fd)
            st = os.fstat(fd)
        except (FormatError, OSError):
            os.close(fd)
            raise
        length = st.st_size
        if not is_well_formed_length(length, self.header.chunk_size):
            os.close(fd)
            raise ChunkError(0, "truncated or torn file")
        #: the committed inode (``fd`` while clean, ``target_fd`` while a working copy exists)
        self.key = (st.st_dev, st.st_ino)
        self.nlink_at_open = st.st_nlink
        self.fd = fd
        #: while dirty: the committed inode, kept open so a hard-linked file can be rewritten in place
        self.target_fd: int | None = None
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
        return self.source.decrypt_range(index, index + 1, [length], index if index in self.flagged else -1)[0]

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
        self.target_fd = self.fd
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
            return bytes(read_plain(self.source, self.size, offset, length, -1))
        data = b"".join(bytes(self._chunk(i)) for i in range(first, last))
        return data[offset - first * self.cs:end - first * self.cs]

    def write(self, offset: int, data: bytes) -> int:
        """Needs a working copy (`ensure_working_copy`) first."""
        assert self.temp_name is not None
        self.last_write_ns = time.time_ns()
        self.pending_times = None
        if not isinstance(data, bytes):  # dirty chunks keep views of it: it must not change
            data = bytes(data)
        end = offset + len(data)
        if end > self.size:
            self._grow(end)
        cs = self.cs
        view = memoryview(data)
        pos = offset
        dirty = self.dirty
        while pos < end:
            index = pos // cs
            within = pos - index * cs
            if within == 0 and end - pos >= cs:
                # whole chunks (a large sequential write): views of the request's bytes, no copy
                full = (end - pos) // cs
                at = pos - offset
                dirty.update((index + k, view[at + k * cs:at + (k + 1) * cs]) for k in range(full))
                pos += full * cs
                continue
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
        self.last_write_ns = time.time_ns()
        self.pending_times = None
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
        """Seal dirty chunks into the working copy, contiguous runs in one pwritev each.

        Per run: one `seal_run` (one getrandom for all nonces) and one pwritev; per chunk
        only a length check, so small chunks cost little more than the cipher itself.
        """
        core = self.core()
        cs = self.cs
        size = self.size
        n_last = chunk_count(size, cs) - 1
        last_length = size - n_last * cs
        dirty = self.dirty
        indices = sorted(dirty)
        if keep_last and indices and indices[-1] == n_last:
            indices.pop()
        # chunks per pwritev: 2 buffers each (IOV_MAX is 1024), and about 1 MiB, so the sealed
        # buffers of one run stay in the CPU cache and the allocator reuses them (8 MiB runs
        # measured ~40% slower: fresh pages for every run)
        run_max = max(1, min(512, (1 << 20) // cs))
        k = 0
        while k < len(indices):
            start = indices[k]
            j = k + 1
            while j < len(indices) and indices[j] == indices[j - 1] + 1 and j - k < run_max:
                j += 1
            stop = start + (j - k)
            self._fill_zeros(core, start)
            plains: list[bytes | bytearray | memoryview] = []
            for index in range(start, stop):
                plain = dirty.pop(index)
                want = cs if index < n_last else last_length
                if len(plain) != want:  # grown since it was dirtied (the gap reads as zeros) or shrunk
                    plain = bytes(plain[:want]) + bytes(max(0, want - len(plain)))
                plains.append(plain)
            sealed = core.seal_run(plains, self.source.aads(start, stop, n_last))
            _write_runs(self.fd, [(self.header.chunk_offset(start), sealed)])
            self.flagged.difference_update(range(start, stop))
            if start <= n_last < stop:
                self.flagged.add(n_last)
            self.phys = max(self.phys, stop)
            k = j
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
        elif self.last_write_ns is not None:
            os.utime(self.fd, ns=(os.fstat(self.fd).st_atime_ns, self.last_write_ns))
        self.last_write_ns = None
        os.fsync(self.fd)
        return True

    def in_place(self) -> bool:
        """Whether the commit must rewrite the committed inode in place: it has another name.

        Also after this writer's own name went (unlink, renamed over) while another name keeps
        the inode: writes through an open file reach the file, as on a local disk.
        """
        if self.temp_name is None or self.target_fd is None:
            return False
        nlink = os.fstat(self.target_fd).st_nlink
        return nlink >= 1 if self.detached else nlink > 1

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
        # the key always names an inode this writer holds open, so its number is never reused
        st = os.fstat(self.fd)
        self.key = (st.st_dev, st.st_ino)
        self._close_target()
        self.phys = n
        self.flagged = {n - 1}
        self.source.forget()

    def publish_in_place(self) -> None:
        """Copy the prepared working copy over the committed inode, crash-safe (blocking).

        See the module doc for the steps; `finish_rewrite` redoes them after a crash.
        """
        assert self.temp_name is not None and self.target_fd is not None
        parent, _, name = self.temp_name.rpartition("/")
        record = f"{parent + '/' if parent else ''}{REDO_PREFIX}{name[len(TMP_PREFIX):]}"
        target = record + REDO_TARGET_SUFFIX
        dst = writable_fd(self.target_fd)  # before the commit point: a refusal changes nothing
        try:
            os.link(f"/proc/self/fd/{self.target_fd}", target, dst_dir_fd=self.store.fd, follow_symlinks=True)
            try:
                self.store.rename(self.temp_name, record)
                self.store.fsync_dir(parent)
            except BaseException:
                self.store.unlink(target)
                raise
            self.temp_name = None  # from here on the record is the new contents, redone at mount
            _rewrite_after_commit_point(self.store, self.fd, dst, record)
        finally:
            os.close(dst)
        n = chunk_count(self.size, self.cs)
        os.close(self.fd)
        self.fd, self.target_fd = self.target_fd, None
        self.source = ChunkSource(self.fd, self.header, self._core)
        self.phys = n
        self.flagged = {n - 1}

    def _close_target(self) -> None:
        if self.target_fd is not None:
            os.close(self.target_fd)
            self.target_fd = None

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
        self._close_target()
        try:
            os.close(self.fd)
        except OSError as e:  # pragma: no cover
            if e.errno != errno.EBADF:
                raise
