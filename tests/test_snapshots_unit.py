"""snapshots/ without FUSE: the zip writer against real unzip, the safety checks, retention, triggers."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest
import trio

from kfs.bus import Bus
from kfs.config import SnapshotsConfig
from kfs.fs.area import Area
from kfs.snapshots import reader, triggers
from kfs.snapshots.area import SnapshotsArea, memory_window
from kfs.snapshots.reader import check_for_restore, open_snapshot, verify
from kfs.snapshots.restore import Source
from kfs.snapshots.writer import (
    CHUNK,
    MAX_OPEN_FDS,
    Sink,
    SnapshotError,
    SnapshotWriter,
    build_manifest,
    commit,
    temp_name,
)
from kfs.store import StoreDir


def make_state(root: Path) -> StoreDir:
    (root / "logs" / "sub").mkdir(parents=True)
    lines = "".join(json.dumps({"i": i, "message": f"line {i} of the log " * 3}) + "\n" for i in range(60_000))
    (root / "logs" / "big.log.jsonl").write_text(lines)           # several chunks: exercises the primers
    (root / "logs" / "sub" / "small.log.jsonl").write_text('{"a": 1}\n')
    (root / "vault").mkdir()
    (root / "vault" / "secret.enc").write_bytes(os.urandom(3 * CHUNK + 17))
    (root / "vault" / "empty").write_bytes(b"")
    return StoreDir.open(str(root))


def write_zip(state: StoreDir, out: StoreDir, name: str, compression: str = "auto") -> Path:
    fd = out.open_fd(temp_name(name), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    zw = SnapshotWriter(fd, compression)
    logs, vault = Sink(zw, "logs"), Sink(zw, "vault")
    logs.add_store_file("big.log.jsonl", state, "logs/big.log.jsonl")
    logs.add_store_file("sub/small.log.jsonl", state, "logs/sub/small.log.jsonl")
    logs.add_store_file("head.log.jsonl", state, "logs/big.log.jsonl", length=1000)
    vault.add_store_file("secret.enc", state, "vault/secret.enc", compress=False)
    vault.add_store_file("empty", state, "vault/empty")
    Sink(zw, "streams").add_bytes("chat/0.jsonl", b'{"event": "hi"}\n')
    zw.write(lambda w: build_manifest({"name": name, "type": "full"}, w))
    commit(out, fd, name)
    return Path(out.label) / f"{name}.zip"


@pytest.mark.parametrize("compression", ["auto", "deflate", "stored"])
def test_zip_is_read_by_unzip_and_manifest_matches_sha256sum(tmp_path: Path, compression: str) -> None:
    state = make_state(tmp_path / "state")
    out = StoreDir.open(str(tmp_path / "out"))
    path = write_zip(state, out, "s1", compression)
    assert subprocess.run(["unzip", "-tq", str(path)], capture_output=True).returncode == 0
    dest = tmp_path / "x"
    subprocess.run(["unzip", "-q", str(path), "-d", str(dest)], check=True)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["file_count"] == 6
    for item in manifest["files"]:
        out_line = subprocess.run(["sha256sum", str(dest / item["path"])], capture_output=True, text=True).stdout
        assert out_line.split()[0] == item["sha256"], item["path"]
        assert (dest / item["path"]).stat().st_size == item["size"]
    assert (dest / "logs/big.log.jsonl").read_bytes() == (tmp_path / "state/logs/big.log.jsonl").read_bytes()
    assert (dest / "logs/head.log.jsonl").read_bytes() == (tmp_path / "state/logs/big.log.jsonl").read_bytes()[:1000]
    methods = {i["path"]: i["method"] for i in manifest["files"]}
    if compression == "auto":
        assert methods["vault/secret.enc"] == "stored" and methods["logs/big.log.jsonl"] == "deflate"
    assert not list((tmp_path / "out").glob(".*"))  # the temp name is gone
    snap = open_snapshot(out, "s1")
    assert verify(snap) == []
    check_for_restore(snap)


def test_verify_reports_a_corrupted_entry(tmp_path: Path) -> None:
    state = make_state(tmp_path / "state")
    out = StoreDir.open(str(tmp_path / "out"))
    path = write_zip(state, out, "s1")
    snap = open_snapshot(out, "s1")
    info = snap.files["vault/secret.enc"]
    offset = snap.data_offset(info) + 1000
    snap.close()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = verify(open_snapshot(out, "s1"))
    assert problems and "vault/secret.enc" in problems[0]


def test_source_copies_and_checks_entries(tmp_path: Path) -> None:
    state = make_state(tmp_path / "state")
    out = StoreDir.open(str(tmp_path / "out"))
    write_zip(state, out, "s1")
    snap = open_snapshot(out, "s1")
    listed = check_for_restore(snap)
    source = Source(snap, "logs", listed)
    assert source.names() == ["big.log.jsonl", "head.log.jsonl", "sub/small.log.jsonl"]
    target = StoreDir.open(str(tmp_path / "target"))
    source.copy_to("sub/small.log.jsonl", target, "deep/er/small.log.jsonl")
    assert (tmp_path / "target/deep/er/small.log.jsonl").read_text() == '{"a": 1}\n'
    assert source.read_bytes("head.log.jsonl") == (tmp_path / "state/logs/big.log.jsonl").read_bytes()[:1000]


def evil_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]], manifest: bool = True) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        files = []
        for info, data in entries:
            zf.writestr(info, data)
            name = info.filename if isinstance(info, zipfile.ZipInfo) else info
            files.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        if manifest:
            zf.writestr("manifest.json", json.dumps({"name": path.stem, "type": "full", "files": files}))


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("case", ["slip", "absolute", "symlink", "oversized", "bomb", "unlisted", "duplicate",
                                  "no-manifest"])
def test_malicious_zips_are_refused(tmp_path: Path, case: str) -> None:
    out = StoreDir.open(str(tmp_path / "out"))
    path = tmp_path / "out" / "evil.zip"
    max_entry = reader.MAX_ENTRY_BYTES
    if case == "slip":
        evil_zip(path, [("logs/../../etc/passwd", b"x")])
    elif case == "absolute":
        evil_zip(path, [("/etc/passwd", b"x")])
    elif case == "symlink":
        evil_zip(path, [(symlink_info("logs/link"), b"/etc/passwd")])
    elif case == "oversized":
        evil_zip(path, [("logs/a.log.jsonl", b"x" * 5000)])
        max_entry = 4096
    elif case == "bomb":
        evil_zip(path, [("logs/a.log.jsonl", b"\0" * (8 << 20))])
        max_entry = 1 << 40
        reader_ratio = reader.MAX_RATIO
        reader.MAX_RATIO = 100
    elif case == "unlisted":
        evil_zip(path, [("logs/a.log.jsonl", b"{}\n")])
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr("logs/extra.log.jsonl", b"{}\n")
    elif case == "duplicate":
        evil_zip(path, [("logs/a.log.jsonl", b"{}\n")])
        with pytest.warns(UserWarning), zipfile.ZipFile(path, "a") as zf:
            zf.writestr("logs/a.log.jsonl", b"{}\n")
    elif case == "no-manifest":
        evil_zip(path, [("logs/a.log.jsonl", b"{}\n")], manifest=False)
    try:
        with pytest.raises(SnapshotError):
            check_for_restore(open_snapshot(out, "evil"), max_entry)
    finally:
        if case == "bomb":
            reader.MAX_RATIO = reader_ratio


def test_browse_index_hides_unsafe_names(tmp_path: Path) -> None:
    out = StoreDir.open(str(tmp_path / "out"))
    evil_zip(tmp_path / "out" / "evil.zip", [("logs/../../x", b"x"), ("logs/ok.log.jsonl", b"{}\n")])
    snap = open_snapshot(out, "evil")
    assert "logs/ok.log.jsonl" in snap.files
    assert not any(".." in p for p in snap.files)


def test_diff_of_manifests() -> None:
    a = {"files": [{"path": "x", "sha256": "1", "size": 1}, {"path": "y", "sha256": "2", "size": 1}]}
    b = {"files": [{"path": "y", "sha256": "3", "size": 1}, {"path": "z", "sha256": "4", "size": 1}]}
    assert reader.diff(a, b) == {"added": ["z"], "removed": ["x"], "changed": ["y"]}


def test_retention_keeps_last_daily_weekly_and_never_manual() -> None:
    day = 86400.0
    base = 1_796_000_000.0
    snaps = [(f"t{i}", base + i * day / 4, "timer") for i in range(40)]   # 4 a day for 10 days
    snaps.append(("manual-old", base - 100 * day, "manual"))
    snaps.append(("e1", base - 50 * day, "event:code_push"))
    doomed = triggers.to_prune(snaps, keep_last=3, keep_daily=2, keep_weekly=0)
    kept = {s[0] for s in snaps} - set(doomed)
    assert "manual-old" in kept and "e1" not in kept
    assert {"t39", "t38", "t37"} <= kept               # last 3
    assert "t35" in kept                                # newest of the day before
    assert len(kept) == 5
    assert triggers.to_prune(snaps, 0, 0, 0) == [s[0] for s in sorted(
        (s for s in snaps if s[2] != "manual"), key=lambda s: s[1], reverse=True)]


def test_event_matching_and_debounce() -> None:
    names = {"code_push"}
    assert triggers.match_event({"file": "x.log.jsonl", "record": {"event": "code_push"}}, names) == "code_push"
    assert triggers.match_event({"event": "code_push"}, names) == "code_push"
    assert triggers.match_event({"record": {"event": "other"}}, names) is None
    d = triggers.Debouncer(10)
    assert d.seen("code_push", 100) == "code_push"
    assert d.seen("code_push", 101) is None
    assert d.due(105) is None
    assert d.due(111) == "code_push"
    assert d.due(112) is None


def test_memory_window_keeps_the_newest() -> None:
    events = [{"timestamp": f"2026-01-01T00:00:{i:02d}Z", "record": {"i": i}} for i in (5, 1, 9, 3)]
    window = json.loads(memory_window(events, 2))
    assert [e["record"]["i"] for e in window["events"]] == [5, 9]


class FakeLogs(Area):
    """A real Area subclass with snapshot hooks over a real store dir (no FUSE)."""

    name = "logs"

    def __init__(self, bus: Bus, store: StoreDir) -> None:
        super().__init__(bus)
        self.store = store

    async def export_state(self, sink, scope):  # type: ignore[no-untyped-def]
        for rel in self.store.walk_files():
            await trio.to_thread.run_sync(sink.add_store_file, rel, self.store, rel)
        if "memory_events" in scope:
            scope["memory_events"].append({"timestamp": "2026-01-01T00:00:00Z", "record": {"event": "x"}})

    async def restore_state(self, source):  # type: ignore[no-untyped-def]
        names = source.names()
        for name in names:
            await trio.to_thread.run_sync(source.copy_to, name, self.store, name)
        return names


def test_area_triggers_create_restore_without_fuse(tmp_path: Path) -> None:
    bus = Bus()
    logs_dir = StoreDir.open(str(tmp_path / "store/logs"))
    (tmp_path / "store/logs/a.log.jsonl").write_text('{"v": 1}\n')
    config = SnapshotsConfig(on_events=["code_push"], event_debounce=60, keep_last=1, keep_daily=0,
                             keep_weekly=0)
    area = SnapshotsArea(bus, StoreDir.open(str(tmp_path / "store/snapshots")), config, None)
    area.attach_peers({"logs": FakeLogs(bus, logs_dir), "snapshots": area})
    published: list[str] = []
    bus.subscribe(lambda e: published.append(e.topic), ["snapshot_created", "snapshot_restored"])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await area.start(nursery)
            await area.create_snapshot("keep", trigger="manual")
            await area.create_snapshot("conv", type_="conversation")
            with pytest.raises(OSError):
                await area.create_snapshot("keep")
            for _ in range(3):  # one event: one snapshot; the rest fold into one more, 60 s later
                bus.publish("log_line", {"file": "g.log.jsonl", "record": {"event": "code_push"}})
            await trio.sleep(1)
            listing = await area.control("ls", {})
            triggered = [s for s in listing if s["trigger"] == "event:code_push"]
            assert len(triggered) == 1
            (tmp_path / "store/logs/a.log.jsonl").write_text('{"v": 2}\n')
            result = await area.restore("keep")
            assert result["areas"] == ["logs"] and result["safety"].startswith("pre-restore-")
            nursery.cancel_scope.cancel()
        await area.stop()

    trio.run(main)
    assert (tmp_path / "store/logs/a.log.jsonl").read_text() == '{"v": 1}\n'
    assert published.count("snapshot_restored") == 1
    with zipfile.ZipFile(tmp_path / "store/snapshots/conv.zip") as zf:
        assert json.loads(zf.read("memory_window.json"))["count"] == 1
        assert json.loads(zf.read("manifest.json"))["type"] == "conversation"
    assert not (tmp_path / "store/snapshots/.restore-journal.json").exists()


def test_many_files_flush_early_and_stay_whole(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "logs").mkdir(parents=True)
    for i in range(MAX_OPEN_FDS + 40):
        (root / "logs" / f"f{i:04d}.log.jsonl").write_text(f'{{"i": {i}}}\n')
    state = StoreDir.open(str(root))
    out = StoreDir.open(str(tmp_path / "out"))
    fd = out.open_fd(temp_name("many"), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    zw = SnapshotWriter(fd)
    sink = Sink(zw, "logs")
    for rel in state.walk_files("logs"):
        sink.add_store_file(rel[5:], state, rel)
    assert len(zw.written) > 0            # past MAX_OPEN_FDS pending descriptors, written out early
    with pytest.raises(SnapshotError):
        sink.add_bytes("f0000.log.jsonl", b"twice")
    zw.write(lambda w: build_manifest({"name": "many"}, w))
    commit(out, fd, "many")
    snap = open_snapshot(out, "many")
    assert len(snap.files) == MAX_OPEN_FDS + 41 and verify(snap) == []
    assert subprocess.run(["unzip", "-tq", str(tmp_path / "out/many.zip")], capture_output=True).returncode == 0
