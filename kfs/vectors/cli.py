"""``kfs vectors ls|query|status`` against a live mount."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

from kfs.cli import CliError, add_area_commands, add_command, live_call, print_result


def register(subparsers: Any) -> None:
    sub = add_area_commands(subparsers, "vectors", "vector collections: list, query, sync status")
    add_command(sub, "ls", cmd_ls, "collections with count, dimension, queue depth and sync lag", json_output=True)
    p = add_command(sub, "query", cmd_query, "nearest records of a collection, as JSON Lines",
                    "collection", "mountpoint")
    p.add_argument("--text", help="query text (embedded by the configured model)")
    p.add_argument("--vector", help="query vector as a JSON list")
    p.add_argument("-k", type=int, default=None, help="how many results (default: search_k)")
    add_command(sub, "status", cmd_status, "backend, sync mode, queue depth, lag and last error", json_output=True)
    add_command(sub, "sync", cmd_sync, "apply every queued record to the backend now")


def cmd_ls(args: argparse.Namespace) -> int:
    return print_result(args, live_call(args.mountpoint, "vectors.ls"), _collection_table)


def _collection_table(cols: list[dict[str, Any]]) -> Iterator[str]:
    yield f"{'COLLECTION':<24} {'DIM':>5} {'QUEUED':>7} {'LAG_S':>7}  BACKEND"
    for c in cols:
        dim = c["dimension"] if c["dimension"] is not None else "-"
        yield f"{c['name']:<24} {dim:>5} {c['queue_depth']:>7} {c['sync_lag_s']:>7}  {c['backend']}"


def cmd_query(args: argparse.Namespace) -> int:
    if bool(args.text) == bool(args.vector):
        raise CliError("give exactly one of --text or --vector")
    vector = None
    if args.vector:
        try:
            vector = json.loads(args.vector)
        except ValueError:
            raise CliError("--vector must be a JSON list of numbers") from None
        if not isinstance(vector, list) or not all(isinstance(x, int | float) for x in vector):
            raise CliError("--vector must be a JSON list of numbers")
    if args.k is not None and not 1 <= args.k <= 1000:
        raise CliError("-k must be 1..1000")
    results = live_call(args.mountpoint, "vectors.query",
                        {"collection": args.collection, "text": args.text, "vector": vector, "k": args.k})
    for r in results:
        print(json.dumps(r))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return print_result(args, live_call(args.mountpoint, "vectors.status"), _status_lines)


def _status_lines(status: dict[str, Any]) -> Iterator[str]:
    yield f"state       {status['state']}"
    yield f"backend     {status['backend']}  ({status['sync_mode']})"
    yield f"queued      {status['queue_depth']} records, {status['applied']} applied since mount"
    if status.get("last_error"):
        yield f"last error  {status['last_error']}"
    for name, c in status["collections"].items():
        yield f"  {name:<22} dim {c['dimension']}  queued {c['queue_depth']}  lag {c['sync_lag_s']}s"


def cmd_sync(args: argparse.Namespace) -> int:
    status = live_call(args.mountpoint, "vectors.sync", timeout=300)
    print(f"queued {status['queue_depth']} records")
    return 0
