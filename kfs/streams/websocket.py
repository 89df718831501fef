"""The WebSocket face of the broker (``websockets.trio``, websockets 17).

``GET /streams/NAME[?since=SEQ][&token=T]`` with ``Authorization: Bearer T``
(or ``?token=`` for browsers).  Authentication and the ACL are checked in
``process_request``, before the upgrade: unknown token -> 401, a stream the
role may neither subscribe nor publish to -> 403, too many clients -> 503;
refusals are logged on the ``system`` stream.

After the upgrade every event of the stream is sent as one text message
(the stored JSON line); text messages from the client publish if the role
allows; refusals and bad JSON are answered ``{"kfs":"error","code":...}``,
and with ``?ack=1`` each accepted message is answered ``{"kfs":"ack","seq":N}``;
``?subscribe=0`` makes a publish-only connection.
Each client keeps a seq cursor into the retained history: a client that
falls more than ``send_queue`` events behind is dropped (close 1013), so a
stalled client costs no memory and never slows anyone else.
"""

from __future__ import annotations

import functools
import hmac
import http
import json
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import trio
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.trio.server import Server, ServerConnection, serve

from kfs.config import WebSocketConfig
from kfs.streams.acl import Acl
from kfs.streams.broker import Broker, parse_event, valid_name
from kfs.streams.reader import gap_marker

log = logging.getLogger("kfs.streams.websocket")

#: a subscriber that sent less than this long ago waits COALESCE_WAIT before its next send, so a
#: busy stream costs one socket send per run of events (at 1,000 events/s: +0.5 ms on average)
COALESCE_AFTER = 0.002
COALESCE_WAIT = 0.001
#: events per read and send context
SEND_RUN = 1024


@dataclass(eq=False)
class Client:
    connection: ServerConnection
    stream: str
    token_id: str
    role: str
    can_subscribe: bool
    can_publish: bool
    cursor: int = 0
    peer: str = ""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dropped: str = ""
    sent: int = 0
    acks: bool = False
    #: trio clock of the last send (a recent one means events are streaming: coalesce)
    last_send: float = -1e9


class WebSocketServer:
    def __init__(self, broker: Broker, acl: Acl, config: WebSocketConfig) -> None:
        self.broker = broker
        self.acl = acl
        self.config = config
        self.clients: set[Client] = set()
        self._accepted: dict[int, Client] = {}
        self.server: Server | None = None
        self.port = config.port
        self.denied = 0
        self.dropped = 0
        broker.batch_listeners.append(self._on_events)

    # ------------------------------------------------------------------ life cycle
    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.server = await nursery.start(functools.partial(
                serve, self._handler, self.config.port, host=self.config.host,
                process_request=self._process_request,
                max_size=self.config.max_message_kb * 1024, max_queue=256,
                compression=None, close_timeout=2, logger=log,
            ))
            assert self.server is not None
            self.port = self.server.listeners[0].socket.getsockname()[1]
            log.info("websocket broker on %s:%s", self.config.host, self.port)
            task_status.started()

    async def stop(self) -> None:
        if self._on_events in self.broker.batch_listeners:
            self.broker.batch_listeners.remove(self._on_events)
        if self.server is not None:
            with trio.move_on_after(5):
                await self.server.aclose()

    # ------------------------------------------------------------------ handshake
    def _deny(self, connection: ServerConnection, status: http.HTTPStatus, why: str, **extra: Any) -> Response:
        self.denied += 1
        peer = _peer(connection)
        try:
            self.broker.publish("system", {"event": "stream_ws_denied", "source": "streams",
                                           "status": int(status), "reason": why, "peer": peer, **extra})
        except OSError:
            pass
        return connection.respond(status, why + "\n")

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urllib.parse.urlsplit(request.path)
        query = urllib.parse.parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "streams" or not valid_name(parts[1]):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "use /streams/NAME\n")
        name = parts[1]
        token = None
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            token = header[7:].strip()
        elif "token" in query:
            token = query["token"][0]
        info = self.acl.authenticate(token)
        if info is None:
            return self._deny(connection, http.HTTPStatus.UNAUTHORIZED, "unknown or missing token",
                              stream_name=name)
        can_subscribe = self.acl.may_subscribe(info.role, name)
        can_publish = self.acl.may_publish(info.role, name)
        wants_events = query.get("subscribe", ["1"])[0] not in ("0", "false", "no")
        if not (can_subscribe or can_publish):
            return self._deny(connection, http.HTTPStatus.FORBIDDEN, f"role {info.role} may not use stream {name}",
                              stream_name=name, token=info.id)
        if name not in self.broker.streams and not can_publish:
            return connection.respond(http.HTTPStatus.NOT_FOUND, f"no stream {name}\n")
        if len(self.clients) + len(self._accepted) >= self.config.max_connections:
            return self._deny(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections",
                              stream_name=name)
        stream = self.broker.streams.get(name)
        cursor = stream.log.next_seq if stream is not None else 1
        if "since" in query:
            since = query["since"][0]
            if not since.isdigit():
                return connection.respond(http.HTTPStatus.BAD_REQUEST, "since must be a seq number\n")
            cursor = int(since)
        self._accepted[id(connection)] = Client(connection, name, info.id, info.role,
                                                can_subscribe and wants_events, can_publish,
                                                cursor, _peer(connection),
                                                acks=query.get("ack", ["0"])[0] in ("1", "true", "yes"))
        return None

    # ------------------------------------------------------------------ connection
    async def _handler(self, connection: ServerConnection) -> None:
        client = self._accepted.pop(id(connection), None)
        if client is None:
            return
        self.clients.add(client)
        try:
            with client.scope:
                async with trio.open_nursery() as nursery:
                    if client.can_subscribe:
                        nursery.start_soon(self._send_loop, client)
                    await self._recv_loop(client)
                    nursery.cancel_scope.cancel()
        finally:
            self.clients.discard(client)
        if client.dropped:
            with trio.move_on_after(2):
                try:
                    await connection.aclose(1013, client.dropped)
                except Exception:
                    pass

    async def _recv_loop(self, client: Client) -> None:
        connection = client.connection
        try:
            async for message in connection:
                if isinstance(message, bytes):
                    try:
                        message = message.decode()
                    except UnicodeDecodeError:
                        await self._reply(client, {"kfs": "error", "code": 400, "error": "not UTF-8"})
                        continue
                if not client.can_publish:
                    await self._reply(client, {"kfs": "error", "code": 403,
                                               "error": f"role {client.role} may not publish to {client.stream}"})
                    continue
                lines = [line.encode() for line in message.splitlines() if line.strip()]
                try:
                    events = [parse_event(line) for line in lines]
                    seqs = self.broker.publish_many(client.stream, events)
                except OSError as e:
                    await self._reply(client, {"kfs": "error", "code": 400, "error": e.strerror or str(e)})
                    continue
                if client.acks:
                    await self._reply(client, {"kfs": "ack", "seq": seqs[-1] if seqs else None})
        except ConnectionClosed:
            pass

    @staticmethod
    async def _reply(client: Client, body: dict[str, Any]) -> None:
        await client.connection.send(json.dumps(body, separators=(",", ":")))

    async def _send_loop(self, client: Client) -> None:
        connection = client.connection
        try:
            while True:
                stream = self.broker.streams.get(client.stream)
                if stream is None:
                    await trio.sleep(0.25)  # not created yet (a publisher may create it)
                    continue
                log_ = stream.log
                if client.cursor < log_.first_seq and log_.retained_events:
                    await connection.send(gap_marker(stream.name, client.cursor, log_.first_seq).decode().rstrip("\n"))
                    client.cursor = log_.first_seq
                if client.cursor >= log_.next_seq:
                    await stream.changed.wait()
                    if trio.current_time() - client.last_send < COALESCE_AFTER:
                        # Events are streaming in: gather a few more before sending.  The cost of
                        # a message here is mostly its socket send (a loopback send runs the
                        # receiver's TCP path too): one send for a run of events, not one each.
                        await trio.sleep(COALESCE_WAIT)
                    continue
                # One read for a run of events, then all their frames in one send context
                # (websockets 17's own way of writing a message, minus a lock round per frame).
                last = min(log_.next_seq, client.cursor + SEND_RUN)
                start, end = log_.offset_of(client.cursor), log_.offset_of(last)
                data = b""
                while len(data) < end - start:
                    chunk = log_.read(start + len(data), end - start - len(data))
                    if not chunk:
                        break
                    data += chunk
                frames = data.split(b"\n")[:-1]
                if len(frames) != last - client.cursor:
                    frames = [log_.line(seq)[:-1] for seq in range(client.cursor, last)]
                async with connection.send_context():
                    protocol = connection.protocol
                    for frame in frames:
                        protocol.send_text(frame)
                    # websockets' trio connection hands each queued frame to its own send_all (one
                    # syscall per event); the run's frames are one byte string, so send them as one.
                    writes = protocol.writes
                    if len(writes) > 1 and all(writes):  # (b"" would be its end-of-stream marker)
                        writes[:] = [b"".join(writes)]
                client.cursor = last
                client.sent += len(frames)
                client.last_send = trio.current_time()
        except ConnectionClosed:
            pass

    # ------------------------------------------------------------------ drop the slow
    def _on_events(self, name: str, first: int, lines: list[bytes], origin: str | None) -> None:
        """After each publish (once per burst): drop subscribers now too far behind."""
        if not self.clients:
            return
        head = first + len(lines)
        for client in list(self.clients):
            if client.stream == name and client.can_subscribe and not client.dropped \
                    and head - client.cursor > self.config.send_queue:
                self._drop(client, "too slow: send queue full")

    def _drop(self, client: Client, why: str) -> None:
        client.dropped = why
        self.dropped += 1
        client.scope.cancel()
        try:
            self.broker.publish("system", {"event": "stream_ws_dropped", "source": "streams",
                                           "stream_name": client.stream, "token": client.token_id,
                                           "peer": client.peer, "reason": why})
        except OSError:
            pass

    def drop_token(self, token_id: str) -> None:
        for client in list(self.clients):
            if hmac.compare_digest(client.token_id, token_id):
                self._drop(client, "token revoked")

    def readers_of(self, stream: str) -> list[dict[str, Any]]:
        head = self.broker.streams[stream].log.next_seq if stream in self.broker.streams else 0
        return [{"kind": "websocket", "peer": c.peer, "role": c.role, "lag": max(0, head - c.cursor)}
                for c in self.clients if c.stream == stream and c.can_subscribe]


def _peer(connection: ServerConnection) -> str:
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"
