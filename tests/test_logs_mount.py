"""logs/ through a real mount: the issue's example, bad input, append-only, tail, level, rotation, retention."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount

RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
QUIET = {"streams.yaml": {"websocket": {"enabled": False}}}

EXAMPLE = '{"agent":"kAI.dev.assistant","event":"plan_generated","summary":"Plan created"}'


def sh(command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, **kwargs)  # type: ignore[call-overload]


def store_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its sha256 (the daemon's own log excluded: it may grow)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "kfsd.log.jsonl":
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def logs(kfs_mount: Callable[..., Mount]) -> Mount:
    return kfs_mount(config=QUIET)


def test_issue_example_echo_tail_python(logs: Mount) -> None:
    kai = logs.path / "logs" / "kai.log.jsonl"
    assert kai.exists() and kai.stat().st_size == 0  # logging.yaml's output exists from the mount on
    assert sh(f"echo '{EXAMPLE}' >> {kai}").returncode == 0
    last = sh(f"tail -n 1 {kai}").stdout
    record = json.loads(last)
    assert record["agent"] == "kAI.dev.assistant" and record["summary"] == "Plan created"
    assert RFC3339_Z.match(record["timestamp"])

    before = (logs.store / "logs" / "kai.log.jsonl").read_bytes()
    bad = sh(f"echo 'not json' >> {kai}")
    assert bad.returncode != 0 and "Invalid argument" in bad.stderr
    assert (logs.store / "logs" / "kai.log.jsonl").read_bytes() == before

    with open(kai, "a") as f:
        f.write('{"agent":"py","n":1}\n')
        f.write('{"agent":"py","n":2,"timestamp":"2020-01-01T00:00:00Z"}\n')
    lines = kai.read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[1])["n"] == 1 and RFC3339_Z.match(json.loads(lines[1])["timestamp"])
    assert json.loads(lines[2])["timestamp"] == "2020-01-01T00:00:00Z"
    assert kai.stat().st_size == len(kai.read_bytes())  # the size the kernel reports is the stored one
    assert (logs.store / "logs" / "kai.log.jsonl").read_text() == kai.read_text()
    counters = logs.status()["areas"]["logs"]["counters"]
    assert counters["lines"] == 3 and counters["rejected_writes"] == 1


def test_bad_input_changes_nothing(logs: Mount) -> None:
    d = logs.path / "logs"
    good = d / "good.log.jsonl"
    good.write_text('{"a":1}\n')
    before = store_digest(logs.store / "logs")

    def errno_of(action: Callable[[], object]) -> int | None:
        try:
            action()
        except OSError as e:
            return e.errno
        return None

    def append_raw(data: bytes) -> None:
        fd = os.open(good, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def overwrite_at_zero() -> None:
        with open(good, "r+b", buffering=0) as f:
            f.write(b'{"b":2}\n')

    assert errno_of(lambda: append_raw(b"not json\n")) == errno.EINVAL
    assert errno_of(lambda: append_raw(b'{"bad json":\n')) == errno.EINVAL
    assert errno_of(lambda: append_raw(b'[1,2,3]\n')) == errno.EINVAL
    assert errno_of(lambda: append_raw(b'{"ok":1}\n{"broken"\n')) == errno.EINVAL  # refused as a whole
    assert errno_of(lambda: append_raw(b"\xff\xfe\n")) == errno.EINVAL
    assert errno_of(lambda: os.truncate(good, 0)) == errno.EPERM
    assert errno_of(lambda: os.truncate(good, 3)) == errno.EPERM
    assert errno_of(lambda: open(good, "w").close()) == errno.EPERM  # O_TRUNC
    assert errno_of(overwrite_at_zero) == errno.EPERM
    assert errno_of(lambda: (d / "notes.txt").write_text("{}\n")) == errno.EINVAL
    assert errno_of(lambda: (d / "x.20260101T000000Z.log.jsonl").touch()) == errno.EPERM
    assert errno_of(lambda: os.rename(good, d / "other.log.jsonl")) == errno.EPERM
    assert sh(f": > {good}").returncode != 0
    assert sh(f"echo '{{}}' > {d / 'bad name.json'}").returncode != 0
    assert store_digest(logs.store / "logs") == before
    assert sorted(p.name for p in d.iterdir()) == ["good.log.jsonl", "kai.log.jsonl", "kfsd.log.jsonl"]


def test_touch_mkdir_tail_fsync_and_partial_lines(logs: Mount) -> None:
    d = logs.path / "logs"
    assert sh(f"touch {d / 'new.log.jsonl'}").returncode == 0
    assert (d / "new.log.jsonl").stat().st_size == 0
    assert sh(f"touch {d / 'new.log.jsonl'}").returncode == 0  # existing file: times only
    (d / "agents").mkdir()
    nested = d / "agents" / "a1.log.jsonl"
    tail = subprocess.Popen(["tail", "-f", "-s", "0.1", str(d / "new.log.jsonl")], stdout=subprocess.PIPE, text=True)
    try:
        with open(d / "new.log.jsonl", "a") as f:
            for i in range(5):
                f.write(json.dumps({"i": i}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        got = [json.loads(tail.stdout.readline())["i"] for _ in range(5)]
        assert got == list(range(5))
        assert logs.status()["areas"]["logs"]["counters"]["fsyncs"] == 5
    finally:
        tail.kill()
        tail.wait()
    # A line split over many write() calls, and one without its newline at close.
    fd = os.open(nested, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for piece in (b'{"split":', b'"a', b'cross"', b', "n": 1', b"}\n", b'{"no_newline": true}'):
        assert os.write(fd, piece) == len(piece)
    os.close(fd)
    records = [json.loads(x) for x in nested.read_text().splitlines()]
    assert records[0]["split"] == "across" and records[1]["no_newline"] is True
    # An unfinished line that is not an object is dropped at close and counted.
    fd = os.open(nested, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b'{"never": ')
    os.close(fd)
    deadline = time.monotonic() + 5
    while logs.status()["areas"]["logs"]["counters"]["partial_lines_dropped"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(nested.read_text().splitlines()) == 2
    assert (logs.store / "logs" / "agents" / "a1.log.jsonl").exists()
    # The daemon logged that drop into kfsd.log.jsonl behind the kernel's back: the mount shows it.
    daemon_log = d / "kfsd.log.jsonl"
    deadline = time.monotonic() + 5
    while daemon_log.read_bytes() != (logs.store / "logs" / "kfsd.log.jsonl").read_bytes():
        assert time.monotonic() < deadline, "kfsd.log.jsonl as seen in the mount is stale"
        time.sleep(0.1)
    assert "unfinished line" in daemon_log.read_text()


def test_level_filtering(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config={**QUIET, "logging.yaml": {"level": "warning"}})
    f = mount.path / "logs" / "lvl.log.jsonl"
    with open(f, "a") as out:
        for level in ("debug", "info", "warning", "ERROR", "critical"):
            out.write(json.dumps({"level": level, "msg": level}) + "\n")
        out.write('{"msg":"no level"}\n')
    kept = [json.loads(x)["msg"] for x in f.read_text().splitlines()]
    assert kept == ["warning", "ERROR", "critical", "no level"]
    assert mount.status()["areas"]["logs"]["counters"]["filtered_lines"] == 2


def test_rotation_and_retention(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config={**QUIET, "logging.yaml": {
        "rotate_size_mb": 0.01, "max_days": 2, "retention_check_interval": "0.2s"}})
    d = mount.path / "logs"
    with open(d / "rot.log.jsonl", "a") as f:
        for i in range(300):
            f.write(json.dumps({"i": i, "pad": "x" * 100}) + "\n")
            f.flush()
    rotated = sorted(p for p in d.iterdir() if re.match(r"^rot\.\d{8}T\d{6}Z(-\d+)?\.log\.jsonl$", p.name))
    assert len(rotated) >= 3
    seen = []
    for p in [*rotated, d / "rot.log.jsonl"]:
        assert p.stat().st_size <= 0.01 * (1 << 20) + 200
        seen += [json.loads(x)["i"] for x in p.read_text().splitlines()]
    assert sorted(seen) == list(range(300))
    oldest = rotated[0]
    assert oldest.stat().st_mode & 0o777 == 0o444
    with pytest.raises(OSError) as e:
        open(oldest, "a").close()
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.chmod(oldest, 0o644)
    assert e.value.errno == errno.EPERM
    # Age one rotated file past max_days in the store: the periodic check deletes it, only it.
    old = time.time() - 3 * 86400
    os.utime(mount.store / "logs" / oldest.name, (old, old))
    deadline = time.monotonic() + 10
    while (mount.store / "logs" / oldest.name).exists():
        assert time.monotonic() < deadline, "retention did not delete the expired file"
        time.sleep(0.1)
    assert not oldest.exists()
    assert all(p.exists() for p in rotated[1:])
    assert mount.status()["areas"]["logs"]["counters"]["retention_deleted"] == 1
