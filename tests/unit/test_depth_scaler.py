"""The depth scaler as a scenario on the twins: a LocalBranch over a real Store,
the FakeLauncher, the stub remote control, the in-memory depth reader and a
fake clock that the test moves; ``scaler.step()`` is one poll."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from branchd.celery.depth import MemoryDepthReader
from branchd.celery.stub import StubNode, StubRemoteControl
from branchd.clock import FakeClock, FakeScheduler
from branchd.config import Config
from branchd.errors import BrokerUnavailable, NotFound
from branchd.events import EventBus
from branchd.local import LocalBranch, build
from branchd.process.fake import FakeLauncher
from branchd.store import Store

APP = "shop"
HOST = "testhost"
POLICY = {"on": "default", "per_worker": 20, "min": 1, "max": 12, "down_after": 60}


@dataclass
class Rig:
    m: LocalBranch
    stub: StubRemoteControl
    depth: MemoryDepthReader
    sched: FakeScheduler

    async def until(self, ok: Callable[[], bool]) -> None:
        real = time.monotonic() + 5
        while not ok():
            assert time.monotonic() < real, "condition not met"
            await self.sched.advance(0.01)

    async def worker(self, name: str, autoscale: tuple[int, int] = (1, 1)) -> StubNode:
        node = self.stub.add_node(f"{name}@{HOST}", queues=["default"], autoscale=autoscale)
        await self.m.instances.create_instance(
            APP,
            {
                "name": name,
                "kind": "celery",
                "queues": ["default"],
                "autoscale": {"min": autoscale[1], "max": autoscale[0]},
            },
        )
        spec = self.m.instances.specs(APP)[-1]
        await self.until(lambda: self.m.instances.running(spec.name))
        return node

    async def poll(self, seconds: float = 2.0) -> None:
        await self.sched.advance(seconds)
        await self.m.scaler.step()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    base = Config.for_tests(tmp_path)
    # the loop's own timer never comes due: the test polls with step()
    config = replace(base, celery=replace(base.celery, depth_poll_interval=1e9))
    store = Store(config.db_path)
    clock = FakeClock()
    sched = FakeScheduler(clock)
    stub, depth = StubRemoteControl(), MemoryDepthReader()
    m = build(
        store,
        FakeLauncher(),
        clock,
        config,
        store.branch_id(),
        scheduler=sched,
        remote=stub,
        bus=EventBus(),
        hostname=HOST,
        depth_reader=depth,
        ready=_NoCounts(),  # (the stall check's reads are not this test's)
    )
    await m.start()
    await m.apps.put_app(APP, {}, {}, {"celery_app": "tests.celery_app.tasks", "scale": POLICY})
    yield Rig(m, stub, depth, sched)
    await m.shutdown(keep=True)
    store.close()


class _NoCounts:
    """The stall check's ReadyCounter, knowing nothing (it then never acts)."""

    async def ready(self, app: object, queue: str) -> int | None:
        return None

    def close(self) -> None:
        pass


def _tasks(n: int) -> dict[str, object]:
    return {"ok": [{"id": str(i), "delivery_info": {"routing_key": "default"}} for i in range(n)]}


async def test_up_within_one_poll_down_after_the_window(rig: Rig) -> None:
    node = await rig.worker("w1")
    rig.depth.set("default", 2000)
    await rig.poll()
    assert node.autoscale == (12, 1)  # (max, min): up in this one poll
    assert rig.m.scaler.last[APP].target == 12
    # persisted: the next start (and the reconcile) keeps it
    spec = rig.m.instances.specs(APP)[0]
    assert spec.autoscale is not None and (spec.autoscale.min, spec.autoscale.max) == (1, 12)

    rig.depth.set("default", 0)
    await rig.poll()
    await rig.poll(50)
    assert node.autoscale == (12, 1)  # within the window: held
    await rig.poll(10)
    assert node.autoscale == (1, 1)


async def test_in_flight_holds_it_up_and_is_in_the_depth(rig: Rig) -> None:
    node = await rig.worker("w1", (4, 4))
    rig.stub.script(node.name, "active", _tasks(3))
    rig.stub.script(node.name, "reserved", _tasks(5))
    got = await rig.m.depth.queue_depth(APP, "default")
    assert (got["ready"], got["in_flight"], got["running"], got["consumers"]) == (0, 8, 3, 1)
    await rig.poll()
    # 8 in flight / 20 -> 1 process, but 3 tasks run: never below them
    assert rig.m.scaler.last[APP].target == 3
    assert node.autoscale == (4, 4)  # (no shrink while 5 wait: see the test below)
    rig.stub.script(node.name, "reserved", {"ok": []})
    await rig.poll()
    assert node.autoscale == (3, 1)


async def test_split_over_the_branchs_workers(rig: Rig) -> None:
    a = await rig.worker("w1")
    b = await rig.worker("w2")
    rig.depth.set("default", 100)  # 100 / 20 = 5 processes: 3 + 2
    await rig.poll()
    assert (a.autoscale, b.autoscale) == ((3, 1), (2, 0))


async def test_a_broker_down_changes_nothing(rig: Rig) -> None:
    node = await rig.worker("w1")
    rig.depth.set("default", 400)
    await rig.poll()
    assert node.autoscale == (12, 1)
    rig.depth.down = True
    await rig.poll(120)
    assert node.autoscale == (12, 1)
    with pytest.raises(BrokerUnavailable):
        await rig.m.depth.queue_depth(APP, "default")


async def test_no_policy_no_scaling_and_unknown_queue(rig: Rig) -> None:
    await rig.m.apps.patch_app(APP, {"scale": None})
    node = await rig.worker("w1")
    rig.depth.set("default", 2000)
    reads = rig.depth.reads
    await rig.poll()
    assert node.autoscale == (1, 1) and rig.depth.reads == reads
    with pytest.raises(NotFound):
        await rig.m.depth.queue_depth(APP, "nope")
    assert [d["queue"] for d in await rig.m.depth.app_depth(APP)] == ["default"]


async def test_celerys_default_queue_is_read_and_listed_when_it_holds_messages(
    rig: Rig,
) -> None:
    """Issue 16's trial: ``delay()`` with no queue sends to 'celery', which
    no worker of the app consumed: its depth was a 404 and out of the list."""
    await rig.m.apps.patch_app(APP, {"scale": None})
    await rig.worker("w1")  # (consumes 'default' only)
    assert [d["queue"] for d in await rig.m.depth.app_depth(APP)] == ["default"]
    rig.depth.set("celery", 7)
    got = await rig.m.depth.queue_depth(APP, "celery")
    assert (got["queue"], got["ready"], got["consumers"]) == ("celery", 7, 0)
    listed = {d["queue"]: d["ready"] for d in await rig.m.depth.app_depth(APP)}
    assert listed == {"celery": 7, "default": 0}


async def test_no_shrink_while_the_worker_holds_reserved_tasks(rig: Rig) -> None:
    """A process being handed a reserved task looks idle to billiard's shrink:
    the max comes down only at a poll where every task held is running."""
    node = await rig.worker("w1")
    rig.depth.set("default", 400)
    await rig.poll()
    assert node.autoscale == (12, 1)
    rig.depth.set("default", 0)
    rig.stub.script(node.name, "active", _tasks(2))
    rig.stub.script(node.name, "reserved", _tasks(3))
    await rig.poll(61)  # the window is over: the target is 2 (the two running) ...
    assert rig.m.scaler.last[APP].target == 2
    assert node.autoscale == (12, 1)  # ... but 3 wait to be handed to a process
    rig.stub.script(node.name, "reserved", {"ok": []})
    await rig.poll()
    assert node.autoscale == (2, 1)


async def test_no_second_shrink_while_a_shrunk_process_is_still_exiting(rig: Rig) -> None:
    """billiard lists a terminated process until it is reaped, and a shrink
    meanwhile may pick it again (counted twice: the pool keeps a process more
    than it counts, for good). The max comes down again only once the pool's
    list and its count agree."""
    node = await rig.worker("w1")
    pool = {"listed": 1, "counted": 1}

    def stats(_: object) -> dict[str, object]:
        high, low = node.autoscale or (1, 1)
        scaler = {"max": high, "min": low, "current": pool["counted"]}
        return {"pool": {"processes": list(range(pool["listed"]))}, "autoscaler": scaler}

    rig.stub.script(node.name, "stats", stats)
    rig.depth.set("default", 400)
    await rig.poll()
    assert node.autoscale == (12, 1)
    pool.update(listed=12, counted=12)
    rig.depth.set("default", 0)
    rig.stub.script(node.name, "active", _tasks(3))
    await rig.poll(61)  # the window is over; three tasks run: down to 3
    assert node.autoscale == (3, 1)
    pool.update(counted=3)  # nine are terminated, still exiting (listed)
    rig.stub.script(node.name, "active", {"ok": []})
    sent = rig.stub.commands(node.name).count("autoscale")
    await rig.poll()
    assert rig.m.scaler.last[APP].target == 1
    assert node.autoscale == (3, 1) and rig.stub.commands(node.name).count("autoscale") == sent
    pool.update(listed=3)  # reaped
    await rig.poll()
    assert node.autoscale == (1, 1)


async def test_the_depths_read_are_in_the_metrics(rig: Rig) -> None:
    from prometheus_client.core import GaugeMetricFamily

    from branchd.api.metrics import _depths

    await rig.worker("w1")
    rig.depth.set("default", 400, consumers=1)
    await rig.poll()
    known = rig.m.scaler.known_depths()
    assert known[(APP, "default")]["ready"] == 400
    samples = {
        (f.name, s.labels["queue"]): s.value
        for f in _depths(known, GaugeMetricFamily)
        for s in f.samples
    }
    assert samples[("branchd_queue_ready", "default")] == 400
    assert samples[("branchd_queue_consumers", "default")] == 1


async def test_a_worker_that_does_not_answer_is_a_lower_bound_and_never_lowers(rig: Rig) -> None:
    node = await rig.worker("w1")
    rig.depth.set("default", 200)  # 200 / 20 -> 10
    await rig.poll()
    assert node.autoscale == (10, 1)
    rig.depth.set("default", 0)
    rig.stub.script(node.name, "active", None)  # busy: no reply in time
    got = await rig.m.depth.queue_depth(APP, "default")
    assert (got["in_flight"], got["unanswered"]) == (0, 1)  # 0 held is not known
    await rig.poll(120)  # past the window: a known 0 would bring it down
    assert node.autoscale == (10, 1)
    rig.stub.script(node.name, "active", {"ok": []})
    got = await rig.m.depth.queue_depth(APP, "default")
    assert "unanswered" not in got
    await rig.poll(120)
    assert node.autoscale == (1, 1)
