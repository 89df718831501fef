"""logs/ modules without FUSE: validation, writer, rotation, retention, spool, area."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

import pytest
import trio
from snapshot_doubles import MemorySink

from kfs.bus import Bus, Event
from kfs.config import LoggingConfig, LogstashConfig
from kfs.fs.area import AttrChanges, Ctx
from kfs.logs import rotation
from kfs.logs.area import LogHandle, LogsArea
from kfs.logs.lines import LineError, LineValidator, is_rotated_name, split_complete
from kfs.logs.logstash import Forwarder, Spool
from kfs.store import StoreDir

RFC3339_Z = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"


# ----------------------------------------------------------------------------- lines
def test_timestamp_added_first_and_records_returned() -> None:
    batch = LineValidator().process(b'{"a":1}\n{"b":2}\n')
    lines = batch.data.decode().splitlines()
    assert [json.loads(x)["a" if i == 0 else "b"] for i, x in enumerate(lines)] == [1, 2]
    for text, record in zip(lines, batch.records, strict=True):
        assert text.startswith('{"timestamp":"')
        assert json.loads(text) == record
    import re

    assert re.match(RFC3339_Z, batch.records[0]["timestamp"])


def test_existing_timestamp_and_formatting_kept() -> None:
    raw = b'{"timestamp":"2020-01-01T00:00:00Z", "n": 1.50}\n'
    assert LineValidator().process(raw).data == raw


def test_mixed_batch_whitespace_and_empty_object() -> None:
    raw = b'  {"timestamp":"x"}  \r\n{}\n{"a": [1, {"b": null}]}\n'
    batch = LineValidator().process(raw)
    lines = batch.data.decode().splitlines()
    assert lines[0] == '{"timestamp":"x"}'
    assert json.loads(lines[1]).keys() == {"timestamp"}
    assert json.loads(lines[2])["a"] == [1, {"b": None}]


@pytest.mark.parametrize("raw", [
    b"not json\n", b"[1,2]\n", b'"text"\n', b"42\n", b"\n", b"   \n", b'{"a":1} x\n', b'{"a":1}{"b":2}\n',
    b'{"a":NaN}\n', b'{"a":\n1}\n', b'{"a":1}\nnope\n', b'{"a":"\xff"}\n', b'{"a":"\x01"}\n',
])
def test_bad_lines_rejected(raw: bytes) -> None:
    with pytest.raises(LineError):
        LineValidator().process(raw)


def test_general_path_accepts_what_the_fast_path_declines() -> None:
    batch = LineValidator().process(b'{"big": 123456789012345678901234567890}\n{"s": "\\ud800"}\n')
    assert batch.records[0]["big"] == 123456789012345678901234567890
    assert len(batch.data.splitlines()) == 2


def test_deep_nesting_is_a_bad_line_not_a_crash() -> None:
    with pytest.raises(LineError):
        LineValidator().process(b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n")


def test_crafted_lines_that_form_a_valid_array_are_still_rejected() -> None:
    with pytest.raises(LineError):
        LineValidator().process(b'{"a":[{}\n{}]},{},{"b":[{}\n{}]}\n')


def test_level_filter() -> None:
    v = LineValidator("warning")
    batch = v.process(b'{"level":"debug"}\n{"level":"INFO"}\n{"level":"error","x":1}\n{"x":2}\n'
                      b'{"level":"whatever"}\n{"level":5}\n')
    assert batch.filtered == 2
    assert [r.get("x") for r in batch.records] == [1, 2, None, None]
    assert len(batch.data.splitlines()) == 4


def test_fast_path_edge_cases() -> None:
    # An empty object spelt with a space: stamped (not spliced into '{"timestamp":..., }').
    batch = LineValidator().process(b'{"a":1}\n{ }\n')
    assert [json.loads(x).keys() for x in batch.data.splitlines()] == [{"timestamp", "a"}, {"timestamp"}]
    # A timestamp key spelt with an escape counts as a timestamp: not added twice.
    raw = b'{"\\u0074imestamp":"2020-01-01T00:00:00Z","a":1}\n'
    assert LineValidator().process(raw).data == raw
    # Unhashable and unknown levels: never dropped; below-level ones are.
    batch = LineValidator("info").process(b'{"level":["x"]}\n{"level":"DEBUG"}\n{"level":"trace2"}\n')
    assert batch.filtered == 1 and [r["level"] for r in batch.records] == [["x"], "trace2"]
    # Whitespace before the newline of a line that is otherwise bare: trimmed by the general path.
    assert LineValidator().process(b'{"timestamp":"t"} \n').data == b'{"timestamp":"t"}\n'


@pytest.mark.parametrize("after", [b" ", b"\t", b"\r"])
def test_whitespace_after_an_object_in_a_compact_batch_is_trimmed(after: bytes) -> None:
    """The batch check looks at last bytes only where the batch holds whitespace: any of it counts."""
    raw = b'{"timestamp":"t","a":1}\n{"timestamp":"t","b":2}' + after + b'\n{"timestamp":"t","c":3}\n'
    assert LineValidator().process(raw).data == raw.replace(after, b"")
    stamped = LineValidator().process(raw.replace(b'"timestamp":"t",', b""))
    assert [json.loads(x) for x in stamped.data.splitlines()] == stamped.records
    assert stamped.data.count(b"}\n") == 3 and after not in stamped.data


def test_split_complete() -> None:
    assert split_complete(b"ab", b"c\nde") == (b"abc\n", b"de")
    assert split_complete(b"", b"abc") == (b"", b"abc")


def test_rotated_names() -> None:
    assert is_rotated_name("kai.20261202T010203Z.log.jsonl")
    assert is_rotated_name("kai.20261202T010203Z-2.log.jsonl")
    assert not is_rotated_name("kai.log.jsonl")


# ----------------------------------------------------------------------------- rotation
def test_rotation_and_retention(tmp_path: Path) -> None:
    store = StoreDir.open(str(tmp_path))
    (tmp_path / "a.log.jsonl").write_text('{"a":1}\n')
    now = time.time()
    first, _ = rotation.rotate(store, "a.log.jsonl", now)
    (tmp_path / "a.log.jsonl").write_text('{"a":2}\n')
    second, st = rotation.rotate(store, "a.log.jsonl", now)
    rotation.create_like(store, "a.log.jsonl", st)
    assert first != second and second.endswith("-1.log.jsonl")
    assert os.stat(tmp_path / first).st_mode & 0o777 == 0o444
    assert (tmp_path / "a.log.jsonl").read_bytes() == b""
    old = now - 10 * 86400
    os.utime(tmp_path / first, (old, old))
    assert rotation.apply_retention(store, 5, now) == [first]
    assert sorted(os.listdir(tmp_path)) == sorted(["a.log.jsonl", second])


# ----------------------------------------------------------------------------- spool
def test_spool_segments_read_commit_reopen(tmp_path: Path) -> None:
    store = StoreDir.open(str(tmp_path))
    spool = Spool(store, segment_bytes=100)
    lines = [f'{{"n":{i}}}\n'.encode() for i in range(50)]
    for line in lines:
        spool.append(line)
    assert len(spool.starts) > 3
    got, offset = b"", 0
    while chunk := spool.read(offset, 64):
        assert chunk.endswith(b"\n")
        got += chunk
        offset += len(chunk)
    assert got == b"".join(lines)
    spool.commit(offset // 2)
    spool.close()
    again = Spool(store, segment_bytes=100)
    assert again.committed == offset // 2 and again.head == offset
    rest = b""
    pos = again.committed
    while chunk := again.read(pos):
        rest += chunk
        pos += len(chunk)
    assert rest == got[offset // 2:]
    again.append(b'{"n":"more"}\n')
    assert again.head == offset + 13


def test_spool_bounded_drops_oldest(tmp_path: Path) -> None:
    spool = Spool(StoreDir.open(str(tmp_path)), max_bytes=300, segment_bytes=100)
    for i in range(100):
        spool.append(f'{{"n":{i:04d}}}\n'.encode())
    assert spool.depth <= 400 and spool.dropped_bytes > 0
    assert spool.read(spool.committed).startswith(b'{"n":')


# ----------------------------------------------------------------------------- area
def make_area(tmp_path: Path, **config: object) -> tuple[LogsArea, list[Event]]:
    bus = Bus()
    events: list[Event] = []
    bus.subscribe(events.append)
    return LogsArea(bus, StoreDir.open(str(tmp_path)), LoggingConfig(**config), None), events  # type: ignore[arg-type]


def test_area_write_assembles_lines_and_publishes(tmp_path: Path) -> None:
    area, events = make_area(tmp_path)

    async def main() -> None:
        h = await area.create("x.log.jsonl", 0o644, os.O_WRONLY | os.O_APPEND, Ctx())
        for piece in (b'{"a":', b' "b', b'c"}\n{"d"', b':1}\n'):
            assert await area.write(h, 0, piece) == len(piece)
        with pytest.raises(OSError) as e:
            await area.write(h, 0, b'{"ok":1}\nbad\n')
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            await area.write(h, 0, b"nope")
        assert e.value.errno == errno.EINVAL
        await area.write(h, 0, b'{"last":true}')
        await area.release(h)

    trio.run(main)
    stored = [json.loads(x) for x in (tmp_path / "x.log.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "timestamp"} for r in stored] == [
        {"a": "bc"}, {"d": 1}, {"last": True}]
    # One `log_lines` event per accepted write: the stored bytes and the same records.
    batches = [e for e in events if e.topic == "log_lines"]
    assert [r for e in batches for r in e.data["records"]] == stored
    assert b"".join(e.data["data"] for e in batches) == (tmp_path / "x.log.jsonl").read_bytes()
    assert all(e.data["count"] == len(e.data["records"]) and e.data["file"] == "x.log.jsonl" for e in batches)
    assert not [e for e in events if e.topic == "log_line"]  # nobody asked for per-line events
    assert area.status()["counters"]["rejected_writes"] == 2


def test_per_line_events_only_for_subscribers_that_name_them(tmp_path: Path) -> None:
    area, everything = make_area(tmp_path)
    named: list[Event] = []
    area.bus.subscribe(named.append, ["log_line"])

    async def main() -> None:
        h = await area.create("y.log.jsonl", 0o644, os.O_WRONLY | os.O_APPEND, Ctx())
        await area.write(h, 0, b'{"n":1}\n{"n":2}\n')
        await area.release(h)

    trio.run(main)
    assert [(e.data["file"], e.data["record"]["n"]) for e in named] == [("y.log.jsonl", 1), ("y.log.jsonl", 2)]
    assert [e.topic for e in everything] == ["log_lines"]  # a catch-all subscriber gets the batch only


def test_area_append_only_and_names(tmp_path: Path) -> None:
    area, _ = make_area(tmp_path)

    async def main() -> None:
        h = await area.create("x.log.jsonl", 0o644, os.O_WRONLY, Ctx())
        await area.write(h, 0, b'{"a":1}\n')
        await area.write(h, 8, b'{"a":2}\n')  # sequential continuation of the same handle
        await area.release(h)
        h = await area.open("x.log.jsonl", os.O_WRONLY, Ctx())
        with pytest.raises(OSError) as e:
            await area.write(h, 0, b'{"a":3}\n')
        assert e.value.errno == errno.EPERM
        await area.release(h)
        for flags in (os.O_WRONLY | os.O_TRUNC,):
            with pytest.raises(OSError) as e:
                await area.open("x.log.jsonl", flags, Ctx())
            assert e.value.errno == errno.EPERM
        with pytest.raises(OSError) as e:
            await area.setattr("x.log.jsonl", AttrChanges(size=0), None, Ctx())
        assert e.value.errno == errno.EPERM
        for name, code in (("x.txt", errno.EINVAL), ("x.20260101T000000Z.log.jsonl", errno.EPERM),
                           (".logstash-spool", errno.EPERM)):
            with pytest.raises(OSError) as e:
                await area.create(name, 0o644, os.O_WRONLY, Ctx())
            assert e.value.errno == code, name
        with pytest.raises(OSError) as e:
            await area.rename("x.log.jsonl", "y.log.jsonl", 0)
        assert e.value.errno == errno.EPERM

    trio.run(main)
    assert len((tmp_path / "x.log.jsonl").read_text().splitlines()) == 2
    assert sorted(os.listdir(tmp_path)) == ["x.log.jsonl"]


def test_area_rotates(tmp_path: Path) -> None:
    area, events = make_area(tmp_path, rotate_size_mb=0.001)  # ~1 KiB

    async def main() -> None:
        h = await area.create("r.log.jsonl", 0o644, os.O_WRONLY | os.O_APPEND, Ctx())
        for i in range(100):
            await area.write(h, 0, json.dumps({"i": i, "pad": "x" * 40}).encode() + b"\n")
        await area.release(h)

    trio.run(main)
    names = sorted(os.listdir(tmp_path))
    rotated = [n for n in names if is_rotated_name(n)]
    assert len(rotated) >= 3 and "r.log.jsonl" in names
    seen = []
    for name in [*rotated, "r.log.jsonl"]:
        seen += [json.loads(x)["i"] for x in (tmp_path / name).read_text().splitlines()]
    assert sorted(seen) == list(range(100))
    assert sum(e.topic == "log_rotated" for e in events) == len(rotated)


def test_forwarder_delivers_in_order_with_replay(tmp_path: Path) -> None:
    """A plain TCP listener as the peer: close it mid-run, lines still all arrive (maybe twice)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    config = LogstashConfig(host="127.0.0.1", port=port, reconnect_max=0.2, replay_window=0.3)  # type: ignore[arg-type]
    fwd = Forwarder(StoreDir.open(str(tmp_path)), config)
    received = bytearray()

    async def serve_once(count_limit: int | None,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        task_status.started()
        stream = await listeners[0].accept()
        buf = bytearray()
        try:
            with trio.move_on_after(5):
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    buf.extend(data)
                    # what a receiver keeps: whole lines only (a hang-up can cut the last one)
                    cut = buf.rfind(b"\n") + 1
                    received.extend(buf[:cut])
                    del buf[:cut]
                    if count_limit is not None and received.count(b"\n") >= count_limit:
                        break
        finally:
            await stream.aclose()
        for lst in listeners:
            await lst.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fwd.run)
            for i in range(50):
                fwd.append(f'{{"n":{i}}}\n'.encode())  # spooled while no peer listens
            await trio.sleep(0.3)
            await serve_once(20)  # takes some lines then hangs up
            for i in range(50, 100):
                fwd.append(f'{{"n":{i}}}\n'.encode())
            async with trio.open_nursery() as inner:
                await inner.start(serve_once, None)
                with trio.move_on_after(5):
                    while fwd.spool.committed < fwd.spool.head:
                        await trio.sleep(0.1)
                assert fwd.spool.committed == fwd.spool.head
                inner.cancel_scope.cancel()
            nursery.cancel_scope.cancel()

    trio.run(main)
    seqs = [json.loads(x)["n"] for x in received.decode().splitlines() if x.endswith("}")]
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == list(range(100))


def test_export_state_conversation_memory(tmp_path: Path) -> None:
    area, _ = make_area(tmp_path)
    (tmp_path / "chat.log.jsonl").write_text("".join(json.dumps({"timestamp": f"t{i}", "i": i}) + "\n"
                                                     for i in range(10)))
    (tmp_path / "chat.log.jsonl.partial").write_text("ignored")
    sink = MemorySink()
    scope: dict[str, object] = {"type": "conversation", "memory_window": 3, "memory_events": []}
    trio.run(area.export_state, sink, scope)
    assert list(sink.files) == ["chat.log.jsonl"]
    assert [e["record"]["i"] for e in scope["memory_events"]] == [7, 8, 9]  # type: ignore[attr-defined,index]


def test_daemon_log_is_never_rotated(tmp_path: Path) -> None:
    area, _ = make_area(tmp_path, rotate_size_mb=0.0001)

    async def main() -> None:
        h = await area.create("kfsd.log.jsonl", 0o644, os.O_WRONLY | os.O_APPEND, Ctx())
        for i in range(20):
            await area.write(h, 0, json.dumps({"i": i, "pad": "x" * 50}).encode() + b"\n")
        await area.release(h)

    trio.run(main)
    assert os.listdir(tmp_path) == ["kfsd.log.jsonl"]
    assert area.status()["counters"]["rotations"] == 0


# ----------------------------------------------------------------------------- hot paths
@pytest.mark.parametrize("line", [
    b'{"a":1}\n', b'{"timestamp":"x","a":1}\n', b'{"\\u0074imestamp":"x"}\n', b'{}\n', b'  {"a":1}\n',
    b'{"a":1}\r\n', b'{"level":"debug","a":1}\n', b'{"level":"ERROR","a":1}\n', b'{"a":"\\u00e9"}\n',
    b'{"a":[1,{"b":null}],"n":1.50}\n',
])
def test_single_line_path_matches_the_batch_path(line: bytes) -> None:
    # The one-line path (open-append-close) stores what the batch path stores for the same line.
    one, batch = LineValidator("info"), LineValidator("info")
    for v in (one, batch):
        v.clock.now = lambda: "2026-01-01T00:00:00.000Z"  # type: ignore[method-assign]
    other = b'{"other":true}\n'
    got = one.process(line)
    together = batch.process(line + other)
    assert got.data + one.process(other).data == together.data
    assert got.records + one.process(other).records == together.records
    assert got.filtered == together.filtered


@pytest.mark.parametrize("line", [
    b"[1]\n", b'{"a":NaN}\n', b'{"a":1} x\n', b'{"a":1}{"b":2}\n', b'{"a":"\xff"}\n', b"{\n", b'{"a":"\x01"}\n',
])
def test_single_line_path_rejects_bad_lines(line: bytes) -> None:
    with pytest.raises(LineError):
        LineValidator().process(line)


def test_timestamp_and_level_keys_spelt_with_escapes_still_count() -> None:
    v = LineValidator("info")
    stamped = b'{"\\u0074imestamp":"t1","a":1}\n{"timestamp":"t2"}\n'
    assert v.process(stamped).data == stamped  # both lines carry a timestamp: stored as written
    batch = v.process(b'{"\\u006cevel":"debug","a":1}\n{"b":2}\n')
    assert batch.filtered == 1 and [r.get("b") for r in batch.records] == [2]


def test_writers_keep_idle_files_open_and_notice_unlinks(tmp_path: Path) -> None:
    from kfs.logs import writer

    store = StoreDir.open(str(tmp_path), mode=0o700)
    writers = writer.Writers(store)
    (tmp_path / "a.log.jsonl").write_bytes(b"")
    log = writers.acquire("a.log.jsonl")
    fd = log.fd
    writers.release(log)
    assert writers.in_use() == 0 and os.fstat(fd)  # idle, still open
    again = writers.acquire("a.log.jsonl")
    assert again is log and again.fd == fd and writers.in_use() == 1
    writers.release(again)
    # Removed behind kfs's back: the idle descriptor is dropped, the path opened afresh (or ENOENT).
    (tmp_path / "a.log.jsonl").unlink()
    with pytest.raises(FileNotFoundError):
        writers.acquire("a.log.jsonl")
    with pytest.raises(OSError):
        os.fstat(fd)
    (tmp_path / "a.log.jsonl").write_bytes(b'{"x":1}\n')
    fresh = writers.acquire("a.log.jsonl")
    assert fresh.size == 8
    writers.release(fresh)
    # At most IDLE_FILES idle files: the least recently released is closed first.
    names = [f"f{i}.log.jsonl" for i in range(writer.IDLE_FILES + 3)]
    for name in names:
        (tmp_path / name).write_bytes(b"")
        writers.release(writers.acquire(name))
    assert writers.idle == writer.IDLE_FILES and writers.in_use() == 0
    assert "a.log.jsonl" not in writers.files and names[-1] in writers.files
    writers.close_all()


def test_area_open_append_close_reuses_the_store_file(tmp_path: Path) -> None:
    area, _ = make_area(tmp_path)

    async def main() -> None:
        h = await area.create("c.log.jsonl", 0o644, os.O_WRONLY | os.O_APPEND, Ctx())
        await area.release(h)
        fds = set()
        for i in range(5):
            h = await area.open("c.log.jsonl", os.O_WRONLY | os.O_APPEND, Ctx())
            assert isinstance(h, LogHandle) and h.log is not None
            fds.add(h.log.fd)
            await area.write(h, 0, b'{"i":%d}\n' % i)
            assert (await area.getattr("c.log.jsonl")).size == (tmp_path / "c.log.jsonl").stat().st_size
            await area.flush(h)
            await area.release(h)
        assert len(fds) == 1 and area.status()["counters"]["open_logs"] == 0
        # unlink through kfs closes the idle file; a new log of that name starts empty
        await area.unlink("c.log.jsonl")
        h = await area.create("c.log.jsonl", 0o644, os.O_WRONLY | os.O_APPEND, Ctx())
        await area.write(h, 0, b'{"new":1}\n')
        await area.release(h)
        # a directory with a log's name cannot be opened for writing
        await area.mkdir("d.log.jsonl", 0o755, Ctx())
        with pytest.raises(OSError) as e:
            await area.open("d.log.jsonl", os.O_WRONLY | os.O_APPEND, Ctx())
        assert e.value.errno == errno.EISDIR

    trio.run(main)
    assert [json.loads(x)["new"] for x in (tmp_path / "c.log.jsonl").read_text().splitlines()] == [1]
