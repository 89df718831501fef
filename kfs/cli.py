"""The ``kfs`` command.  Errors are one line on stderr and a non-zero exit, never a traceback.

Area commands (``kfs vault ...``, ``kfs stream ...``) live in ``kfs/<area>/cli.py``,
each with ``register(subparsers)``; this module only wires them in.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kfs import __version__
from kfs.config import ConfigError, load_config
from kfs.control import ControlError, call
from kfs.paths import control_socket_path, default_store, nested

AREA_CLIS = ["kfs.vault.cli", "kfs.snapshots.cli", "kfs.streams.cli", "kfs.vectors.cli"]


class CliError(Exception):
    """Shown to the user as ``kfs: <message>``, exit code 1 (or ``code``)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- helpers
def live_call(mountpoint: str, cmd: str, args: dict[str, Any] | None = None, timeout: float = 120) -> Any:
    """Run ``cmd`` on the daemon serving ``mountpoint``; CliError on failure."""
    try:
        return call(control_socket_path(os.path.abspath(mountpoint)), cmd, args, timeout)
    except ControlError as e:
        raise CliError(str(e)) from None


def add_area_commands(subparsers: Any, area: str, help: str) -> Any:
    """The ``kfs AREA`` command; returns the sub-parsers its subcommands are added to."""
    parser = subparsers.add_parser(area, help=help)
    return parser.add_subparsers(dest=f"{area}_command", metavar="COMMAND", required=True)


def add_command(
    sub: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    *positionals: str,
    json_output: bool = False,
) -> argparse.ArgumentParser:
    """One subcommand taking ``positionals`` (just ``mountpoint`` when none are named) and, if
    ``json_output``, a ``--json`` flag; the caller adds its own options to the parser returned."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help)
    for positional in positionals or ("mountpoint",):
        p.add_argument(positional)
    if json_output:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=func)
    return p


def print_result(args: argparse.Namespace, result: Any, render: Callable[[Any], Iterable[str]]) -> int:
    """Print ``result`` as JSON under ``--json``, else the lines ``render`` makes of it."""
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for line in render(result):
            print(line)
    return 0


def is_mounted(path: str) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return True


def is_stale_mount(path: str) -> bool:
    """True when ``path`` is a FUSE mount whose daemon is gone ("Transport endpoint is not connected").

    Opening the directory, not ``stat``: the kernel answers ``stat`` of a dead mount's root
    from its attribute cache for as long as the attribute timeout, while an open always
    needs the daemon.
    """
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def lazy_unmount(path: str) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", "-z", path] if tool else ["umount", "-l", path]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def wait_unmounted(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_mounted(path):
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- mount
def cmd_mount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    if is_stale_mount(mountpoint):
        # A daemon that died (kill -9, crash) leaves "Transport endpoint is not connected".
        lazy_unmount(mountpoint)
    if os.path.exists(mountpoint) and not os.path.isdir(mountpoint):
        raise CliError(f"{mountpoint}: not a directory")
    if is_mounted(mountpoint):
        raise CliError(f"{mountpoint}: already mounted")
    if not os.path.exists("/dev/fuse"):
        raise CliError("/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE is available")
    try:
        os.makedirs(mountpoint, exist_ok=True)
    except OSError as e:
        raise CliError(f"{mountpoint}: cannot create: {e.strerror}") from None
    try:
        config = load_config(args.config)
    except ConfigError as e:
        raise CliError(str(e)) from None
    store = os.path.abspath(args.store or default_store(mountpoint))
    if nested(store, mountpoint):
        raise CliError(f"store {store} is inside the mountpoint {mountpoint}: refused (the daemon would deadlock)")
    if nested(mountpoint, store):
        raise CliError(f"mountpoint {mountpoint} is inside the store {store}: refused (the daemon would deadlock)")
    if os.path.exists(store) and not os.path.isdir(store):
        raise CliError(f"store {store}: not a directory")
    passphrase = read_mount_passphrase(args, store)
    if args.foreground:
        return run_foreground(args, mountpoint, store, config, passphrase)
    return spawn_daemon(args, mountpoint, store, passphrase)


def read_mount_passphrase(args: argparse.Namespace, store: str) -> bytearray | None:
    """The vault passphrase for this mount, if one was given (the vault may add a prompt)."""
    if getattr(args, "passphrase_stdin", False):
        return bytearray(sys.stdin.buffer.read().rstrip(b"\n"))
    try:
        vault_cli = importlib.import_module("kfs.vault.cli")
    except ImportError:
        vault_cli = None
    if vault_cli is not None and hasattr(vault_cli, "passphrase_for_mount"):
        return vault_cli.passphrase_for_mount(args, store)
    if args.passphrase_file:
        try:
            with open(args.passphrase_file, "rb") as f:
                return bytearray(f.read().rstrip(b"\n"))
        except OSError as e:
            raise CliError(f"{args.passphrase_file}: {e.strerror}") from None
    env = os.environ.get("KFS_VAULT_PASSPHRASE")
    return bytearray(env.encode()) if env else None


def run_foreground(
    args: argparse.Namespace, mountpoint: str, store: str, config: Any, passphrase: bytearray | None
) -> int:
    import trio

    from kfs.daemon import Daemon, MountOptions

    ready_fd = args.ready_fd

    def report(message: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, message.encode() + b"\n")
                os.close(ready_fd)
            except OSError:
                pass

    opts = MountOptions(
        mountpoint=mountpoint, store=store, config=config, config_dir=args.config,
        foreground=True, allow_other=args.allow_other, passphrase=passphrase, debug=args.debug,
    )
    try:
        daemon = Daemon(opts)
        trio.run(daemon.run, lambda: report("ready"))
    except RuntimeError as e:  # pyfuse3.init failures
        report(f"error: {e}")
        raise CliError(f"cannot mount {mountpoint}: {e}") from None
    except OSError as e:
        report(f"error: {e.strerror or e}")
        raise CliError(f"cannot mount {mountpoint}: {e.strerror or e}") from None
    return 0


def spawn_daemon(args: argparse.Namespace, mountpoint: str, store: str, passphrase: bytearray | None) -> int:
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "kfs", "mount", mountpoint, "--foreground", "--store", store,
           "--ready-fd", str(write_end)]
    if args.config:
        cmd += ["--config", os.path.abspath(args.config)]
    if args.allow_other:
        cmd.append("--allow-other")
    if passphrase is not None:
        cmd.append("--passphrase-stdin")
    child = subprocess.Popen(
        cmd, stdin=subprocess.PIPE if passphrase is not None else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(write_end,), start_new_session=True,
    )
    os.close(write_end)
    if passphrase is not None and child.stdin is not None:
        child.stdin.write(bytes(passphrase))
        child.stdin.close()
        passphrase[:] = bytes(len(passphrase))
    with os.fdopen(read_end, "rb") as ready:
        message = ready.readline().decode(errors="replace").strip()
    if message == "ready":
        print(f"kfs: mounted {mountpoint} (store {store}, pid {child.pid})")
        return 0
    code = child.wait(timeout=30) if message else child.wait()
    if message.startswith("error: "):
        raise CliError(f"cannot mount {mountpoint}: {message[7:]}")
    raise CliError(f"the daemon exited with code {code} before mounting; see {store}/logs/kfsd.log.jsonl")


# --------------------------------------------------------------------------- umount, status
def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        call(control_socket_path(mountpoint), "umount", timeout=10)
    except ControlError:
        if is_stale_mount(mountpoint) or is_mounted(mountpoint):
            lazy_unmount(mountpoint)
            if wait_unmounted(mountpoint, 10):
                return 0
        raise CliError(f"{mountpoint}: not mounted by kfs") from None
    if not wait_unmounted(mountpoint, args.timeout):
        raise CliError(f"{mountpoint}: still mounted after {args.timeout:.0f}s (files held open?)")
    # The daemon's socket disappears once it has fully stopped.
    deadline = time.monotonic() + args.timeout
    while os.path.exists(control_socket_path(mountpoint)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return print_result(args, live_call(args.mountpoint, "status", timeout=30), _status_lines)


def _status_lines(status: dict[str, Any]) -> Iterator[str]:
    fuse = status["fuse"]
    yield f"kfs {status['version']} on {status['mountpoint']}  (pid {status['pid']}, up {status['uptime_s']}s)"
    yield f"store     {status['store']}"
    yield (f"fuse      {fuse['requests']} requests ({fuse['requests_per_s']}/s), {fuse['errors']} errors, "
           f"{fuse['open_handles']} open handles")
    for name, area in status["areas"].items():
        state = area.get("state", "?")
        counters = ", ".join(f"{k}={v}" for k, v in sorted((area.get("counters") or {}).items()))
        extra = area.get("message", "")
        yield f"{name:<9} {state}{'  ' + counters if counters else ''}{'  ' + extra if extra else ''}"


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kfs", description="kfs: the agents' persistence layer, as a FUSE filesystem")
    parser.add_argument("--version", action="version", version=f"kfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("mount", help="mount kfs on MOUNTPOINT (returns once it answers)")
    p.add_argument("mountpoint")
    p.add_argument("--store", help="where the real bytes live (default /var/lib/kfs/<escaped mountpoint>)")
    p.add_argument("--config", default=None, help="directory of YAML files overriding config/ (or KFS_CONFIG)")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground, diagnostics on stderr")
    p.add_argument("--passphrase-file", help="file holding the vault passphrase")
    p.add_argument("--allow-other", action="store_true", help="let other users use the mount (permissions apply)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--passphrase-stdin", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="drain, flush and unmount MOUNTPOINT")
    p.add_argument("mountpoint")
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(func=cmd_umount)

    add_command(sub, "status", cmd_status, "store, uptime, each area's state and counters", json_output=True)

    for module_name in AREA_CLIS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        register: Callable[[Any], None] | None = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"kfs: {e}", file=sys.stderr)
        return e.code
    except ConfigError as e:
        print(f"kfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kfs: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"kfs: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
