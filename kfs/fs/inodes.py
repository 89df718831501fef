"""Inode numbers for (area, relative path) pairs, with the kernel's lookup counts.

Inodes are keyed by path: an area reports paths, the kernel wants numbers.
A number lives while the kernel holds a reference to it (lookup count > 0);
``forget`` drops it.  The root and the area roots are never forgotten.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import pyfuse3

from kfs.fs.area import Attr, fs_error

ROOT_INODE: int = pyfuse3.ROOT_INODE


@dataclass(slots=True)
class Node:
    inode: int
    area: str  # "" for the mount's root
    path: str
    lookups: int = 0
    pinned: bool = False
    #: the path was unlinked/rmdir'ed (a plain field: read on every request)
    unlinked: bool = False
    #: for an unlinked path still open somewhere: its last attributes (fstat keeps working)
    unlinked_attr: Attr | None = None


class InodeTable:
    def __init__(self) -> None:
        self._by_inode: dict[int, Node] = {}
        self._by_key: dict[tuple[str, str], Node] = {}
        self._next = ROOT_INODE + 1
        self._add(ROOT_INODE, "", "", pinned=True)

    def _add(self, inode: int, area: str, path: str, pinned: bool = False) -> Node:
        node = Node(inode, area, path, pinned=pinned)
        self._by_inode[inode] = node
        self._by_key[(area, path)] = node
        return node

    def __len__(self) -> int:
        return len(self._by_inode)

    def get(self, inode: int) -> Node:
        try:
            return self._by_inode[inode]
        except KeyError:
            raise fs_error(errno.ESTALE, f"unknown inode {inode}") from None

    def find(self, area: str, path: str) -> Node | None:
        return self._by_key.get((area, path))

    def nodes_of(self, area: str) -> list[Node]:
        """Every numbered node of ``area``, unlinked-but-open ones included."""
        return [node for node in self._by_inode.values() if node.area == area]

    def pin_area(self, area: str) -> Node:
        node = self.ensure(area, "")
        node.pinned = True
        return node

    def ensure(self, area: str, path: str) -> Node:
        """The node for this path, numbering it if new (no lookup counted)."""
        node = self._by_key.get((area, path))
        if node is None:
            node = self._add(self._next, area, path)
            self._next += 1
        return node

    def remember(self, area: str, path: str) -> Node:
        """The kernel learnt this entry (lookup/create/mkdir reply): count it."""
        node = self.ensure(area, path)
        node.lookups += 1
        return node

    def forget(self, inode: int, nlookup: int) -> None:
        node = self._by_inode.get(inode)
        if node is None:
            return
        node.lookups -= nlookup
        if node.lookups <= 0 and not node.pinned:
            del self._by_inode[inode]
            if self._by_key.get((node.area, node.path)) is node:
                del self._by_key[(node.area, node.path)]

    def removed(self, area: str, path: str, last_attr: Attr | None = None) -> None:
        """A path was unlinked/rmdir'ed: its number stays valid until forgotten, but unnamed."""
        node = self._by_key.pop((area, path), None)
        if node is not None:
            node.path = f"\0deleted\0{node.inode}"
            node.unlinked = True
            if last_attr is not None:
                last_attr.nlink = 0
                node.unlinked_attr = last_attr

    def renamed(self, area: str, old: str, new: str) -> None:
        """Move ``old`` and everything below it to ``new``."""
        self.removed(area, new)
        prefix = old + "/"
        for (a, path), node in list(self._by_key.items()):
            if a != area or not (path == old or path.startswith(prefix)):
                continue
            del self._by_key[(a, path)]
            node.path = new + path[len(old):]
            self._by_key[(a, node.path)] = node
