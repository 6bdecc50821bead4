"""Instance names across the cluster: which branch holds which, a new name's
reservation, and a name two branches hold.

- *Holders.* Each branch's record gossips a digest of its instance names;
  when another branch's digest changes, its names are fetched over the peer
  channel (``record``). ``names_of`` answers with them only while they match
  the digest gossiped now (stale names would send a request to a branch that
  no longer holds the instance).
- *Reservation.* A create of a named instance first reserves the name with
  its reserver: the live branch with the highest rendezvous hash of the name
  (``reserver``), so two creates of one name through two branches ask the
  same branch, which lets one through. A reservation lasts ``RESERVE_TTL``,
  by when the creating branch's record says it holds the name.
- *Collisions.* Branches that cannot see each other (a partition, a
  reserver out of reach) may both create one name. Once they see each other
  again, each branch that finds one of its names held by another asks that
  branch for its copy (``copy``: when it was made, whether that branch
  drains) and keeps or gives up its own by ``replication.collision_winner``;
  the loser's own branch stops and removes it and says so. A copy being
  moved away (``drain --move``) is left to the move.

- *Running workers.* The same fetched record says which of its Celery
  workers run (the digest covers them too), so that an app's rate limits
  can be split over its running workers across the cluster: ``elsewhere``
  counts them by app on the other branches, and ``recount`` says after each
  names step which apps' counts changed.

The branch's own instances are read through ``Holdings`` (the engine, as the
daemon wires it); the members through ``Members`` (the cluster service).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from branchd.clock import Clock
from branchd.cluster.record import names_digest, record_from_json
from branchd.errors import Conflict
from branchd.replication import Copy, collision_winner

log = logging.getLogger(__name__)

#: How long a reserved instance name is held for the branch creating it (s):
#: past that its record (names gossiped as a digest, then fetched) says it.
RESERVE_TTL = 30.0


def reserver(key: str, branches: Iterable[str]) -> str:
    """The branch that decides who may create instance ``key`` (``app/name``):
    the highest rendezvous hash of the key and a branch id. Every branch that
    sees the same live members picks the same one, so two creates of one name
    through two branches ask the same branch, which says yes to one only."""
    return max(branches, key=lambda b: hashlib.sha256(f"{key}\x00{b}".encode()).digest())


@dataclass(frozen=True)
class Holder:
    """Another live branch, as the names see it."""

    id: str
    api_url: str
    #: The digest of its instance names its meta gossips now.
    digest: str


class Members(Protocol):
    """What the names need of the membership (``ClusterService``)."""

    @property
    def self_id(self) -> str: ...
    def holders(self) -> list[Holder]: ...
    def live_ids(self) -> list[str]: ...
    def owner_of(self, app: str, name: str) -> str | None: ...
    def api_url_of(self, branch: str) -> tuple[str | None, str]: ...
    def own_names(self) -> tuple[str, ...]: ...
    def draining(self) -> bool: ...
    async def call(self, api_url: str, op: str, args: dict[str, Any]) -> Any: ...


class Holdings(Protocol):
    """This branch's own instances, as the names need them."""

    def created_at(self, app: str, name: str) -> float | None:
        """When ``app/name`` was created here (None: not held here)."""
        ...

    def moving(self, app: str, name: str) -> bool:
        """Whether ``app/name`` is being moved away (``drain --move``)."""
        ...

    def give_up(self, app: str, name: str, why: str) -> None:
        """Stop and remove this branch's copy of ``app/name`` (in the background)."""
        ...


class Names:
    def __init__(self, members: Members, clock: Clock, holdings: Holdings | None = None) -> None:
        self._m = members
        self._clock = clock
        self.holdings = holdings
        self._names: dict[str, tuple[str, tuple[str, ...]]] = {}  # id: (digest, names)
        #: id: (its running workers' app/name, how many of each app's)
        self._running: dict[str, tuple[tuple[str, ...], Counter[str]]] = {}
        #: The running workers of each app on the other branches, as last counted.
        self._elsewhere: dict[str, int] = {}
        self._reserved: dict[str, tuple[str, float]] = {}  # app/name: (by, until)
        self._given_up: set[str] = set()  # app/name given up and not gone yet
        self._found: set[str] = set()  # app/name@branch: each collision once
        #: Copies given up here (another branch's copy of the name won).
        self.given_up = 0

    # holders -------------------------------------------------------------------

    def names_of(self, branch: str, digest: str) -> tuple[str, ...] | None:
        """``branch``'s instance names, if fetched for ``digest`` (None: not yet)."""
        got = self._names.get(branch)
        return got[1] if got is not None and got[0] == digest else None

    def known(self, branch: str) -> tuple[str, ...]:
        """``branch``'s instance names as last fetched (maybe for an older digest)."""
        got = self._names.get(branch)
        return got[1] if got is not None else ()

    async def fetch(self, holder: Holder) -> None:
        """``holder``'s names, if its digest changed since we fetched them."""
        if self.names_of(holder.id, holder.digest) is not None:
            return
        answer = await self._m.call(holder.api_url, "record", {})
        rec = record_from_json(answer["record"])
        self._names[holder.id] = (names_digest(rec.instances, rec.running), rec.instances)
        apps = Counter(key.split("/", 1)[0] for key in rec.running)
        self._running[holder.id] = (rec.running, apps)

    def forget_others_than(self, known: set[str]) -> None:
        for gone in set(self._names) - known:
            del self._names[gone]
        for gone in set(self._running) - known:
            del self._running[gone]

    # running workers ---------------------------------------------------------------

    def running_of(self, branch: str) -> tuple[str, ...]:
        """``branch``'s running workers (``app/name``) as last fetched."""
        got = self._running.get(branch)
        return got[0] if got is not None else ()

    def recount(self, branches: Iterable[str]) -> list[str]:
        """Count each app's running workers on ``branches`` (the other members
        that may run workers) as last fetched; the apps whose count changed
        since the last count, sorted."""
        counts: Counter[str] = Counter()
        for branch in branches:
            got = self._running.get(branch)
            if got is not None:
                counts.update(got[1])
        now = {app: n for app, n in counts.items() if n}
        changed = sorted(app for app in now.keys() | self._elsewhere.keys()
                         if now.get(app, 0) != self._elsewhere.get(app, 0))  # fmt: skip
        self._elsewhere = now
        return changed

    def elsewhere(self, app: str) -> int:
        """How many of ``app``'s workers run on the other branches (last count)."""
        return self._elsewhere.get(app, 0)

    # reservation ---------------------------------------------------------------

    def reserve_here(self, app: str, name: str, by: str) -> bool:
        """This branch, as the name's reserver: may ``by`` create ``app/name``?
        Not if a live branch holds it, nor while another branch holds it reserved."""
        key, now = f"{app}/{name}", self._clock.monotonic()
        self._reserved = {k: v for k, v in self._reserved.items() if v[1] > now}
        if self._m.owner_of(app, name) is not None:
            return False
        held = self._reserved.get(key)
        if held is not None and held[0] != by:
            return False
        self._reserved[key] = (by, now + RESERVE_TTL)
        return True

    async def reserve(self, app: str, name: str) -> None:
        """Reserve ``app/name`` for a create through this branch, with its
        reserver; ``Conflict`` when another create has it or a branch holds
        it. A reserver that cannot be reached does not stop the create (the
        membership will find it gone; a name created twice is then found as a
        collision, as on a partition)."""
        me = self._m.self_id
        key = f"{app}/{name}"
        chosen = reserver(key, self._m.live_ids() or [me])
        if chosen == me:
            ok = self.reserve_here(app, name, me)
        else:
            url, _ = self._m.api_url_of(chosen)
            try:
                if url is None:
                    raise Conflict(f"no API known for {chosen}")
                asked = {"app": app, "name": name, "by": me}
                ok = bool((await self._m.call(url, "reserve", asked)).get("ok"))
            except Exception as exc:  # (aiohttp's errors, a refusal, a bad answer)
                log.warning("cannot reserve %s at %s (creating it anyway): %s", key, chosen, exc)
                return
        if not ok:
            raise Conflict(
                f"instance {name!r} of app {app!r} exists or is being created "
                f"(reserved at branch {chosen})",
                branch=chosen,
            )

    # collisions ----------------------------------------------------------------

    def copy(self, app: str, name: str) -> dict[str, Any]:
        """This branch's copy of ``app/name`` (the peer channel's ``copy``)."""
        made = self.holdings.created_at(app, name) if self.holdings is not None else None
        return {"created_at": made, "draining": self._m.draining()}

    async def check(self) -> int:
        """Find the names held here and by another live branch, and give up
        this branch's copy of each where the other's wins. How many collisions
        were found."""
        if self.holdings is None:
            return 0
        mine = set(self._m.own_names())
        self._given_up &= mine  # (those gone since)
        found = 0
        for holder in self._m.holders():
            both = mine.intersection(self.names_of(holder.id, holder.digest) or ())
            for key in sorted(both - self._given_up):
                app, name = key.split("/", 1)
                ours = self.holdings.created_at(app, name)
                if ours is None or self.holdings.moving(app, name):
                    continue
                theirs = await self._m.call(holder.api_url, "copy", {"app": app, "name": name})
                if not isinstance(theirs, dict) or theirs.get("created_at") is None:
                    continue  # (gone there since its names were fetched)
                found += 1
                self._found.add(f"{key}@{holder.id}")
                here = Copy(self._m.self_id, ours, self._m.draining())
                there = Copy(holder.id, float(theirs["created_at"]), bool(theirs.get("draining")))
                if collision_winner(here, there) is here:
                    continue  # (the other branch gives its copy up)
                self._given_up.add(key)
                self.given_up += 1
                why = (
                    f"instance {key} is also on branch {holder.id}, "
                    + ("which does not drain" if here.draining and not there.draining
                       else "created there first" if there.created_at < ours
                       else "made at the same time, and its id is lower")
                    + ": this copy is stopped and removed (one name, one instance)"
                )  # fmt: skip
                log.warning("%s", why)
                self.holdings.give_up(app, name, why)
        return found

    @property
    def collisions(self) -> int:
        """Names found held here and by another branch (each pair once)."""
        return len(self._found)
