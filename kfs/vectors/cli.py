"""``kfs vectors ls|query|status`` against a live mount."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kfs.cli import CliError, live_call


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("vectors", help="vector collections: list, query, sync status")
    sub = parser.add_subparsers(dest="vectors_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("ls", help="collections with count, dimension, queue depth and sync lag")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("query", help="nearest records of a collection, as JSON Lines")
    p.add_argument("collection")
    p.add_argument("mountpoint")
    p.add_argument("--text", help="query text (embedded by the configured model)")
    p.add_argument("--vector", help="query vector as a JSON list")
    p.add_argument("-k", type=int, default=None, help="how many results (default: search_k)")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("status", help="backend, sync mode, queue depth, lag and last error")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sync", help="apply every queued record to the backend now")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_sync)


def cmd_ls(args: argparse.Namespace) -> int:
    cols = live_call(args.mountpoint, "vectors.ls")
    if args.json:
        print(json.dumps(cols, indent=2))
        return 0
    print(f"{'COLLECTION':<24} {'DIM':>5} {'QUEUED':>7} {'LAG_S':>7}  BACKEND")
    for c in cols:
        dim = c["dimension"] if c["dimension"] is not None else "-"
        print(f"{c['name']:<24} {dim:>5} {c['queue_depth']:>7} {c['sync_lag_s']:>7}  {c['backend']}")
    return 0


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
    status = live_call(args.mountpoint, "vectors.status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"state       {status['state']}")
    print(f"backend     {status['backend']}  ({status['sync_mode']})")
    print(f"queued      {status['queue_depth']} records, {status['applied']} applied since mount")
    if status.get("last_error"):
        print(f"last error  {status['last_error']}")
    for name, c in status["collections"].items():
        print(f"  {name:<22} dim {c['dimension']}  queued {c['queue_depth']}  lag {c['sync_lag_s']}s")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    status = live_call(args.mountpoint, "vectors.sync", timeout=300)
    print(f"queued {status['queue_depth']} records")
    return 0
