"""Versions of declared records: a hybrid logical clock (HLC) stamped with a branch.

Every write of a declaration (app, queue, instance, or its tombstone) gets a
``Version``; of two versions of one record the greater wins, on every branch
alike, with no coordinator. A plain wall-clock time cannot be that version:
two branches' clocks disagree and one may step backwards (NTP), so a later
write could lose. A Lamport counter alone forgets time, so "newer" would mean
nothing to a person. The HLC (Kulkarni et al., 2014) is both: the wall time in
milliseconds while the clock moves forwards, a counter while it stands still
or goes back, and it never moves below a version it has seen. The branch id
breaks the tie between two branches that stamped the same (time, counter).

``tick`` and ``merge`` are the pure rules (table-tested); ``HybridClock``
holds the last version and reads the wall time from a ``Clock``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from branchd.clock import Clock

#: The wire form's widths: 48 bits of milliseconds (until the year 10889) and
#: 16 bits of counter, fixed so that the strings sort as the versions do (the
#: store can ask SQLite for the greatest one).
WALL_MAX = (1 << 48) - 1
COUNTER_MAX = (1 << 16) - 1
_WIRE_RE = re.compile(r"^([0-9a-f]{12})\.([0-9a-f]{4})\.(.+)$", re.DOTALL)


@dataclass(frozen=True, order=True)
class Version:
    """One write's place in the total order: (wall_ms, counter, branch)."""

    wall_ms: int
    counter: int
    branch: str

    def __post_init__(self) -> None:
        if not 0 <= self.wall_ms <= WALL_MAX:
            raise ValueError(f"version wall time out of range: {self.wall_ms}")
        if not 0 <= self.counter <= COUNTER_MAX:
            raise ValueError(f"version counter out of range: {self.counter}")
        if not self.branch:
            raise ValueError("a version needs a branch id")

    def to_wire(self) -> str:
        """``<wall_ms:12 hex>.<counter:4 hex>.<branch>``: fixed widths up to the
        branch, so the strings sort as the versions do."""
        return f"{self.wall_ms:012x}.{self.counter:04x}.{self.branch}"

    @classmethod
    def from_wire(cls, text: str) -> Version:
        match = _WIRE_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"not a version: {text!r}")
        wall, counter, branch = match.groups()
        return cls(int(wall, 16), int(counter, 16), branch)


def _after(wall_ms: int, counter: int, branch: str) -> Version:
    """(wall_ms, counter + 1): a counter at its limit carries into the time, so
    the wire form keeps its width (the clock runs 1 ms ahead for a while)."""
    if counter < COUNTER_MAX:
        return Version(wall_ms, counter + 1, branch)
    return Version(wall_ms + 1, 0, branch)


def tick(last: Version, wall_ms: int, branch: str) -> Version:
    """The version of a local write: the wall time if it moved past ``last``,
    else ``last``'s time with the next counter (a clock that stands or steps back)."""
    if wall_ms > last.wall_ms:
        return Version(wall_ms, 0, branch)
    return _after(last.wall_ms, last.counter, branch)


def merge(last: Version, remote: Version, wall_ms: int, branch: str) -> Version:
    """The version after receiving ``remote``: greater than both it and ``last``,
    whatever the wall clock says."""
    top = max(last.wall_ms, remote.wall_ms, wall_ms)
    if top == wall_ms and wall_ms > max(last.wall_ms, remote.wall_ms):
        return Version(wall_ms, 0, branch)
    if last.wall_ms == remote.wall_ms == top:
        return _after(top, max(last.counter, remote.counter), branch)
    if last.wall_ms == top:
        return _after(top, last.counter, branch)
    return _after(top, remote.counter, branch)


class HybridClock:
    """This branch's HLC: ``now()`` for a local write, ``observe()`` for a
    version received from another branch (or read back from the database)."""

    def __init__(self, wall: Clock, branch: str, last: Version | None = None) -> None:
        self._wall = wall
        self.branch = branch
        self._last = last if last is not None else Version(0, 0, branch)

    @property
    def last(self) -> Version:
        return self._last

    def _wall_ms(self) -> int:
        return min(max(int(self._wall.wall() * 1000), 0), WALL_MAX)

    def now(self) -> Version:
        self._last = tick(self._last, self._wall_ms(), self.branch)
        return self._last

    def observe(self, remote: Version) -> Version:
        self._last = merge(self._last, remote, self._wall_ms(), self.branch)
        return self._last
