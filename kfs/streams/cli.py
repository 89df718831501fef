"""``kfs stream ls|tail|publish|status|token create|list|revoke`` against a live mount."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from kfs.cli import CliError, live_call


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("stream", help="list, follow and publish to streams; manage broker tokens")
    sub = parser.add_subparsers(dest="stream_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("ls", help="streams with their last seq, retained events and readers")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("tail", help="print the last N events of a stream (-f: then follow)")
    p.add_argument("mountpoint")
    p.add_argument("stream")
    p.add_argument("-n", "--lines", type=int, default=20)
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("publish", help="publish JSON object lines (argument, or stdin with -)")
    p.add_argument("mountpoint")
    p.add_argument("stream")
    p.add_argument("event", help="a JSON object, or - to read lines from stdin")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("status", help="a stream's retained range, readers and bridge state")
    p.add_argument("mountpoint")
    p.add_argument("stream")
    p.set_defaults(func=cmd_status)

    token = sub.add_parser("token", help="bearer tokens for the WebSocket broker")
    tsub = token.add_subparsers(dest="token_command", metavar="ACTION")
    tsub.required = True
    p = tsub.add_parser("create", help="create a token for a role; prints it once, alone on its last line")
    p.add_argument("mountpoint")
    p.add_argument("--role", required=True)
    p.add_argument("--note", default="")
    p.set_defaults(func=cmd_token_create)
    p = tsub.add_parser("list", help="token ids and roles (never the tokens)")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token_list)
    p = tsub.add_parser("revoke", help="revoke a token by id (its clients are disconnected)")
    p.add_argument("mountpoint")
    p.add_argument("id")
    p.set_defaults(func=cmd_token_revoke)


def cmd_ls(args: argparse.Namespace) -> int:
    streams = live_call(args.mountpoint, "streams.ls", timeout=30)
    if args.json:
        print(json.dumps(streams, indent=2))
        return 0
    print(f"{'STREAM':<24} {'LAST SEQ':>9} {'RETAINED':>9} {'BYTES':>11} {'READERS':>7}")
    for s in streams:
        name = s["name"] + (" (built-in)" if s["builtin"] else "")
        print(f"{name:<24} {s['last_seq']:>9} {s['retained']:>9} {s['bytes']:>11} {s['readers']:>7}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    if args.lines < 0:
        raise CliError("--lines must be 0 or more")
    result = live_call(args.mountpoint, "streams.tail", {"stream": args.stream, "lines": min(args.lines, 100_000)},
                       timeout=60)
    for line in result["lines"]:
        sys.stdout.write(line)
    sys.stdout.flush()
    if not args.follow:
        return 0
    # Follow through the mount itself: a replay file from the next seq on.
    path = os.path.join(args.mountpoint, "streams", f"{args.stream}@since", str(result["next_seq"]))
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    data = sys.stdin.read() if args.event == "-" else args.event
    result = live_call(args.mountpoint, "streams.publish", {"stream": args.stream, "data": data}, timeout=30)
    seqs = result["seqs"]
    print(f"published {len(seqs)} event{'s' if len(seqs) != 1 else ''} to {args.stream} (seq {seqs[0]}"
          f"{'-' + str(seqs[-1]) if len(seqs) > 1 else ''})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(live_call(args.mountpoint, "streams.status", {"stream": args.stream}, timeout=30), indent=2))
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    result = live_call(args.mountpoint, "streams.token_create", {"role": args.role, "note": args.note}, timeout=30)
    print(f"token {result['id']} for role {result['role']} (shown once; kfs keeps only its hash):")
    print(result["token"])
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    tokens = live_call(args.mountpoint, "streams.token_list", timeout=30)
    if args.json:
        print(json.dumps(tokens, indent=2))
        return 0
    print(f"{'ID':<10} {'ROLE':<12} {'CREATED':<21} NOTE")
    for t in tokens:
        print(f"{t['id']:<10} {t['role']:<12} {t['created']:<21} {t['note']}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    result = live_call(args.mountpoint, "streams.token_revoke", {"id": args.id}, timeout=30)
    print(f"revoked token {result['id']} (role {result['role']})")
    return 0
