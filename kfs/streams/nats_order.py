"""Per-origin order for events bridged in from NATS.

Every event a node sends carries its origin node, its seq in the origin's
stream and the seq of the origin's previous event in that stream that went
out (``Kfs-Origin``, ``Kfs-Seq``, ``Kfs-Prev``).  A single publisher's order
is what NATS promises, and it is what a user expects on every node; but around
a NATS crash JetStream can redeliver a message after newer ones (the consumer
believed it delivered, the client never got it).  So per (origin, stream) the
receiver appends an event only once its predecessor is in:

- ``prev <= last taken``: append it (and then whatever was held behind it);
- ``seq <= last taken``: a redelivery, dropped (acknowledged only);
- otherwise it is held back, in memory, bounded.  The bridge asks JetStream for
  the missing range; if the hole is still there after ``hold_timeout`` (or the
  holding space is full) kfs gives up on it: the held events go in, in order,
  after a ``gap`` marker naming the origin seqs that never came.

This module is pure bookkeeping (no NATS, no trio): the bridge feeds it and
acts on what it returns.

A stream deleted and created again on its origin restarts its seqs at 1; its
events then carry a larger generation (``Kfs-Gen``).  The first event of a newer
generation closes the old one (events still held from it go in after a gap
marker) and the count starts afresh; a late event of an older generation is a
redelivery and is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: held events over all (origin, stream) pairs before the oldest hole is given up on
MAX_HELD = 4096


@dataclass(slots=True)
class Release:
    """What to do with one offered item."""

    item: Any
    origin: str
    stream: str
    seq: int
    #: False: a redelivery of something already taken; only acknowledge it
    append: bool = True
    #: origin seqs (first, last) given up on just before this event, for the gap marker
    gap: tuple[int, int] | None = None


@dataclass(slots=True)
class Held:
    seq: int
    prev: int
    item: Any
    since: float
    #: JetStream stream sequence of the message (None in core NATS)
    js_seq: int | None = None


@dataclass(slots=True)
class Hole:
    """A missing stretch that JetStream may still hold: the messages of ``origin`` on the
    stream's subject after JetStream sequence ``after_js`` (the last one taken) whose seq
    lies in (``after_seq``, ``before_seq``); ``need_seq`` is the held event's predecessor.

    They usually sit before the first held message (a redelivery JetStream keeps for
    its ack wait), but may sit after it if a publisher's retry stored them late."""

    origin: str
    stream: str
    after_js: int
    after_seq: int
    need_seq: int
    before_seq: int
    #: the generation the seqs count in (None: the origin does not say)
    generation: int | None = None


@dataclass
class OriginOrder:
    #: origin -> stream -> last seq taken (persisted by the bridge)
    last: dict[str, dict[str, int]] = field(default_factory=dict)
    #: origin -> stream -> JetStream sequence of the last message taken (where a repair scan starts)
    last_js: dict[str, dict[str, int]] = field(default_factory=dict)
    #: origin -> stream -> generation that ``last`` counts in (persisted by the bridge)
    generation: dict[str, dict[str, int]] = field(default_factory=dict)
    hold_timeout: float = 45.0
    max_held: int = MAX_HELD
    held: dict[tuple[str, str], dict[int, Held]] = field(default_factory=dict)
    gaps: int = 0
    duplicates: int = 0
    #: events ever held back (a measure of how often the order had to be restored)
    held_total: int = 0

    @property
    def held_count(self) -> int:
        return sum(len(chain) for chain in self.held.values())

    def offer(self, origin: str, stream: str, seq: int, prev: int | None, item: Any, now: float,
              js_seq: int | None = None, hold: bool = True, generation: int | None = None) -> list[Release]:
        """Offer one event; returns what to append (in order) or acknowledge now.

        ``prev`` None: the sender did not say (an older kfs): taken as it comes.
        ``hold`` False (core NATS): a missing predecessor will never come, so the
        event goes in at once after a gap marker.  ``generation`` None: the sender
        did not say; the event counts in the generation last seen.
        """
        out: list[Release] = []
        if generation is not None:
            known = self.generation.get(origin, {}).get(stream)
            if known is not None and generation < known:
                self.duplicates += 1  # a late copy from an incarnation that is gone
                return [Release(item, origin, stream, seq, append=False)]
            last = self.last.get(origin, {}).get(stream)
            # Unknown generation (state from an older kfs): a seq already taken means a new one.
            if (known is not None and generation > known) or (known is None and last is not None and seq <= last):
                out = self._new_generation(origin, stream)
            if known != generation:
                self.generation.setdefault(origin, {})[stream] = generation
        last = self.last.get(origin, {}).get(stream)
        if last is not None and seq <= last:
            self.duplicates += 1
            return [Release(item, origin, stream, seq, append=False)]
        chain = self.held.get((origin, stream))
        if chain is not None and seq in chain:
            # JetStream redelivered a held message: keep the newest copy (its ack is the live one).
            self.duplicates += 1
            chain[seq].item = item
            return []
        if last is None or prev is None or prev <= last:
            out.append(self._take(origin, stream, seq, item, js_seq))
        elif not hold:
            out.append(self._take(origin, stream, seq, item, js_seq, gap=(last + 1, prev)))
        else:
            self.held.setdefault((origin, stream), {})[seq] = Held(seq, prev, item, now, js_seq)
            self.held_total += 1
            if self.held_count > self.max_held:
                out += self._give_up(self._oldest_hole())
            return out
        out += self._release_chain(origin, stream)
        return out

    def expire(self, now: float) -> list[Release]:
        """Give up on every hole older than ``hold_timeout``."""
        out: list[Release] = []
        for key in list(self.held):
            while (chain := self.held.get(key)) and min(h.since for h in chain.values()) + self.hold_timeout <= now:
                out += self._give_up(key)
        return out

    def holes(self) -> list[Hole]:
        """The stretches worth asking JetStream for (where both ends' JetStream sequences are known)."""
        out = []
        for (origin, stream), chain in self.held.items():
            if not chain:
                continue
            first = chain[min(chain)]
            after_js = self.last_js.get(origin, {}).get(stream)
            if after_js is not None:
                out.append(Hole(origin, stream, after_js, self.last[origin][stream], first.prev, first.seq,
                                self.generation.get(origin, {}).get(stream)))
        return out

    def _new_generation(self, origin: str, stream: str) -> list[Release]:
        """The origin's stream was created again: what is still held of the old one goes in
        (after gap markers), and seqs count afresh."""
        out: list[Release] = []
        while self.held.get((origin, stream)):
            out += self._give_up((origin, stream))
        # Its first event (seq 1) names 0 as its predecessor: later ones wait for it as usual.
        self.last.setdefault(origin, {})[stream] = 0
        return out

    # ------------------------------------------------------------------ internals
    def _take(self, origin: str, stream: str, seq: int, item: Any, js_seq: int | None,
              gap: tuple[int, int] | None = None) -> Release:
        self.last.setdefault(origin, {})[stream] = seq
        if js_seq is not None:
            self.last_js.setdefault(origin, {})[stream] = js_seq
        if gap is not None:
            self.gaps += 1
        return Release(item, origin, stream, seq, gap=gap)

    def _release_chain(self, origin: str, stream: str) -> list[Release]:
        """Take held events whose predecessor is now in; drop held ones now behind the mark."""
        key = (origin, stream)
        chain = self.held.get(key)
        out: list[Release] = []
        while chain:
            seq = min(chain)
            held = chain[seq]
            last = self.last[origin][stream]
            if seq <= last:
                del chain[seq]
                self.duplicates += 1
                out.append(Release(held.item, origin, stream, seq, append=False))
            elif held.prev <= last:
                del chain[seq]
                out.append(self._take(origin, stream, seq, held.item, held.js_seq))
            else:
                break
        if not chain:
            self.held.pop(key, None)
        return out

    def _give_up(self, key: tuple[str, str]) -> list[Release]:
        chain = self.held.get(key)
        if not chain:
            return []
        origin, stream = key
        first = chain.pop(min(chain))
        last = self.last.get(origin, {}).get(stream, 0)
        out = [self._take(origin, stream, first.seq, first.item, first.js_seq, gap=(last + 1, first.prev))]
        if not chain:
            self.held.pop(key, None)
        return out + self._release_chain(origin, stream)

    def _oldest_hole(self) -> tuple[str, str]:
        return min(self.held, key=lambda k: min(h.since for h in self.held[k].values()))
