"""Per-area entries of the `metrics` stream, folded from each area's ``status()``.

No area imports another: the daemon hands streams/ the areas (``attach_peers``,
as it does for snapshots/) and every area already answers ``status()`` for
``kfs status``.  This module turns those answers into one small, uniform entry
per area, without knowing what any area is:

- ``counters``: the area's own numeric counters, as ``kfs status`` shows them;
- ``errors``: the sum of those counters whose name says error, reject, fail or drop;
- ``backlog``: every number in the status (top level or one dict down, not the
  counters) whose name has the word depth, lag, spool, backlog, pending or held:
  vectors' sync queue depth and lag, logs' Logstash spool, the NATS outbox;
- ``last_error``: a non-empty ``last_error`` text, if the status has one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

#: words (of a name split at "_") that mark a figure as a backlog: queue_depth, sync_lag_s,
#: spool_bytes, backlog, held; not queue_fdatasyncs (a count of syncs)
BACKLOG_WORDS = frozenset({"depth", "lag", "spool", "backlog", "pending", "held"})
ERROR_RE = re.compile(r"error|reject|fail|drop")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def area_entry(status: dict[str, Any]) -> dict[str, Any]:
    """One area's metrics entry from its ``status()``."""
    raw_counters = status.get("counters")
    counters = {k: v for k, v in raw_counters.items() if _number(v)} if isinstance(raw_counters, dict) else {}
    backlog: dict[str, float] = {}
    last_error = ""
    for key, value in status.items():
        if key == "counters":
            continue
        children = value.items() if isinstance(value, dict) else ()
        for path, leaf in [(key, value), *((f"{key}.{k}", v) for k, v in children)]:
            name = path.rpartition(".")[2]
            if _number(leaf) and BACKLOG_WORDS.intersection(name.split("_")):
                backlog[path] = leaf
            elif name == "last_error" and isinstance(leaf, str) and leaf and not last_error:
                last_error = leaf
    entry: dict[str, Any] = {
        "state": str(status.get("state", "")),
        "counters": counters,
        "errors": sum(v for k, v in counters.items() if ERROR_RE.search(k)),
        "backlog": backlog,
    }
    if last_error:
        entry["last_error"] = last_error[:200]
    return entry


def areas_metrics(statuses: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every area's entry; an area whose ``status()`` fails says so instead of breaking the rest."""
    out: dict[str, dict[str, Any]] = {}
    for name, status in statuses.items():
        try:
            out[name] = area_entry(status())
        except Exception as e:  # a peer's bug must not stop the metrics stream
            out[name] = {"state": f"status failed: {e!r}"[:200], "counters": {}, "errors": 0, "backlog": {}}
    return out
