"""The transport scenarios, run over real UDP on 127.0.0.1 and over the
in-memory network on a fake clock; then what only the memory network does
(loss, reordering, partitions, slow readers).

Each scenario is written once against a ``Side``: it makes transports that
record what they receive and waits for a condition, polling real time with a
deadline (UDP) or stepping the fake scheduler (memory). Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from branchd.clock import FakeClock, FakeScheduler
from branchd.cluster.codec import DATAGRAM_BUDGET, pack, unpack
from branchd.cluster.memnet import MemoryNetwork
from branchd.cluster.messages import Ack, Ping
from branchd.cluster.transport import Transport, UdpTransport, split_addr

Inbox = list[tuple[str, bytes]]


@dataclass
class Side:
    kind: str
    network: MemoryNetwork | None = None
    scheduler: FakeScheduler | None = None
    made: list[Transport] = field(default_factory=list)

    async def make(self, refused: list[str] | None = None) -> tuple[Transport, Inbox]:
        """A transport and its inbox; the addresses it is told were refused
        go to ``refused``, when given."""
        inbox: Inbox = []
        told = refused.append if refused is not None else None

        def receive(addr: str, data: bytes) -> None:
            inbox.append((addr, data))

        transport: Transport
        if self.network is None:
            transport = await UdpTransport.open("127.0.0.1:0", receive, refusal=told)
        else:
            transport = self.network.transport(f"b{len(self.made)}:8401", receive, told)
        self.made.append(transport)
        return transport, inbox

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        if self.scheduler is None:
            deadline = time.monotonic() + timeout
            while not predicate():
                if time.monotonic() > deadline:
                    raise AssertionError(f"condition not met within {timeout}s")
                await asyncio.sleep(0.005)
            return
        deadline = self.scheduler.clock.monotonic() + timeout
        while not predicate():
            if self.scheduler.clock.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s (fake)")
            await self.scheduler.advance(0.05)

    async def settle(self, seconds: float = 0.3) -> None:
        """Let whatever is in flight arrive (to check that something did not)."""
        if self.scheduler is None:
            # loopback hands a datagram over at once: a marker sent to itself
            # after them, once arrived, shows the loop has read what came before
            marker, inbox = await self.make()
            marker.send(marker.address, b"marker")
            await self.until(lambda: bool(inbox))
        else:
            await self.scheduler.advance(seconds)


@pytest.fixture(params=["udp", "memory"])
async def side(request: pytest.FixtureRequest) -> AsyncIterator[Side]:
    if request.param == "udp":
        s = Side("udp")
    else:
        scheduler = FakeScheduler(FakeClock())
        s = Side("memory", MemoryNetwork(scheduler, seed=1, delay=(0.001, 0.01)), scheduler)
    yield s
    for t in s.made:
        t.close()


PING = Ping("b0", "b0:8401", 1, "b1")


# both transports ------------------------------------------------------------------


async def test_a_datagram_arrives_with_its_sender(side: Side) -> None:
    a, _ = await side.make()
    b, inbox = await side.make()
    [datagram] = pack([PING])
    a.send(b.address, datagram)
    await side.until(lambda: len(inbox) == 1)
    assert inbox == [(a.address, datagram)] and unpack(inbox[0][1]) == [PING]
    b.send(a.address, pack([Ack("b1", b.address, 1)])[0])  # and back
    assert a.stats().sent == 1 and b.stats().received == 1


async def test_many_datagrams_both_ways(side: Side) -> None:
    a, in_a = await side.make()
    b, in_b = await side.make()
    for i in range(50):
        a.send(b.address, b"a%d" % i)
        b.send(a.address, b"b%d" % i)
    await side.until(lambda: len(in_a) == len(in_b) == 50)
    assert {d for _, d in in_b} == {b"a%d" % i for i in range(50)}


async def test_the_address_is_a_real_one(side: Side) -> None:
    a, _ = await side.make()
    host, port = split_addr(a.address)
    if side.kind == "udp":
        assert host == "127.0.0.1" and port != 0
    b, _ = await side.make()
    assert a.address != b.address


async def test_a_datagram_over_the_budget_is_dropped_and_counted(side: Side) -> None:
    a, _ = await side.make()
    b, inbox = await side.make()
    a.send(b.address, b"x" * (DATAGRAM_BUDGET + 1))
    a.send(b.address, b"y" * DATAGRAM_BUDGET)  # the budget itself goes
    await side.until(lambda: len(inbox) == 1)
    await side.settle()
    assert [d[:1] for _, d in inbox] == [b"y"]
    assert (a.stats().oversize, a.stats().sent) == (1, 1)


async def test_a_closed_transport_neither_sends_nor_receives(side: Side) -> None:
    a, in_a = await side.make()
    b, in_b = await side.make()
    b.close()
    b.close()  # twice is fine
    a.send(b.address, b"to a closed one")
    b.send(a.address, b"from a closed one")  # no exception: dropped and counted
    await side.settle()
    assert in_a == [] and in_b == []
    assert b.stats().closed == 1 and b.stats().sent == 0
    assert split_addr(b.address)  # still says where it was


async def test_a_send_to_nowhere_never_raises(side: Side) -> None:
    a, _ = await side.make()
    b, inbox = await side.make()
    for addr in ("127.0.0.1:9", "not-an-address", "name.invalid:8401", "[::1]:9"):
        a.send(addr, b"lost")
    a.send(b.address, b"still works")
    await side.until(lambda: len(inbox) == 1)


async def test_a_datagram_to_a_port_nobody_holds_is_refused_and_told(side: Side) -> None:
    refused: list[str] = []
    a, _ = await side.make(refused)
    gone, _ = await side.make()
    b, inbox = await side.make()
    gone.close()  # its port now free (once the loop has closed the socket)
    await side.settle()
    a.send(gone.address, b"to nobody")
    await side.until(lambda: refused == [gone.address])
    assert a.stats().refused == 1
    a.send(b.address, b"still works")  # and nothing is refused of a live one
    await side.until(lambda: len(inbox) == 1)
    await side.settle()
    assert refused == [gone.address] and a.stats().send_errors == 0


# UDP only -------------------------------------------------------------------------


async def test_udp_send_errors_are_counted_and_logged_once_per_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = await UdpTransport.open("127.0.0.1:0", lambda addr, data: None)
    try:
        with caplog.at_level(logging.WARNING, "branchd.cluster.transport"):
            for _ in range(3):
                a.send("255.255.255.255:9", b"broadcast, not allowed")  # EACCES
                a.send("name.invalid:9", b"a name")
        assert a.stats().send_errors == 6
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
    finally:
        a.close()


async def test_udp_a_refusal_does_not_cost_the_next_datagram_to_another() -> None:
    # With IP_RECVERR, the error an ICMP message leaves pending fails the next
    # sendto, to any address: that datagram must still go (sent again).
    refused: list[str] = []
    inbox: Inbox = []
    live = await UdpTransport.open("127.0.0.1:0", lambda addr, data: inbox.append((addr, data)))
    a = await UdpTransport.open("127.0.0.1:0", lambda addr, data: None, refusal=refused.append)
    gone = await UdpTransport.open("127.0.0.1:0", lambda addr, data: None)
    gone.close()
    side = Side("udp")
    try:
        await side.settle()  # (its socket closed by the loop)
        for i in range(50):
            a.send(gone.address, b"to nobody")
            a.send(live.address, b"%d" % i)
            await side.settle()
        await side.until(lambda: len(inbox) == 50)
        assert sorted(int(d) for _, d in inbox) == list(range(50))
        assert a.stats().send_errors == 0 and a.stats().refused > 0
        assert set(refused) == {gone.address}
    finally:
        for t in (a, live, *side.made):
            t.close()


async def test_udp_a_refusal_that_quotes_no_datagram_sent_there_is_not_believed() -> None:
    refused: list[str] = []
    a = await UdpTransport.open("127.0.0.1:0", lambda addr, data: None, refusal=refused.append)
    gone = await UdpTransport.open("127.0.0.1:0", lambda addr, data: None)
    gone.close()
    side = Side("udp")
    try:
        await side.settle()
        a.send(gone.address, b"to nobody")
        a._recent.clear()  # as if that datagram was never ours: a forged ICMP message
        await side.until(lambda: a.stats().send_errors == 1)
        assert refused == [] and a.stats().refused == 0
    finally:
        a.close()
        for t in side.made:
            t.close()


async def test_udp_drops_an_arriving_datagram_over_the_budget() -> None:
    inbox: Inbox = []
    b = await UdpTransport.open("127.0.0.1:0", lambda addr, data: inbox.append((addr, data)))
    a = await UdpTransport.open("127.0.0.1:0", lambda addr, data: None, budget=4000)
    try:
        a.send(b.address, b"z" * 2000)
        a.send(b.address, b"small")
        deadline = time.monotonic() + 5
        while not inbox and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert [d for _, d in inbox] == [b"small"] and b.stats().oversize == 1
    finally:
        a.close()
        b.close()


async def test_udp_a_receiver_that_fails_does_not_stop_the_transport() -> None:
    got: list[bytes] = []

    def receive(addr: str, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("receiver bug")
        got.append(data)

    b = await UdpTransport.open("127.0.0.1:0", receive)
    a = await UdpTransport.open("127.0.0.1:0", lambda addr, data: None)
    try:
        a.send(b.address, b"boom")
        a.send(b.address, b"after")
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert got == [b"after"]
    finally:
        a.close()
        b.close()


# the memory network only ----------------------------------------------------------


@pytest.fixture
def scheduler() -> FakeScheduler:
    return FakeScheduler(FakeClock())


def _node(net: MemoryNetwork, addr: str) -> tuple[Transport, Inbox]:
    inbox: Inbox = []
    return net.transport(addr, lambda a, d: inbox.append((a, d))), inbox


async def test_a_silenced_host_refuses_nothing_until_a_transport_is_made_there(
    scheduler: FakeScheduler,
) -> None:
    net = MemoryNetwork(scheduler, seed=3)
    refused: list[str] = []
    a = net.transport("a:1", lambda addr, data: None, refused.append)
    _, inbox = _node(net, "b:1")
    net.silence("b:1")  # its transport closes with its host
    a.send("b:1", b"into the void")
    await scheduler.advance(0.1)
    assert refused == [] and inbox == [] and net.stats().nowhere == 1
    b2, inbox2 = _node(net, "b:1")  # the host is back, its branch with it
    a.send("b:1", b"hello again")
    await scheduler.advance(0.1)
    assert [d for _, d in inbox2] == [b"hello again"]
    b2.close()
    a.send("b:1", b"refused now")
    await scheduler.advance(0.1)
    assert refused == ["b:1"] and net.stats().refused == 1


@pytest.mark.parametrize("loss", [0.0, 0.01, 0.1, 0.5])
async def test_the_loss_rate_is_the_one_asked(scheduler: FakeScheduler, loss: float) -> None:
    net = MemoryNetwork(scheduler, seed=7, loss=loss)
    a, _ = _node(net, "a:1")
    b, inbox = _node(net, "b:1")
    for i in range(10_000):
        a.send(b.address, b"%d" % i)
    await scheduler.advance(0.1)
    assert abs(len(inbox) / 10_000 - (1 - loss)) < 0.02
    assert net.stats().lost + net.stats().delivered == 10_000


async def test_a_run_is_a_function_of_its_seed(scheduler: FakeScheduler) -> None:
    async def run(seed: int) -> list[bytes]:
        net = MemoryNetwork(scheduler, seed=seed, loss=0.2, delay=(0.0, 0.5))
        a, _ = _node(net, "a:1")
        b, inbox = _node(net, "b:1")
        for i in range(100):
            a.send(b.address, b"%d" % i)
        await scheduler.advance(1.0)
        return [d for _, d in inbox]

    assert await run(3) == await run(3) != await run(4)


async def test_delay_spread_reorders_and_equal_delays_keep_the_order(
    scheduler: FakeScheduler,
) -> None:
    for delay, ordered in (((0.01, 0.01), True), ((0.0, 0.2), False)):
        net = MemoryNetwork(scheduler, seed=2, delay=delay)
        a, _ = _node(net, f"a{delay}:1")
        b, inbox = _node(net, f"b{delay}:1")
        sent = [b"%d" % i for i in range(50)]
        for d in sent:
            a.send(b.address, d)
        await scheduler.advance(delay[0] / 2)
        assert inbox == []  # nothing before the least delay (0: at the next step)
        await scheduler.advance(delay[1])
        got = [d for _, d in inbox]
        assert sorted(got) == sorted(sent) and (got == sent) is ordered


async def test_a_partition_cuts_both_ways_until_healed(scheduler: FakeScheduler) -> None:
    net = MemoryNetwork(scheduler, delay=(0.01, 0.01))
    nodes = {n: _node(net, f"{n}:1") for n in "abcd"}
    net.partition({"a:1", "b:1"}, {"c:1", "d:1"})

    def everyone_sends() -> None:
        for n, (t, _) in nodes.items():
            for m in "abcd":
                if m != n:
                    t.send(f"{m}:1", n.encode())

    everyone_sends()
    await scheduler.advance(1.0)
    heard = {n: sorted(d.decode() for _, d in inbox) for n, (_, inbox) in nodes.items()}
    assert heard == {"a": ["b"], "b": ["a"], "c": ["d"], "d": ["c"]}
    assert net.stats().cut == 8

    # in flight when the cut is made: lost too
    nodes["a"][0].send("c:1", b"late")
    net.partition({"a:1"}, {"c:1"})
    await scheduler.advance(1.0)
    assert all(d != b"late" for _, d in nodes["c"][1])

    net.heal()
    for _, inbox in nodes.values():
        inbox.clear()
    everyone_sends()
    await scheduler.advance(1.0)
    assert all(len(inbox) == 3 for _, inbox in nodes.values())


async def test_a_slow_reader_gets_its_datagrams_half_a_second_to_2_5_s_late(
    scheduler: FakeScheduler,
) -> None:
    net = MemoryNetwork(scheduler, seed=5, delay=(0.001, 0.001))
    a, in_a = _node(net, "a:1")
    slow, in_slow = _node(net, "slow:1")
    arrived: list[float] = []
    t0 = scheduler.clock.monotonic()
    for i in range(200):
        a.send(slow.address, b"%d" % i)
    slow.send(a.address, b"its own sends are not late")
    net.slow("slow:1")
    for i in range(200):
        a.send(slow.address, b"late %d" % i)
    await scheduler.advance(0.01)
    assert len(in_a) == 1 and len(in_slow) == 200  # sent before it was slow: on time
    while len(in_slow) < 400:
        before = len(in_slow)
        await scheduler.advance(0.01)
        arrived += [scheduler.clock.monotonic() - t0] * (len(in_slow) - before)
    assert min(arrived) >= 0.5 and max(arrived) <= 2.5 + 0.02
    assert max(arrived) - min(arrived) > 1.5  # spread over the window
    net.slow("slow:1", False)
    a.send(slow.address, b"on time again")
    await scheduler.advance(0.01)
    assert in_slow[-1][1] == b"on time again"


async def test_a_closed_member_gets_nothing_and_its_address_is_free_again(
    scheduler: FakeScheduler,
) -> None:
    net = MemoryNetwork(scheduler, delay=(0.1, 0.1))
    a, _ = _node(net, "a:1")
    b, inbox = _node(net, "b:1")
    a.send("b:1", b"in flight")
    b.close()
    await scheduler.advance(0.2)
    assert inbox == [] and net.stats().nowhere == 1
    with pytest.raises(ValueError, match="taken"):
        _node(net, "a:1")
    _, again = _node(net, "b:1")  # a restart at the same address
    a.send("b:1", b"hello again")
    await scheduler.advance(0.2)
    assert [d for _, d in again] == [b"hello again"]
