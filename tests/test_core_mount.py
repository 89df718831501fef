"""`kfs mount / status / umount` through the real CLI and a real kernel mount."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

from conftest import Mount, is_mounted, kfs_cli

AREAS = {"logs", "snapshots", "streams", "vault", "vectors"}


def wait_for(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_mount_shows_the_five_areas_and_umount_removes_the_mount(kfs_mount) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = kfs_mount()
    assert is_mounted(mount.path)
    assert AREAS <= set(os.listdir(mount.path))
    for name in AREAS:
        assert stat.S_ISDIR(os.stat(mount.path / name).st_mode)
    mount.stop()
    assert not is_mounted(mount.path)
    assert os.listdir(mount.path) == []


def test_status_reports_store_areas_and_counters(kfs_mount) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = kfs_mount()
    os.listdir(mount.path / "logs")
    status = mount.status()
    assert status["store"] == str(mount.store)
    assert status["mountpoint"] == str(mount.path)
    assert set(status["areas"]) >= AREAS - {"vault"}
    assert status["fuse"]["requests"] > 0
    human = mount.cli("status", str(mount.path)).stdout
    assert "store" in human and str(mount.store) in human


def test_missing_mountpoint_is_created(kfs_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = kfs_mount(start=False)
    assert not mount.path.exists()
    mount.start()
    assert is_mounted(mount.path)


def test_daemon_diagnostics_go_to_the_store_log(kfs_mount) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = kfs_mount()
    mount.stop()
    lines = (mount.store / "logs" / "kfsd.log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any("mounted" in r["message"] for r in records)
    assert all(r["timestamp"].endswith("Z") for r in records)


def test_sigterm_unmounts_cleanly(kfs_mount) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = kfs_mount()
    assert mount.pid is not None
    os.kill(mount.pid, signal.SIGTERM)
    assert wait_for(lambda: not is_mounted(mount.path))
    mount._wait_exit()
    mount.pid = None


def test_remount_after_kill9_cleans_the_dead_mount(kfs_mount) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = kfs_mount()
    assert mount.pid is not None
    os.stat(mount.path)  # the root's attributes now cached: stat keeps answering after the kill
    os.kill(mount.pid, signal.SIGKILL)
    mount._wait_exit()
    mount.pid = None
    # The kernel still has the mount, answering ENOTCONN; kfs mount must recover.
    mount.start()
    assert AREAS <= set(os.listdir(mount.path))


def test_errors_are_one_line_and_change_nothing(kfs_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = kfs_mount()
    cases = []
    # already mounted
    cases.append(kfs_cli("mount", str(mount.path), "--store", str(tmp_path / "other")))
    # not a directory
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases.append(kfs_cli("mount", str(afile), "--store", str(tmp_path / "s2")))
    # store inside the mountpoint, and mountpoint inside the store
    cases.append(kfs_cli("mount", str(tmp_path / "m3"), "--store", str(tmp_path / "m3" / "store")))
    cases.append(kfs_cli("mount", str(tmp_path / "s4" / "mnt"), "--store", str(tmp_path / "s4")))
    # bad config
    bad = tmp_path / "badconf"
    bad.mkdir()
    (bad / "logging.yaml").write_text("rotate_size_mb: huge\n")
    cases.append(kfs_cli("mount", str(tmp_path / "m5"), "--store", str(tmp_path / "s5"), "--config", str(bad)))
    # umount / status of something not mounted
    cases.append(kfs_cli("umount", str(tmp_path / "nothing")))
    cases.append(kfs_cli("status", str(tmp_path / "nothing")))
    expected = ["already mounted", "not a directory", "inside the mountpoint", "inside the store",
                "logging.yaml: rotate_size_mb", "not mounted", "no kfs daemon"]
    for result, text in zip(cases, expected, strict=True):
        assert result.returncode != 0
        assert result.stderr.startswith("kfs: "), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert text in result.stderr, (text, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "s5").exists()
    assert not (tmp_path / "other").exists()


def test_help_lists_each_command(kfs_mount) -> None:  # type: ignore[no-untyped-def]
    out = kfs_cli("--help").stdout
    for command in ("mount", "umount", "status"):
        assert command in out


def test_statfs_reports_the_store_filesystem(kfs_mount) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = kfs_mount()
    on_mount = os.statvfs(mount.path)
    on_store = os.statvfs(mount.store)
    assert on_mount.f_blocks == on_store.f_blocks
    assert on_mount.f_namemax == 255
    df = subprocess.run(["df", str(mount.path)], capture_output=True, text=True, check=True)
    assert "kfs" in df.stdout


def test_sequential_readahead_is_raised_to_one_mebibyte(kfs_mount) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = kfs_mount()
    dev = os.stat(mount.path).st_dev
    window = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert mount.status()["fuse"]["readahead_kb"] == 1024
    assert window.read_text().strip() == "1024"
    # and a log still reads back whole through the larger window
    lines = b"".join(b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * 200) for i in range(20_000))
    with open(mount.path / "logs" / "ra.log.jsonl", "ab") as f:
        f.write(lines)
    stored = (mount.path / "logs" / "ra.log.jsonl").read_bytes()
    assert stored.count(b"\n") == 20_000 and b'"n":19999' in stored
