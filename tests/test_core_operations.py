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


class LinkArea(Area):
    """Files in memory, with hard links: a name maps to a file object; identity while linked."""

    name = "links"

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus)
        self.files: dict[str, dict[str, object]] = {}

    def _attr(self, file: dict[str, object]) -> Attr:
        attr = Attr.regular(len(file["data"]))  # type: ignore[arg-type]
        attr.nlink = sum(1 for f in self.files.values() if f is file)
        attr.identity = file["id"] if attr.nlink > 1 else None
        return attr

    async def getattr(self, path: str) -> Attr:
        if path == "":
            return Attr.directory()
        if path not in self.files:
            raise fs_error(errno.ENOENT)
        return self._attr(self.files[path])

    async def readdir(self, path: str) -> list[tuple[str, Attr]]:
        return [(name, self._attr(f)) for name, f in sorted(self.files.items())]

    async def unlink(self, path: str) -> None:
        del self.files[path]

    async def rename(self, old: str, new: str, flags: int) -> None:
        if self.files.get(new) is not self.files[old]:
            self.files[new] = self.files.pop(old)

    async def link(self, old: str, new: str) -> Attr:
        if new in self.files:
            raise fs_error(errno.EEXIST)
        self.files[new] = self.files[old]
        return self._attr(self.files[new])


def link_ops() -> tuple[KfsOperations, LinkArea, int]:
    bus = Bus()
    area = LinkArea(bus)
    areas: dict[str, Area] = {"links": area, "logs": EmptyArea("logs", bus)}
    ops = KfsOperations(areas, bus, os.open("/", os.O_RDONLY | os.O_DIRECTORY))
    root = ops.inodes.find("links", "")
    assert root is not None
    return ops, area, root.inode


def test_hard_links_are_one_inode_under_every_name() -> None:
    ops, area, root = link_ops()

    async def run() -> None:
        area.files["a"] = {"id": 1, "data": b"abc"}
        a = await ops.lookup(root, b"a", None)
        b = await ops.link(a.st_ino, root, b"b", None)
        assert b.st_ino == a.st_ino and b.st_nlink == 2
        assert (await ops.lookup(root, b"b", None)).st_ino == a.st_ino
        node = ops.inodes.get(a.st_ino)
        assert node.lookups == 3 and sorted(node.names or []) == ["a", "b"]
        # unlink of the name requests resolve through: the node lives on under the other
        await ops.unlink(root, b"a", None)
        assert not node.unlinked and node.path == "b" and node.names is None
        assert (await ops.getattr(a.st_ino, None)).st_size == 3
        # rename moves the one key; a link into the renamed name is the same inode again
        await ops.rename(root, b"b", root, b"c", 0, None)
        assert ops.inodes.find("links", "c") is node and ops.inodes.find("links", "b") is None
        d = await ops.link(a.st_ino, root, b"d", None)
        assert d.st_ino == a.st_ino
        # rename between two names of one file changes nothing
        await ops.rename(root, b"c", root, b"d", 0, None)
        assert ops.inodes.find("links", "c") is node and ops.inodes.find("links", "d") is node
        # the kernel forgets it: every key and the identity go with the node
        ops.inodes.forget(a.st_ino, node.lookups)
        assert ops.inodes.find("links", "c") is None and ops.inodes.find("links", "d") is None
        assert ops.inodes.find_identity("links", 1) is None
        # names met fresh (after a remount, say) are found to be one inode by their identity
        c = await ops.lookup(root, b"c", None)
        assert (await ops.lookup(root, b"d", None)).st_ino == c.st_ino
        # and readdir numbers them alike
        fh = await ops.opendir(root, None)
        assert {inode for name, _, inode in ops._dirs[fh] if name in ("c", "d")} == {c.st_ino}

    trio.run(run)


def test_a_reused_identity_is_not_taken_for_the_old_file() -> None:
    """Store inode numbers are reused: a stale identity must not merge two different files."""
    ops, area, root = link_ops()

    async def run() -> None:
        first = {"id": 7, "data": b"first"}
        area.files.update(a=first, b=first)
        a = await ops.lookup(root, b"a", None)
        assert ops.inodes.find_identity("links", 7) is ops.inodes.get(a.st_ino)
        # behind the table's back (a commit by rename gives the file a new inode): a is alone now
        del area.files["b"]
        area.files["a"] = {"id": 8, "data": b"first"}
        second = {"id": 7, "data": b"another file, its old number"}
        area.files.update(x=second, y=second)
        x = await ops.lookup(root, b"x", None)
        y = await ops.lookup(root, b"y", None)
        assert x.st_ino == y.st_ino != a.st_ino

    trio.run(run)


def test_link_across_areas_is_exdev_and_areas_without_links_refuse() -> None:
    ops, area, root = link_ops()

    async def run() -> None:
        area.files["a"] = {"id": 1, "data": b""}
        a = await ops.lookup(root, b"a", None)
        logs = await ops.lookup(ROOT_INODE, b"logs", None)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.link(a.st_ino, logs.st_ino, b"x", None)
        assert e.value.errno == errno.EXDEV
        with pytest.raises(pyfuse3.FUSEError) as e:  # the area root is a directory
            await ops.link(root, ROOT_INODE, b"x", None)
        assert e.value.errno == errno.EPERM
        node = ops.inodes.remember("logs", "x.log.jsonl")
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.link(node.inode, logs.st_ino, b"y.log.jsonl", None)
        assert e.value.errno == errno.EPERM

    trio.run(run)


def test_a_name_replaced_behind_a_link_gets_its_own_inode() -> None:
    """A snapshot restore swaps files in by rename: names that were one file are two now."""
    ops, area, root = link_ops()

    async def run() -> None:
        shared = {"id": 3, "data": b"shared"}
        area.files.update(a=shared)
        a = await ops.lookup(root, b"a", None)
        await ops.link(a.st_ino, root, b"b", None)
        area.files["a"] = {"id": 4, "data": b"restored a"}
        area.files["b"] = {"id": 5, "data": b"restored b!"}
        again_a = await ops.lookup(root, b"a", None)
        b = await ops.lookup(root, b"b", None)
        assert b.st_ino != again_a.st_ino and b.st_size == 11
        assert (await ops.getattr(again_a.st_ino, None)).st_size == 10

    trio.run(run)
