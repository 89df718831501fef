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

A trio pass is still paid for every wait on /dev/fuse: ``wait_readable``
parks the worker, and the scheduler re-arms the descriptor in its epoll set,
polls, and resumes the worker — about 20 µs of Python per request.
`DirectWait` takes that wait off trio while FUSE is the only thing with work
to do: with no task in trio's run queue and none left in the scheduler batch
the worker belongs to, it sleeps in one ``epoll_wait`` of its own on /dev/fuse
*and* trio's epoll descriptor (readable whenever one of trio's own waits has an
event: sockets, threads' ``run_sync_soon``, signals), and returns straight to
pyfuse3 when only /dev/fuse is ready.  A task that a request woke (the streams'
pump after a log write) gets one scheduler pass (a checkpoint) before the next
wait; an event for trio, or no request within `DIRECT_BUDGET` of the last trio
pass, sends the wait through trio's ``wait_readable`` as before.  So a timer or a
cancellation is late by at most the budget (2 ms; the streams' bounded waits are
250 ms), and nothing spins: every wait sleeps in the kernel.  Measured: a request
that libfuse answers itself (the IOCTL from ``isatty``) went from ~30 to ~12 µs
of daemon CPU, a FLUSH from ~22–28 to ~11–15 µs.

A FUSE request is a synchronous round trip: the caller sleeps until the reply,
the daemon sleeps until the next request.  When the two run on different CPUs,
every sleep ends with a cross-CPU wake-up, and on this machine kind (a VM whose
idle vCPUs halt: ``haltpoll.guest_halt_poll_ns=0``) that costs tens of µs on
both sides.  Measured with one process doing open-append-close on logs/: 9.1k
cycles/s with daemon and caller pinned to one CPU, 2.6k/s on two.  The kernel's
scheduler keeps them apart (the caller's previous CPU is idle, so it wakes
there), so `AdaptiveSpin` takes the daemon's half of the cost away instead: after
a request, the direct wait first polls /dev/fuse without sleeping for a short
window (yielding the CPU between polls, so a caller on the same CPU runs).  A
caller's next request usually comes within tens of µs and is then read without
any wake-up (2.6k -> 4.6k cycles/s).  The window adapts as KVM's halt-polling does:
it grows while waits end shortly after it, and shrinks to nothing when they are
long, so an idle or slow-paced mount does not spin at all.
``KFS_FUSE_SPIN_US=0`` turns it off; ``kfs status`` shows the window and its hits.

The swap goes through ``pyfuse3.trio``, the module pyfuse3 looks trio up in
(pyfuse3.asyncio swaps it the same way); everything but ``Lock`` and
``lowlevel.wait_readable`` is trio's.  ``KFS_FUSE_LOOP=pyfuse3`` in the daemon's
environment runs plain ``pyfuse3.main`` instead (to compare, or should a pyfuse3
upgrade change its loop); ``KFS_FUSE_WAIT=trio`` keeps the hand-off but waits
through trio on every request.
"""

from __future__ import annotations

import logging
import os
import select
import time
import types
from typing import Any

import pyfuse3
import trio

log = logging.getLogger("kfs.fs")

#: how long after the last trio pass requests may be waited for directly (seconds)
DIRECT_BUDGET = 0.002
#: the longest a wait polls before it sleeps (seconds); see `AdaptiveSpin`
SPIN_MAX = 0.0002
#: where a growing window starts
SPIN_START = 0.00001


class AdaptiveSpin:
    """How long a wait for the next request polls before sleeping (the module doc says why).

    KVM's halt-polling rule: a wait that had to sleep, but whose request came within
    ``max_window`` of its start, would have been caught by a longer window, so the window
    doubles (from ``SPIN_START``); a wait that slept longer than that means the caller is
    not in a tight loop of requests, so the window halves, to zero below the start.
    """

    __slots__ = ("hits", "max_window", "misses", "window")

    def __init__(self, max_window: float = SPIN_MAX) -> None:
        self.max_window = max_window
        self.window = 0.0
        #: waits whose request came while polling, and polls that ended in a sleep
        self.hits = 0
        self.misses = 0

    def poll(self, poller: select.epoll, limit: float) -> list[tuple[int, int]]:
        """Poll ``poller`` for up to the window (never past ``limit`` seconds); [] if nothing came."""
        window = min(self.window, limit)
        if window <= 0:
            return []
        deadline = time.monotonic() + window
        while True:
            os.sched_yield()
            ready = poller.poll(0)
            if ready:
                self.hits += 1
                return ready
            if time.monotonic() >= deadline:
                self.misses += 1
                return []

    def slept(self, seconds: float) -> None:
        """A wait slept ``seconds`` (from its start) before its request or event came: adapt."""
        if seconds <= self.max_window:
            self.window = min(self.max_window, max(SPIN_START, self.window * 2))
        elif self.window:
            self.window = self.window / 2 if self.window / 2 >= SPIN_START else 0.0

    def state(self) -> dict[str, float | int]:
        return {"spin_window_us": round(self.window * 1e6, 1), "spin_hits": self.hits, "spin_misses": self.misses}


def spin_from_environment() -> AdaptiveSpin | None:
    """`AdaptiveSpin` with the window cap from ``KFS_FUSE_SPIN_US`` (µs; 0 turns polling off)."""
    text = os.environ.get("KFS_FUSE_SPIN_US", "")
    try:
        max_us = float(text) if text else SPIN_MAX * 1e6
    except ValueError:
        log.warning("KFS_FUSE_SPIN_US=%r is not a number of microseconds: using %d", text, SPIN_MAX * 1e6)
        max_us = SPIN_MAX * 1e6
    return AdaptiveSpin(max_us / 1e6) if max_us > 0 else None


class _Done:
    """An awaitable that is already done (``await`` returns None at once): no coroutine to build."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())


DONE = _Done()


class ReaderLock:
    """The lock pyfuse3's workers hold while waiting on /dev/fuse; see the module doc.

    ``async with`` on it builds no coroutine when it is free (the per-request case):
    ``__aenter__`` and ``__aexit__`` return `DONE`.
    """

    def __init__(self) -> None:
        self.owner: trio.lowlevel.Task | None = None
        self.waiters = trio.lowlevel.ParkingLot()

    def __aenter__(self) -> Any:
        if self.owner is None:
            # No checkpoint here: the caller's next step, wait_readable, is one (or a direct wait).
            self.owner = trio.lowlevel.current_task()
            return DONE
        # `hand_off` sets owner to us before waking us.
        return self.waiters.park()

    def __aexit__(self, *exc_info: object) -> Any:
        # Not handed over: this worker is normally back for it before the step ends.
        self.owner = None
        return DONE

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


class DirectWait(HandOff):
    """`HandOff`, plus ``wait_readable`` for /dev/fuse without a trio pass while nothing else has work.

    See the module doc.  "Nothing else" means: no task in trio's run queue, none left
    to run in the scheduler batch the worker itself is part of (counted with the
    instrument hooks), no event pending in trio's epoll.  Reaches into two trio
    internals, read once: the run queue (``runner.runq``) and the epoll object of
    trio's I/O manager; without them (another trio version, another I/O manager)
    every wait goes through trio.
    """

    def __init__(self, budget: float = DIRECT_BUDGET, spin: AdaptiveSpin | None = None) -> None:
        super().__init__()
        self.budget = budget
        self.spin = spin
        #: waits answered without a trio pass, and those that went through trio
        self.direct = 0
        self.via_trio = 0
        #: scheduler passes taken (a checkpoint) to let tasks a request woke run first
        self.yields = 0
        self._until = 0.0
        self._fuse_fd = -1
        self._runq: Any = None
        self._poller: select.epoll | None = None
        self._enabled = True
        #: tasks in the scheduler batch being run, and how many of them have had their step
        self._batch = 0
        self._stepped = 0

    def after_io_wait(self, timeout: float) -> None:
        # The batch about to run is the run queue now (plus timers expiring this pass).
        self._batch = len(self._runq) if self._runq is not None else 0
        self._stepped = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self._stepped += 1
        for lock in self.locks:
            if lock.owner is None and lock.waiters:
                lock.hand_off()

    def _bind(self, fd: int) -> bool:
        """Set up on the first wait (inside the run): our epoll holds /dev/fuse and trio's epoll."""
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT

            runner = GLOBAL_RUN_CONTEXT.runner
            runq = runner.runq
            trio_fd = runner.io_manager._epoll.fileno()
            len(runq)
        except (ImportError, AttributeError, TypeError, RuntimeError):
            log.info("FUSE requests wait through trio (its internals are not the expected ones)")
            self._enabled = False
            return False
        poller = select.epoll(2)
        poller.register(fd, select.EPOLLIN)
        poller.register(trio_fd, select.EPOLLIN)
        self._poller, self._fuse_fd, self._runq = poller, fd, runq
        return True

    def wait_readable(self, fd: Any) -> Any:
        """What pyfuse3 awaits before reading a request: `DONE` (direct) or a coroutine."""
        if fd == self._fuse_fd or (self._enabled and self._poller is None and isinstance(fd, int) and self._bind(fd)):
            if not self._quiet():
                # Others have work (a task the handler woke, say): let them run first, then wait.
                return self._after_others(fd)
            if self._direct_wait():
                return DONE
        return self._wait_via_trio(fd)

    def _quiet(self) -> bool:
        # our own step is not counted yet: anyone else in the batch still has to run
        return not self._runq and self._stepped + 1 >= self._batch

    def _direct_wait(self) -> bool:
        """Wait for /dev/fuse in our own epoll, up to the budget; True when only /dev/fuse is ready."""
        start = time.monotonic()
        remaining = self._until - start
        if remaining > 0:
            poller = self._poller
            assert poller is not None
            ready = poller.poll(0)
            if not ready and self.spin is not None:
                ready = self.spin.poll(poller, remaining)
                if not ready:
                    # never below 0: epoll takes a negative timeout (-1 s) as "forever", past trio's timers
                    ready = poller.poll(max(0.0, self._until - time.monotonic()))
                    self.spin.slept(time.monotonic() - start)
            elif not ready:
                ready = poller.poll(remaining)
            if len(ready) == 1 and ready[0][0] == self._fuse_fd:
                self.direct += 1
                return True
        return False

    async def _after_others(self, fd: Any) -> None:
        # One scheduler pass without registering /dev/fuse with trio (a checkpoint: runs the
        # woken tasks, polls trio's I/O, fires due timers, delivers cancellation), then a direct
        # wait if everyone else is done; else trio's wait as usual.
        await trio.lowlevel.checkpoint()
        self.yields += 1
        self._until = time.monotonic() + self.budget
        if self._quiet() and self._direct_wait():
            return
        await self._wait_via_trio(fd)

    async def _wait_via_trio(self, fd: Any) -> None:
        await trio.lowlevel.wait_readable(fd)
        self.via_trio += 1
        self._until = time.monotonic() + self.budget

    def close(self) -> None:
        if self._poller is not None:
            self._poller.close()
            self._poller = None
            self._fuse_fd = -1


class _TrioForPyfuse3(types.ModuleType):
    """trio, except for the one lock pyfuse3 creates (and, with `DirectWait`, its wait on /dev/fuse)."""

    def __init__(self, handoff: HandOff, direct: DirectWait | None = None) -> None:
        super().__init__("kfs.fs.fuse_loop.trio")
        # trio's names copied in: pyfuse3 looks up trio.lowlevel & co. per request, and a
        # module __getattr__ would be a Python call each time
        self.__dict__.update({k: v for k, v in vars(trio).items() if not k.startswith("__")})
        self._handoff = handoff
        self.Lock = self._new_lock  # stands in for trio.Lock (pyfuse3 makes exactly one)
        if direct is not None:
            lowlevel = types.ModuleType("kfs.fs.fuse_loop.trio.lowlevel")
            lowlevel.__dict__.update({k: v for k, v in vars(trio.lowlevel).items() if not k.startswith("__")})
            lowlevel.wait_readable = direct.wait_readable  # type: ignore[attr-defined]
            self.lowlevel = lowlevel

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)

    def _new_lock(self) -> ReaderLock:
        lock = ReaderLock()
        self._handoff.locks.append(lock)
        return lock


#: the running loop's `DirectWait` (for status), None with KFS_FUSE_WAIT=trio or the stock loop
current_direct: DirectWait | None = None


async def serve(min_tasks: int, max_tasks: int) -> None:
    """``pyfuse3.main(min_tasks, max_tasks)`` with the one-pass hand-off (pyfuse3.init first)."""
    global current_direct
    if os.environ.get("KFS_FUSE_LOOP") == "pyfuse3":
        await pyfuse3.main(min_tasks=min_tasks, max_tasks=max_tasks)
        return
    direct = None if os.environ.get("KFS_FUSE_WAIT") == "trio" else DirectWait(spin=spin_from_environment())
    handoff = direct if direct is not None else HandOff()
    original = pyfuse3.trio  # type: ignore[attr-defined]
    pyfuse3.trio = _TrioForPyfuse3(handoff, direct)  # type: ignore[attr-defined]
    trio.lowlevel.add_instrument(handoff)
    current_direct = direct
    try:
        await pyfuse3.main(min_tasks=min_tasks, max_tasks=max_tasks)
    finally:
        try:
            trio.lowlevel.remove_instrument(handoff)
        except KeyError:
            pass
        pyfuse3.trio = original  # type: ignore[attr-defined]
        if direct is not None:
            direct.close()
        current_direct = None
