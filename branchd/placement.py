"""Where a new instance goes: the better of two random feasible branches.

Pure: no I/O, no clock; the random source is passed in, so tests are
deterministic. Callers hand in the live branches' records
(``ClusterService.alive()``): liveness is the gossip's to decide, not ours.

Why two random choices and not the least loaded: the records are gossip,
seconds old, and every branch places from the same picture. "Least loaded"
sends every request of that window to the one branch that looked emptiest
(herding), which on old data is worse than picking at random (Mitzenmacher,
"How useful is old information?", 2000). Comparing just two random branches
keeps most of the gain of fresh data (mean queue 2.66 against 10.1 for
random at 90 % load, "The Power of Two Choices", 1996) and spreads the
requests of one stale window over many branches (``bench/placement_sim.py``).

The ranking is the whole fallback order: the receiving branch re-checks
(admission control) and answers ``Full`` when the record was stale, and the
sender then tries the next one, so each next choice is again the better of
two random ones among those left, never a sort of all of them by stale data.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from branchd.errors import Full, Invalid, NotFound
from branchd.model import App
from branchd.process.specs import build_spec
from branchd.views import BranchRecord, Need, mib, need_for


class _Ordered(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


T = TypeVar("T")
K = TypeVar("K", bound=_Ordered)

#: How a branch ranks for a request, bigger is better (see ``spare``).
Spare = tuple[int, int, int, float]


def need_of(fields: Mapping[str, Any], app: App, *, cpus: int = 1) -> Need:
    """What a create's body (``fields``, over ``app``'s defaults) needs; a
    body that makes no valid instance needs the least (its create then says
    what is wrong with it)."""
    fields = {k: v for k, v in fields.items() if k != "name"}  # (not a field of the spec)
    try:
        spec = build_spec(app, "placed", fields, "", 0.0)
    except (Invalid, ValueError, TypeError, KeyError):
        return Need()
    return need_for(spec, app, cpus=cpus)


@dataclass
class Recent:
    """The creates this branch placed on others whose records may not say so
    yet (a record's names travel as a digest, fetched within about a second):
    counted on top of those records, so that a burst of creates through one
    branch spreads instead of piling onto whichever branch looked emptiest a
    second ago. An entry goes once the branch's record holds the name, or
    after ``ttl`` seconds."""

    ttl: float = 10.0
    _by: dict[str, list[tuple[str, int, float, str]]] = field(default_factory=dict)

    def add(self, record: BranchRecord, key: str, slots: int, now: float) -> None:
        """``key`` (``app/name``, taking ``slots``) was made at ``now`` on the
        branch of ``record`` (the record it was placed by)."""
        self._by.setdefault(record.id, []).append((key, slots, now, record.digest))

    def apply(self, records: Iterable[BranchRecord], now: float) -> list[BranchRecord]:
        out = []
        for r in records:
            # A name not yet in the branch's record is counted on top of it:
            # in its capacity while the record is the one it was placed by,
            # and in its names until they hold it (a new record's capacity
            # counts it already, since the meta says how many the branch
            # holds and the slots they take, but its names come by a fetch,
            # up to a names step later: without it, the branch would look
            # like it held fewer of the app's instances than it does).
            pending = [
                e
                for e in self._by.get(r.id, ())
                if e[0] not in r.instances and now - e[2] < self.ttl
            ]
            if not pending:
                self._by.pop(r.id, None)
                out.append(r)
                continue
            self._by[r.id] = pending
            uncounted = [e for e in pending if e[3] == r.digest]
            c = r.capacity
            cap = replace(
                c,
                instances=c.instances + len(uncounted),
                slots_used=c.slots_used + sum(e[1] for e in uncounted),
            )
            names = tuple(sorted((*r.instances, *(e[0] for e in pending))))
            out.append(replace(r, capacity=cap, instances=names))
        return out


def why_not(record: BranchRecord, need: Need) -> str | None:
    """Why ``record``'s branch cannot take ``need`` (None: it can)."""
    c = record.capacity
    if c.draining:
        return "draining"
    if c.free_instances < 1:
        return f"{c.instances} of {c.max_instances} instances"
    if c.free_slots < need.slots:
        return f"{c.free_slots} free slot{'s' if c.free_slots != 1 else ''}"
    if c.memory_free < need.memory:
        return f"{mib(c.memory_free)} free"
    return None


def same_app(record: BranchRecord, app: str) -> int:
    """How many instances of ``app`` the branch holds (names are ``app/name``)."""
    prefix = app + "/"
    return sum(1 for name in record.instances if name.startswith(prefix))


def spare(record: BranchRecord, app: str | None = None) -> Spare:
    """The branch's spare capacity as a sort key, bigger is better: fewer of
    ``app``'s instances first (an app's instances spread, so one lost host
    takes few of them), then free slots, then free memory, then CPU headroom
    (cpus less the 1-minute load)."""
    c = record.capacity
    return (
        -same_app(record, app) if app is not None else 0,
        c.free_slots,
        c.memory_free,
        c.cpus - c.load[0],
    )


def choices(items: Sequence[T], key: Callable[[T], K], rng: random.Random) -> Iterator[T]:
    """``items`` in power-of-two-choices order, lazily: each next one is the
    better (larger ``key``; a tie goes to either) of two drawn at random from
    those not yet given. The last one left comes alone.

    Lazy, and O(1) per item after an O(n) copy: the usual caller wants the
    first one or two (the simulation in ``bench/`` only the first).
    """
    left = list(items)
    while left:
        n = len(left)
        i = rng.randrange(n)
        if n > 1:
            j = rng.randrange(n - 1)
            j += j >= i  # two distinct ones
            a, b = key(left[i]), key(left[j])
            if a < b or (not b < a and rng.random() < 0.5):
                i = j
        yield left[i]
        left[i] = left[-1]
        left.pop()


def pick(
    candidates: Iterable[BranchRecord],
    need: Need,
    rng: random.Random,
    *,
    app: str | None = None,
) -> tuple[BranchRecord, ...]:
    """The feasible branches among ``candidates`` (the live ones), in the
    order to try them: first choice first, then the next ones for when a
    branch answers ``Full``. ``app`` spreads that app's instances (leave it
    out for a pinned request, see ``pick_pinned``).

    Raises ``Full`` naming every branch and why it cannot, when none can.
    """
    records = sorted(candidates, key=lambda r: r.id)  # (the same rng, the same answer)
    feasible = [r for r in records if why_not(r, need) is None]
    if not feasible:
        raise Full(_no_room(records, need))
    return tuple(choices(feasible, lambda r: spare(r, app), rng))


def pick_pinned(candidates: Iterable[BranchRecord], branch: str, need: Need) -> BranchRecord:
    """The one live branch ``branch`` names (its id, else its hostname), if it
    can take ``need``: the request said where (``?branch=``), so there is no
    fallback and no spreading.

    Raises ``NotFound`` for a branch that is not live (or unknown),
    ``Invalid`` for a hostname two live branches share, ``Full`` when it has
    no room (saying why).
    """
    records = list(candidates)
    found = [r for r in records if r.id == branch] or [r for r in records if r.hostname == branch]
    if not found:
        live = ", ".join(sorted(_label(r) for r in records)) or "none"
        raise NotFound(f"no live branch with id or hostname {branch!r} (live: {live})")
    if len(found) > 1:
        ids = ", ".join(sorted(r.id for r in found))
        raise Invalid(f"hostname {branch!r} names {len(found)} live branches ({ids}): give the id")
    record = found[0]
    reason = why_not(record, need)
    if reason is not None:
        raise Full(f"branch {_label(record)} has no room for {need}: {reason}")
    return record


def _no_room(records: Sequence[BranchRecord], need: Need) -> str:
    if not records:
        return f"no live branch to place it on (it needs {need})"
    reasons = "; ".join(f"{_label(r)}: {why_not(r, need)}" for r in records)
    return f"no branch has room for {need} ({reasons})"


def _label(record: BranchRecord) -> str:
    return f"{record.hostname} ({record.id[:8]})" if record.hostname else record.id
