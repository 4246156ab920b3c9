"""The heartbeat wheel: live streams filed by when their next heartbeat is due.

A sweep takes only the streams whose heartbeat falls in the ticks since the last one,
instead of looking at every stream every tick: with 10,000 idle streams and heartbeats
every 15 s, a one-second tick handles about 670 streams, not 10,000. A stream is in one
slot at a time (the one its ``next_heartbeat`` falls in), and leaves it when it ends.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.sse.stream import Stream


class HeartbeatWheel:
    __slots__ = ("slots", "tick_s", "turned_to")

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        # slot number (a time divided by tick_s, rounded down) -> the streams due in it
        self.slots: dict[int, set[Stream]] = {}
        # The last slot a turn reached: the next turn starts there again, since streams
        # filed in it after that turn (or not yet due at it) are still waiting.
        self.turned_to: int | None = None

    def _slot(self, at: float) -> int:
        # Never a slot behind the last turn, which the next turn would not visit.
        n = int(at // self.tick_s)
        turned_to = self.turned_to
        return n if turned_to is None or n >= turned_to else turned_to

    def add(self, stream: Stream) -> None:
        """File ``stream`` under its ``next_heartbeat``."""
        self.slots.setdefault(self._slot(stream.next_heartbeat), set()).add(stream)

    def discard(self, stream: Stream) -> None:
        """Take ``stream`` out (it ended). A stream still filed is in a slot at or after
        the last turn's, so ``_slot`` finds it where ``add`` put it."""
        slot = self.slots.get(self._slot(stream.next_heartbeat))
        if slot is not None:
            slot.discard(stream)

    def turn(self, now: float) -> list[Stream]:
        """Take out every stream filed in a slot up to ``now``'s: those whose heartbeat is
        due, and some of ``now``'s own slot that are not due yet (the caller files those
        back, with the others once their heartbeat is written)."""
        last = int(now // self.tick_s)
        first = self.turned_to
        slots = self.slots
        if first is None or first > last or last - first > len(slots):
            # The first turn, a clock that went back, or a long gap: the slots held.
            numbers: Iterable[int] = sorted(n for n in slots if n <= last)
        else:
            numbers = range(first, last + 1)
        self.turned_to = last
        taken: list[Stream] = []
        for n in numbers:
            due = slots.pop(n, None)
            if due:
                taken.extend(due)
        return taken

    def __len__(self) -> int:
        """How many streams are filed."""
        return sum(len(s) for s in self.slots.values())
