"""The gossip service over a network: N ``Gossip`` services on one
``MemoryNetwork`` stepped on the ``FakeScheduler`` (no real waiting, each run
a function of its seed), then three over real UDP on 127.0.0.1.

Every simulated frame is sealed (AES-GCM under one cluster key), as a
clustered daemon's are. The figures each test measures are printed
(``pytest -s``) and the bounds asserted are stated beside them.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import pytest

from branchd.clock import FakeClock, FakeScheduler, LoopScheduler, SystemClock
from branchd.cluster.gossip import Gossip, _fitted
from branchd.cluster.keyring import ClusterKey, Keyring, generate_key, parse_key
from branchd.cluster.memnet import MemoryNetwork
from branchd.cluster.messages import MemberState, Message, Sync, Update
from branchd.cluster.timing import MembershipConfig
from branchd.cluster.transport import UdpTransport
from branchd.events import Event, EventBus, MemberChanged

AL, SU, DE, LE = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT
LAN = MembershipConfig.lan()
KEY = parse_key(generate_key())
KEYRING = Keyring.of(KEY)


class Recorder(EventBus):
    """A bus that also keeps every event, with the (fake) time it came."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.log: list[tuple[float, Event]] = []

    def publish(self, event: Event) -> None:
        self.log.append((self.clock.monotonic(), event))
        super().publish(event)


class Sim:
    """N gossip services on one memory network, on one fake clock."""

    def __init__(
        self,
        n: int,
        seed: int,
        *,
        config: MembershipConfig = LAN,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.0005, 0.005),
    ) -> None:
        self.clock = FakeClock()
        self.scheduler = FakeScheduler(self.clock)
        self.net = MemoryNetwork(self.scheduler, seed=seed, loss=loss, delay=delay)
        self.config, self.seed = config, seed
        self.nodes: dict[str, Gossip] = {}
        self.buses: dict[str, Recorder] = {}
        self.ids = [f"b{i}" for i in range(n)]
        for i in self.ids:
            self.add(i)

    @staticmethod
    def addr(mid: str) -> str:
        return f"{mid}:8401"

    def add(self, mid: str, keyring: Keyring | None = KEYRING) -> Gossip:
        addr = self.addr(mid)

        bus = Recorder(self.clock)
        g = Gossip(
            mid,
            addr,
            1,
            lambda r: self.net.transport(addr, r),
            self.scheduler,
            self.config,
            keyring,
            bus,
            seed=self.seed * 100_003 + len(self.nodes),
        )
        self.nodes[mid], self.buses[mid] = g, bus
        return g

    async def join_all(self, stagger: float = 0.02) -> None:
        first, *rest = self.ids
        await self.nodes[first].start(())
        for mid in rest:
            await self.scheduler.advance(stagger)
            await self.nodes[mid].start((self.addr(first),))

    async def run(self, seconds: float) -> None:
        await self.scheduler.advance(seconds)

    @property
    def now(self) -> float:
        return self.clock.monotonic()

    def live(self) -> list[str]:
        return [i for i in self.ids if not self.nodes[i]._closed]

    def everyone_sees(self, mid: str, state: MemberState) -> bool:
        return all(self.nodes[o].state_of(mid) is state for o in self.live() if o != mid)

    def converged(self) -> bool:
        """Every live branch sees every other live one alive."""
        live = self.live()
        return all(self.nodes[o].state_of(m) is AL for o in live for m in live)

    async def until(self, done: Callable[[], bool], limit: float, step: float = 0.05) -> float:
        """Step until ``done()``; the simulated time it took (fail past ``limit``)."""
        t0 = self.now
        while not done():
            if self.now - t0 > limit:
                raise AssertionError(f"not done within {limit}s (simulated)")
            await self.run(step)
        return self.now - t0

    def deaths(self, of: str | None = None) -> list[tuple[float, str]]:
        """(time, member) of every death any branch was told of."""
        return [
            (t, e.id)
            for b in self.buses.values()
            for t, e in b.log
            if isinstance(e, MemberChanged)
            and e.state == "dead"
            and not e.reaped
            and (of is None or e.id == of)
        ]

    def close(self) -> None:
        for g in self.nodes.values():
            g.close()


def figures(label: str, values: list[float]) -> str:
    line = (
        f"{label}: median {statistics.median(values):.2f}s max {max(values):.2f}s "
        f"over {len(values)} seeds"
    )
    print(line)
    return line


# joining ----------------------------------------------------------------------------

#: simulated seconds until every branch knows every other alive, joined
#: through one seed 20 ms apart (measured, seed 1: N = 3 0.2 s, 10 0.25 s, 100 6 s)
JOIN_BOUND = {3: 2.0, 10: 3.0, 100: 10.0}


@pytest.mark.parametrize("n", [3, 10, 100])
async def test_every_branch_knows_every_member_after_joining_through_one_seed(n: int) -> None:
    sim = Sim(n, seed=1)
    await sim.join_all()
    took = await sim.until(sim.converged, limit=JOIN_BOUND[n])
    print(f"join N={n}: converged {took:.2f}s after the last start")
    for g in sim.nodes.values():
        assert [v.id for v in g.members()] == sorted(sim.ids)
        assert [v.id for v in g.members() if v.is_self] == [g.id]
        assert g.stats().dropped["bad_tag"] == 0 and g.stats().failures == 0
    sim.close()


def test_a_sync_too_big_for_a_datagram_is_split_and_asks_once() -> None:
    states = tuple(Update(f"b{i:03}", f"b{i:03}:8401", 1, 0, AL, "b000") for i in range(100))
    parts = _fitted(Sync("b000", "b000:8401", states, reply=True), 1359)
    assert len(parts) > 1 and all(isinstance(p, Sync) for p in parts)
    assert [p.reply for p in parts if isinstance(p, Sync)] == [True] + [False] * (len(parts) - 1)
    assert tuple(u for p in parts if isinstance(p, Sync) for u in p.states) == states


# a killed branch --------------------------------------------------------------------

#: Measured (LAN profile, no loss, simulated seconds from the close until every
#: survivor says dead; median / max): over seeds 1-30, N = 3 5.55 / 6.75 s and
#: N = 10 5.75 / 8.00 s; over seeds 1-5, N = 100 10.80 / 11.35 s (the test runs
#: seeds 1-10, 1-10 and 1-2 to stay fast, and prints its own). The bounds leave
#: room over the worst seen: the suspicion alone is 4 s (N = 3: none of the
#: others confirms, so the minimum from the start) to 24 s at N = 10, 8 s to
#: 48 s at N = 100.
DETECTION_BOUND = {3: 10.0, 10: 12.0, 100: 20.0}
DETECTION_SEEDS = {3: range(1, 11), 10: range(1, 11), 100: range(1, 3)}


@pytest.mark.parametrize("n", [3, 10, pytest.param(100, marks=pytest.mark.slow)])
async def test_a_killed_branch_is_dead_on_every_survivor_within_a_bound(n: int) -> None:
    took: list[float] = []
    for seed in DETECTION_SEEDS[n]:
        sim = Sim(n, seed)
        await sim.join_all()
        await sim.until(sim.converged, limit=JOIN_BOUND[n])
        await sim.run(2.0)
        victim = sim.ids[-1]
        sim.nodes[victim].close()  # no leave: its transport closed, nothing said
        gone = lambda sim=sim, victim=victim: sim.everyone_sees(victim, DE)  # noqa: E731
        took.append(await sim.until(gone, DETECTION_BOUND[n]))
        assert {m for _, m in sim.deaths()} == {victim}, seed  # nobody else, ever
        sim.close()
    figures(f"detection N={n}", took)


# a leave ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 10, 100])
async def test_a_leave_is_seen_as_left_on_all_within_a_second(n: int) -> None:
    sim = Sim(n, seed=3)
    await sim.join_all()
    await sim.until(sim.converged, limit=JOIN_BOUND[n])
    leaver = sim.nodes[sim.ids[1]]
    t0 = sim.now
    leaving = asyncio.ensure_future(leaver.leave())
    took = await sim.until(lambda: sim.everyone_sees(leaver.id, LE), limit=1.0, step=0.01)
    print(f"leave N={n}: left on all after {took:.2f}s")
    await sim.until(leaving.done, limit=3.0)
    assert leaving.result() is True  # the goodbye was spent before the timeout
    spent = sim.now - t0
    leaver.close()
    await sim.run(30.0)  # long past any suspicion: left stays left, never dead
    assert sim.everyone_sees(leaver.id, LE) and sim.deaths() == []
    assert spent <= 3.0
    sim.close()


async def test_a_lone_branch_leaves_at_once() -> None:
    sim = Sim(1, seed=1)
    await sim.join_all()
    assert await sim.nodes["b0"].leave(timeout=1.0) is True
    sim.close()


# loss, slow readers, partitions -----------------------------------------------------


async def test_no_false_death_at_one_percent_loss_with_slow_readers() -> None:
    for seed in (1, 2, 3):
        sim = Sim(10, seed, loss=0.01)
        sim.net.slow(sim.addr("b7"))  # 10 % of the branches read 0.5-2.5 s late
        await sim.join_all()
        await sim.run(60.0)
        assert sim.deaths() == [], seed
        assert sim.converged() or await sim.until(sim.converged, limit=10.0) >= 0
        sim.close()


async def test_a_healed_partition_converges() -> None:
    sim = Sim(10, seed=4)
    await sim.join_all()
    await sim.until(sim.converged, limit=JOIN_BOUND[10])
    left, right = sim.ids[:5], sim.ids[5:]
    sim.net.partition([sim.addr(i) for i in left], [sim.addr(i) for i in right])
    # each side finds the other dead
    await sim.until(
        lambda: (
            all(sim.nodes[o].state_of(m) is DE for o in left for m in right)
            and all(sim.nodes[o].state_of(m) is DE for o in right for m in left)
        ),
        limit=40.0,
    )
    sim.net.heal()
    # the reconnect (every push-pull interval) brings the views together
    took = await sim.until(sim.converged, limit=LAN.push_pull_interval + 10.0)
    print(f"partition healed: one view again after {took:.2f}s")
    assert took <= LAN.push_pull_interval + 10.0
    sim.close()


async def isolate_b0_briefly(seed: int) -> tuple[Sim, float]:
    sim = Sim(10, seed)
    await sim.join_all()
    await sim.until(sim.converged, limit=JOIN_BOUND[10])
    sim.net.partition([sim.addr("b0")], [sim.addr(i) for i in sim.ids[1:]])
    await sim.run(2.5)  # under the suspicion's minimum (4 s)
    sim.net.heal()
    # b0 suspected whom it probed during the cut, and its rumours were lost
    # with the cut; b0 keeps its own suspicion in its dissemination queue
    # while the member is suspect, so after the heal it reaches the suspect,
    # which refutes. Measured over seeds 1-15: one view again after
    # 0.2-1.1 s (median 0.5 s); before that re-arming, 17-23.5 s, and seeds
    # 4, 5, 6 and 8 declared the suspect dead.
    took = await sim.until(sim.converged, limit=LAN.suspicion_max_timeout_mult * 4.0 + 5.0)
    return sim, took


async def test_a_short_partition_heals() -> None:
    sim, took = await isolate_b0_briefly(seed=5)
    print(f"short partition healed: one view again after {took:.2f}s")
    sim.close()


async def test_a_short_partition_causes_no_death() -> None:
    sim, _ = await isolate_b0_briefly(seed=5)
    deaths = sim.deaths()
    sim.close()
    assert deaths == []


# keys ---------------------------------------------------------------------------------


async def test_a_branch_with_a_wrong_key_is_never_admitted() -> None:
    sim = Sim(3, seed=6)
    await sim.join_all()
    await sim.until(sim.converged, limit=2.0)
    stranger = sim.add("x1", Keyring.of(parse_key(generate_key())))
    # and one that claims the cluster key's id without knowing the key
    forged = ClusterKey(KEY.id, bytes(32))
    impostor = sim.add("x2", Keyring.of(forged))
    await stranger.start((sim.addr("b0"),))
    await impostor.start((sim.addr("b1"),))
    await sim.run(20.0)
    insiders = [sim.nodes[i] for i in sim.ids]
    for g in insiders:
        assert {v.id for v in g.members()} == set(sim.ids)
    for g in (stranger, impostor):
        assert [v.id for v in g.members()] == [g.id]  # it never learns a member
    assert sim.nodes["b0"].stats().dropped["unknown_key"] > 0
    assert sim.nodes["b1"].stats().dropped["bad_tag"] > 0
    assert stranger.stats().dropped["unknown_key"] == 0  # nobody answered it
    sim.close()


async def test_frames_without_any_key_are_dropped_by_a_keyed_cluster() -> None:
    sim = Sim(2, seed=7)
    await sim.join_all()
    plain = sim.add("p1", keyring=None)
    await plain.start((sim.addr("b0"),))
    await sim.run(5.0)
    assert [v.id for v in plain.members()] == ["p1"]
    dropped = sim.nodes["b0"].stats().dropped
    assert dropped["bad_version"] + dropped["too_short"] > 0
    sim.close()


async def test_a_failure_in_a_step_is_counted_and_the_service_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sim = Sim(3, seed=8)
    await sim.join_all()
    await sim.until(sim.converged, limit=2.0)
    g = sim.nodes["b0"]
    real = g._send
    calls = 0

    def flaky(addr: str, messages: list[Message]) -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise RuntimeError("boom")
        real(addr, messages)

    g._send = flaky  # type: ignore[method-assign]
    with caplog.at_level("ERROR"):
        await sim.run(5.0)
    g._send = real  # type: ignore[method-assign]
    await sim.run(5.0)
    assert sim.converged()
    assert sum("boom" in r.getMessage() for r in caplog.records) <= 1  # said once


# real UDP on the loopback -----------------------------------------------------------


async def test_three_branches_on_udp_find_each_other_and_see_one_closed_dead() -> None:
    scheduler = LoopScheduler(SystemClock())
    config = MembershipConfig.local()
    nodes = [
        Gossip(
            f"u{i}",
            None,
            1,
            lambda r: UdpTransport.open("127.0.0.1:0", r),
            scheduler,
            config,
            KEYRING,
            seed=i,
        )
        for i in range(3)
    ]

    async def poll(done: Callable[[], bool], timeout: float) -> float:
        t0 = time.monotonic()
        while not done():
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"not done within {timeout}s")
            await asyncio.sleep(0.02)
        return time.monotonic() - t0

    try:
        await nodes[0].start(())
        seed = nodes[0].address
        assert seed is not None and not seed.endswith(":0")
        for g in nodes[1:]:
            await g.start((seed,))
        ids = {g.id for g in nodes}
        await poll(lambda: all({v.id for v in g.members()} == ids for g in nodes), 5.0)
        nodes[2].close()
        # local profile: suspicion min 3 s (N = 3: no confirmation awaited)
        took = await poll(lambda: all(g.state_of("u2") is DE for g in nodes[:2]), 10.0)
        print(f"udp: u2 dead on both survivors {took:.2f}s after its close")
        assert all(g.stats().dropped["bad_tag"] == 0 for g in nodes)
    finally:
        for g in nodes:
            g.close()



# meta and push-pull by another way (HTTP in the daemon) ------------------------------


async def test_a_members_meta_reaches_every_branch_and_a_change_overrides_it() -> None:
    sim = Sim(10, seed=3)
    await sim.join_all()
    await sim.until(sim.converged, 5.0)
    sim.nodes["b4"].set_meta('{"load":1}')
    took = await sim.until(
        lambda: all(
            next(v.meta for v in sim.nodes[o].members() if v.id == "b4") == '{"load":1}'
            for o in sim.ids
        ),
        3.0,
    )
    print(f"a meta change reached 10 branches in {took:.2f}s (simulated)")
    sim.nodes["b4"].set_meta('{"load":2}')
    await sim.until(
        lambda: all(
            next(v.meta for v in sim.nodes[o].members() if v.id == "b4") == '{"load":2}'
            for o in sim.ids
        ),
        3.0,
    )
    with pytest.raises(ValueError, match="at most 512"):
        sim.nodes["b4"].set_meta("x" * 513)
    sim.close()


async def test_push_pull_by_another_way_joins_and_its_failure_is_survived() -> None:
    """Two services whose push-pulls go through a hook (the daemon's HTTP post),
    which calls the other's ``exchange``: a join by ``merge(exchange(own_view))``
    and the periodic push-pull both go that way, none in datagrams."""
    clock = FakeClock()
    scheduler = FakeScheduler(clock)
    net = MemoryNetwork(scheduler, seed=5)
    nodes: dict[str, Gossip] = {}
    carried: list[str] = []
    failing = {"on": False}

    def hook(addr: str, sync: Sync) -> asyncio.Future[Sync] | None:
        target = next(g for g in nodes.values() if g.address == addr)
        carried.append(addr)
        fut: asyncio.Future[Sync] = asyncio.get_running_loop().create_future()
        if failing["on"]:
            fut.set_exception(ConnectionRefusedError("refused"))
        else:
            fut.set_result(target.exchange(sync))
        return fut

    config = MembershipConfig.for_tests()
    for mid in ("a", "b"):
        addr = f"{mid}:8401"
        nodes[mid] = Gossip(
            mid,
            addr,
            1,
            lambda r, addr=addr: net.transport(addr, r),
            scheduler,
            config,
            KEYRING,
            push_pull=hook,
            meta=f"meta-{mid}",
        )
    a, b = nodes["a"], nodes["b"]
    await a.start()
    await b.start()
    a.merge(b.exchange(a.own_view()))  # the join: one HTTP round trip
    assert a.state_of("b") is AL and b.state_of("a") is AL
    assert {v.id: v.meta for v in a.members()} == {"a": "meta-a", "b": "meta-b"}
    await scheduler.advance(config.push_pull_interval + 1)
    assert carried, "the periodic push-pull went through the hook"
    failing["on"] = True
    before = len(carried)
    await scheduler.advance(config.push_pull_interval + 1)
    assert len(carried) > before
    assert a.state_of("b") is AL and a.stats().failures == 0
    a.close()
    b.close()
