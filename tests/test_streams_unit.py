"""Fast tier: the streams modules without FUSE (segments, broker, reader, ACL)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import trio
from snapshot_doubles import DirSink, DirSource

from kfs.config import RoleConfig
from kfs.store import StoreDir
from kfs.streams.acl import TOKENS_FILE, Acl
from kfs.streams.broker import Broker
from kfs.streams.reader import StreamHandle, read_stream
from kfs.streams.segments import SegmentLog


def store_at(tmp_path: Path, name: str = "streams") -> StoreDir:
    return StoreDir.open(str(tmp_path / name))


def test_segments_append_read_reload(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    log = SegmentLog.open(store, 1000, 1 << 20)
    lines = [json.dumps({"i": i}).encode() + b"\n" for i in range(50)]
    for i, line in enumerate(lines):
        assert log.append(line) == (i + 1, sum(map(len, lines[:i])))
    assert log.end_offset == sum(map(len, lines))
    assert log.line(7) == lines[6]
    assert log.read(0, 1 << 20)[: len(lines[0])] == lines[0]
    assert log.seq_at(log.offset_of(10)) == (10, True)
    log.close()
    again = SegmentLog.open(store, 1000, 1 << 20)
    assert (again.first_seq, again.next_seq, again.end_offset) == (1, 51, log.end_offset)
    assert again.line(50) == lines[49]


def test_segments_torn_last_line_is_cut(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    log = SegmentLog.open(store, 1000, 1 << 20)
    log.append(b'{"a":1}\n')
    name = log.segments[-1].name
    log.close()
    with open(tmp_path / "streams" / name, "ab") as f:
        f.write(b'{"torn":')
    again = SegmentLog.open(store, 1000, 1 << 20)
    assert again.next_seq == 2 and again.end_offset == 8
    assert (tmp_path / "streams" / name).read_bytes() == b'{"a":1}\n'


def test_retention_bounds_events_and_bytes(tmp_path: Path) -> None:
    log = SegmentLog.open(store_at(tmp_path), 100, 1 << 30)
    for i in range(1000):
        log.append(b'{"i":%d}\n' % i)
    assert 100 * 7 // 8 <= log.retained_events <= 100
    assert log.next_seq == 1001
    assert log.line(log.first_seq) == b'{"i":%d}\n' % (log.first_seq - 1)
    files = os.listdir(tmp_path / "streams")
    assert len(files) == len(log.segments) <= 9

    by_bytes = SegmentLog.open(store_at(tmp_path, "b"), 10**9, 64 * 1024)
    for _ in range(2000):
        by_bytes.append(b"x" * 99 + b"\n")
    assert by_bytes.retained_bytes <= 64 * 1024
    assert by_bytes.retained_bytes >= 64 * 1024 * 7 // 8 - 100
    on_disk = sum(os.path.getsize(tmp_path / "b" / n) for n in os.listdir(tmp_path / "b"))
    assert on_disk == by_bytes.retained_bytes


def test_publish_objects_stores_what_publish_many_would(tmp_path: Path) -> None:
    """Log bursts are stamped at the byte level: the same fields as the dict path, the writer's bytes kept."""
    broker = Broker(store_at(tmp_path), 1000, 1 << 20, "node-a")
    seen: list[tuple[str, int, int]] = []
    broker.batch_listeners.append(lambda name, first, count, origin: seen.append((name, first, count)))
    lines = [b'{"timestamp":"2026-01-01T00:00:00.000Z","msg":"a","n":1.50}', b'{"timestamp":"t2","x":[1,{"y":null}]}']
    records = [json.loads(x) for x in lines]
    assert broker.publish_objects("logs", b"\n".join(lines) + b"\n", records, {"file": "kai.log.jsonl"}) == range(1, 3)
    log = broker.streams["logs"].log
    assert log.line(1) == b'{"seq":1,"stream":"logs",' + lines[0][1:-1] + b',"file":"kai.log.jsonl"}\n'
    for seq, record in zip((1, 2), records, strict=True):
        assert json.loads(log.line(seq)) == {"seq": seq, "stream": "logs", **record, "file": "kai.log.jsonl"}
    assert seen == [("logs", 1, 2)]
    # Reserved fields, the extra field already there, a null timestamp, escaped names: from the records.
    odd = [b'{"timestamp":"t3","seq":7,"stream":"x","kfs_origin":"o","file":"mine"}', b'{"timestamp":null,"a":1}',
           b'{"timestamp":"t5","\\u0073eq":9}']
    records = [json.loads(x) for x in odd]
    assert broker.publish_objects("logs", b"\n".join(odd) + b"\n", records, {"file": "kai.log.jsonl"}) == range(3, 6)
    got = [json.loads(log.line(seq)) for seq in (3, 4, 5)]
    assert got[0] == {"seq": 3, "stream": "logs", "timestamp": "t3", "file": "mine"}
    assert got[1]["seq"] == 4 and got[1]["a"] == 1 and got[1]["timestamp"].endswith("Z")
    assert got[2] == {"seq": 5, "stream": "logs", "timestamp": "t5", "file": "kai.log.jsonl"}
    assert records[0]["seq"] == 7  # the caller's records are not touched
    with pytest.raises(OSError) as e:
        big = b'{"timestamp":"t","s":"' + b"x" * (1 << 20) + b'"}'
        broker.publish_objects("logs", big + b"\n", [json.loads(big)])
    assert e.value.errno == errno.EFBIG and log.next_seq == 6


def test_log_lines_reach_the_logs_stream_from_the_bus(tmp_path: Path) -> None:
    from kfs.bus import Bus
    from kfs.config import StreamsConfig
    from kfs.streams.area import StreamsArea

    bus = Bus()
    area = StreamsArea(bus, store_at(tmp_path), StreamsConfig())
    big = b'{"timestamp":"t","s":"' + b"x" * (1 << 20) + b'"}'
    lines = [b'{"timestamp":"t","i":1}', big, b'{"timestamp":"t","i":3}']
    data = b"\n".join(lines) + b"\n"
    bus.publish("log_lines", {"file": "a.log.jsonl", "data": data, "count": 3,
                              "records": [json.loads(x) for x in lines]}, "logs")
    # Published on the area's own thread (the trio loop's, in the daemon): stored before publish
    # returned, with no task to wake.
    log = area.broker.streams["logs"].log
    # The oversized line (logs/ takes up to 16 MiB, an event is at most 1 MiB) is the only one left out.
    assert [json.loads(log.line(s))["i"] for s in range(log.first_seq, log.next_seq)] == [1, 3]
    assert area.counters["bus_events_dropped"] == 1
    assert area.broker.streams["system"].log.next_seq == 1  # no system event for log lines


def test_bus_events_from_other_threads_reach_the_stream_through_the_pump(tmp_path: Path) -> None:
    from kfs.bus import Bus
    from kfs.config import StreamsConfig
    from kfs.streams.area import StreamsArea

    bus = Bus()
    config = StreamsConfig()
    config.websocket.enabled = False
    config.metrics_interval = 0
    area = StreamsArea(bus, store_at(tmp_path), config)
    system = area.broker.streams["system"]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await area.start(nursery)
            # a key derivation or a Chroma call finishing in a worker thread publishes from there
            await trio.to_thread.run_sync(bus.publish, "vault_unlock_failed", {"reason": "test"}, "vault")
            with trio.fail_after(10):
                while system.log.next_seq == 1:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    event = json.loads(system.log.line(1))
    assert event["event"] == "vault_unlock_failed" and event["reason"] == "test"


def test_broker_stamps_and_validates(tmp_path: Path) -> None:
    broker = Broker(store_at(tmp_path), 1000, 1 << 20, "node-a")
    assert set(broker.streams) == {"system", "logs", "metrics"}
    seqs = broker.publish_lines("chat", [b'{"text":"hi","seq":99,"stream":"x"}', b'{"n":2}'])
    assert seqs == [1, 2]
    first = json.loads(broker.streams["chat"].log.line(1))
    assert first["seq"] == 1 and first["stream"] == "chat" and first["text"] == "hi"
    assert first["timestamp"].endswith("Z")
    for bad in ([b"[1,2]"], [b'{"ok":1}', b"not json"], [b'"s"']):
        with pytest.raises(OSError) as e:
            broker.publish_lines("chat", bad)
        assert e.value.errno == errno.EINVAL
    assert broker.streams["chat"].log.next_seq == 3  # all or nothing
    with pytest.raises(OSError) as e:
        broker.delete("system")
    assert e.value.errno == errno.EPERM
    broker.delete("chat")
    assert "chat" not in broker.streams and not (tmp_path / "streams" / "chat").exists()


def test_broker_since_time(tmp_path: Path) -> None:
    broker = Broker(store_at(tmp_path), 1000, 1 << 20, "n")
    for i in range(10):
        broker.publish("t", {"i": i, "timestamp": f"2026-01-01T00:00:{i:02d}Z"})
    from kfs.streams.broker import parse_rfc3339

    assert broker.seq_since_time(broker.streams["t"], parse_rfc3339("2026-01-01T00:00:04Z")) == 5
    assert broker.seq_since_time(broker.streams["t"], parse_rfc3339("2027-01-01T00:00:00Z")) == 11


def test_reader_follows_waits_and_gaps(tmp_path: Path) -> None:
    broker = Broker(store_at(tmp_path), 10_000, 1 << 26, "n")
    broker.publish("s", {"i": 0})

    async def main() -> None:
        handle = StreamHandle("s", os.O_RDONLY, stream="s", open_next_seq=2)
        data = await read_stream(broker, handle, 0, 4096, 0.05, 100)
        assert json.loads(data)["i"] == 0
        with pytest.raises(OSError) as e:  # idle: bounded wait, then EINTR
            await read_stream(broker, handle, len(data), 4096, 0.05, 100)
        assert e.value.errno == errno.EINTR
        nonblocking = StreamHandle("s", os.O_RDONLY | os.O_NONBLOCK, stream="s", open_next_seq=2,
                                   started=True, kernel_next=len(data), real_next=len(data))
        with pytest.raises(OSError) as e:
            await read_stream(broker, nonblocking, len(data), 4096, 0.05, 100)
        assert e.value.errno == errno.EAGAIN

        async def publish_later() -> None:
            await trio.sleep(0.01)
            broker.publish("s", {"i": 1})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_later)
            more = await read_stream(broker, handle, len(data), 4096, 5, 100)
        assert json.loads(more)["i"] == 1
        # Fall 1000 events behind with max lag 100: a gap marker, then recent events.
        for i in range(1000):
            broker.publish("s", {"i": i + 2})
        offset = len(data) + len(more)
        marker = json.loads(await read_stream(broker, handle, offset, 65536, 0.05, 100))
        assert marker["gap"] > 900 and marker["from_seq"] == 3
        offset += len(json.dumps(marker, separators=(",", ":"))) + 1
        after = await read_stream(broker, handle, offset, 65536, 0.05, 100)
        assert json.loads(after.split(b"\n")[0])["seq"] == marker["to_seq"] + 1

    trio.run(main)


def test_acl_tokens_hashed_and_roles(tmp_path: Path) -> None:
    roles = {"admin": RoleConfig(["*"], ["*"]), "dashboard": RoleConfig(["metrics", "system"], [])}
    store = store_at(tmp_path)
    acl = Acl(store, roles)
    info, secret = acl.create_token("dashboard")
    assert secret not in (tmp_path / "streams" / TOKENS_FILE).read_text()
    again = Acl(store, roles)
    assert again.authenticate(secret) is not None and again.authenticate(secret).role == "dashboard"
    assert again.authenticate(secret + "x") is None and again.authenticate(None) is None
    assert again.may_subscribe("dashboard", "metrics") and not again.may_subscribe("dashboard", "chat")
    assert not again.may_publish("dashboard", "metrics") and again.may_publish("admin", "chat")
    with pytest.raises(OSError):
        again.create_token("nope")
    again.revoke(info.id)
    assert Acl(store, roles).authenticate(secret) is None


def test_segment_read_then_append_after_reload(tmp_path: Path) -> None:
    """A read opens the active segment's fd; later appends must still work through it."""
    store = store_at(tmp_path)
    log = SegmentLog.open(store, 1000, 1 << 20)
    log.append(b'{"a":1}\n')
    log.close()
    again = SegmentLog.open(store, 1000, 1 << 20)
    assert again.read(0, 100) == b'{"a":1}\n'
    assert again.append(b'{"a":2}\n') == (2, 8)
    assert again.line(2) == b'{"a":2}\n'


def test_snapshot_export_and_restore(tmp_path: Path) -> None:
    from kfs.bus import Bus
    from kfs.config import StreamsConfig
    from kfs.streams.area import StreamsArea

    config = StreamsConfig()
    area = StreamsArea(Bus(), store_at(tmp_path), config)
    for i in range(5):
        area.broker.publish("chat", {"i": i})
    snap = tmp_path / "snap"
    trio.run(area.export_state, DirSink(snap), {"type": "full"})
    assert any(n.startswith("chat/") for n in DirSource(snap).names())
    for i in range(5, 9):
        area.broker.publish("chat", {"i": i})
    changed = trio.run(area.restore_state, DirSource(snap))
    assert "chat" in changed
    chat = area.broker.streams["chat"]
    assert chat.log.next_seq == 6
    assert [json.loads(chat.log.line(s))["i"] for s in range(1, 6)] == list(range(5))
    area.broker.publish("chat", {"i": "after"})
    assert json.loads(chat.log.line(6))["i"] == "after"
    assert not [n for n in os.listdir(tmp_path / "streams") if n.startswith((".old-", ".restore-"))]


def test_bus_routing(tmp_path: Path) -> None:
    from kfs.bus import Bus, Event
    from kfs.config import StreamsConfig
    from kfs.streams.area import StreamsArea

    bus = Bus()
    seen: list[Event] = []
    bus.subscribe(seen.append, ["stream_event"])
    area = StreamsArea(bus, store_at(tmp_path), StreamsConfig())
    bus.publish("vault_locked", {"reason": "idle"}, "vault")
    bus.publish("log_line", {"file": "kai.log.jsonl", "record": {"msg": "hello", "level": "info"}}, "logs")
    area._drain_inbox()
    system = json.loads(area.broker.streams["system"].log.line(1))
    assert (system["event"], system["source"], system["reason"]) == ("vault_locked", "vault", "idle")
    logged = json.loads(area.broker.streams["logs"].log.line(1))
    assert (logged["msg"], logged["file"]) == ("hello", "kai.log.jsonl")
    area.broker.publish("chat", {"event": "code_push"})
    assert [(e.data["stream"], e.data["record"]["event"]) for e in seen] == [("chat", "code_push")]
    assert area.broker.streams["system"].log.next_seq == 2  # stream events do not loop into system


def test_append_many_matches_append(tmp_path: Path) -> None:
    one = SegmentLog.open(store_at(tmp_path, "one"), 40, 1 << 20)
    many = SegmentLog.open(store_at(tmp_path, "many"), 40, 1 << 20)
    lines = [b'{"i":%d}\n' % i for i in range(300)]
    for line in lines:
        one.append(line)
    for base in range(0, 300, 37):
        many.append_many(lines[base: base + 37])
    assert (one.first_seq, one.next_seq, one.end_offset) == (many.first_seq, many.next_seq, many.end_offset)
    assert [one.line(s) for s in range(one.first_seq, 301)] == [many.line(s) for s in range(many.first_seq, 301)]
    assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "many"))
    reloaded = SegmentLog.open(store_at(tmp_path, "many"), 40, 1 << 20)
    assert (reloaded.first_seq, reloaded.next_seq) == (many.first_seq, 301)


def test_append_many_large_bursts_byte_exact(tmp_path: Path) -> None:
    """Bursts beyond the writev limit and the segment's byte bound land whole and in order."""
    log = SegmentLog.open(store_at(tmp_path), 1_000_000, 4 << 20)
    lines = [b'{"i":%d,"pad":"%s"}\n' % (i, b"x" * (i % 300)) for i in range(5000)]
    log.append_many(lines[:3000])
    log.append_many(lines[3000:])
    assert log.next_seq == 5001 and log.end_offset == sum(map(len, lines))
    assert [log.line(s) for s in (1, 1025, 2049, 4999, 5000)] == [lines[i] for i in (0, 1024, 2048, 4998, 4999)]
    on_disk = b"".join((tmp_path / "streams" / seg.name).read_bytes() for seg in log.segments)
    assert on_disk == b"".join(lines)[log.start_offset:]
    assert len(log.segments) > 1  # segment_bytes (512 KiB) cut the bursts


def test_append_block_cuts_segments_at_line_boundaries(tmp_path: Path) -> None:
    """One buffer for a burst: segments roll between lines (by count and by bytes), as line by line."""
    one = SegmentLog.open(store_at(tmp_path, "one"), 80, 40 * 1024)  # segments of 10 events, 5 KiB
    block = SegmentLog.open(store_at(tmp_path, "block"), 80, 40 * 1024)
    lines = [b'{"i":%d,"pad":"%s"}\n' % (i, b"x" * (i * 37 % 900)) for i in range(200)]
    lines[50] = b'{"big":"%s"}\n' % (b"y" * 6000)  # larger than a segment: alone in one
    for line in lines:
        one.append(line)
    for base in range(0, 200, 47):
        part = lines[base: base + 47]
        block.append_block(b"".join(part), list(map(len, part)))
    assert (one.first_seq, one.next_seq, one.end_offset) == (block.first_seq, block.next_seq, block.end_offset)
    assert list(one.offsets) == list(block.offsets)
    assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "block"))
    for name in os.listdir(tmp_path / "one"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "block" / name).read_bytes()
    reloaded = SegmentLog.open(store_at(tmp_path, "block"), 80, 40 * 1024)
    assert list(reloaded.offsets) == list(block.offsets)


def test_publish_objects_index_and_listeners_match_the_stored_lines(tmp_path: Path) -> None:
    """Bursts rendered in one piece: seqs crossing a power of ten, "%" in the bytes and the file name,
    both paths (own seq or not); the offset index, a reload and per-line listeners agree."""
    broker = Broker(store_at(tmp_path), 10_000, 64 << 20, "node-a")
    heard: list[tuple[int, bytes]] = []
    broker.listeners.append(lambda name, seq, line, origin: heard.append((seq, line)))
    counts: list[int] = []
    broker.batch_listeners.append(lambda name, first, count, origin: counts.append(count))
    plain = [b'{"timestamp":"t","msg":"50%% %d %%s"}' % i for i in range(7)]
    numbered = [b'{"timestamp":"t","seq":%d,"msg":"%%d"}' % i for i in range(95)]
    for burst in (plain, numbered, plain, numbered[:1], plain[:1]):
        records = [json.loads(x) for x in burst]
        broker.publish_objects("logs", b"\n".join(burst) + b"\n", records, {"file": "100%.log.jsonl"})
    log = broker.streams["logs"].log
    assert counts == [7, 95, 7, 1, 1] and log.next_seq == 112
    stored = [log.line(seq) for seq in range(1, 112)]
    assert heard == list(zip(range(1, 112), stored, strict=True))
    assert stored[1] == b'{"seq":2,"stream":"logs","timestamp":"t","msg":"50% 1 %s","file":"100%.log.jsonl"}\n'
    assert stored[9] == b'{"seq":10,"stream":"logs","timestamp":"t","msg":"%d","file":"100%.log.jsonl"}\n'
    assert stored[102] == b'{"seq":103,"stream":"logs","timestamp":"t","msg":"50% 0 %s","file":"100%.log.jsonl"}\n'
    assert b"".join(stored) == b"".join((tmp_path / "streams" / "logs" / seg.name).read_bytes()
                                        for seg in log.segments)
    broker.close()
    reloaded = Broker(store_at(tmp_path), 10_000, 64 << 20, "node-a").streams["logs"].log
    assert stored[110] == b'{"seq":111,"stream":"logs","timestamp":"t","msg":"50% 0 %s","file":"100%.log.jsonl"}\n'
    assert list(reloaded.offsets) == list(log.offsets) and reloaded.next_seq == 112
