"""Placement (``branchd/placement.py``): the better of two random feasible branches."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from branchd.errors import Full, Invalid, NotFound
from branchd.model import App, Autoscale, CelerySettings, InstanceSpec, Kind
from branchd.placement import (
    choices,
    need_of,
    pick,
    pick_pinned,
    same_app,
    spare,
    why_not,
)
from branchd.views import BranchRecord, Capacity, Need, need_for

GIB = 1 << 30


def branch(
    name: str,
    *,
    free: int = 10,
    mem: int = 8 * GIB,
    cpus: int = 4,
    load: float = 0.0,
    draining: bool = False,
    instances: tuple[str, ...] = (),
) -> BranchRecord:
    """A live branch with ``free`` free slots (each instance held takes one)."""
    held = len(instances)
    cap = Capacity(
        cpus=cpus,
        load=(load, load, load),
        memory_total=16 * GIB,
        memory_free=mem,
        instances=held,
        max_instances=held + 100,
        draining=draining,
        slots=held + free,
        slots_used=held,
    )
    return BranchRecord(
        id=f"id-{name}",
        hostname=f"{name}.example",
        version="0.1.0",
        started_at=0.0,
        address=f"{name}:8400",
        capacity=cap,
        instances=tuple(sorted(instances)),
    )


def cluster(n: int, **kw: object) -> list[BranchRecord]:
    return [branch(f"b{i:02d}", **kw) for i in range(n)]  # type: ignore[arg-type]


def ids(records: tuple[BranchRecord, ...]) -> list[str]:
    return [r.id for r in records]


# --- what an instance needs ------------------------------------------------


def spec(**kw: object) -> InstanceSpec:
    fields: dict[str, object] = {"command": (), **kw}
    return InstanceSpec(app="shop", name="w1", branch="", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("s", "app", "estimate", "need"),
    [
        (spec(command=("sleep", "1")), None, 0, Need(1, 0)),
        (spec(command=("sleep", "1")), None, 300, Need(1, 300)),
        (spec(kind=Kind.CELERY, concurrency=4), None, 0, Need(4, 0)),
        (spec(kind=Kind.CELERY, autoscale=Autoscale(2, 8)), None, 0, Need(8, 0)),
        (
            spec(kind=Kind.CELERY),
            App("shop", celery=CelerySettings(autoscale=Autoscale(1, 6))),
            0,
            Need(6, 0),
        ),
        (spec(kind=Kind.CELERY), App("shop"), 0, Need(1, 0)),
        (spec(kind=Kind.CELERY, concurrency=2, memory_limit=GIB), None, 300, Need(2, GIB)),
    ],
)
def test_the_need_is_the_largest_concurrency_and_the_memory_limit_or_estimate(
    s: InstanceSpec, app: App | None, estimate: int, need: Need
) -> None:
    assert need_for(s, app, estimate) == need


def test_a_worker_of_celerys_default_concurrency_takes_its_hosts_cpus() -> None:
    # the host knows its CPU count; a sender placing it does not yet (1)
    assert need_for(spec(kind=Kind.CELERY), App("shop"), cpus=8) == Need(8, 0)
    assert need_for(spec(command=("x",)), App("shop"), cpus=8) == Need(1, 0)
    assert need_for(spec(kind=Kind.CELERY, concurrency=2), App("shop"), cpus=8) == Need(2, 0)


@pytest.mark.parametrize(
    ("body", "defaults", "need"),
    [
        ({"command": ["x"]}, {}, Need(1, 0)),
        ({"kind": "celery", "autoscale": {"min": 1, "max": 6}}, {}, Need(6, 0)),
        ({"kind": "celery"}, {"concurrency": 3}, Need(3, 0)),  # the app's default
        ({"kind": "celery", "concurrency": 5}, {"concurrency": 3}, Need(5, 0)),
        ({"name": "w9", "kind": "celery", "concurrency": 8}, {}, Need(8, 0)),  # (named)
        ({"kind": "celery", "concurrency": 1, "memory_limit": GIB}, {}, Need(1, GIB)),
        ({"kind": "celery", "command": ["x"]}, {}, Need()),  # invalid: its create says why
        ({"kind": "nope"}, {}, Need()),
    ],
)
def test_a_create_body_needs_what_its_instance_would(
    body: dict[str, object], defaults: dict[str, object], need: Need
) -> None:
    assert need_of(body, App("shop", defaults=defaults), cpus=4) == need


def test_a_branch_at_its_instance_limit_takes_none_whatever_its_slots() -> None:
    b = branch("b", free=50)
    at_limit = replace(b, capacity=replace(b.capacity, max_instances=b.capacity.instances))
    assert why_not(at_limit, Need()) == "0 of 0 instances"
    with pytest.raises(Full, match="0 of 0 instances"):
        pick([at_limit], Need(), random.Random(1))


# --- feasibility ------------------------------------------------------------


def test_draining_full_and_short_of_memory_branches_are_never_chosen() -> None:
    ok = branch("ok")
    records = [
        branch("drain", draining=True),
        branch("full", free=0),
        branch("two", free=2),
        branch("small", mem=GIB),
        ok,
    ]
    need = Need(slots=3, memory=2 * GIB)
    for seed in range(50):
        assert pick(records, need, random.Random(seed)) == (ok,)
    assert why_not(records[0], need) == "draining"
    assert why_not(records[2], need) == "2 free slots"
    assert why_not(records[3], need) == "1024 MiB free"


def test_an_all_full_cluster_is_a_clear_full_error_naming_each_branch() -> None:
    records = [branch("a", draining=True), branch("b", free=0), branch("c", mem=0)]
    with pytest.raises(Full) as e:
        pick(records, Need(1, 512 << 20), random.Random(1))
    msg = e.value.message
    assert "no branch has room for 1 slot and 512 MiB of memory" in msg
    assert "a.example (id-a): draining" in msg
    assert "b.example (id-b): 0 free slots" in msg
    assert "c.example (id-c): 0 MiB free" in msg
    assert e.value.status == 503


def test_no_live_branch_at_all_is_full_too() -> None:
    with pytest.raises(Full, match="no live branch"):
        pick([], Need(), random.Random(1))


# --- the ranking --------------------------------------------------------------


def test_the_ranking_is_the_whole_fallback_order_and_deterministic_per_seed() -> None:
    records = cluster(8)
    one = pick(records, Need(), random.Random(7))
    assert sorted(ids(one)) == sorted(r.id for r in records)
    assert pick(list(reversed(records)), Need(), random.Random(7)) == one  # input order: moot


def test_of_two_the_one_with_more_spare_capacity_always_comes_first() -> None:
    roomy, tight = branch("roomy", free=9), branch("tight", free=1)
    for seed in range(30):
        assert pick([tight, roomy], Need(), random.Random(seed)) == (roomy, tight)
    # slots first, then free memory, then CPU headroom
    assert spare(branch("x", free=2, mem=GIB)) > spare(branch("y", free=1, mem=8 * GIB))
    assert spare(branch("x", mem=2 * GIB)) > spare(branch("y", mem=GIB, load=0.0))
    assert spare(branch("x", cpus=8, load=7.5)) < spare(branch("y", cpus=4, load=1.0))


def test_stale_data_does_not_herd_onto_the_branch_that_looked_emptiest() -> None:
    # One snapshot, read by many requests before the next refresh: one branch
    # looks emptiest. Least-loaded would send every request there; the better
    # of two only those that draw it as one of their two: 2 / n (20 % of 10).
    records = [*cluster(9, free=5), branch("empty", free=50)]
    rng = random.Random(3)
    firsts = Counter(pick(records, Need(), rng)[0].id for _ in range(2000))
    assert 0.15 < firsts["id-empty"] / 2000 < 0.24
    assert len(firsts) == 10  # every branch got some


def test_a_branch_with_fewer_free_slots_gets_fewer_placements_over_many_picks() -> None:
    # Placements fill the records as they go (fresh data): the branch with
    # fewer slots takes fewer, and none is ever overfilled.
    records = {r.id: r for r in [branch("big1", free=40), branch("big2", free=40)]}
    records["id-small"] = branch("small", free=10)
    rng = random.Random(5)
    got: Counter[str] = Counter()
    for _ in range(60):
        first = pick(records.values(), Need(), rng)[0]
        got[first.id] += 1
        records[first.id] = _with_one_more(first)
    assert got["id-small"] < got["id-big1"] and got["id-small"] < got["id-big2"]
    assert got["id-small"] <= 10


def _with_one_more(r: BranchRecord, app: str = "x") -> BranchRecord:
    c = r.capacity
    cap = replace(c, instances=c.instances + 1, slots_used=c.slots_used + 1)
    name = f"{app}/{len(r.instances)}-{r.id}"
    return BranchRecord(
        r.id, r.hostname, r.version, r.started_at, r.address, cap,
        instances=tuple(sorted((*r.instances, name))),
    )  # fmt: skip


def test_an_apps_instances_spread_over_branches() -> None:
    # b0 is much emptier, but already holds shop's instances: a new shop
    # instance goes elsewhere; an app none holds still prefers b0.
    b0 = branch("b0", free=90, instances=("shop/w1", "shop/w2", "web/x"))
    others = [branch("b1", free=5, instances=("web/y",)), branch("b2", free=5)]
    assert same_app(b0, "shop") == 2 and same_app(b0, "sho") == 0
    for seed in range(20):
        ranking = pick([b0, *others], Need(), random.Random(seed), app="shop")
        assert ranking[-1] == b0
    wins = sum(
        pick([b0, *others], Need(), random.Random(s), app="api")[0] == b0 for s in range(300)
    )
    assert wins > 170  # first whenever it is one of the two drawn (2 / 3)


def test_spreading_many_instances_of_one_app_evens_them_out() -> None:
    # Another app fills b0 first, so on free slots alone shop would avoid it;
    # the spread outweighs the slots. (The better of two, not a sort: within
    # two of even, as the power of two choices promises, not exactly even.)
    records = {r.id: r for r in cluster(5, free=50)}
    for _ in range(10):
        records["id-b00"] = _with_one_more(records["id-b00"], "web")
    rng = random.Random(11)
    for _ in range(20):
        first = pick(records.values(), Need(), rng, app="shop")[0]
        records[first.id] = _with_one_more(first, "shop")
    counts = sorted(same_app(r, "shop") for r in records.values())
    assert counts[-1] - counts[0] <= 2, counts
    assert same_app(records["id-b00"], "shop") >= 3


def test_choices_is_lazy_and_gives_the_one_left_last() -> None:
    rng = random.Random(2)
    assert list(choices([], lambda x: x, rng)) == []
    assert list(choices([5], lambda x: x, rng)) == [5]
    assert list(choices([1, 2], lambda x: x, rng)) == [2, 1]
    it = choices(range(10**6), lambda x: x, rng)
    assert next(it) >= 0  # (no million-step sort before the first)


# --- pinned ---------------------------------------------------------------------


def test_pinned_by_id_or_hostname_ignores_the_spread() -> None:
    b0 = branch("b0", free=1, instances=("shop/w1",))
    records = [b0, branch("b1")]
    assert pick_pinned(records, "id-b0", Need()) == b0
    assert pick_pinned(records, "b0.example", Need()) == b0


def test_pinned_to_a_full_or_draining_branch_says_why() -> None:
    records = [branch("full", free=1), branch("drain", draining=True)]
    with pytest.raises(Full, match=r"\(id-full\) has no room for 2 slots: 1 free slot$"):
        pick_pinned(records, "full.example", Need(slots=2))
    with pytest.raises(Full, match="draining"):
        pick_pinned(records, "id-drain", Need())


def test_pinned_to_an_unknown_or_ambiguous_branch() -> None:
    records = [branch("a"), branch("b")]
    with pytest.raises(NotFound, match=r"'nope' \(live: a.example \(id-a\), b.example \(id-b\)\)"):
        pick_pinned(records, "nope", Need())
    twin = BranchRecord("id-a2", "a.example", "0.1.0", 0.0, "a:8401", records[0].capacity)
    with pytest.raises(Invalid, match="names 2 live branches"):
        pick_pinned([*records, twin], "a.example", Need())
    assert pick_pinned([*records, twin], "id-a2", Need()) == twin  # an id is never ambiguous


# --- properties -------------------------------------------------------------------

caps = hs.builds(
    lambda free, mem, load, draining, shop: branch(
        "x", free=free, mem=mem, load=load, draining=draining,
        instances=tuple(f"shop/{i}" for i in range(shop)),
    ),
    hs.integers(0, 6), hs.integers(0, 4) , hs.floats(0, 8), hs.booleans(), hs.integers(0, 3),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    hs.lists(caps, max_size=12),
    hs.integers(1, 4),
    hs.integers(0, 3),
    hs.integers(0, 2**32),
    hs.sampled_from([None, "shop"]),
)
def test_the_ranking_is_a_permutation_of_the_feasible_set(
    shapes: list[BranchRecord], slots: int, mem: int, seed: int, app: str | None
) -> None:
    records = [
        BranchRecord(f"id-{i}", f"h{i}", "0.1.0", 0.0, "", r.capacity, instances=r.instances)
        for i, r in enumerate(shapes)
    ]
    need = Need(slots, mem)
    feasible = {r.id for r in records if why_not(r, need) is None}
    try:
        ranking = pick(records, need, random.Random(seed), app=app)
    except Full:
        assert not feasible
        return
    assert sorted(ids(ranking)) == sorted(feasible)  # each once, nothing infeasible
    for r in ranking:
        c = r.capacity
        assert not c.draining and c.free_slots >= slots and c.memory_free >= mem


def test_creates_placed_a_moment_ago_count_until_the_records_say_so() -> None:
    from branchd.placement import Recent

    b0, b1 = (replace(branch(n, free=10), digest="d1") for n in ("b0", "b1"))
    recent = Recent(ttl=10.0)
    recent.add(b1, "shop/w1", 4, now=100.0)
    got = {r.id: r for r in recent.apply([b0, b1], now=101.0)}
    assert got["id-b0"] == b0  # (untouched)
    assert got["id-b1"].instances == ("shop/w1",) and got["id-b1"].capacity.free_slots == 6
    assert same_app(got["id-b1"], "shop") == 1  # the app's spread sees it
    # a new record of b1 (its names changed) counts it in its capacity itself:
    # not twice (its meta's figures came with the digest); until its names are
    # fetched, the name is still added to them, so the app's spread sees it
    told = replace(_with_one_more(b1, "shop"), digest="d2", instances=())
    [seen] = recent.apply([told], now=102.0)
    assert seen.capacity == told.capacity and seen.instances == ("shop/w1",)
    fetched = replace(told, instances=("shop/w1",))
    assert recent.apply([fetched], now=102.5) == [fetched]  # and then it is gone
    assert recent.apply([told], now=103.0) == [told]
    recent.add(b0, "shop/w2", 1, now=100.0)
    assert recent.apply([b0], now=110.0) == [b0]  # too old: its record must say by now
