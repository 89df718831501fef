"""Open stream files: the byte cursor of one reader, and its bounded waits.

The kernel addresses a read by file offset.  For a plain follower (``cat``,
``tail -f``) each read starts where the last one ended, and we serve it from
our own cursor (``real_next``), which may run ahead of the kernel's offset:
below the retained range we start at the oldest event, and a reader that
falls too far behind skips ahead behind a ``gap`` marker line that exists only
in its own view.  Any other offset (``tail -n`` seeking back from
``st_size``, ``pread``) is served as an absolute position in the stream.

A read at the end waits for the next event at most ``read_wait`` and then
answers EINTR (or EAGAIN at once with O_NONBLOCK): pyfuse3 ignores FUSE
interrupts, so a request held longer would leave the reader unkillable.
``cat``, ``tail`` and Python retry EINTR without a word.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field

import trio

from kfs.fs.area import Handle, fs_error
from kfs.streams.broker import Broker, Stream, rfc3339


@dataclass(eq=False)
class StreamHandle(Handle):
    stream: str = ""
    kind: str = "stream"  # "stream" | "status"
    #: stream offset that kernel offset 0 maps to (non-zero for NAME@since/SEQ)
    base: int = 0
    started: bool = False
    kernel_next: int = 0
    real_next: int = 0
    #: gap marker bytes still to hand out before real data
    pending: bytes = b""
    #: stream.log.next_seq when the file was opened: history before it is not "lag"
    open_next_seq: int = 1
    gaps: int = 0
    #: the seq at or after real_next (kept so a retention cut can say what was lost)
    cursor_seq: int = 0
    missed: int = 0
    #: an incomplete line written so far (the kernel may split a large write)
    write_buffer: bytearray = field(default_factory=bytearray)
    status_bytes: bytes = b""
    #: the stream's generation at open: once the name is deleted and created again, this
    #: handle reads end of file (its offsets belong to the old incarnation), like a deleted file
    generation: int = 0

    # Handles are identities (kept in sets), not values.
    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    def lag(self, stream: Stream) -> int:
        if not self.started:
            seq = stream.log.seq_at(self.base)[0]
        else:
            seq = stream.log.seq_at(max(self.real_next, stream.log.start_offset))[0]
        return max(0, stream.log.next_seq - seq)


def gap_marker(stream: str, first_missed: int, next_seq: int) -> bytes:
    record = {"gap": next_seq - first_missed, "stream": stream, "from_seq": first_missed,
              "to_seq": next_seq - 1, "timestamp": rfc3339()}
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


async def read_stream(broker: Broker, handle: StreamHandle, offset: int, size: int,
                      wait: float, max_lag: int) -> bytes:
    stream = broker.streams.get(handle.stream)
    if stream is None:
        return b""  # removed while open: end of file
    if stream.generation != handle.generation:
        if handle.generation:
            return b""  # removed and created again while open: end of file too
        handle.generation = stream.generation  # (a handle made without one takes the current)
    log = stream.log
    following = handle.started and offset == handle.kernel_next
    if following:
        if handle.pending:
            out = handle.pending[:size]
            handle.pending = handle.pending[len(out):]
            handle.kernel_next = offset + len(out)
            return out
        real = handle.real_next
    else:
        handle.pending = b""
        real = handle.base + offset
    if real < log.start_offset:
        if following:
            # Retention dropped events this reader had not read yet: say so.
            lost_from = handle.cursor_seq
            if 0 < lost_from < log.first_seq:
                handle.pending = gap_marker(stream.name, lost_from, log.first_seq)
                handle.gaps += 1
                handle.missed += log.first_seq - lost_from
        real = log.start_offset
    elif (following or (not handle.started and offset == 0)) and max_lag > 0 and real < log.end_offset:
        seq, at_line_start = log.seq_at(real)
        backlog = log.next_seq - max(seq, handle.open_next_seq)
        if backlog > max_lag:
            if at_line_start:
                resume = log.next_seq - max(1, max_lag // 2)
                handle.pending = gap_marker(stream.name, seq, resume)
                handle.gaps += 1
                handle.missed += resume - seq
                real = log.offset_of(resume)
            else:
                # Finish the line in progress first: the marker goes between lines.
                size = min(size, log.offset_of(seq + 1) - real)
    handle.started = True
    handle.real_next = real
    if handle.pending:
        out = handle.pending[:size]
        handle.pending = handle.pending[len(out):]
        handle.kernel_next = offset + len(out)
        return out
    if real >= log.end_offset:
        if handle.nonblocking:
            handle.kernel_next = offset
            raise fs_error(errno.EAGAIN)
        with trio.move_on_after(wait):
            await stream.changed.wait()
        if broker.streams.get(handle.stream) is not stream:
            return b""
        if real >= log.end_offset:
            handle.kernel_next = offset
            raise fs_error(errno.EINTR)
    out = log.read(real, size)
    handle.kernel_next = offset + len(out)
    handle.real_next = real + len(out)
    handle.cursor_seq = handle_seq(handle, stream)
    return out


def handle_seq(handle: StreamHandle, stream: Stream) -> int:
    """The seq this handle would read next (first seq at or after its cursor)."""
    seq, exact = stream.log.seq_at(handle.real_next)
    return seq if exact else seq + 1
