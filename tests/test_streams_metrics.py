"""The per-area entries of the `metrics` stream (kfs/streams/metrics.py), without FUSE.

The real-mount check (entries for every area, a NATS outbox backlog showing up while the
link to nats-server is cut) is in test_streams_nats.py."""

from __future__ import annotations

from typing import Any

from kfs.streams.metrics import area_entry, areas_metrics


def test_area_entry_keeps_counters_sums_errors_and_finds_backlogs() -> None:
    vectors = {"state": "backend unavailable (queueing)", "queue_depth": 12, "sync_lag_s": 3.5,
               "last_error": "connection refused", "applied": 40, "queue_fdatasyncs": 2,
               "collections": {"c": {"queue_depth": 12}}, "counters": {"records_accepted": 52, "records_rejected": 1}}
    entry = area_entry(vectors)
    assert entry["state"] == "backend unavailable (queueing)" and entry["last_error"] == "connection refused"
    assert entry["counters"] == {"records_accepted": 52, "records_rejected": 1} and entry["errors"] == 1
    # queue_fdatasyncs is a count of syncs, not a backlog; collections are two levels down
    assert entry["backlog"] == {"queue_depth": 12, "sync_lag_s": 3.5}
    logs = {"state": "ready", "counters": {"lines": 3, "bytes": 90, "rejected_writes": 2, "logstash_spool_bytes": 77},
            "logstash": {"state": "down", "spool_bytes": 77, "spool_segments": 1, "failures": 4, "last_error": ""}}
    entry = area_entry(logs)
    assert entry["backlog"] == {"logstash.spool_bytes": 77, "logstash.spool_segments": 1}
    assert entry["errors"] == 2 and "last_error" not in entry
    streams = {"state": "ready", "counters": {"published": 9}, "nats": {"backlog": 20, "held": 0, "reordered": 5}}
    assert area_entry(streams)["backlog"] == {"nats.backlog": 20, "nats.held": 0}


def test_a_failing_status_does_not_break_the_others() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    out = areas_metrics({"vault": lambda: {"state": "locked", "counters": {"unlocks": 1}}, "odd": broken})
    assert out["vault"]["counters"] == {"unlocks": 1}
    assert out["odd"]["state"].startswith("status failed") and out["odd"]["backlog"] == {}
