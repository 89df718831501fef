"""Helpers shared by the streams tests (test_streams_*.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append_events(path: Path, *events: dict[str, Any]) -> None:
    """One write of whole JSON lines to a stream file, as `echo >>` would (returns once acknowledged)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"".join(json.dumps(e).encode() + b"\n" for e in events))
    finally:
        os.close(fd)
