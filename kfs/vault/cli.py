"""``kfs vault init|unlock|lock|passwd|verify|status`` and the mount's passphrase.

Passphrases come from ``--passphrase-file``, then ``KFS_VAULT_PASSPHRASE``
(``KFS_VAULT_NEW_PASSPHRASE`` for passwd's new one), then a prompt when stdin
is a terminal.  Commands act on a live mount through its control socket, or
offline on a store (``--store DIR``, or the default store of an unmounted
MOUNTPOINT).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from kfs.cli import print_result
from kfs.vault import keyfile
from kfs.vault.contentenc import KEY_FILE

FAILURE_DELAY = 0.5
ENV = "KFS_VAULT_PASSPHRASE"
ENV_NEW = "KFS_VAULT_NEW_PASSPHRASE"


def _cli_error(message: str) -> Exception:
    from kfs.cli import CliError

    return CliError(message)


def _iterations(args: argparse.Namespace) -> int:
    if getattr(args, "iterations", None):
        return int(args.iterations)
    try:
        from kfs.config import load_config

        return int(load_config(getattr(args, "config", None)).vault.kdf_iterations)
    except Exception:
        return 100_000


def _read_file(path: str) -> bytearray:
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except OSError as e:
        raise _cli_error(f"{path}: {e.strerror}") from None
    while data.endswith(b"\n") or data.endswith(b"\r"):
        del data[-1]
    return data


def _prompt(prompt: str, confirm: bool) -> bytearray:
    try:
        first = getpass.getpass(prompt)
        if confirm and getpass.getpass("Repeat passphrase: ") != first:
            raise _cli_error("the passphrases do not match; nothing changed")
    except EOFError:
        raise _cli_error("no passphrase given") from None
    return bytearray(first.encode())


def read_passphrase(file: str | None, env: str, prompt: str, confirm: bool = False,
                    required: bool = True) -> bytearray | None:
    if file:
        value = _read_file(file)
    elif os.environ.get(env):
        value = bytearray(os.environ[env].encode())
    elif sys.stdin.isatty():
        value = _prompt(prompt, confirm)
    elif required:
        raise _cli_error(f"no passphrase: use --passphrase-file, {env}, or run on a terminal")
    else:
        return None
    if not value:
        raise _cli_error("empty passphrase refused")
    return value


def _vault_store(store: str) -> Any:
    from kfs.store import StoreDir

    try:
        # the same modes the daemon uses: the store private, its area folders traversable
        os.makedirs(os.path.abspath(store), mode=0o700, exist_ok=True)
        return StoreDir.open(os.path.join(os.path.abspath(store), "vault"), create=True, mode=0o755)
    except OSError as e:
        raise _cli_error(f"{store}: {e.strerror}") from None


def _load_key(vstore: Any) -> keyfile.KeyFile | None:
    try:
        return keyfile.load(vstore)
    except keyfile.KeyFileError as e:
        raise _cli_error(str(e)) from None


def _unwrap(kf: keyfile.KeyFile, passphrase: bytes | bytearray) -> bytearray:
    started = time.monotonic()
    try:
        return kf.unwrap(passphrase)
    except keyfile.WrongPassphrase:
        time.sleep(max(0.0, FAILURE_DELAY - (time.monotonic() - started)))
        raise _cli_error("wrong vault passphrase; nothing changed") from None


def _wipe(*values: bytearray | None) -> None:
    for value in values:
        if value is not None:
            value[:] = bytes(len(value))


# --------------------------------------------------------------------------- kfs mount
def passphrase_for_mount(args: argparse.Namespace, store: str) -> bytearray | None:
    """The vault passphrase for ``kfs mount``, checked against the key (None: stay locked).

    With a passphrase and no key yet, a new vault key is created (on a terminal,
    after asking).  A wrong passphrase stops the mount with one line.
    """
    try:
        from kfs.config import load_config

        if not load_config(getattr(args, "config", None)).vault.enabled:
            return None  # no vault in this mount: ask nothing, create nothing
    except Exception:  # the mount itself reports a bad config
        pass
    vstore = _vault_store(store)
    try:
        kf = _load_key(vstore)
        interactive = not getattr(args, "passphrase_file", None) and not os.environ.get(ENV)
        if interactive and not sys.stdin.isatty():
            return None
        if interactive and kf is None:
            answer = input(f"kfs: no vault key in {store}; create one now? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("kfs: the vault stays locked; run `kfs vault init` later", file=sys.stderr)
                return None
            passphrase = read_passphrase(None, ENV, "New vault passphrase: ", confirm=True)
        else:
            passphrase = read_passphrase(getattr(args, "passphrase_file", None), ENV, "Vault passphrase: ")
        assert passphrase is not None
        if kf is None:
            new_kf, master = keyfile.KeyFile.create(passphrase, _iterations(args))
            _wipe(master)
            keyfile.save(vstore, new_kf)
            print(f"kfs: created a new vault key in {store}/vault/{KEY_FILE}", file=sys.stderr)
        else:
            _wipe(_unwrap(kf, passphrase))
        return passphrase
    finally:
        vstore.close()


# --------------------------------------------------------------------------- target
def _live(args: argparse.Namespace) -> str | None:
    """The mountpoint if the command should go to a live daemon, else None (offline)."""
    from kfs.paths import control_socket_path

    if getattr(args, "store", None):
        return None
    mountpoint = getattr(args, "mountpoint", None)
    if not mountpoint:
        raise _cli_error("give a MOUNTPOINT (live mount) or --store DIR")
    if os.path.exists(control_socket_path(os.path.abspath(mountpoint))):
        return mountpoint
    return None


def _offline_store(args: argparse.Namespace) -> str:
    from kfs.paths import default_store

    if getattr(args, "store", None):
        return str(args.store)
    return default_store(os.path.abspath(args.mountpoint))


def _call(mountpoint: str, cmd: str, payload: dict[str, Any] | None = None) -> Any:
    from kfs.cli import live_call

    return live_call(mountpoint, f"vault.{cmd}", payload or {})


# --------------------------------------------------------------------------- commands
def cmd_init(args: argparse.Namespace) -> int:
    live = _live(args)
    if live is None:
        vstore = _vault_store(_offline_store(args))
        try:
            if _load_key(vstore) is not None:
                raise _cli_error("this vault already has a key (use `kfs vault passwd` to change the passphrase)")
            passphrase = read_passphrase(args.passphrase_file, ENV, "New vault passphrase: ", confirm=True)
            assert passphrase is not None
            kf, master = keyfile.KeyFile.create(passphrase, _iterations(args))
            _wipe(master, passphrase)
            keyfile.save(vstore, kf)
        finally:
            vstore.close()
        print(f"kfs: vault key created ({KEY_FILE}); mount with --passphrase-file or {ENV}")
        return 0
    passphrase = read_passphrase(args.passphrase_file, ENV, "New vault passphrase: ", confirm=True)
    assert passphrase is not None
    _call(live, "init", {"passphrase": passphrase.decode(), "iterations": args.iterations})
    _wipe(passphrase)
    print("kfs: vault key created; the vault is unlocked")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    passphrase = read_passphrase(args.passphrase_file, ENV, "Vault passphrase: ")
    assert passphrase is not None
    result = _call(args.mountpoint, "unlock", {"passphrase": passphrase.decode()})
    _wipe(passphrase)
    print("kfs: vault already unlocked" if result.get("already") else "kfs: vault unlocked")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    _call(args.mountpoint, "lock")
    print("kfs: vault locked")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    old = read_passphrase(args.passphrase_file, ENV, "Current vault passphrase: ")
    new = read_passphrase(args.new_passphrase_file, ENV_NEW, "New vault passphrase: ", confirm=True)
    assert old is not None and new is not None
    live = _live(args)
    if live is not None:
        _call(live, "passwd", {"old": old.decode(), "new": new.decode(), "iterations": args.iterations})
    else:
        vstore = _vault_store(_offline_store(args))
        try:
            kf = _load_key(vstore)
            if kf is None:
                raise _cli_error("no vault key in this store: run `kfs vault init`")
            _wipe(_unwrap(kf, old))
            keyfile.save(vstore, kf.rewrap(old, new, _iterations(args)))
        finally:
            vstore.close()
    _wipe(old, new)
    print("kfs: vault passphrase changed (the master key was rewrapped; contents untouched)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    live = _live(args)
    if live is not None:
        result = _call(live, "verify")
    else:
        from kfs.vault.area import verify_store
        from kfs.vault.cryptocore import CryptoCore

        vstore = _vault_store(_offline_store(args))
        try:
            kf = _load_key(vstore)
            if kf is None:
                raise _cli_error("no vault key in this store: nothing to verify against")
            passphrase = read_passphrase(args.passphrase_file, ENV, "Vault passphrase: ")
            assert passphrase is not None
            master = _unwrap(kf, passphrase)
            _wipe(passphrase)
            core = CryptoCore(master)
            _wipe(master)
            checked, damaged = verify_store(vstore, core)
            core.wipe()
            result = {"checked": checked, "damaged": damaged}
        finally:
            vstore.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for item in result["damaged"]:
            print(f"DAMAGED {item['file']}: {item['error']}")
        print(f"kfs: {result['checked']} file(s) checked, {len(result['damaged'])} damaged")
    return 1 if result["damaged"] else 0


def cmd_status(args: argparse.Namespace) -> int:
    return print_result(args, _call(args.mountpoint, "status"), _status_lines)


def _status_lines(status: dict[str, Any]) -> Iterator[str]:
    yield f"vault     {status['state']}  {status.get('message', '')}"
    yield (f"          open files {status['open_files']}, auto-lock after {status['auto_lock_timeout_s']:.0f}s idle, "
           f"failed unlocks {status['unlock_failures']}")


def register(subparsers: Any) -> None:
    vault = subparsers.add_parser("vault", help="the encrypted vault: init, unlock, lock, passwd, verify, status")
    sub = vault.add_subparsers(dest="vault_command", metavar="COMMAND", required=True)

    def target(p: argparse.ArgumentParser, optional: bool = True) -> None:
        p.add_argument("mountpoint", nargs="?" if optional else None, help="a kfs mountpoint")
        if optional:
            p.add_argument("--store", help="act offline on this store directory instead of a live mount")
            p.add_argument("--config", default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("init", help="create the vault key (asks a passphrase twice)")
    target(p)
    p.add_argument("--passphrase-file")
    p.add_argument("--iterations", type=int, default=None, help="PBKDF2 iterations (default: kdf_iterations)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("unlock", help="unlock the vault of a live mount")
    target(p, optional=False)
    p.add_argument("--passphrase-file")
    p.set_defaults(func=cmd_unlock)

    p = sub.add_parser("lock", help="wipe the key from memory now")
    target(p, optional=False)
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("passwd", help="change the passphrase (rewraps the key; contents untouched)")
    target(p)
    p.add_argument("--passphrase-file", help="the current passphrase")
    p.add_argument("--new-passphrase-file", help=f"the new passphrase (or {ENV_NEW})")
    p.add_argument("--iterations", type=int, default=None)
    p.set_defaults(func=cmd_passwd)

    p = sub.add_parser("verify", help="authenticate every vault file; exit 1 on any damage")
    target(p)
    p.add_argument("--passphrase-file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("status", help="locked or not, mlock, failures, open files")
    target(p, optional=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
