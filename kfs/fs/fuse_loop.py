"""pyfuse3's request loop with one trio scheduler pass per request instead of two.

pyfuse3 serves /dev/fuse from a pool of worker tasks.  Each worker takes a
``trio.Lock`` (only one task may wait on a descriptor in trio), waits for
the descriptor to be readable, releases the lock, reads one request and
runs its handler.  ``trio.Lock`` hands itself to the next waiting worker on
release, and an uncontended acquire is a checkpoint, so every request
costs two scheduler passes: the worker that reads it, then the next worker
taking over the wait.  A trio pass is pure Python: a bare checkpoint measured
20–40 µs on this (loaded, 2-core) machine kind, as much as the rest of a
small request.

Almost every kfs handler answers without yielding, and then the worker
that read the request is back at the lock before anything else runs.  So
`ReaderLock` does not hand itself over on release: an uncontended acquire
takes it without a checkpoint (the ``wait_readable`` that follows is the
checkpoint), and `HandOff`, a trio instrument, wakes the next waiting
worker at the end of any task step that left the lock free with workers
waiting: a handler that did yield (a stream read waiting for events, a
key derivation in a thread).  Requests are then still served while it waits,
exactly as before.

The swap goes through ``pyfuse3.trio``, the module pyfuse3 looks trio up in
(pyfuse3.asyncio swaps it the same way); everything but ``Lock`` is trio's.
``KFS_FUSE_LOOP=pyfuse3`` in the daemon's environment runs plain
``pyfuse3.main`` instead (to compare, or should a pyfuse3 upgrade change its loop).
"""

from __future__ import annotations

import os
import types
from typing import Any

import pyfuse3
import trio


class ReaderLock:
    """The lock pyfuse3's workers hold while waiting on /dev/fuse; see the module doc."""

    def __init__(self) -> None:
        self.owner: trio.lowlevel.Task | None = None
        self.waiters = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        if self.owner is None:
            # No checkpoint here: the caller's next step, wait_readable, is one.
            self.owner = trio.lowlevel.current_task()
            return
        # `hand_off` sets owner to us before waking us.
        await self.waiters.park()

    async def __aexit__(self, *exc_info: object) -> None:
        # Not handed over: this worker is normally back for it before the step ends.
        self.owner = None

    def hand_off(self) -> None:
        if self.owner is None and self.waiters:
            (self.owner,) = self.waiters.unpark(count=1)


class HandOff(trio.abc.Instrument):
    """Wakes a waiting worker when a task step ends with a `ReaderLock` free."""

    def __init__(self) -> None:
        self.locks: list[ReaderLock] = []

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        for lock in self.locks:
            if lock.owner is None and lock.waiters:
                lock.hand_off()


class _TrioForPyfuse3(types.ModuleType):
    """trio, except for the one lock pyfuse3 creates."""

    def __init__(self, handoff: HandOff) -> None:
        super().__init__("kfs.fs.fuse_loop.trio")
        # trio's names copied in: pyfuse3 looks up trio.lowlevel & co. per request, and a
        # module __getattr__ would be a Python call each time
        self.__dict__.update({k: v for k, v in vars(trio).items() if not k.startswith("__")})
        self._handoff = handoff
        self.Lock = self._new_lock  # stands in for trio.Lock (pyfuse3 makes exactly one)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)

    def _new_lock(self) -> ReaderLock:
        lock = ReaderLock()
        self._handoff.locks.append(lock)
        return lock


async def serve(min_tasks: int, max_tasks: int) -> None:
    """``pyfuse3.main(min_tasks, max_tasks)`` with the one-pass hand-off (pyfuse3.init first)."""
    if os.environ.get("KFS_FUSE_LOOP") == "pyfuse3":
        await pyfuse3.main(min_tasks=min_tasks, max_tasks=max_tasks)
        return
    handoff = HandOff()
    original = pyfuse3.trio  # type: ignore[attr-defined]
    pyfuse3.trio = _TrioForPyfuse3(handoff)  # type: ignore[attr-defined]
    trio.lowlevel.add_instrument(handoff)
    try:
        await pyfuse3.main(min_tasks=min_tasks, max_tasks=max_tasks)
    finally:
        try:
            trio.lowlevel.remove_instrument(handoff)
        except KeyError:
            pass
        pyfuse3.trio = original  # type: ignore[attr-defined]
