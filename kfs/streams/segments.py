"""Retained history of one stream on disk: segment files of JSON lines.

A stream is a byte log with offsets that only grow.  Its retained part lives
in the store's ``streams/NAME/`` as segment files named
``<first seq, 20 digits>-<first byte offset, 20 digits>.jsonl``; the last one
is active (appended to).  Retention deletes whole oldest segments, so what
stays is a contiguous range of sequence numbers and of byte offsets.

Durability: every event is ``os.write``-n to the active segment before the
writer is answered, so a kill -9 of the daemon loses nothing acknowledged
(the page cache survives the process).  A torn last line (power loss) is cut
off at load.

In memory we keep one int per retained event (its byte offset) so that seq
<-> offset lookups are a bisect; lines themselves are read back with
``os.pread`` from the segment files (page cache: microseconds).
"""

from __future__ import annotations

import bisect
import errno
import os
import re
from array import array
from dataclasses import dataclass, field
from itertools import accumulate

from kfs.store import StoreDir

SEGMENT_RE = re.compile(r"^(\d{20})-(\d{20})\.jsonl$")


def _write_all(fd: int, view: memoryview) -> None:
    """Write all of ``view`` (``os.write`` may stop short: disk full, a signal)."""
    while view:
        view = view[os.write(fd, view):]


@dataclass
class Segment:
    first_seq: int
    first_offset: int
    name: str
    size: int = 0
    events: int = 0
    fd: int = -1

    @property
    def end_offset(self) -> int:
        return self.first_offset + self.size


def segment_name(first_seq: int, first_offset: int) -> str:
    return f"{first_seq:020d}-{first_offset:020d}.jsonl"


@dataclass
class SegmentLog:
    """The on-disk retained history of one stream, plus its offset index."""

    directory: StoreDir
    max_events: int
    max_bytes: int
    segments: list[Segment] = field(default_factory=list)
    #: byte offset of each retained event, oldest first; offsets[i] is seq first_seq + i
    offsets: array = field(default_factory=lambda: array("q"))
    first_seq: int = 1
    next_seq: int = 1
    end_offset: int = 0

    @classmethod
    def open(cls, directory: StoreDir, max_events: int, max_bytes: int) -> SegmentLog:
        log = cls(directory, max(1, max_events), max(1, max_bytes))
        log._load()
        return log

    # ------------------------------------------------------------------ limits
    @property
    def segment_events(self) -> int:
        """Roll the active segment at this many events (retention drops whole segments)."""
        return max(1, self.max_events // 8)

    @property
    def segment_bytes(self) -> int:
        return max(4096, self.max_bytes // 8)

    @property
    def start_offset(self) -> int:
        return self.segments[0].first_offset if self.segments else self.end_offset

    @property
    def retained_events(self) -> int:
        return self.next_seq - self.first_seq

    @property
    def retained_bytes(self) -> int:
        return self.end_offset - self.start_offset

    # ------------------------------------------------------------------ load
    def _load(self) -> None:
        names = sorted(n for n in self.directory.listdir() if SEGMENT_RE.match(n))
        for name in names:
            m = SEGMENT_RE.match(name)
            assert m is not None
            seg = Segment(int(m.group(1)), int(m.group(2)), name)
            data = self.directory.read_bytes(name)
            complete = data.rfind(b"\n") + 1
            if complete < len(data):
                # A torn last line was never acknowledged: cut it off.
                with self.directory.opened(name, os.O_WRONLY) as fd:
                    os.ftruncate(fd, complete)
                data = data[:complete]
            if self.segments and seg.first_offset != self.segments[-1].end_offset:
                # A hole (a segment lost by hand): start the offset index afresh there.
                self.offsets = array("q")
                for old in self.segments:
                    self._close(old)
                self.segments = []
            pos = 0
            while pos < len(data):
                self.offsets.append(seg.first_offset + pos)
                pos = data.index(b"\n", pos) + 1
                seg.events += 1
            seg.size = len(data)
            if not self.segments:
                self.first_seq = seg.first_seq
            self.segments.append(seg)
        if self.segments:
            last = self.segments[-1]
            self.next_seq = last.first_seq + last.events
            self.end_offset = last.end_offset
            # Empty middle segments (a roll right before a crash) are harmless; the
            # seq of the first event is what the names say.
            self.first_seq = self.next_seq - len(self.offsets)
        self._retain()

    # ------------------------------------------------------------------ write
    def append(self, line: bytes) -> tuple[int, int]:
        """Write one complete line (ending in ``\\n``); returns its (seq, offset)."""
        seg = self.segments[-1] if self.segments else None
        if seg is None or seg.events >= self.segment_events or (seg.size and seg.size + len(line) > self.segment_bytes):
            seg = self._roll()
        if seg.fd < 0:
            seg.fd = self.directory.open_fd(seg.name, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        _write_all(seg.fd, memoryview(line))
        seq, offset = self.next_seq, self.end_offset
        self.offsets.append(offset)
        seg.size += len(line)
        seg.events += 1
        self.next_seq += 1
        self.end_offset += len(line)
        self._retain()
        return seq, offset

    def append_many(self, lines: list[bytes]) -> None:
        """Write complete lines, one ``os.write`` per segment they land in (see `append_block`)."""
        if len(lines) == 1:
            self.append(lines[0])  # a single event (a WebSocket message): no batch machinery
            return
        self.append_block(b"".join(lines), list(map(len, lines)))

    def append_block(self, block: bytes, sizes: list[int]) -> None:
        """Write a burst of complete lines held in one buffer; ``sizes`` are its lines' lengths.

        One ``os.write`` per segment the burst lands in, cut at line boundaries.  The cut and
        the offset index come from one ``accumulate`` and a ``bisect`` (C loops): a burst of a
        thousand log lines costs no Python bytecode per line, and no bytes object per line.
        """
        if len(sizes) == 1:
            self.append(block)
            return
        view = memoryview(block)
        start = 0  # bytes of the block written so far
        index = 0  # lines of the block written so far
        while index < len(sizes):
            seg = self.segments[-1] if self.segments else None
            if seg is None or seg.events >= self.segment_events or (
                    seg.size and seg.size + sizes[index] > self.segment_bytes):
                seg = self._roll()
            if seg.fd < 0:
                seg.fd = self.directory.open_fd(seg.name, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            room = self.segment_events - seg.events
            # ends[k] is where line index + k starts (ends[0] is the current end of the log).
            ends = list(accumulate(sizes[index: index + room], initial=self.end_offset))
            # Lines that fit under the segment's byte bound; the first always goes in (an empty
            # segment takes even an oversized line).
            take = max(1, bisect.bisect_right(ends, self.end_offset + self.segment_bytes - seg.size, 1) - 1)
            written = ends[take] - self.end_offset
            _write_all(seg.fd, view[start: start + written])
            del ends[take:]
            self.offsets.fromlist(ends)  # from a list: a third of extend's cost
            self.end_offset += written
            self.next_seq += take
            seg.size += written
            seg.events += take
            index += take
            start += written
        self._retain()

    def _roll(self) -> Segment:
        seg = Segment(self.next_seq, self.end_offset, segment_name(self.next_seq, self.end_offset))
        seg.fd = self.directory.open_fd(seg.name, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
        self.segments.append(seg)
        return seg

    def _retain(self) -> int:
        """Delete oldest whole segments while over a bound (never the active one)."""
        dropped = 0
        while len(self.segments) > 1 and (
            self.retained_events > self.max_events or self.retained_bytes > self.max_bytes
        ):
            old = self.segments.pop(0)
            self._close(old)
            try:
                self.directory.unlink(old.name)
            except FileNotFoundError:
                pass
            del self.offsets[: old.events]
            self.first_seq += old.events
            dropped += old.events
        return dropped

    def sync(self) -> None:
        if self.segments and self.segments[-1].fd >= 0:
            os.fsync(self.segments[-1].fd)

    # ------------------------------------------------------------------ read
    def read(self, offset: int, size: int) -> bytes:
        """Bytes at ``offset`` (inside the retained range), within one segment."""
        if offset < self.start_offset or offset >= self.end_offset or size <= 0:
            return b""
        index = bisect.bisect_right([s.first_offset for s in self.segments], offset) - 1
        seg = self.segments[index]
        if seg.fd < 0:
            # Read-write even here: the active segment's fd is also the one appends use.
            seg.fd = self.directory.open_fd(seg.name, os.O_RDWR | os.O_APPEND)
        want = min(size, seg.end_offset - offset)
        return os.pread(seg.fd, want, offset - seg.first_offset)

    def line(self, seq: int) -> bytes:
        """The stored line of event ``seq`` (with its newline)."""
        if not self.first_seq <= seq < self.next_seq:
            raise KeyError(seq)
        start = self.offsets[seq - self.first_seq]
        end = self.offsets[seq - self.first_seq + 1] if seq + 1 < self.next_seq else self.end_offset
        out = b""
        while len(out) < end - start:
            chunk = self.read(start + len(out), end - start - len(out))
            if not chunk:
                raise OSError(errno.EIO, "segment shorter than its index")
            out += chunk
        return out

    def offset_of(self, seq: int) -> int:
        """Byte offset where event ``seq`` starts (clamped to the retained range)."""
        if seq < self.first_seq:
            return self.start_offset
        if seq >= self.next_seq:
            return self.end_offset
        return self.offsets[seq - self.first_seq]

    def seq_at(self, offset: int) -> tuple[int, bool]:
        """The seq of the event containing ``offset`` and whether it starts exactly there."""
        if offset >= self.end_offset:
            return self.next_seq, True
        i = bisect.bisect_right(self.offsets, offset) - 1
        if i < 0:
            return self.first_seq, offset == self.start_offset
        return self.first_seq + i, self.offsets[i] == offset

    # ------------------------------------------------------------------ teardown
    @staticmethod
    def _close(seg: Segment) -> None:
        if seg.fd >= 0:
            os.close(seg.fd)
            seg.fd = -1

    def close(self) -> None:
        for seg in self.segments:
            self._close(seg)

    def destroy(self) -> None:
        """Delete every segment (the stream is removed)."""
        self.close()
        for seg in self.segments:
            try:
                self.directory.unlink(seg.name)
            except FileNotFoundError:
                pass
        self.segments = []
        self.offsets = array("q")
