"""``kfs snapshot ls|create|verify|diff|restore|rm MOUNTPOINT ...`` (served by the live daemon)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

#: snapshots of a large state take a while; the daemon answers when the zip is durable
LONG = 6 * 3600.0


def _call(mountpoint: str, cmd: str, args: dict[str, Any]) -> Any:
    from kfs.cli import live_call

    return live_call(mountpoint, f"snapshots.{cmd}", args, timeout=LONG)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_ls(args: argparse.Namespace) -> int:
    from kfs.cli import print_result

    return print_result(args, _call(args.mountpoint, "ls", {}), _snapshot_table)


def _snapshot_table(snaps: list[dict[str, Any]]) -> Iterator[str]:
    for s in sorted(snaps, key=lambda s: (s.get("created", ""), s["name"])):
        yield (f"{s['name']:<32} {s.get('created', '?'):<21} {s.get('type', '?'):<12} {s.get('trigger', '?'):<20} "
               f"{s.get('files', 0):>6} files {_human(s.get('size', 0)):>10}")


def cmd_create(args: argparse.Namespace) -> int:
    from kfs.cli import CliError

    if args.type == "agent" and not args.agent:
        raise CliError("--type agent needs --agent ID")
    result = _call(args.mountpoint, "create", {"name": args.name, "type": args.type, "agent": args.agent,
                                               "trigger": args.trigger})
    print(result["name"])
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from kfs.cli import CliError

    if args.store:
        result = _verify_offline(args.store, args.name)
    else:
        result = _call(args.mountpoint, "verify", {"name": args.name})
    for problem in result["problems"]:
        print(problem)
    if not result["ok"]:
        raise CliError(f"{args.name}: {len(result['problems'])} difference(s) from manifest.json")
    print(f"{args.name}: ok ({result['files']} files match manifest.json)")
    return 0


def _verify_offline(store_path: str, name: str) -> dict[str, Any]:
    """Verify a snapshot straight from a store directory, no daemon needed."""
    import os

    from kfs.cli import CliError
    from kfs.snapshots.reader import open_snapshot, verify
    from kfs.snapshots.writer import SnapshotError
    from kfs.store import StoreDir

    try:
        snapshots = StoreDir.open(os.path.join(store_path, "snapshots"), create=False)
        snap = open_snapshot(snapshots, name)
    except FileNotFoundError:
        raise CliError(f"no snapshot {name} in {store_path}") from None
    except SnapshotError as e:
        raise CliError(str(e)) from None
    try:
        problems = verify(snap)
        return {"name": name, "ok": not problems, "problems": problems, "files": len(snap.files) - 1}
    finally:
        snap.close()


def cmd_diff(args: argparse.Namespace) -> int:
    result = _call(args.mountpoint, "diff", {"a": args.a, "b": args.b})
    for mark, key in (("+", "added"), ("-", "removed"), ("M", "changed")):
        for path in result[key]:
            print(f"{mark} {path}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    result = _call(args.mountpoint, "restore", {"name": args.name})
    print(f"restored {result['name']} ({', '.join(result['areas']) or 'no area with restore hooks'}); "
          f"safety snapshot {result['safety']}")
    if result.get("skipped"):
        print(f"not restored (no restore hook here): {', '.join(result['skipped'])}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    for name in args.names:
        _call(args.mountpoint, "rm", {"name": name})
    return 0


def register(subparsers: Any) -> None:
    from kfs.cli import add_area_commands, add_command

    sub = add_area_commands(subparsers, "snapshot", "take, list, verify, diff, restore and delete snapshots")
    add_command(sub, "ls", cmd_ls, "list snapshots", json_output=True)
    c = add_command(sub, "create", cmd_create, "take a snapshot (named YYYY-MM-DDTHHMMSSZ unless --name)")
    c.add_argument("--type", choices=["full", "agent", "conversation"], default="full")
    c.add_argument("--agent", help="agent id (for --type agent)")
    c.add_argument("--name", help="snapshot name (default: the UTC time)")
    c.add_argument("--trigger", default="manual", help="manual (default) or event:NAME (for hooks)")
    c = add_command(sub, "verify", cmd_verify,
                    "re-hash every file against manifest.json (non-zero exit on a difference)", "mountpoint", "name")
    c.add_argument("--store", help="verify offline, from this store directory, without a live mount")
    add_command(sub, "diff", cmd_diff, "files added, removed and changed from snapshot A to B", "mountpoint", "a", "b")
    add_command(sub, "restore", cmd_restore, "restore a full snapshot (takes a pre-restore safety snapshot first)",
                "mountpoint", "name")
    c = add_command(sub, "rm", cmd_rm, "delete snapshots")
    c.add_argument("names", nargs="+")
