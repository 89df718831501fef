"""Inode numbers for (area, relative path) pairs, with the kernel's lookup counts.

Inodes are keyed by path: an area reports paths, the kernel wants numbers.
A number lives while the kernel holds a reference to it (lookup count > 0);
``forget`` drops it.  The root and the area roots are never forgotten.

Hard links: a file with several names is one node with several keys.  An area
that supports links reports an ``identity`` in its `Attr` (the vault: the store
file's ``(st_dev, st_ino)`` while it has more than one name); the FUSE layer
gives a name whose identity is already numbered that node (`add_name`), so the
kernel sees one inode: one ``st_ino``, one page cache, one attribute cache.  A
node's ``path`` is the name requests resolve through; ``names`` lists all of
them (None for the usual one-name node, so the common case carries nothing).
Unlinking or renaming one name moves or drops that key only.
"""

from __future__ import annotations

import errno
from collections.abc import Hashable
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
    #: what the area says this file is, whatever its name (see the module doc); None: by path only
    identity: Hashable | None = None
    #: every name of a hard-linked node, ``path`` among them; None while it has one name
    names: list[str] | None = None


class InodeTable:
    def __init__(self) -> None:
        self._by_inode: dict[int, Node] = {}
        self._by_key: dict[tuple[str, str], Node] = {}
        self._by_identity: dict[tuple[str, Hashable], Node] = {}
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

    def find_identity(self, area: str, identity: Hashable) -> Node | None:
        """The live node last seen with this identity (the caller checks it still is that file)."""
        return self._by_identity.get((area, identity))

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

    def set_identity(self, node: Node, identity: Hashable | None) -> None:
        """Record what the area now says ``node`` is (None: a one-name file, known by path only)."""
        old = node.identity
        if identity is old or identity == old:
            return
        if old is not None and self._by_identity.get((node.area, old)) is node:
            del self._by_identity[(node.area, old)]
        node.identity = identity
        if identity is not None:
            self._by_identity[(node.area, identity)] = node

    def add_name(self, node: Node, path: str) -> None:
        """``path`` is one more name of ``node`` (a hard link made, or found by identity)."""
        key = (node.area, path)
        held = self._by_key.get(key)
        if held is node:
            return
        if held is not None:  # an older file of that name, gone from the area meanwhile
            self.removed(node.area, path)
        if node.names is None:
            node.names = [node.path]
        node.names.append(path)
        self._by_key[key] = node

    def forget(self, inode: int, nlookup: int) -> None:
        node = self._by_inode.get(inode)
        if node is None:
            return
        node.lookups -= nlookup
        if node.lookups <= 0 and not node.pinned:
            del self._by_inode[inode]
            for path in node.names or (node.path,):
                if self._by_key.get((node.area, path)) is node:
                    del self._by_key[(node.area, path)]
            if node.identity is not None and self._by_identity.get((node.area, node.identity)) is node:
                del self._by_identity[(node.area, node.identity)]

    def removed(self, area: str, path: str, last_attr: Attr | None = None) -> None:
        """A path was unlinked/rmdir'ed: its number stays valid until forgotten, but unnamed.

        A node with other names keeps them (and stays valid): only this key goes.
        """
        node = self._by_key.pop((area, path), None)
        if node is None:
            return
        names = node.names
        if names is not None and path in names and len(names) > 1:
            names.remove(path)
            if node.path == path:
                node.path = names[0]
            if len(names) == 1:
                node.names = None
            return
        node.names = None
        self.set_identity(node, None)
        node.path = f"\0deleted\0{node.inode}"
        node.unlinked = True
        if last_attr is not None:
            last_attr.nlink = 0
            node.unlinked_attr = last_attr

    def renamed(self, area: str, old: str, new: str) -> None:
        """Move ``old`` and everything below it to ``new``."""
        if old == new:
            return
        moving = self._by_key.get((area, old))
        if moving is not None and moving is self._by_key.get((area, new)):
            return  # two names of one file: rename(2) leaves both in place
        self.removed(area, new)
        prefix = old + "/"
        for (a, path), node in list(self._by_key.items()):
            if a != area or not (path == old or path.startswith(prefix)):
                continue
            del self._by_key[(a, path)]
            moved = new + path[len(old):]
            if node.names is not None:
                node.names[node.names.index(path)] = moved
            if node.path == path:
                node.path = moved
            self._by_key[(a, moved)] = node
