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
``?subscribe=0`` makes a publish-only connection.  The upgrade names the stream's
generation (``Kfs-Stream-Generation``); ``?since=SEQ&generation=G`` with a G that is
no longer current (the stream was deleted and created again) replays the current
one from its start after a ``{"kfs":"generation",...}`` message, also sent to a
client connected across the re-creation.
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
from itertools import chain
from typing import Any

import trio
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import Side, State
from websockets.trio.server import Server, ServerConnection, serve

from kfs.config import WebSocketConfig
from kfs.streams.acl import Acl
from kfs.streams.broker import Broker, parse_event, valid_name
from kfs.streams.reader import gap_marker

log = logging.getLogger("kfs.streams.websocket")

#: events per read and send context
SEND_RUN = 1024
#: response header of the upgrade: the stream's generation (see `Stream.generation`)
GENERATION_HEADER = "Kfs-Stream-Generation"


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
    #: the generation of the stream that ``cursor`` counts in (0: the stream did not exist yet)
    generation: int = 0


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
                process_request=self._process_request, process_response=self._process_response,
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
        generation = stream.generation if stream is not None else 0
        if "since" in query:
            since = query["since"][0]
            if not since.isdigit():
                return connection.respond(http.HTTPStatus.BAD_REQUEST, "since must be a seq number\n")
            cursor = int(since)
            wanted = query.get("generation", [""])[0]
            if wanted and not wanted.isdigit():
                return connection.respond(http.HTTPStatus.BAD_REQUEST, "generation must be a number\n")
            if wanted and stream is not None and int(wanted) != generation:
                # The seq counts in an incarnation of the name that is gone: replay this one
                # from its start, after a message saying so (the send loop sends it).
                cursor = 1
                generation = int(wanted)
        self._accepted[id(connection)] = Client(connection, name, info.id, info.role,
                                                can_subscribe and wants_events, can_publish,
                                                cursor, _peer(connection),
                                                acks=query.get("ack", ["0"])[0] in ("1", "true", "yes"),
                                                generation=generation)
        return None

    def _process_response(self, connection: ServerConnection, request: Request, response: Response) -> None:
        """Name the stream's generation on the upgrade: a client resuming with ``since`` passes it back."""
        client = self._accepted.get(id(connection))
        stream = self.broker.streams.get(client.stream) if client is not None else None
        if stream is not None and response.status_code == http.HTTPStatus.SWITCHING_PROTOCOLS:
            response.headers[GENERATION_HEADER] = str(stream.generation)

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
                if stream.generation != client.generation:
                    if client.generation:
                        # Deleted and created again (or resumed from another incarnation): the
                        # cursor's seqs meant the old one; follow the new one from its start.
                        await connection.send(json.dumps({
                            "kfs": "generation", "stream": stream.name, "generation": stream.generation,
                            "previous": client.generation}, separators=(",", ":")))
                        client.cursor = 1
                    client.generation = stream.generation
                log_ = stream.log
                if client.cursor < log_.first_seq and log_.retained_events:
                    await connection.send(gap_marker(stream.name, client.cursor, log_.first_seq).decode().rstrip("\n"))
                    client.cursor = log_.first_seq
                if client.cursor >= log_.next_seq:
                    await stream.changed.wait()
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
                # No waiting for more: whatever arrived while the last send ran goes in this one,
                # so a busy stream sends runs of events and a quiet one sends each at once.
                async with connection.send_context():
                    protocol = connection.protocol
                    if (protocol.state is State.OPEN and protocol.side is Side.SERVER and not protocol.extensions
                            and not protocol.expect_continuation_frame and not protocol.debug):
                        # What send_text would queue frame by frame, built for the run in C loops:
                        # an unmasked, unfragmented text frame per event (the stored lines are
                        # UTF-8 JSON), one byte string, one socket send.
                        protocol.writes.append(text_frames(frames))
                    else:
                        for frame in frames:
                            protocol.send_text(frame)
                client.cursor = last
                client.sent += len(frames)
        except ConnectionClosed:
            pass

    # ------------------------------------------------------------------ drop the slow
    def _on_events(self, name: str, first: int, count: int, origin: str | None) -> None:
        """After each publish (once per burst of ``count`` events): drop subscribers now too far behind."""
        if not self.clients:
            return
        head = first + count
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


class _FrameHeaders(dict[int, bytes]):
    """Text frame header (FIN, opcode 1, unmasked) by payload length, made once per length."""

    def __missing__(self, length: int) -> bytes:
        if length < 126:
            header = bytes((0x81, length))
        elif length < 1 << 16:
            header = b"\x81\x7e" + length.to_bytes(2, "big")
        else:
            header = b"\x81\x7f" + length.to_bytes(8, "big")
        if len(self) < 1 << 16:
            self[length] = header
        return header


_FRAME_HEADERS = _FrameHeaders()


def text_frames(payloads: list[bytes]) -> bytes:
    """Server-to-client text frames (RFC 6455 5.2) of ``payloads``, back to back."""
    headers = map(_FRAME_HEADERS.__getitem__, map(len, payloads))
    return b"".join(chain.from_iterable(zip(headers, payloads, strict=True)))


def _peer(connection: ServerConnection) -> str:
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except Exception:
        return "?"
