"""Line validation for logs/: JSON objects only, `timestamp` added, `level` filtered.

The hot path of every write.  A batch of complete lines (ending in ``\\n``) is
decoded once and scanned with the C JSON scanner object by object, so the
per-line cost is the C parse plus a few Python operations.  A line is stored
byte for byte as written (surrounding whitespace trimmed) unless it lacks a
``timestamp``, which is then inserted as the object's first member: no
re-serialisation, so the user's key order and number formatting survive.
"""

from __future__ import annotations

import json
import json.scanner
import re
import time
from dataclasses import dataclass, field
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


class _Slow(Exception):
    """The batch needs the general path."""


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
        timestamp inserted into every line with a single ``bytes.replace``: a valid line holds
        no raw newline, so ``\\n{`` only ever starts a line).  It parses with orjson (strict
        RFC 8259, validates UTF-8; about 1.5x the standard library here).  Anything else, and
        anything orjson refuses, takes the general path, which also words the error.
        """
        records: list[dict[str, Any]] = []
        append = records.append
        loads = orjson.loads
        below = self.below_names
        stamped = 0
        lines = raw.split(b"\n")
        lines.pop()  # raw ends with a newline
        try:
            for line in lines:
                if line[:1] != b"{" or line[-1:] != b"}":
                    raise _Slow
                record = loads(line)
                if record.__class__ is not dict or not record:
                    raise _Slow
                if "timestamp" in record:
                    stamped += 1
                if below:
                    level = record.get("level")
                    if level.__class__ is str and level.lower() in below:
                        raise _Slow
                append(record)
        except (_Slow, orjson.JSONDecodeError):
            return self._process_general(raw)
        if stamped == len(records):
            return Batch(raw, records)
        if stamped:
            return self._process_general(raw)
        timestamp = self.clock.now()
        for record in records:
            record["timestamp"] = timestamp
        head = b'{"timestamp":"' + timestamp.encode() + b'",'
        return Batch(head + raw[1:].replace(b"\n{", b"\n" + head), records)

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
