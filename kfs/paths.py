"""Where things live: default store, control socket, nesting checks."""

from __future__ import annotations

import os
import string
from pathlib import Path

_PLAIN = set(string.ascii_letters + string.digits + ":_.")


def systemd_escape_path(path: str) -> str:
    """What ``systemd-escape --path`` prints for ``path``."""
    trimmed = os.path.normpath(path).strip("/")
    if not trimmed:
        return "-"
    out = []
    for i, ch in enumerate(trimmed):
        if ch == "/":
            out.append("-")
        elif ch in _PLAIN and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def default_store(mountpoint: str) -> str:
    """/var/lib/kfs/<escaped> for root, $XDG_DATA_HOME/kfs/<escaped> for others."""
    escaped = systemd_escape_path(os.path.realpath(mountpoint))
    if os.geteuid() == 0:
        return f"/var/lib/kfs/{escaped}"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return f"{base}/kfs/{escaped}"


def runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run/kfs"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/kfs-{os.geteuid()}"
    return f"{base}/kfs"


def control_socket_path(mountpoint: str) -> str:
    return f"{runtime_dir()}/{systemd_escape_path(os.path.realpath(mountpoint))}.sock"


def nested(inner: str, outer: str) -> bool:
    """True if ``inner`` is ``outer`` or lies below it (after resolving links)."""
    a, b = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    return a == b or b in a.parents
