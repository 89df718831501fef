"""The control socket: how the CLI talks to a live mount.

A Unix socket (mode 0600) per mount; only root or the daemon's own uid may
connect (SO_PEERCRED).  One JSON request line, one JSON answer line:
  -> {"cmd": "status"}                      <- {"ok": true, "result": {...}}
  -> {"cmd": "vault.unlock", "args": {...}} <- {"ok": false, "error": "wrong passphrase"}
``AREA.COMMAND`` goes to that area's ``control()``; the rest are the daemon's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("kfs.control")

MAX_REQUEST = 1 << 20
Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class ControlError(Exception):
    """A command failed; ``str()`` is the one line for the user."""


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


async def serve(path: str, handler: Handler, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket at ``path`` until cancelled."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _serve_one(stream, handler), [listener])
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        try:
            uid = _peer_uid(stream.socket)
            if uid not in (0, os.geteuid()):
                await _send(stream, {"ok": False, "error": "permission denied"})
                return
            request = await _receive_line(stream)
            cmd = request.get("cmd")
            args = request.get("args") or {}
            if not isinstance(cmd, str) or not isinstance(args, dict):
                raise ControlError("bad request")
            result = await handler(cmd, args)
            await _send(stream, {"ok": True, "result": result})
        except (ControlError, OSError, ValueError) as e:
            try:
                await _send(stream, {"ok": False, "error": _user_message(e)})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as e:
            log.exception("control command failed")
            try:
                await _send(stream, {"ok": False, "error": f"internal error: {e!r}"})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


def _user_message(e: Exception) -> str:
    """The one line a failed command shows: an OSError's own text (``OSError(EACCES, "vault is locked")``)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


async def _receive_line(stream: trio.SocketStream) -> dict[str, Any]:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ControlError("request too large")
    data = json.loads(bytes(buf).split(b"\n", 1)[0] or b"{}")
    if not isinstance(data, dict):
        raise ControlError("bad request")
    return data


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message, default=str).encode() + b"\n")


def call(path: str, cmd: str, args: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
    """Blocking client: send one command, return its result or raise ControlError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError("no kfs daemon answers for this mountpoint (not mounted by kfs?)") from None
        except PermissionError:
            raise ControlError("permission denied on the control socket") from None
        sock.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise ControlError(f"the daemon did not answer {cmd!r} within {timeout:.0f}s") from None
    except OSError as e:
        if e.errno in (errno.ECONNRESET, errno.EPIPE):
            raise ControlError("the daemon closed the connection") from None
        raise
    finally:
        sock.close()
    if not buf:
        raise ControlError("the daemon closed the connection without an answer")
    answer = json.loads(bytes(buf).split(b"\n", 1)[0])
    if not answer.get("ok"):
        raise ControlError(answer.get("error") or "failed")
    return answer.get("result")
