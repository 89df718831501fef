"""Line validation for logs/: JSON objects only, `timestamp` added, `level` filtered.

The hot path of every write.  A batch of complete lines (ending in ``\\n``) is
checked and parsed line by line by orjson inside ``map``, so
the per-line cost is the C parse and no Python bytecode (the general path,
for anything unusual, scans with the C JSON scanner object by object).  A line is stored
byte for byte as written (surrounding whitespace trimmed) unless it lacks a
``timestamp``, which is then inserted as the object's first member: no
re-serialisation, so the user's key order and number formatting survive.
"""

from __future__ import annotations

import json
import json.scanner
import operator
import re
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import orjson

#: one line (an assembled JSON object) may not be longer than this
MAX_LINE_BYTES = 16 << 20

LOG_SUFFIX = ".log.jsonl"
#: ``NAME.YYYYMMDDTHHMMSSZ.log.jsonl`` (``-N`` when two rotations share a second)
ROTATED_NAME = re.compile(r"^(?P<base>.+)\.(?P<stamp>\d{8}T\d{6}Z)(?:-(?P<n>\d+))?\.log\.jsonl$")

LEVELS: dict[str, int] = {
    "trace": 5, "debug": 10, "info": 20, "notice": 25, "warn": 30, "warning": 30,
    "error": 40, "err": 40, "critical": 50, "crit": 50, "fatal": 50, "alert": 55, "emergency": 60, "emerg": 60,
}


class LineError(ValueError):
    """A line that is not a JSON object: the whole write fails with EINVAL."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_scan_once = json.scanner.make_scanner(json.JSONDecoder(parse_constant=_reject_constant))

#: a line's first and last byte (as ints), and all of it after its first
_FIRST_BYTE = operator.itemgetter(0)
_LAST_BYTE = operator.itemgetter(-1)
_AFTER_BRACE = slice(1, None)


def is_log_name(name: str) -> bool:
    return name.endswith(LOG_SUFFIX) and len(name) > len(LOG_SUFFIX)


def is_rotated_name(name: str) -> bool:
    return ROTATED_NAME.match(name) is not None


class TimestampClock:
    """RFC 3339 UTC timestamps with milliseconds and ``Z``; the date part is cached per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((t - second) * 1000):03d}Z"


@dataclass
class Batch:
    """What one run of complete lines becomes."""

    data: bytes = b""  # the bytes to append to the store file (may be empty)
    records: list[dict[str, Any]] = field(default_factory=list)  # the stored records, in order
    filtered: int = 0  # lines accepted but not stored (below the level)


class LineValidator:
    def __init__(self, level: str = "debug") -> None:
        self.min_rank = LEVELS.get(level.lower(), 0)
        #: level names (lower case) that are dropped
        self.below_names = frozenset(name for name, rank in LEVELS.items() if rank < self.min_rank)
        self.clock = TimestampClock()

    def below_level(self, record: dict[str, Any]) -> bool:
        level = record.get("level")
        if not isinstance(level, str):
            return False
        rank = LEVELS.get(level.lower())
        # A level we do not know is kept: never drop what we cannot rank.
        return rank is not None and rank < self.min_rank

    def process(self, raw: bytes) -> Batch:
        """Validate complete lines (``raw`` ends with ``\\n``); raise LineError naming the first bad one.

        The fast path covers batches whose lines are all bare, non-empty objects (``{`` first,
        ``}`` last) that either all carry a timestamp (stored as they are) or none does (one
        timestamp inserted into every line).  Its per-line work runs in C loops (``map`` over
        orjson, strict RFC 8259, validates UTF-8; lookups in the records; one slice per line
        where a timestamp goes in): no Python bytecode per line, which is what a 128 KiB write
        of ~1,000 lines spends its time on otherwise.  Whole-buffer passes are few (one split,
        one join), as each costs about as much as a C loop over the lines.  Anything else, and
        anything orjson refuses, takes the general path, which also words the error.
        """
        if raw.find(b"\n") == len(raw) - 1:
            return self._process_one(raw)
        pieces = raw.split(b"\n")
        pieces.pop()  # raw ends with a newline
        lines = len(pieces)
        try:
            # No whitespace around any object: every line's first byte is "{" (IndexError: an empty
            # line) and its last "}".  A line that starts with "{" and parses can only end otherwise
            # in whitespace: where the batch holds none at all (three memchr scans, which stop at
            # the first hit), the last bytes need no look.
            bare = bytes(map(_FIRST_BYTE, pieces)) == b"{" * lines and (
                (b" " not in raw and b"\t" not in raw and b"\r" not in raw)
                or bytes(map(_LAST_BYTE, pieces)) == b"}" * lines)
        except IndexError:
            bare = False
        if not bare:
            return self._process_general(raw)
        try:
            # A line that starts with "{" and parses is an object: no type check needed.
            records: list[dict[str, Any]] = list(map(orjson.loads, pieces))
        except orjson.JSONDecodeError:
            return self._process_general(raw)
        if not all(records):  # an empty object: the general path stamps it
            return self._process_general(raw)
        # Keys are looked up in the records, not searched for in the bytes: a scan of the batch
        # costs more than a lookup per record, and a key spelt with \u escapes cannot hide.
        if self.below_names and any(map(operator.contains, records, repeat("level", lines))) \
                and self._any_below(records):
            return self._process_general(raw)
        stamped = sum(map(operator.contains, records, repeat("timestamp", lines)))
        if stamped == lines:
            return Batch(raw, records)
        if stamped:
            return self._process_general(raw)
        timestamp = self.clock.now()
        deque(map(operator.setitem, records, repeat("timestamp", lines), repeat(timestamp, lines)), 0)
        # Every line becomes head + the line after its "{": one slice per line (cheaper than a
        # replace of "\n{", which is two passes of a two-byte search) and one join into the only
        # large new buffer.
        head = b'{"timestamp":"' + timestamp.encode() + b'",'
        rests = list(map(operator.getitem, pieces, repeat(_AFTER_BRACE, lines)))
        rests[0] = head + rests[0]
        rests[-1] += b"\n"
        return Batch((b"\n" + head).join(rests), records)

    def _process_one(self, raw: bytes) -> Batch:
        """`process` for a single line (one ``echo >>``, one open-append-close): the same
        checks and output as the batch fast path, without its per-batch set-up."""
        if raw[:1] != b"{" or raw[-2:] != b"}\n":
            return self._process_general(raw)
        try:
            record = orjson.loads(raw)  # starts with "{" and parses: an object
        except orjson.JSONDecodeError:
            return self._process_general(raw)
        if not record or (self.below_names and self.below_level(record)):
            return self._process_general(raw)  # the general path stamps {} and filters
        if "timestamp" in record:
            return Batch(raw, [record])
        timestamp = self.clock.now()
        record["timestamp"] = timestamp
        return Batch(b'{"timestamp":"' + timestamp.encode() + b'",' + raw[1:], [record])

    def _any_below(self, records: list[dict[str, Any]]) -> bool:
        """Does any record carry a level below the configured one?  Looks at distinct values only."""
        try:
            levels = set(map(dict.get, records, repeat("level", len(records))))
        except TypeError:  # an unhashable level (a list...): look at each
            return any(self.below_level(r) for r in records)
        below = self.below_names
        return any(level.__class__ is str and level.lower() in below for level in levels)

    def _process_general(self, raw: bytes) -> Batch:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LineError(f"not UTF-8 at byte {e.start}") from None
        batch = Batch()
        records = batch.records
        pieces: list[str] = []
        changed = False
        timestamp = ""
        pos = 0
        end_of_text = len(text)
        line_no = 0
        while pos < end_of_text:
            line_no += 1
            newline = text.find("\n", pos)
            start = pos
            if text[start] != "{":
                # Leading whitespace is allowed (and trimmed); anything else is not an object.
                while start < newline and text[start] in " \t\r":
                    start += 1
                if start == newline:
                    raise LineError(f"line {line_no}: empty line")
                if text[start] != "{":
                    raise LineError(f"line {line_no}: not a JSON object")
                changed = True
            try:
                record, end = _scan_once(text, start)
            except StopIteration:
                raise LineError(f"line {line_no}: not valid JSON") from None
            except ValueError as e:
                raise LineError(f"line {line_no}: not valid JSON ({e})") from None
            except RecursionError:
                raise LineError(f"line {line_no}: nested too deeply") from None
            if end > newline:
                raise LineError(f"line {line_no}: not valid JSON (object spans lines)")
            if end != newline:
                if text[end:newline].strip(" \t\r"):
                    raise LineError(f"line {line_no}: extra data after the JSON object")
                changed = True
            if self.min_rank and self.below_level(record):
                batch.filtered += 1
                changed = True
            elif "timestamp" in record:
                pieces.append(text[start:end + 1] if end == newline else text[start:end] + "\n")
                records.append(record)
            else:
                if not timestamp:
                    timestamp = self.clock.now()
                changed = True
                head = f'{{"timestamp":"{timestamp}"'
                pieces.append(head + ("," + text[start + 1:end] if record else "}") + "\n")
                record["timestamp"] = timestamp
                records.append(record)
            pos = newline + 1
        batch.data = raw if not changed else "".join(pieces).encode("utf-8")
        return batch


def split_complete(pending: bytes, data: bytes) -> tuple[bytes, bytes]:
    """(complete lines, remainder) of ``pending + data``; complete lines end with ``\\n``."""
    cut = data.rfind(b"\n")
    if cut < 0:
        return b"", pending + data
    if pending:
        return pending + data[:cut + 1], data[cut + 1:]
    return data[:cut + 1], data[cut + 1:]


def plausible_start(partial: bytes) -> bool:
    """Can ``partial`` (a line still being written) become a JSON object?  Checks its first byte."""
    stripped = partial.lstrip(b" \t\r")
    return not stripped or stripped[:1] == b"{"
