"""Tier 1: the FUSE dispatch layer called directly, without a kernel."""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3
import pytest
import trio

from kfs.bus import Bus, Event
from kfs.fs.area import Area, Attr, EmptyArea, fs_error
from kfs.fs.inodes import ROOT_INODE
from kfs.fs.operations import KfsOperations


class BrokenArea(Area):
    """An area whose getattr has a bug, and whose open fails properly."""

    name = "broken"

    async def getattr(self, path: str) -> Attr:
        if path == "":
            return Attr.directory()
        raise ZeroDivisionError("a bug")

    async def readdir(self, path: str) -> list[tuple[str, Attr]]:
        return [("file", Attr.regular(3))]

    async def open(self, path, flags, ctx):  # type: ignore[no-untyped-def]
        raise fs_error(errno.EACCES)


def make_ops() -> tuple[KfsOperations, list[Event]]:
    bus = Bus()
    events: list[Event] = []
    bus.subscribe(events.append)
    areas: dict[str, Area] = {"broken": BrokenArea(bus), "logs": EmptyArea("logs", bus)}
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    return KfsOperations(areas, bus, fd), events


def test_root_lists_every_area_as_a_directory() -> None:
    ops, _ = make_ops()

    async def run() -> None:
        for name in (b"broken", b"logs"):
            entry = await ops.lookup(ROOT_INODE, name, None)
            assert stat.S_ISDIR(entry.st_mode)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(ROOT_INODE, b"nope", None)
        assert e.value.errno == errno.ENOENT

    trio.run(run)


def test_unexpected_exception_becomes_eio_and_an_event_not_a_crash() -> None:
    ops, events = make_ops()

    async def run() -> None:
        area_root = await ops.lookup(ROOT_INODE, b"broken", None)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(area_root.st_ino, b"file", None)
        assert e.value.errno == errno.EIO
        # and the next request is served as usual
        assert stat.S_ISDIR((await ops.getattr(area_root.st_ino, None)).st_mode)

    trio.run(run)
    assert ops.errors == 1
    assert [ev.topic for ev in events] == ["kfs_error"]


def test_oserror_from_an_area_keeps_its_errno() -> None:
    ops, _ = make_ops()

    async def run() -> None:
        area_root = await ops.lookup(ROOT_INODE, b"broken", None)
        node = ops.inodes.remember("broken", "file")
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.open(node.inode, os.O_RDONLY, None)
        assert e.value.errno == errno.EACCES
        assert area_root.st_ino != node.inode

    trio.run(run)


def test_names_over_name_max_get_enametoolong() -> None:
    ops, _ = make_ops()

    async def run() -> None:
        area_root = await ops.lookup(ROOT_INODE, b"logs", None)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.lookup(area_root.st_ino, b"x" * 256, None)
        assert e.value.errno == errno.ENAMETOOLONG

    trio.run(run)


def test_empty_area_refuses_writes_with_erofs() -> None:
    ops, _ = make_ops()

    async def run() -> None:
        area_root = await ops.lookup(ROOT_INODE, b"logs", None)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.create(area_root.st_ino, b"a.log.jsonl", 0o644, os.O_WRONLY, None)
        assert e.value.errno == errno.EROFS

    trio.run(run)


def test_forgotten_inodes_leave_the_table_but_area_roots_stay() -> None:
    ops, _ = make_ops()
    before = len(ops.inodes)
    node = ops.inodes.remember("logs", "x.log.jsonl")
    assert len(ops.inodes) == before + 1
    ops.inodes.forget(node.inode, 1)
    assert len(ops.inodes) == before
    root = ops.inodes.find("logs", "")
    assert root is not None
    ops.inodes.forget(root.inode, 5)
    assert ops.inodes.find("logs", "") is root


def test_rename_moves_a_subtree_of_inodes() -> None:
    ops, _ = make_ops()
    a = ops.inodes.remember("vault", "dir")
    b = ops.inodes.remember("vault", "dir/file")
    ops.inodes.renamed("vault", "dir", "other")
    assert ops.inodes.find("vault", "other") is a
    assert ops.inodes.find("vault", "other/file") is b
    assert ops.inodes.find("vault", "dir/file") is None


def test_nodes_of_an_area_include_files_unlinked_while_open() -> None:
    from kfs.fs.inodes import InodeTable

    table = InodeTable()
    gone = table.remember("vault", "gone")
    kept = table.remember("vault", "kept")
    table.remember("logs", "a.log.jsonl")
    table.removed("vault", "gone")
    assert gone.unlinked and not kept.unlinked
    assert {node.inode for node in table.nodes_of("vault")} == {gone.inode, kept.inode}


def test_notifier_drain_returns_once_everything_queued_is_sent() -> None:
    ops, _ = make_ops()
    assert ops.notifier.drain(0.1)  # not started (unmounted): nothing to wait for
    ops.notifier.start()
    try:
        assert ops.notifier.drain(5.0)
    finally:
        ops.notifier.stop()
