"""The WebSocket broker of a real mount, with websockets' own (sync) client."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Mount, retained_events
from streams_support import append_events
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

pytestmark = pytest.mark.timeout(180)


def ws_mount(kfs_mount: Callable[..., Mount], **extra: Any) -> tuple[Mount, str]:
    config = {"websocket": {"port": 0, **extra.pop("websocket", {})}, "metrics_interval": "1s", **extra}
    mount = kfs_mount(config={"streams.yaml": config})
    port = mount.status()["areas"]["streams"]["websocket"]["port"]
    return mount, f"ws://127.0.0.1:{port}"


def token_for(mount: Mount, role: str) -> str:
    return mount.cli("stream", "token", "create", "--role", role, str(mount.path)).stdout.strip().splitlines()[-1]


def open_ws(url: str, token: str | None, **kw: Any) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(url, additional_headers=headers, open_timeout=10, close_timeout=2, **kw)


def publish_file(mount: Mount, stream: str, *events: dict[str, Any]) -> None:
    append_events(mount.path / "streams" / stream, *events)


def events_of(ws: ClientConnection, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        out.append(json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic()))))
    return out


def system_events(mount: Mount) -> list[dict[str, Any]]:
    return retained_events(mount.path / "streams" / "system")


def test_tokens_roles_publish_and_resume(kfs_mount: Callable[..., Mount]) -> None:
    mount, base = ws_mount(kfs_mount)
    admin, reader, dashboard = token_for(mount, "admin"), token_for(mount, "reader"), token_for(mount, "dashboard")
    publish_file(mount, "chat", {"n": 1}, {"n": 2})

    # bad or missing token: 401 before the upgrade, logged on system
    for bad in ("kfs_nope_nope", None):
        with pytest.raises(InvalidStatus) as e:
            open_ws(f"{base}/streams/chat", bad)
        assert e.value.response.status_code == 401
    # forbidden stream for the role: 403
    with pytest.raises(InvalidStatus) as e:
        open_ws(f"{base}/streams/chat", dashboard)
    assert e.value.response.status_code == 403
    denied = [ev for ev in system_events(mount) if ev.get("event") == "stream_ws_denied"]
    assert [d["status"] for d in denied] == [401, 401, 403]

    # a good token follows live events; ?token= works too (browsers)
    with open_ws(f"{base}/streams/chat", reader) as live, connect(f"{base}/streams/chat?token={admin}&ack=1") as pub:
        time.sleep(0.2)
        publish_file(mount, "chat", {"n": 3})
        got = events_of(live, 1)[0]
        assert (got["n"], got["seq"], got["stream"]) == (3, 3, "chat")
        # publish allowed (admin) ...
        pub.send(json.dumps({"n": 4}))
        replies = [json.loads(pub.recv(timeout=10)) for _ in range(3)]
        assert {"kfs": "ack", "seq": 4} in replies
        assert events_of(live, 1)[0]["n"] == 4
        # ... and refused (reader), and bad JSON answered, connection kept
        live.send(json.dumps({"n": 5}))
        assert json.loads(live.recv(timeout=10))["code"] == 403
        pub.send("not json")
        assert json.loads(pub.recv(timeout=10))["kfs"] == "error"
    fd = os.open(mount.path / "streams" / "chat", os.O_RDONLY | os.O_NONBLOCK)
    assert [json.loads(line)["n"] for line in os.read(fd, 1 << 16).splitlines()] == [1, 2, 3, 4]
    os.close(fd)

    # resume with since
    with open_ws(f"{base}/streams/chat?since=2", reader) as resumed:
        assert [e["seq"] for e in events_of(resumed, 3)] == [2, 3, 4]
    # dashboard may read metrics
    with open_ws(f"{base}/streams/metrics", dashboard) as metrics:
        assert "events_published" in events_of(metrics, 1, timeout=15)[0]


def test_oversized_message_and_revoked_token(kfs_mount: Callable[..., Mount]) -> None:
    mount, base = ws_mount(kfs_mount, websocket={"max_message_kb": 4})
    admin = token_for(mount, "admin")
    with open_ws(f"{base}/streams/big", admin) as ws:
        ws.send(json.dumps({"blob": "x" * 10_000}))
        with pytest.raises(ConnectionClosed) as e:
            while True:
                ws.recv(timeout=10)
        # 1009 (message too big); the close frame can lose the race with the TCP close
        assert e.value.rcvd is None or e.value.rcvd.code == 1009
    assert "big" not in os.listdir(mount.path / "streams") or os.stat(mount.path / "streams" / "big").st_size == 0
    token_id = admin.split("_")[1]
    with open_ws(f"{base}/streams/big", admin) as ws:
        mount.cli("stream", "token", "revoke", str(mount.path), token_id)
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
    with pytest.raises(InvalidStatus) as e2:
        open_ws(f"{base}/streams/big", admin)
    assert e2.value.response.status_code == 401


def test_slow_client_is_dropped_others_keep_up(kfs_mount: Callable[..., Mount]) -> None:
    mount, base = ws_mount(kfs_mount, websocket={"send_queue": 200})
    token = token_for(mount, "reader")
    publish_file(mount, "firehose", {"i": -1})
    with open_ws(f"{base}/streams/firehose", token, max_queue=1) as slow, \
            open_ws(f"{base}/streams/firehose", token) as fast:  # slow never reads
        assert slow is not None
        time.sleep(0.3)
        blob = "y" * 8000
        total = 3000
        received: list[int] = []
        for base_i in range(0, total, 50):
            publish_file(mount, "firehose", *({"i": i, "blob": blob} for i in range(base_i, base_i + 50)))
            while len(received) < base_i + 50:  # the fast client keeps up
                received.append(json.loads(fast.recv(timeout=20))["i"])
        assert received == list(range(total))
        dropped = [e for e in system_events(mount) if e.get("event") == "stream_ws_dropped"]
        assert len(dropped) == 1 and dropped[0]["stream_name"] == "firehose"
        assert mount.status()["areas"]["streams"]["websocket"]["dropped"] == 1


def test_connection_limit(kfs_mount: Callable[..., Mount]) -> None:
    mount, base = ws_mount(kfs_mount, websocket={"max_connections": 2})
    token = token_for(mount, "reader")
    with open_ws(f"{base}/streams/system", token), open_ws(f"{base}/streams/system", token):
        with pytest.raises(InvalidStatus) as e:
            open_ws(f"{base}/streams/system", token)
        assert e.value.response.status_code == 503
        assert [e["stream_name"] for e in system_events(mount) if e.get("event") == "stream_ws_denied"] == ["system"]


def test_port_taken_mount_still_works(kfs_mount: Callable[..., Mount]) -> None:
    first, _ = ws_mount(kfs_mount)
    port = first.status()["areas"]["streams"]["websocket"]["port"]
    second = kfs_mount(config={"streams.yaml": {"websocket": {"port": port}}}, name="second")
    publish_file(second, "chat", {"ok": True})
    assert any(e.get("event") == "streams_websocket_failed" for e in system_events(second))
    assert "websocket" not in second.status()["areas"]["streams"]


def test_stream_deleted_and_created_again_is_a_new_generation(kfs_mount: Callable[..., Mount]) -> None:
    """Seqs restart at 1 in a stream created again: the upgrade names the generation, a live
    subscriber is told and follows the new one, and a resume from the old one replays the new."""
    mount, base = ws_mount(kfs_mount)
    token = token_for(mount, "admin")
    publish_file(mount, "chat", {"life": 1, "n": 1}, {"life": 1, "n": 2})
    with open_ws(f"{base}/streams/chat?since=1", token) as live:
        old = int(live.response.headers["Kfs-Stream-Generation"])
        assert [e["n"] for e in events_of(live, 2)] == [1, 2]
        os.unlink(mount.path / "streams" / "chat")
        publish_file(mount, "chat", {"life": 2, "n": 1})
        notice, first = events_of(live, 2)
        assert notice["kfs"] == "generation" and notice["previous"] == old and notice["generation"] > old
        assert (first["seq"], first["life"]) == (1, 2)
        new = notice["generation"]
    status = json.loads((mount.path / "streams" / "chat.status").read_text())
    assert status["generation"] == new
    assert {s["name"]: s["generation"] for s in json.loads(mount.cli("stream", "ls", "--json",
                                                                     str(mount.path)).stdout)}["chat"] == new
    publish_file(mount, "chat", {"life": 2, "n": 2})
    # a client resuming after seq 1 of the old generation: the new one from its start, after the notice
    with open_ws(f"{base}/streams/chat?since=2&generation={old}", token) as resumed:
        notice, *got = events_of(resumed, 3)
        assert (notice["kfs"], notice["generation"]) == ("generation", new)
        assert [(e["seq"], e["life"]) for e in got] == [(1, 2), (2, 2)]
    # the same resume naming the current generation: exactly from that seq
    with open_ws(f"{base}/streams/chat?since=2&generation={new}", token) as resumed:
        assert [(e["seq"], e["n"]) for e in events_of(resumed, 1)] == [(2, 2)]
