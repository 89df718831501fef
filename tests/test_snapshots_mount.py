"""snapshots/ through a real mount: mkdir/ls/cat/rmdir, unzip + sha256sum, races, kill -9, restore, triggers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount

# The streams broker's fixed WebSocket port would collide with other mounts running at the same time.
NO_WS = {"streams.yaml": {"websocket": {"enabled": False}}}
PASS = "snapshot test passphrase"


def cfg(**snapshots: object) -> dict[str, dict]:
    return {**NO_WS, "snapshots.yaml": dict(snapshots)}


def append_log(mount: Mount, name: str, records: list[dict]) -> None:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    fd = os.open(mount.path / "logs" / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 256 << 10]):]
    finally:
        os.close(fd)


def snapshot_list(mount: Mount) -> list[dict]:
    return json.loads(mount.cli("snapshot", "ls", str(mount.path), "--json").stdout)


def test_mkdir_ls_cat_rmdir_and_errors(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config=cfg())
    append_log(mount, "app.log.jsonl", [{"level": "info", "message": f"m{i}"} for i in range(100)])
    snaps = mount.path / "snapshots"
    os.mkdir(snaps / "before-refactor")
    assert (mount.store / "snapshots" / "before-refactor.zip").is_file()
    assert "before-refactor" in os.listdir(snaps)
    tree = sorted(os.listdir(snaps / "before-refactor"))
    assert "manifest.json" in tree and "logs" in tree
    manifest = json.loads((snaps / "before-refactor" / "manifest.json").read_text())
    assert manifest["name"] == "before-refactor" and manifest["type"] == "full" and manifest["trigger"] == "manual"
    assert manifest["created"].endswith("Z") and manifest["kfs_version"] and manifest["source_host"]
    browsed = (snaps / "before-refactor" / "logs" / "app.log.jsonl").read_bytes()
    assert browsed == (mount.path / "logs" / "app.log.jsonl").read_bytes()
    # cat via the real tool, and a random-offset read
    out = subprocess.run(["cat", str(snaps / "before-refactor" / "logs" / "app.log.jsonl")], capture_output=True)
    assert out.stdout == browsed
    with open(snaps / "before-refactor" / "logs" / "app.log.jsonl", "rb") as f:
        f.seek(500)
        assert f.read(100) == browsed[500:600]

    def expect(code: int, fn: Callable[[], object]) -> None:
        with pytest.raises(OSError) as info:
            fn()
        assert info.value.errno == code, info.value

    expect(errno.EEXIST, lambda: os.mkdir(snaps / "before-refactor"))
    expect(errno.EINVAL, lambda: os.mkdir(snaps / ".hidden"))
    expect(errno.EINVAL, lambda: os.mkdir(snaps / "a b"))
    expect(errno.EROFS, lambda: open(snaps / "before-refactor" / "new", "w"))
    expect(errno.EROFS, lambda: open(snaps / "before-refactor" / "manifest.json", "a"))
    expect(errno.EROFS, lambda: os.mkdir(snaps / "before-refactor" / "d"))
    expect(errno.EROFS, lambda: os.unlink(snaps / "before-refactor" / "manifest.json"))
    os.mkdir(snaps / "other")
    expect(errno.EPERM, lambda: os.rename(snaps / "other", snaps / "before-refactor" / "other"))
    assert mount.cli("snapshot", "verify", str(mount.path), "before-refactor").returncode == 0
    os.rename(snaps / "other", snaps / "renamed")          # mv renames a snapshot
    assert (mount.store / "snapshots" / "renamed.zip").is_file() and "other" not in os.listdir(snaps)
    os.rmdir(snaps / "before-refactor")
    assert "before-refactor" not in os.listdir(snaps)
    assert not (mount.store / "snapshots" / "before-refactor.zip").exists()
    expect(errno.ENOENT, lambda: os.rmdir(snaps / "before-refactor"))
    # CLI: a timestamp name, one-line errors
    name = mount.cli("snapshot", "create", str(mount.path)).stdout.strip()
    assert len(name) == len("2026-12-01T101500Z") and name.endswith("Z")
    bad = mount.cli("snapshot", "verify", str(mount.path), "nope", check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    bad = mount.cli("snapshot", "create", str(mount.path), "--type", "agent", check=False)
    assert bad.returncode != 0 and "--agent" in bad.stderr
    diff = mount.cli("snapshot", "diff", str(mount.path), "renamed", name).stdout
    assert all(line[:2] in ("+ ", "- ", "M ") for line in diff.splitlines())


def test_manifest_matches_sha256sum_of_unzipped_files(kfs_mount: Callable[..., Mount], tmp_path: Path) -> None:
    mount = kfs_mount(config=cfg())
    append_log(mount, "a.log.jsonl", [{"message": "x" * 200, "i": i} for i in range(20_000)])
    append_log(mount, "b.log.jsonl", [{"event": "hello"}])
    (mount.path / "streams" / "chat").write_text('{"role": "user", "text": "hi"}\n')
    os.mkdir(mount.path / "snapshots" / "s1")
    zip_path = mount.store / "snapshots" / "s1.zip"
    subprocess.run(["unzip", "-q", str(zip_path), "-d", str(tmp_path / "x")], check=True)
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    paths = [item["path"] for item in manifest["files"]]
    assert "logs/a.log.jsonl" in paths
    sums = subprocess.run(["sha256sum", *paths], cwd=tmp_path / "x", capture_output=True, text=True, check=True)
    got = {line.split("  ", 1)[1]: line.split()[0] for line in sums.stdout.splitlines()}
    assert got == {item["path"]: item["sha256"] for item in manifest["files"]}
    assert mount.cli("snapshot", "verify", str(mount.path), "s1").returncode == 0
    # a flipped byte in the store's zip: verify exits non-zero
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo("logs/a.log.jsonl")
    with open(zip_path, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename) + 200)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x55]))
    os.utime(zip_path, ns=(time.time_ns(), time.time_ns() + 1000))
    bad = mount.cli("snapshot", "verify", str(mount.path), "s1", check=False)
    assert bad.returncode != 0 and "logs/a.log.jsonl" in bad.stdout
    offline = mount.cli("snapshot", "verify", "-", "s1", "--store", str(mount.store), check=False)
    assert offline.returncode != 0 and "logs/a.log.jsonl" in offline.stdout


def test_writers_during_snapshots_land_whole(kfs_mount: Callable[..., Mount], tmp_path: Path) -> None:
    mount = kfs_mount(config=cfg())
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        while not stop.is_set():
            append_log(mount, "busy.log.jsonl", [{"n": written[0], "pad": "y" * 300}])
            written[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        for i in range(3):
            os.mkdir(mount.path / "snapshots" / f"race{i}")
    finally:
        stop.set()
        thread.join()
    previous = -1
    for i in range(3):
        with zipfile.ZipFile(mount.store / "snapshots" / f"race{i}.zip") as zf:
            data = zf.read("logs/busy.log.jsonl")
        assert data.endswith(b"\n")
        numbers = [json.loads(line)["n"] for line in data.splitlines()]
        assert numbers == list(range(len(numbers)))           # whole lines, in order, none missing
        assert len(numbers) >= previous
        previous = len(numbers)
        assert mount.cli("snapshot", "verify", str(mount.path), f"race{i}").returncode == 0


@pytest.mark.slow
def test_kill9_during_create_leaves_no_half_snapshot(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config=cfg(compression="deflate"))
    for part in range(8):
        append_log(mount, f"big{part}.log.jsonl", [{"i": i, "blob": os.urandom(300).hex()} for i in range(6000)])
    for attempt, delay in enumerate((0.05, 0.3)):
        name = f"cut{attempt}"
        proc = subprocess.Popen(["mkdir", str(mount.path / "snapshots" / name)], stderr=subprocess.DEVNULL)
        time.sleep(delay)
        mount.kill9()
        proc.wait(timeout=30)
        # Cut mid-way, the daemon leaves only its hidden temp file, never NAME.zip.
        cut = [p.name for p in (mount.store / "snapshots").iterdir() if p.name.startswith(f".{name}.zip")]
        if cut:
            assert not (mount.store / "snapshots" / f"{name}.zip").exists()
        mount.start()
        leftovers = [p.name for p in (mount.store / "snapshots").iterdir() if p.name.startswith(".")]
        assert leftovers == []
        zip_path = mount.store / "snapshots" / f"{name}.zip"
        if zip_path.exists():   # it finished before the kill: then it is whole
            assert subprocess.run(["unzip", "-tq", str(zip_path)], capture_output=True).returncode == 0
            assert name in os.listdir(mount.path / "snapshots")
        else:
            assert name not in os.listdir(mount.path / "snapshots")
    os.mkdir(mount.path / "snapshots" / "after")
    assert mount.cli("snapshot", "verify", str(mount.path), "after").returncode == 0


def test_restore_round_trip_logs_and_streams(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config=cfg())
    append_log(mount, "conv.log.jsonl", [{"agent_id": "a1", "message": f"before {i}"} for i in range(50)])
    (mount.path / "streams" / "chat").write_text('{"text": "one"}\n{"text": "two"}\n')
    os.mkdir(mount.path / "snapshots" / "good")
    log_then = (mount.path / "logs" / "conv.log.jsonl").read_bytes()
    stream_then = json.loads((mount.path / "streams" / "chat.status").read_text()) \
        if (mount.path / "streams" / "chat.status").exists() else None
    append_log(mount, "conv.log.jsonl", [{"message": "after the snapshot"}])
    (mount.path / "streams" / "chat").write_text('{"text": "three"}\n')
    assert (mount.path / "logs" / "conv.log.jsonl").read_bytes() != log_then
    out = mount.cli("snapshot", "restore", str(mount.path), "good").stdout
    assert "logs" in out and "pre-restore-" in out
    # the kernel's caches were invalidated: the old contents show at once
    assert (mount.path / "logs" / "conv.log.jsonl").read_bytes() == log_then
    names = [s["name"] for s in snapshot_list(mount)]
    safety = [n for n in names if n.startswith("pre-restore-")]
    assert len(safety) == 1
    with zipfile.ZipFile(mount.store / "snapshots" / f"{safety[0]}.zip") as zf:
        assert b"after the snapshot" in zf.read("logs/conv.log.jsonl")
    if stream_then is not None:
        status = json.loads((mount.path / "streams" / "chat.status").read_text())
        assert status == stream_then or status.get("last_seq") == stream_then.get("last_seq")
    # the streams area restored its retained history: "three" is gone
    fd = os.open(mount.path / "streams" / "chat", os.O_RDONLY | os.O_NONBLOCK)
    try:
        got = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
    finally:
        os.close(fd)
    assert b'"one"' in got and b'"two"' in got and b'"three"' not in got
    # still browsable and verifiable after the restore; the system stream heard about it
    assert mount.cli("snapshot", "verify", str(mount.path), "good").returncode == 0
    system = b"".join(p.read_bytes() for p in (mount.store / "streams" / "system").glob("*"))
    assert b"snapshot_restored" in system


def test_restore_refuses_malicious_zips_and_changes_nothing(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config=cfg())
    append_log(mount, "keep.log.jsonl", [{"message": "original"}])
    original = (mount.path / "logs" / "keep.log.jsonl").read_bytes()
    snap_dir = mount.store / "snapshots"
    cases = {
        "slip": "logs/../../../tmp/kfs-zip-slip.log.jsonl",
        "absolute": "/tmp/kfs-absolute.log.jsonl",
        "symlink": "logs/keep.log.jsonl",
    }
    for case, entry in cases.items():
        payload = b'{"message": "evil"}\n'
        with zipfile.ZipFile(snap_dir / f"evil-{case}.zip", "w") as zf:
            info = zipfile.ZipInfo(entry)
            if case == "symlink":
                info.create_system = 3
                info.external_attr = (0o120777) << 16
            zf.writestr(info, payload)
            zf.writestr("manifest.json", json.dumps({"name": case, "type": "full", "files": [
                {"path": entry, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}]}))
        result = mount.cli("snapshot", "restore", str(mount.path), f"evil-{case}", check=False)
        assert result.returncode != 0, case
        assert "refused" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (mount.path / "logs" / "keep.log.jsonl").read_bytes() == original
    assert not Path("/tmp/kfs-zip-slip.log.jsonl").exists() and not Path("/tmp/kfs-absolute.log.jsonl").exists()
    assert not any(s["name"].startswith("pre-restore-") for s in snapshot_list(mount))


def test_timer_trigger_with_retention_keeps_manual(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config=cfg(interval="1s", keep_last=2, keep_daily=0, keep_weekly=0))
    os.mkdir(mount.path / "snapshots" / "mine")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = mount.status()["areas"]["snapshots"]["counters"]
        if status.get("pruned", 0) >= 2:
            break
        time.sleep(0.3)
    snaps = snapshot_list(mount)
    timers = [s for s in snaps if s["trigger"] == "timer"]
    assert 1 <= len(timers) <= 3          # keep_last 2 (+ one being pruned right now at most)
    assert any(s["name"] == "mine" for s in snaps)
    assert mount.status()["areas"]["snapshots"]["counters"]["pruned"] >= 2


def test_event_trigger_from_a_log_line_is_debounced(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config=cfg(on_events=["code_push"], event_debounce="1h"))
    append_log(mount, "git.log.jsonl", [{"event": "unrelated"}])
    hook = Path(__file__).resolve().parent.parent / "scripts" / "git-hook-post-receive.example"
    pushes = "".join(f"{i:040x} {i + 1:040x} refs/heads/main\n" for i in range(4))   # four pushes
    subprocess.run(["sh", str(hook)], input=pushes.encode(), env={**os.environ, "KFS_MOUNT": str(mount.path)},
                   cwd=mount.root, check=True)
    assert (mount.path / "logs" / "git.log.jsonl").read_text().count("code_push") == 4
    deadline = time.monotonic() + 30
    events: list[dict] = []
    while time.monotonic() < deadline and not events:
        events = [s for s in snapshot_list(mount) if s["trigger"] == "event:code_push"]
        time.sleep(0.2)
    time.sleep(1)
    events = [s for s in snapshot_list(mount) if s["trigger"] == "event:code_push"]
    assert len(events) == 1      # the other three fold into one more at the end of the hour


def test_event_trigger_from_a_stream_event(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config=cfg(on_events=["patch_merged"], event_debounce="1h"))
    with open(mount.path / "streams" / "ci", "a") as stream:
        stream.write(json.dumps({"event": "build_started"}) + "\n")
        stream.write(json.dumps({"event": "patch_merged", "pr": 42}) + "\n")
    deadline = time.monotonic() + 30
    events: list[dict] = []
    while time.monotonic() < deadline and not events:
        events = [s for s in snapshot_list(mount) if s["trigger"] == "event:patch_merged"]
        time.sleep(0.2)
    assert len(events) == 1


def test_restore_round_trip_vault_and_vectors(kfs_mount: Callable[..., Mount]) -> None:
    config = {**cfg(), "vector_config.yaml": {"sync_interval": "300ms"}}
    mount = kfs_mount(config=config, passphrase=PASS)
    (mount.path / "vault" / "api.json").write_bytes(b'{"key": "sk-version-one"}')
    col = mount.path / "vectors" / "memory"
    col.mkdir()
    axes = [[1.0 if i == j else 0.0 for j in range(4)] for i in range(4)]
    ids = [str(uuid.uuid4()) for _ in range(4)]
    append_vectors = [{"id": ids[i], "embedding": axes[i], "text": f"axis {i}"} for i in range(4)]
    data = "".join(json.dumps(r) + "\n" for r in append_vectors).encode()
    fd = os.open(col / "records.jsonl", os.O_WRONLY | os.O_APPEND)
    os.write(fd, data)
    os.close(fd)
    os.mkdir(mount.path / "snapshots" / "both")
    with zipfile.ZipFile(mount.store / "snapshots" / "both.zip") as zf:
        names = zf.namelist()
        assert "vault/api.json" in names and "vectors/memory/records.jsonl" in names
        assert b"sk-version-one" not in zf.read("vault/api.json")       # ciphertext only
    (mount.path / "vault" / "api.json").write_bytes(b'{"key": "sk-version-two"}')
    os.rmdir(col)   # rmdir drops a collection
    assert not col.exists()
    mount.cli("snapshot", "restore", str(mount.path), "both")
    mount.cli("vault", "unlock", str(mount.path), check=False)   # the restored key file may lock it
    assert (mount.path / "vault" / "api.json").read_bytes() == b'{"key": "sk-version-one"}'
    deadline = time.monotonic() + 60
    while True:
        try:
            out = subprocess.run(["cat", str(col / "search" / "k=1 [0.05, 0.05, 1.0, 0.05]")], capture_output=True,
                                 timeout=60)
            if out.returncode == 0 and out.stdout:
                break
        except subprocess.TimeoutExpired:
            pass
        assert time.monotonic() < deadline, out.stderr
        time.sleep(0.3)
    assert json.loads(out.stdout.splitlines()[0])["id"] == ids[2]


@pytest.mark.slow
def test_kill9_during_restore_then_restore_again_finishes(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config=cfg())
    names = [f"part{n}.log.jsonl" for n in range(6)]
    for name in names:
        append_log(mount, name, [{"i": i, "blob": os.urandom(200).hex()} for i in range(5000)])
    os.mkdir(mount.path / "snapshots" / "base")
    then = {n: (mount.path / "logs" / n).read_bytes() for n in names}
    for name in names:
        append_log(mount, name, [{"after": True}])
    now = {n: (mount.path / "logs" / n).read_bytes() for n in names}
    proc = subprocess.Popen([sys.executable, "-m", "kfs", "snapshot", "restore",
                             str(mount.path), "base"], cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = mount.store / "snapshots" / ".restore-journal.json"
    deadline = time.monotonic() + 20
    while not journal.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)   # kill as soon as the areas start changing
    mount.kill9()
    proc.wait(timeout=30)
    mount.start()
    for name in names:   # each file is wholly old or wholly new
        assert (mount.path / "logs" / name).read_bytes() in (then[name], now[name])
    if journal.exists():
        status = mount.status()["areas"]["snapshots"]
        assert status["state"] == "restore interrupted" and "kfs snapshot restore" in status["message"]
        other = mount.cli("snapshot", "restore", str(mount.path), "nope-other", check=False)
        assert other.returncode != 0
    mount.cli("snapshot", "restore", str(mount.path), "base")
    assert not journal.exists()
    for name in names:
        assert (mount.path / "logs" / name).read_bytes() == then[name]


def test_agent_and_conversation_types(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config=cfg(memory_window=5))
    append_log(mount, "agent-0b7e.log.jsonl", [{"agent_id": "0b7e", "message": "mine"}])
    append_log(mount, "agent-ffff.log.jsonl", [{"agent_id": "ffff", "message": "theirs"}])
    mount.cli("snapshot", "create", str(mount.path), "--type", "agent", "--agent", "0b7e", "--name", "ag")
    with zipfile.ZipFile(mount.store / "snapshots" / "ag.zip") as zf:
        manifest = json.loads(zf.read("manifest.json"))
        names = zf.namelist()
    assert manifest["type"] == "agent" and manifest["scope"]["agent"] == "0b7e"
    assert "logs/agent-0b7e.log.jsonl" in names and "logs/agent-ffff.log.jsonl" not in names
    mount.cli("snapshot", "create", str(mount.path), "--type", "conversation", "--name", "conv")
    window = json.loads((mount.path / "snapshots" / "conv" / "memory_window.json").read_text())
    assert window["size"] == 5 and len(window["events"]) <= 5
    refused = mount.cli("snapshot", "restore", str(mount.path), "ag", check=False)
    assert refused.returncode != 0 and "full" in refused.stderr
