"""OS integration: `mount -t fuse.kfs` through mount/mount.kfs, and the default store."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, is_mounted, kfs_cli, lazy_unmount

from kfs.paths import default_store, systemd_escape_path

HELPER = Path("/sbin/mount.fuse.kfs")


@pytest.mark.parametrize("path", ["/data", "/tmp/a b/.x-y", "/", "/srv/kfs/mnt"])
def test_store_names_match_systemd_escape(path: str) -> None:
    if shutil.which("systemd-escape") is None:
        pytest.skip("systemd-escape is not installed")
    expected = subprocess.run(["systemd-escape", "--path", path], capture_output=True, text=True).stdout.strip()
    assert systemd_escape_path(path) == expected


def test_mount_t_fuse_kfs_and_plain_umount(tmp_path: Path) -> None:
    if HELPER.exists() or HELPER.is_symlink():
        pytest.skip(f"{HELPER} already exists; not replacing it")
    mountpoint, store = tmp_path / "mnt", tmp_path / "store"
    mountpoint.mkdir()
    HELPER.symlink_to(REPO / "mount" / "mount.kfs")
    try:
        result = subprocess.run(
            ["mount", "-t", "fuse.kfs", "kfs", str(mountpoint), "-o", f"defaults,store={store}"],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert is_mounted(mountpoint)
        assert "logs" in os.listdir(mountpoint)
        assert (store / "logs").is_dir()
        subprocess.run(["umount", str(mountpoint)], check=True, timeout=60)
        assert not is_mounted(mountpoint)
        bad = subprocess.run(["mount", "-t", "fuse.kfs", "kfs", str(mountpoint), "-o", "colour=blue"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "unknown option 'colour=blue'" in bad.stderr
    finally:
        HELPER.unlink()
        if is_mounted(mountpoint):
            lazy_unmount(mountpoint)


def test_default_store_is_under_var_lib_kfs_for_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("root only")
    mountpoint = tmp_path / "mnt"
    store = Path(default_store(str(mountpoint)))
    assert store.parent == Path("/var/lib/kfs")
    try:
        result = kfs_cli("mount", str(mountpoint))
        assert result.returncode == 0, result.stderr
        assert str(store) in result.stdout
        assert (store / "logs").is_dir()
    finally:
        kfs_cli("umount", str(mountpoint))
        if is_mounted(mountpoint):
            lazy_unmount(mountpoint)
        shutil.rmtree(store, ignore_errors=True)
