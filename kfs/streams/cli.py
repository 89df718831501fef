"""``kfs stream ls|tail|publish|status|token create|list|revoke`` against a live mount."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from kfs.cli import CliError, add_area_commands, add_command, live_call, print_result


def register(subparsers: Any) -> None:
    sub = add_area_commands(subparsers, "stream", "list, follow and publish to streams; manage broker tokens")
    add_command(sub, "ls", cmd_ls, "streams with their last seq, retained events and readers", json_output=True)
    p = add_command(sub, "tail", cmd_tail, "print the last N events of a stream (-f: then follow)",
                    "mountpoint", "stream")
    p.add_argument("-n", "--lines", type=int, default=20)
    p.add_argument("-f", "--follow", action="store_true")
    p = add_command(sub, "publish", cmd_publish, "publish JSON object lines (argument, or stdin with -)",
                    "mountpoint", "stream")
    p.add_argument("event", help="a JSON object, or - to read lines from stdin")
    add_command(sub, "status", cmd_status, "a stream's retained range, readers and bridge state",
                "mountpoint", "stream")

    token = sub.add_parser("token", help="bearer tokens for the WebSocket broker")
    tsub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    p = add_command(tsub, "create", cmd_token_create,
                    "create a token for a role; prints it once, alone on its last line")
    p.add_argument("--role", required=True)
    p.add_argument("--note", default="")
    add_command(tsub, "list", cmd_token_list, "token ids and roles (never the tokens)", json_output=True)
    add_command(tsub, "revoke", cmd_token_revoke, "revoke a token by id (its clients are disconnected)",
                "mountpoint", "id")


def cmd_ls(args: argparse.Namespace) -> int:
    return print_result(args, live_call(args.mountpoint, "streams.ls", timeout=30), _stream_table)


def _stream_table(streams: list[dict[str, Any]]) -> Iterator[str]:
    yield f"{'STREAM':<24} {'LAST SEQ':>9} {'RETAINED':>9} {'BYTES':>11} {'READERS':>7}"
    for s in streams:
        name = s["name"] + (" (built-in)" if s["builtin"] else "")
        yield f"{name:<24} {s['last_seq']:>9} {s['retained']:>9} {s['bytes']:>11} {s['readers']:>7}"


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
    return print_result(args, live_call(args.mountpoint, "streams.token_list", timeout=30), _token_table)


def _token_table(tokens: list[dict[str, Any]]) -> Iterator[str]:
    yield f"{'ID':<10} {'ROLE':<12} {'CREATED':<21} NOTE"
    for t in tokens:
        yield f"{t['id']:<10} {t['role']:<12} {t['created']:<21} {t['note']}"


def cmd_token_revoke(args: argparse.Namespace) -> int:
    result = live_call(args.mountpoint, "streams.token_revoke", {"id": args.id}, timeout=30)
    print(f"revoked token {result['id']} (role {result['role']})")
    return 0
