"""Instance names across the cluster (``branchd/cluster/names.py``): a name
two branches hold is found, and the losing copy is given up by its own
branch, by the rule of ``replication.collision_winner``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from branchd.clock import FakeClock
from branchd.cluster.names import Holder, Names
from branchd.cluster.record import names_digest
from branchd.replication import Copy, collision_winner


@pytest.mark.parametrize(
    ("a", "b", "winner"),
    [
        (Copy("x", 10.0), Copy("y", 20.0), "x"),  # made first
        (Copy("y", 20.0), Copy("x", 10.0), "x"),  # (either order)
        (Copy("x", 10.0, draining=True), Copy("y", 20.0), "y"),  # a drained one leaves
        (Copy("x", 10.0, draining=True), Copy("y", 20.0, draining=True), "x"),
        (Copy("y", 10.0), Copy("x", 10.0), "x"),  # the same instant: the lower id
    ],
)
def test_the_copy_that_stays(a: Copy, b: Copy, winner: str) -> None:
    assert collision_winner(a, b).branch == winner
    assert collision_winner(b, a).branch == winner  # both branches agree


@dataclass
class Peers:
    """The membership: this branch (``me``) and one other (``them``)."""

    mine: tuple[str, ...] = ()
    theirs: dict[str, float | None] = field(default_factory=dict)
    #: Their Celery workers running now (their record says).
    running: tuple[str, ...] = ()
    they_drain: bool = False
    we_drain: bool = False
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def self_id(self) -> str:
        return "me"

    def holders(self) -> list[Holder]:
        return [Holder("them", "http://them", "d1")]

    def live_ids(self) -> list[str]:
        return ["me", "them"]

    def owner_of(self, app: str, name: str) -> str | None:
        return None

    def api_url_of(self, branch: str) -> tuple[str | None, str]:
        return "http://them", "alive"

    def own_names(self) -> tuple[str, ...]:
        return self.mine

    def draining(self) -> bool:
        return self.we_drain

    async def call(self, api_url: str, op: str, args: dict[str, Any]) -> Any:
        self.calls.append((op, args))
        if op == "record":
            return {"record": record(tuple(self.theirs), self.running)}
        assert op == "copy"
        return {"created_at": self.theirs.get(f"{args['app']}/{args['name']}"),
                "draining": self.they_drain}  # fmt: skip


def record(names: tuple[str, ...], running: tuple[str, ...] = ()) -> dict[str, Any]:
    cap = {"cpus": 1, "load": [0, 0, 0], "memory_total": 0, "memory_free": 0, "instances": 0}
    body = {"id": "them", "hostname": "h", "version": "0", "started_at": 0.0,
            "address": "them:1", "capacity": cap, "instances": list(names)}  # fmt: skip
    if running:  # (a record without the field: a branch older than the split)
        body["running"] = list(running)
    return body


@dataclass
class Held:
    made: dict[str, float]
    moving_away: set[str] = field(default_factory=set)
    given_up: list[tuple[str, str]] = field(default_factory=list)

    def created_at(self, app: str, name: str) -> float | None:
        return self.made.get(f"{app}/{name}")

    def moving(self, app: str, name: str) -> bool:
        return f"{app}/{name}" in self.moving_away

    def give_up(self, app: str, name: str, why: str) -> None:
        self.given_up.append((f"{app}/{name}", why))


def names(peers: Peers, held: Held) -> Names:
    n = Names(peers, FakeClock(), held)
    # their names as fetched for their digest now (what the names loop does first)
    n._names["them"] = ("d1", tuple(peers.theirs))
    return n


def test_a_name_made_first_elsewhere_is_given_up_here_once() -> None:
    peers = Peers(mine=("shop/w1", "shop/w2"), theirs={"shop/w1": 5.0, "web/x": 1.0})
    held = Held({"shop/w1": 9.0, "shop/w2": 1.0})
    n = names(peers, held)
    assert asyncio.run(n.check()) == 1
    assert [k for k, _ in held.given_up] == ["shop/w1"]
    assert "also on branch them, created there first" in held.given_up[0][1]
    # asked for its copy of the name both hold, never of the others
    assert peers.calls == [("copy", {"app": "shop", "name": "w1"})]
    asyncio.run(n.check())  # (its delete under way: not given up twice)
    assert len(held.given_up) == 1 and n.collisions == 1 and n.given_up == 1


def test_the_copy_made_first_here_is_kept_and_the_other_branch_gives_up() -> None:
    peers = Peers(mine=("shop/w1",), theirs={"shop/w1": 9.0})
    held = Held({"shop/w1": 5.0})
    n = names(peers, held)
    assert asyncio.run(n.check()) == 1
    assert held.given_up == [] and n.collisions == 1
    # the other side, by the same rule: its copy (made at 9.0) gives up
    other = names(Peers(mine=("shop/w1",), theirs={"shop/w1": 5.0}), Held({"shop/w1": 9.0}))
    asyncio.run(other.check())
    assert other.given_up == 1


def test_a_draining_branchs_copy_gives_up_unless_it_is_being_moved() -> None:
    peers = Peers(mine=("shop/w1",), theirs={"shop/w1": 9.0}, we_drain=True)
    held = Held({"shop/w1": 5.0}, moving_away={"shop/w1"})
    n = names(peers, held)
    assert asyncio.run(n.check()) == 0 and held.given_up == []  # the move removes it itself
    held.moving_away.clear()  # (a move that gave up on it: the rule again)
    asyncio.run(n.check())
    assert [k for k, _ in held.given_up] == ["shop/w1"]
    assert "which does not drain" in held.given_up[0][1]


def test_names_gone_there_since_they_were_fetched_are_no_collision() -> None:
    peers = Peers(mine=("shop/w1",), theirs={"shop/w1": None})
    held = Held({"shop/w1": 9.0})
    assert asyncio.run(names(peers, held).check()) == 0 and held.given_up == []


def test_names_are_those_fetched_for_the_digest_gossiped_now() -> None:
    peers = Peers(theirs={"shop/w1": 1.0})
    n = Names(peers, FakeClock(), None)
    assert n.names_of("them", "d1") is None  # not fetched yet
    asyncio.run(n.fetch(Holder("them", "http://them", "d1")))
    digest = next(iter(n._names.values()))[0]
    assert n.names_of("them", digest) == ("shop/w1",)
    assert n.names_of("them", "other") is None  # its names changed since: stale
    asyncio.run(n.fetch(Holder("them", "http://them", digest)))
    assert [op for op, _ in peers.calls] == ["record"]  # the same digest: not fetched again
    n.forget_others_than({"me"})
    assert n.names_of("them", digest) is None
    assert asyncio.run(n.check()) == 0  # (no holdings: nothing to check)


def test_workers_running_elsewhere_are_counted_by_app_and_each_change_told_once() -> None:
    them = Holder("them", "http://them", "d1")
    peers = Peers(theirs={"shop/w1": 1.0, "shop/w2": 1.0, "web/a": 1.0})
    n = Names(peers, FakeClock(), None)
    assert n.recount(["them"]) == [] and n.elsewhere("shop") == 0  # nothing fetched yet
    peers.running = ("shop/w1", "shop/w2", "web/a")
    asyncio.run(n.fetch(them))
    assert n.recount(["them"]) == ["shop", "web"]
    assert (n.elsewhere("shop"), n.elsewhere("web"), n.elsewhere("other")) == (2, 1, 0)
    assert n.running_of("them") == ("shop/w1", "shop/w2", "web/a")
    assert n.recount(["them"]) == []  # the same counts: nothing to re-split
    # one of theirs stops: its record's digest changes, it is fetched again
    peers.running = ("shop/w1", "web/a")
    stale = next(iter(n._names.values()))[0]
    asyncio.run(n.fetch(Holder("them", "http://them", names_digest(peers.theirs, peers.running))))
    assert next(iter(n._names.values()))[0] != stale
    assert n.recount(["them"]) == ["shop"] and n.elsewhere("shop") == 1
    # the branch is no longer counted (dead, left): none of its workers
    assert n.recount([]) == ["shop", "web"] and n.elsewhere("web") == 0
    n.forget_others_than({"me"})
    assert n.running_of("them") == () and n.recount(["them"]) == []


def test_a_record_without_running_workers_has_the_digest_of_its_names() -> None:
    """A branch older than the split says no running workers: its digest is
    the names' alone, so it is fetched once per new set of names, as before."""
    peers = Peers(theirs={"shop/w1": 1.0})
    n = Names(peers, FakeClock(), None)
    digest = names_digest(["shop/w1"])
    asyncio.run(n.fetch(Holder("them", "http://them", digest)))
    assert n.names_of("them", digest) == ("shop/w1",) and n.running_of("them") == ()
    asyncio.run(n.fetch(Holder("them", "http://them", digest)))
    assert [op for op, _ in peers.calls] == ["record"]
