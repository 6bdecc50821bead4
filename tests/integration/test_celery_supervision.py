"""Supervision of Celery workers, fast and without Celery: the LocalBranch on a real
Store, the in-memory ``FakeLauncher`` for processes and ``StubRemoteControl``
for the workers' remote control.

A stub node named ``<instance>@testhost`` plays the worker: it answers pings
while ``alive``, keeps its queue list and autoscaler, and the stub logs every
request in ``.sent``. Tests wait for states with deadlines, never with fixed
sleeps; only "nothing happens for a while" checks let a bounded time pass.

Every test runs twice (the ``time`` fixture's params, as dramatiq runs its
suite over the stub and the real brokers): on a ``FakeClock`` whose
``FakeScheduler`` the rig steps while it waits (no real waiting at all), and
on the real clock with small real intervals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from branchd.celery.broker import BrokerSpec
from branchd.celery.ready import ReadyCounter
from branchd.celery.remote import KombuRemoteControl
from branchd.celery.stub import Sent, StubNode, StubRemoteControl
from branchd.clock import (
    Clock,
    FakeClock,
    FakeScheduler,
    LoopScheduler,
    Scheduler,
    SystemClock,
)
from branchd.config import Config
from branchd.errors import Invalid, RestartRequired
from branchd.events import EventBus
from branchd.local import LocalBranch, build
from branchd.model import Action, App, Autoscale, State, StopStep, TaskLimits
from branchd.process.fake import FakeLauncher
from branchd.process.groups import Outcome
from branchd.process.launcher import Launched, LaunchSpec, ProcessLauncher
from branchd.store import Store
from branchd.views import InstanceView, TreeStats

APP = "shop"
HOST = "testhost"
CELERY_APP = "tests.celery_app.tasks"
DEADLINE = 5.0
HUNG_AFTER = 0.3

T = TypeVar("T")


# Doubles that also write one shared timeline (to check the order of a stop) ----------


class TimelineFake(FakeLauncher):
    def __init__(self, timeline: list[str]) -> None:
        super().__init__()
        self.timeline = timeline

    def signal(self, pid: int, sig: int, group: bool) -> None:
        self.timeline.append(f"signal {pid} {signal.Signals(sig).name} group={group}")
        super().signal(pid, sig, group)


class TimelineStub(StubRemoteControl):
    """The stub, plus one-way sends that can be made slow (a sluggish broker)."""

    def __init__(self, timeline: list[str], scheduler: Scheduler) -> None:
        super().__init__()
        self.timeline = timeline
        self._sched = scheduler
        #: command -> seconds a cast of it takes before it is delivered.
        self.cast_delay: dict[str, float] = {}

    async def cast(
        self,
        broker: BrokerSpec,
        node: str,
        command: str,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        self.timeline.append(f"casting {command}")
        await self._sched.sleep(self.cast_delay.get(command, 0.0))
        await super().cast(broker, node, command, arguments)
        self.timeline.append(f"cast {command}")


# Time: real, or fake and stepped by the waits --------------------------------------


class RealTime:
    """The system clock: waits poll every 10 ms of real time."""

    def __init__(self) -> None:
        self.clock: Clock = SystemClock()
        self.scheduler: Scheduler = LoopScheduler(self.clock)

    def now(self) -> float:
        return self.clock.monotonic()

    async def tick(self) -> None:
        await asyncio.sleep(0.01)

    async def pass_time(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class SteppedTime:
    """A fake clock: each wait's poll moves it 10 ms, firing what is due."""

    def __init__(self) -> None:
        self.fake = FakeScheduler(FakeClock())
        self.clock: Clock = self.fake.clock
        self.scheduler: Scheduler = self.fake

    def now(self) -> float:
        return self.clock.monotonic()

    async def tick(self) -> None:
        await self.fake.advance(0.01)

    async def pass_time(self, seconds: float) -> None:
        await self.fake.advance(seconds)


Time = RealTime | SteppedTime


@pytest.fixture(params=["fake_clock", "real_clock"])
def time_of(request: pytest.FixtureRequest) -> Time:
    return SteppedTime() if request.param == "fake_clock" else RealTime()


# The rig ------------------------------------------------------------------------


class Waits:
    """Waits on a LocalBranch ``m`` that move ``time`` while they poll."""

    m: LocalBranch
    time: Time

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
        """Until ``predicate`` holds, within ``timeout`` seconds of the rig's clock
        (and of real time: a fake clock that cannot bring it about fails as fast)."""
        deadline = self.time.now() + timeout
        real_deadline = time.monotonic() + timeout
        while not predicate():
            if self.time.now() > deadline or time.monotonic() > real_deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            await self.time.tick()

    async def wait_for_async(
        self, read: Callable[[], Awaitable[object]], want: object, timeout: float = DEADLINE
    ) -> None:
        """Until ``await read()`` equals ``want`` (a value asked of a worker)."""
        deadline = self.time.now() + timeout
        real_deadline = time.monotonic() + timeout
        while (got := await read()) != want:
            if self.time.now() > deadline or time.monotonic() > real_deadline:
                raise AssertionError(f"wanted {want!r} within {timeout}s; last read {got!r}")
            await self.time.tick()

    async def finish(self, work: Awaitable[T]) -> T:
        """Await ``work`` while the rig's clock runs (a stop may wait on a timer)."""
        task = asyncio.ensure_future(work)
        await self.wait_for(task.done)
        return await task

    async def view(self, name: str) -> InstanceView:
        return await self.m.instances.get_instance(APP, name)

    async def wait_view(
        self, name: str, predicate: Callable[[InstanceView], bool], timeout: float = DEADLINE
    ) -> InstanceView:
        deadline = self.time.now() + timeout
        real_deadline = time.monotonic() + timeout
        while True:
            view = await self.view(name)
            if predicate(view):
                return view
            if self.time.now() > deadline or time.monotonic() > real_deadline:
                raise AssertionError(f"{name} never got there; last seen: {view.runtime}")
            await self.time.tick()

    async def wait_state(self, name: str, state: State, timeout: float = DEADLINE) -> InstanceView:
        return await self.wait_view(name, lambda v: v.runtime.state == state, timeout)


@dataclass
class Rig(Waits):
    m: LocalBranch
    fake: TimelineFake
    stub: TimelineStub
    store: Store
    timeline: list[str]
    time: Time

    async def add(self, name: str, **fields: Any) -> InstanceView:
        body = {"name": name, "kind": "celery", "hung_after": HUNG_AFTER, **fields}
        return await self.m.instances.create_instance(APP, body)

    def node(self, name: str, **kw: Any) -> StubNode:
        """The worker of instance ``name`` starts answering."""
        return self.stub.add_node(f"{name}@{HOST}", **kw)

    def sent(self, command: str, since: int = 0, *, one_way: bool | None = None) -> list[Sent]:
        return [
            s
            for s in self.stub.sent[since:]
            if s.command == command and (one_way is None or s.one_way == one_way)
        ]

    async def running(self, name: str, queues: list[str], **fields: Any) -> tuple[StubNode, int]:
        """An instance whose worker answered and was brought in line; its node and pid."""
        node = self.node(name, queues=list(queues), autoscale=(4, 1))
        await self.add(name, queues=queues, autoscale={"min": 1, "max": 4}, **fields)
        view = await self.wait_state(name, State.RUNNING)
        await self.wait_for(lambda: bool(self.sent("active_queues")))
        return node, pid_of(view)


def pid_of(view: InstanceView) -> int:
    assert view.runtime.pid is not None, view.runtime
    return view.runtime.pid


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path, time_of: Time) -> AsyncIterator[MakeRig]:
    """``await make_rig(**config_overrides)``: a started LocalBranch and app ``shop``."""
    opened: list[tuple[LocalBranch, Store]] = []

    async def create(ready: ReadyCounter | None = None, **overrides: Any) -> Rig:
        base = Config.for_tests(tmp_path)
        celery = replace(
            base.celery, **{"health_interval": 0.05, "reconcile_interval": 0.5, **overrides}
        )
        config = replace(base, celery=celery)
        store = Store(config.db_path)
        timeline: list[str] = []
        fake, stub = TimelineFake(timeline), TimelineStub(timeline, time_of.scheduler)
        m = build(
            store,
            fake,
            time_of.clock,
            config,
            store.branch_id(),
            scheduler=time_of.scheduler,
            remote=stub,
            bus=EventBus(),
            hostname=HOST,
            ready=ready,
        )
        opened.append((m, store))
        await m.start()
        await m.apps.put_app(APP, {}, {}, {"celery_app": CELERY_APP})
        return Rig(m, fake, stub, store, timeline, time_of)

    yield create
    for m, store in opened:
        await m.shutdown(keep=True)
        await asyncio.sleep(0)  # let the cancelled log rotator finish
        store.close()


@pytest.fixture
async def rig(make_rig: MakeRig) -> Rig:
    return await make_rig()


# Readiness and reconcile ------------------------------------------------------------


async def test_starting_until_the_node_answers_then_reconciled(rig: Rig) -> None:
    view = await rig.add("w1", queues=["default", "high"], autoscale={"min": 1, "max": 4})
    pid = pid_of(view)
    assert view.runtime.state == State.STARTING
    assert view.node == f"w1@{HOST}"

    # Nobody answers: it keeps pinging its node and stays starting.
    await rig.wait_for(lambda: len(rig.sent("ping")) >= 3)
    assert {s.node for s in rig.sent("ping")} == {f"w1@{HOST}"}
    assert (await rig.view("w1")).runtime.state == State.STARTING

    # The worker comes up consuming only part of its queues, and a foreign one.
    node = rig.node("w1", queues=["default", "celery"], autoscale=(2, 1))
    began = rig.time.now()
    view = await rig.wait_state("w1", State.RUNNING)
    assert rig.time.now() - began < 1.0
    assert (view.runtime.pid, view.runtime.restarts, view.runtime.reason) == (pid, 0, None)

    await rig.wait_for(lambda: node.queues == ["default", "high"] and node.autoscale == (4, 1))
    assert [s.arguments for s in rig.sent("add_consumer")] == [{"queue": "high"}]
    assert [s.arguments for s in rig.sent("cancel_consumer")] == [{"queue": "celery"}]
    assert [s.arguments for s in rig.sent("autoscale")] == [{"max": 4, "min": 1}]
    assert rig.fake.signals == []


async def test_custom_binding_is_given_at_start(rig: Rig) -> None:
    binding = {"exchange": "media", "exchange_type": "topic", "routing_key": "image.#"}
    await rig.m.apps.put_queue(APP, "images", binding)
    view = await rig.add("w1", queues=["default", "images"], autostart=False)
    command = view.to_json()["command"]
    assert command[command.index("-Q") + 1] == "default,images"  # the shown argv is the real one

    rig.node("w1", queues=["default", "images"])
    await rig.m.instances.start_instance(APP, "w1")
    await rig.wait_state("w1", State.RUNNING)
    spawned = rig.fake.spawned[0]
    assert list(spawned.argv) == (await rig.view("w1")).to_json()["command"]
    # the declared binding rides to the worker's task_queues through the loader
    assert json.loads(spawned.env["BRANCHD_TASK_QUEUES"]) == {"images": binding}
    assert spawned.env["CELERY_LOADER"] == "branchd_worker_loader:Loader"
    # (that a real worker then consumes it with the declared binding from its
    # start is test_celery_instances' images_bound, on each broker)


async def test_a_worker_on_any_broker_gets_the_loader_though_it_has_nothing_to_hand_over(
    rig: Rig,
) -> None:
    """Its rate limits keep their rate under a backlog only with the loader's
    one timer per bucket (worker_loader): a limit sent later by remote
    control needs it as much as one given at the start."""
    await rig.m.apps.put_app(APP, {}, {}, {"celery_app": CELERY_APP, "broker": REDIS_ANY})
    rig.node("w1", queues=["default"])
    await rig.add("w1", queues=["default"])
    await rig.wait_state("w1", State.RUNNING)
    env = rig.fake.spawned[0].env
    assert "BRANCHD_TASK_ANNOTATIONS" not in env and "BRANCHD_TASK_QUEUES" not in env
    assert env["CELERY_LOADER"] == "branchd_worker_loader:Loader"
    assert env["PYTHONPATH"].split(os.pathsep)[-1].endswith("hook")


# Consumers and autoscale at runtime ---------------------------------------------------


async def test_consumers_of_a_running_worker_are_persisted_sent_and_confirmed(rig: Rig) -> None:
    node, _ = await rig.running("w1", ["default"])
    since = len(rig.stub.sent)

    items = await rig.m.celery.add_consumer(APP, "w1", "extra")
    assert items == [
        {"name": "default", "wanted": True, "declared": False, "live": True},
        {"name": "extra", "wanted": True, "declared": False, "live": True},
    ]
    stored = rig.store.get_instance("w1")
    assert stored is not None and stored.queues == ("default", "extra")
    assert {"queue": "extra"} in [s.arguments for s in rig.sent("add_consumer", since)]
    assert node.queues == ["default", "extra"]

    since = len(rig.stub.sent)
    items = await rig.m.celery.remove_consumer(APP, "w1", "default")
    assert items == [{"name": "extra", "wanted": True, "declared": False, "live": True}]
    stored = rig.store.get_instance("w1")
    assert stored is not None and stored.queues == ("extra",)
    assert {"queue": "default"} in [s.arguments for s in rig.sent("cancel_consumer", since)]
    assert node.queues == ["extra"]


async def test_consumers_of_a_stopped_worker_are_only_persisted(rig: Rig) -> None:
    await rig.add("w1", queues=["default"], autostart=False)

    items = await rig.m.celery.add_consumer(APP, "w1", "extra")
    assert [(i["name"], i["live"]) for i in items] == [("default", None), ("extra", None)]
    items = await rig.m.celery.remove_consumer(APP, "w1", "default")
    assert [(i["name"], i["live"]) for i in items] == [("extra", None)]

    stored = rig.store.get_instance("w1")
    assert stored is not None and stored.queues == ("extra",)
    assert rig.stub.sent == []
    assert (await rig.view("w1")).runtime.state == State.STOPPED


async def test_set_autoscale_checks_the_range_then_sends_and_confirms(rig: Rig) -> None:
    node, _ = await rig.running("w1", ["default"])
    since = len(rig.stub.sent)

    with pytest.raises(Invalid):
        await rig.m.celery.set_autoscale(APP, "w1", 5, 2)
    stored = rig.store.get_instance("w1")
    assert stored is not None and stored.autoscale == Autoscale(min=1, max=4)
    assert rig.sent("autoscale", since) == []

    answer = await rig.m.celery.set_autoscale(APP, "w1", 2, 6)
    assert answer == {"min": 2, "max": 6, "live": {"min": 2, "max": 6}}
    assert [s.arguments for s in rig.sent("autoscale", since)] == [{"max": 6, "min": 2}]
    after = rig.stub.sent[since:]
    asked = next(i for i, s in enumerate(after) if s.command == "autoscale")
    assert any(s.command == "stats" for s in after[asked + 1 :])  # confirmed by stats
    assert node.autoscale == (6, 2)
    stored = rig.store.get_instance("w1")
    assert stored is not None and stored.autoscale == Autoscale(min=2, max=6)


# Health: hung workers, the memory limit, broker outages ---------------------------------


async def test_silent_worker_is_killed_after_hung_after_and_restarted(rig: Rig) -> None:
    node, first = await rig.running("w1", ["default"])

    node.alive = False
    began = rig.time.now()
    view = await rig.wait_view("w1", lambda v: v.runtime.pid not in (None, first))
    # The clock starts at the last answer, at most one health interval before.
    assert rig.time.now() - began >= HUNG_AFTER - 0.06
    assert (first, signal.SIGKILL, True) in rig.fake.signals
    rt = view.runtime
    assert (rt.state, rt.restarts, rt.exit_code) == (State.STARTING, 1, -signal.SIGKILL)
    assert rt.reason == f"no answer to ping for {HUNG_AFTER:g}s"

    node.alive = True
    view = await rig.wait_state("w1", State.RUNNING)
    assert (view.runtime.restarts, view.runtime.reason) == (1, None)


async def test_worker_over_its_memory_limit_is_killed_and_restarted(rig: Rig) -> None:
    node, first = await rig.running("w1", ["default"], memory_limit=100_000_000)

    # Silent as well, so that the new worker stays starting with its reason shown
    # (the default hung_after is far away: only the memory check can kill it).
    await rig.m.instances.update_instance(APP, "w1", {"hung_after": 60})
    node.alive = False
    rig.fake.set_stats(first, TreeStats(memory_rss=200_000_000, processes=3))
    view = await rig.wait_view("w1", lambda v: v.runtime.pid not in (None, first))
    assert (first, signal.SIGKILL, True) in rig.fake.signals
    rt = view.runtime
    assert (rt.state, rt.restarts, rt.exit_code) == (State.STARTING, 1, -signal.SIGKILL)
    assert rt.reason == (
        "memory_limit: the worker's process tree uses 200000000 bytes (RSS), over its "
        "memory_limit of 100000000"
    )

    node.alive = True
    view = await rig.wait_state("w1", State.RUNNING)
    assert view.runtime.restarts == 1


async def test_broker_outage_is_not_a_hung_worker(make_rig: MakeRig) -> None:
    # No periodic sweep during the test: a reconcile can only come from the
    # health check noticing the worker is back after silence.
    rig = await make_rig(reconcile_interval=60.0)
    node, pid = await rig.running("w1", ["default"])

    rig.stub.broker_down = True
    node.queues.clear()  # the broker restarted: the worker's queues are gone
    await rig.time.pass_time(4 * HUNG_AFTER)  # several hung_after periods of silence
    view = await rig.view("w1")
    assert (view.runtime.state, view.runtime.pid, view.runtime.restarts) == (
        State.RUNNING,
        pid,
        0,
    )
    assert not any(sig == signal.SIGKILL for _, sig, _ in rig.fake.signals)

    since = len(rig.stub.sent)
    rig.stub.broker_down = False
    await rig.wait_for(lambda: bool(rig.sent("active_queues", since)), timeout=1.0)
    await rig.wait_for(lambda: node.queues == ["default"], timeout=1.0)
    assert (await rig.view("w1")).runtime.pid == pid


async def test_start_with_the_broker_down_backs_off_naming_the_broker(rig: Rig) -> None:
    rig.stub.broker_down = True
    view = await rig.add("w1", queues=["default"], startsecs=0.4)
    first = pid_of(view)

    view = await rig.wait_state("w1", State.BACKOFF)
    assert view.runtime.reason == "cannot reach the broker: stub broker is down"
    assert (first, signal.SIGKILL, True) in rig.fake.signals
    assert view.runtime.exit_code == -signal.SIGKILL

    rig.node("w1", queues=["default"])
    rig.stub.broker_down = False
    view = await rig.wait_state("w1", State.RUNNING)
    assert view.runtime.reason is None and view.runtime.restarts >= 1


# Warm stop ------------------------------------------------------------------------------


async def test_warm_stop_cancels_queues_then_terms_the_main_process(rig: Rig) -> None:
    node, pid = await rig.running("w1", ["default", "high"])
    rig.fake.stubborn.add(pid)  # it finishes its tasks: exits when the test says so
    mark = len(rig.timeline)

    stopping = asyncio.create_task(rig.m.instances.stop_instance(APP, "w1"))
    await rig.wait_for(lambda: "cast ping" in rig.timeline[mark:])
    assert [e for e in rig.timeline[mark:] if not e.startswith("casting")] == [
        "cast cancel_consumer",
        "cast cancel_consumer",
        f"signal {pid} SIGTERM group=False",
        "cast ping",
    ]
    casts = [s for s in rig.stub.sent if s.one_way]
    assert [(s.command, s.arguments) for s in casts] == [
        ("cancel_consumer", {"queue": "default"}),
        ("cancel_consumer", {"queue": "high"}),
        ("ping", {}),
    ]
    assert node.queues == []
    assert (await rig.view("w1")).runtime.state == State.STOPPING

    rig.fake.exit(pid, 0)
    view = await rig.finish(stopping)
    out = view.to_json()
    assert (out["state"], out["stop_step"], out["pid"], out["exit_code"]) == (
        "stopped",
        "signal",
        None,
        0,
    )
    assert (pid, signal.SIGTERM, True) not in rig.fake.signals


async def test_a_stop_drains_the_running_task_before_the_term(rig: Rig) -> None:
    node, pid = await rig.running("w1", ["default"], stopwaitsecs=30)
    tasks = [{"id": "t1", "name": "shop.encode"}]
    node.scripts["active"] = lambda _: {"ok": list(tasks)}
    node.scripts["reserved"] = {"ok": []}
    rig.fake.stubborn.add(pid)
    asked = len(rig.sent("active"))

    stopping = asyncio.create_task(rig.m.instances.stop_instance(APP, "w1"))
    await rig.wait_for(lambda: len(rig.sent("active")) >= asked + 3)  # it keeps looking
    assert node.queues == []  # no new tasks
    assert [s for s in rig.fake.signals if s[0] == pid] == []  # no TERM while it runs
    tasks.clear()  # the task ends
    await rig.wait_for(lambda: (pid, signal.SIGTERM, False) in rig.fake.signals)
    assert (await rig.view("w1")).runtime.stop_step == StopStep.DRAIN
    rig.fake.exit(pid, 0)
    view = await rig.finish(stopping)
    assert (view.runtime.state, view.runtime.stop_step) == (State.STOPPED, StopStep.DRAIN)


#: Every way a worker is stopped, each through the same draining stop.
STOPS: dict[str, Callable[[LocalBranch], Awaitable[object]]] = {
    "stop": lambda m: m.instances.stop_instance(APP, "w1"),
    "restart": lambda m: m.instances.restart_instance(APP, "w1"),
    "delete": lambda m: m.instances.delete_instance(APP, "w1"),
    "app delete": lambda m: m.instances.delete_app(APP),
    "app rolling restart": lambda m: m.groups.act(APP, Action.RESTART, rolling=True),
    "daemon SIGTERM": lambda m: m.shutdown(keep=False),
}


@pytest.mark.parametrize("time_of", ["fake_clock"], indirect=True)  # (the drain is the same)
@pytest.mark.parametrize("how", list(STOPS))
async def test_every_stop_drains_first(rig: Rig, how: str) -> None:
    node, pid = await rig.running("w1", ["default"], stopwaitsecs=30)
    tasks = [{"id": "t1"}]
    node.scripts["active"] = lambda _: {"ok": list(tasks)}
    node.scripts["reserved"] = {"ok": []}
    rig.fake.stubborn.add(pid)
    asked = len(rig.sent("active"))

    stopping = asyncio.ensure_future(STOPS[how](rig.m))
    await rig.wait_for(lambda: len(rig.sent("active")) >= asked + 3)
    assert [s for s in rig.fake.signals if s[0] == pid] == [], how
    tasks.clear()
    await rig.wait_for(lambda: (pid, signal.SIGTERM, False) in rig.fake.signals)
    rig.fake.exit(pid, 0)
    # (an app's delete ends on a thread, the embedded broker's removal: the
    # fake clock is stepped with real time between the steps, so that 5 s of
    # it cannot pass before a thread had its turn)
    until = time.monotonic() + DEADLINE
    while not stopping.done() and time.monotonic() < until:
        await rig.time.tick()
        await asyncio.sleep(0.001)
    assert stopping.done(), how
    await stopping
    assert rig.timeline.count(f"signal {pid} SIGTERM group=False") == 1


@pytest.mark.parametrize("time_of", ["fake_clock"], indirect=True)  # (2 s of waiting)
async def test_a_drain_that_runs_out_of_time_terms_then_kills(rig: Rig) -> None:
    node, pid = await rig.running("w1", ["default"], stopwaitsecs=2)
    node.scripts["active"] = {"ok": [{"id": "t1"}]}  # a task that never ends
    node.scripts["reserved"] = {"ok": []}
    rig.fake.stubborn.add(pid)
    began = rig.time.now()

    view = await rig.finish(rig.m.instances.stop_instance(APP, "w1"))
    # TERM at half of stopwaitsecs (the warm shutdown's grace), then the kill
    term = rig.timeline.index(f"signal {pid} SIGTERM group=False")
    assert f"signal {pid} SIGKILL group=True" in rig.timeline[term:]
    assert (view.runtime.state, view.runtime.stop_step) == (State.STOPPED, StopStep.KILL)
    assert rig.time.now() - began >= 2.0


@pytest.mark.parametrize("time_of", ["fake_clock"], indirect=True)  # (a bound on its time)
async def test_a_broker_reconnect_brings_back_a_lost_consumer_before_any_sweep(
    make_rig: MakeRig,
) -> None:
    rig = await make_rig(reconcile_interval=600.0)  # (no sweep in this test's time)
    node, _ = await rig.running("w1", ["default", "high"])
    await rig.wait_for(lambda: len(rig.sent("ping")) > 3)
    node.queues.remove("high")  # lost across the broker's restart
    node.scripts["active_queues"] = None  # and the first look after it gets no answer
    rig.stub.connections += 1  # our own connection to the broker was made anew
    asked = len(rig.sent("active_queues"))
    await rig.wait_for(lambda: len(rig.sent("active_queues")) > asked)
    del node.scripts["active_queues"]  # answered from now on: the next round mends it
    began = rig.time.now()
    await rig.wait_for(lambda: "high" in node.queues, timeout=60)
    # within some health rounds (0.05 s each), not a sweep (600 s): the bound is
    # loose because the clock steps on while a thread (a file broker's read)
    # runs in real time, which on a loaded machine took over 1 s of steps
    assert rig.time.now() - began < 30.0
    assert [s.arguments["queue"] for s in rig.sent("add_consumer")][-1] == "high"


@pytest.mark.parametrize("time_of", ["fake_clock"], indirect=True)  # (a bound on its time)
async def test_a_reconnect_brings_back_per_task_limits_though_the_first_look_gets_no_answer(
    make_rig: MakeRig,
) -> None:
    """Seen in CI: after a broker restart the worker answered the ping and
    active_queues but not yet ``registered``; that counted as in line, and its
    rate limit waited for the sweep."""
    rig = await make_rig(reconcile_interval=600.0)  # (no sweep in this test's time)
    await rig.m.apps.patch_app(APP, {"task_overrides": {"shop.resize": {"rate_limit": "60/m"}}})
    node = rig.node("w1", queues=["default"])
    node.tasks = {"shop.resize": {}}
    await rig.add("w1", queues=["default"])
    await rig.wait_state("w1", State.RUNNING)
    await rig.wait_for(lambda: node.tasks["shop.resize"].get("rate_limit") == "60/m")
    await rig.wait_for(lambda: len(rig.sent("ping")) > 3)
    node.tasks = {"shop.resize": {}}  # a worker restarted on its own forgets them
    node.scripts["registered"] = None  # and its first look after the reconnect is unanswered
    rig.stub.connections += 1
    asked = len(rig.sent("registered"))
    await rig.wait_for(lambda: len(rig.sent("registered")) > asked)
    del node.scripts["registered"]
    began = rig.time.now()
    await rig.wait_for(lambda: node.tasks["shop.resize"].get("rate_limit") == "60/m", timeout=60)
    assert rig.time.now() - began < 30.0  # health rounds, not the sweep (600 s)


@pytest.mark.parametrize("time_of", ["fake_clock"], indirect=True)  # (startsecs to run out)
async def test_a_rolling_restart_goes_on_only_once_the_new_worker_answers_a_ping(
    rig: Rig,
) -> None:
    n1, pid1 = await rig.running("w1", ["default"], startsecs=2)
    _, pid2 = await rig.running("w2", ["default"], startsecs=2)
    n1.scripts["ping"] = None  # w1's next worker never answers (nor does this one now)

    rolling = asyncio.ensure_future(rig.m.groups.act(APP, Action.RESTART, rolling=True))
    await rig.wait_for(rolling.done, 30.0)
    items = await rolling
    got = {i.view.spec.name: (i.outcome, i.error) for i in items}
    assert got["w1"][0] is Outcome.FAILED and "no answer to ping" in (got["w1"][1] or ""), got
    assert got["w2"][0] is Outcome.SKIPPED, got
    assert (await rig.view("w2")).runtime.pid == pid2  # the old worker goes on
    assert [s for s in rig.fake.signals if s[0] == pid2] == []
    assert pid1 != (await rig.view("w1")).runtime.pid


class CountedQueues:
    """ReadyCounter twin: the ready messages a test says each queue holds."""

    def __init__(self) -> None:
        self.ready_of: dict[str, int | None] = {}

    async def ready(self, app: App, queue: str) -> int | None:
        return self.ready_of.get(queue, 0)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("time_of", ["fake_clock"], indirect=True)  # (seconds of watching)
async def test_a_worker_that_takes_nothing_while_work_waits_is_restarted(
    make_rig: MakeRig,
) -> None:
    queues = CountedQueues()
    rig = await make_rig(ready=queues, stall_after=1.0)
    node, pid = await rig.running("w1", ["default"])
    node.scripts["active"] = {"ok": []}
    node.scripts["reserved"] = {"ok": []}
    taken = {"shop.encode": 3}
    working = True
    looks: list[tuple[float, bool]] = []  # (when, whether it had taken one more)

    def stats(_: object) -> dict[str, Any]:
        looks.append((rig.time.now(), working))
        if working:  # a task taken between any two looks
            taken["shop.encode"] += 1
        return {"pool": {}, "total": dict(taken)}

    node.scripts["stats"] = stats

    # idle with nothing to take, then work waits and it keeps taking some: healthy
    # (generous deadlines: each sweep's fan-out prune runs in a thread, on real
    # time, while the fake clock goes on; on a loaded machine 5 fake seconds
    # held fewer than 30 rounds)
    await rig.wait_for(lambda: len(rig.sent("ping")) > 30, timeout=60)
    assert rig.sent("reserved") == []  # nothing waits: the worker is not even asked
    queues.ready_of["default"] = 40
    began = rig.time.now()
    await rig.wait_for(lambda: rig.time.now() - began > 3.0)  # three times stall_after
    assert (await rig.view("w1")).runtime.pid == pid
    working = False
    # (the next worker stays silent: its view keeps the reason until it answers)
    killed = f"signal {pid} SIGKILL group=True"
    node.scripts["ping"] = lambda _: None if killed in rig.timeline else {"ok": "pong"}

    # then it takes nothing for stall_after: restarted, saying why, no sooner
    # than stall_after after the last look that saw a take (not after the
    # line above: on a loaded machine the looks pause while a thread runs and
    # the fake clock steps on, so that look may lie over 1 s back)
    view = await rig.wait_view("w1", lambda v: v.runtime.pid not in (None, pid), timeout=60)
    last_take = max(t for t, took in looks if took)
    killing_look = looks[-1][0]  # (the next worker answers no ping: no look since)
    assert killing_look - last_take >= 1.0 - 0.15, looks[-12:]
    assert view.runtime.reason == (
        "stalled: no task taken for 1s while its queues hold ready messages: default (40)"
    )
    assert killed in rig.timeline


async def test_warm_stop_with_the_broker_down_still_terms(rig: Rig) -> None:
    _, pid = await rig.running("w1", ["default"])
    rig.stub.broker_down = True

    view = await rig.finish(rig.m.instances.stop_instance(APP, "w1"))
    assert (view.runtime.state, view.runtime.exit_code) == (State.STOPPED, -signal.SIGTERM)
    assert rig.fake.signals[0] == (pid, signal.SIGTERM, False)


async def test_warm_stop_never_signals_a_worker_that_is_already_gone(rig: Rig) -> None:
    _, pid = await rig.running("w1", ["default"])
    rig.stub.cast_delay["cancel_consumer"] = 0.3  # a sluggish broker

    stopping = asyncio.create_task(rig.m.instances.stop_instance(APP, "w1"))
    await rig.wait_for(lambda: "casting cancel_consumer" in rig.timeline)
    rig.fake.exit(pid, 0)  # it dies on its own while the cancel is in flight
    view = await rig.finish(stopping)
    assert view.runtime.state == State.STOPPED

    # the cancel has ended: the warm stop ran on past the point where it signals
    await rig.wait_for(lambda: "cast cancel_consumer" in rig.timeline)
    for _ in range(20):
        await asyncio.sleep(0)
    assert [s for s in rig.fake.signals if s[1] == signal.SIGTERM] == []


async def _next_daemon(rig: Rig, tmp_path: Path) -> LocalBranch:
    """A new daemon's LocalBranch on the same store, processes and workers."""
    rig.fake.forget_children()
    rig.fake.closed = rig.stub.closed = False  # the old daemon closed both
    base = Config.for_tests(tmp_path)
    config = replace(
        base, celery=replace(base.celery, health_interval=0.05, reconcile_interval=0.5)
    )
    m2 = build(
        rig.store,
        rig.fake,
        rig.time.clock,  # the same host: its clock goes on
        config,
        rig.store.branch_id(),
        scheduler=rig.time.scheduler,
        remote=rig.stub,
        bus=EventBus(),
        hostname=HOST,
    )
    await m2.start()
    return m2


async def test_adopted_while_starting_is_running_only_once_it_answers(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    rig = await make_rig()
    view = await rig.add("w1", startsecs=1.0)
    pid = pid_of(view)
    assert view.runtime.state == State.STARTING
    await rig.m.shutdown(keep=True)  # the daemon goes before the worker ever answered
    m2 = await _next_daemon(rig, tmp_path)
    try:
        again = Rig(m2, rig.fake, rig.stub, rig.store, rig.timeline, rig.time)
        view = await again.view("w1")
        assert (view.runtime.state, view.runtime.pid) == (State.STARTING, pid)
        since = len(rig.stub.sent)
        await again.wait_for(lambda: len(again.sent("ping", since)) >= 2)  # asks it again
        assert (await again.view("w1")).runtime.state == State.STARTING
        rig.node("w1")
        view = await again.wait_state("w1", State.RUNNING)
        assert view.runtime.pid == pid and rig.fake.signals == []
    finally:
        await m2.shutdown(keep=True)


async def test_adopted_while_starting_that_never_answers_is_killed(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    rig = await make_rig()
    pid = pid_of(await rig.add("w1", startsecs=0.5, startretries=1))
    await rig.m.shutdown(keep=True)
    m2 = await _next_daemon(rig, tmp_path)
    try:
        again = Rig(m2, rig.fake, rig.stub, rig.store, rig.timeline, rig.time)
        view = await again.wait_state("w1", State.FATAL)
        assert "no answer to ping" in (view.runtime.reason or "")
        assert pid not in rig.fake.running()
    finally:
        await m2.shutdown(keep=True)


# Autoscale on a fixed-concurrency worker (issue 12, item 11) --------------------------


async def test_autoscale_on_a_fixed_concurrency_worker_is_409_and_changes_nothing(
    rig: Rig,
) -> None:
    node = rig.node("w1", queues=["celery"], concurrency=2)  # started without --autoscale
    await rig.add("w1", concurrency=2)
    await rig.wait_state("w1", State.RUNNING)
    with pytest.raises(RestartRequired) as refused:
        await rig.m.celery.set_autoscale(APP, "w1", 1, 4)
    assert refused.value.status == 409 and refused.value.code == "restart_required"
    assert refused.value.message.startswith("fixed concurrency: ")
    assert "restart it with an autoscale range" in refused.value.message
    # nothing changed: not the worker, not the declaration (in memory or in SQLite)
    assert node.autoscale is None and not rig.sent("autoscale")
    view = await rig.view("w1")
    assert (view.spec.concurrency, view.spec.autoscale) == (2, None)
    stored = {s.name: s for s in rig.store.list_instances()}["w1"]
    assert (stored.concurrency, stored.autoscale) == (2, None)
    assert "--concurrency=2" in (await rig.view("w1")).command

    # Celery's own refusal (a worker whose stats said otherwise) is the same answer.
    node.scripts["stats"] = {"autoscaler": {"min": 1, "max": 2}}
    with pytest.raises(RestartRequired):
        await rig.m.celery.set_autoscale(APP, "w1", 1, 4)
    stored = {s.name: s for s in rig.store.list_instances()}["w1"]
    assert (stored.concurrency, stored.autoscale) == (2, None)

    # Stopped, the range is declared for the next start, which uses it.
    await rig.finish(rig.m.instances.stop_instance(APP, "w1"))
    answer = await rig.m.celery.set_autoscale(APP, "w1", 1, 4)
    assert answer == {"min": 1, "max": 4, "live": None}
    view = await rig.view("w1")
    assert (view.spec.concurrency, view.spec.autoscale) == (None, Autoscale(min=1, max=4))
    assert "--autoscale=4,1" in view.command


async def test_autoscale_when_stats_answer_an_error_is_sent_not_refused(rig: Rig) -> None:
    # an error reply (or none) says nothing of the worker's autoscaler: no 409
    node, _ = await rig.running("w1", ["default"])
    failures = iter([{"error": "stats failed"}])  # the first stats only

    def stats(_: Mapping[str, Any]) -> dict[str, Any]:
        return next(failures, None) or node._do_stats()

    node.scripts["stats"] = stats
    answer = await rig.m.celery.set_autoscale(APP, "w1", 2, 6)
    assert answer["live"] == {"min": 2, "max": 6}
    assert node.autoscale == (6, 2)  # it was sent and confirmed, not refused up front


async def test_the_command_shown_is_the_one_running_until_the_next_start(rig: Rig) -> None:
    await rig.running("w1", ["default"])
    started = list(rig.fake.spawned[0].argv)
    assert (await rig.view("w1")).to_json()["command"] == started
    # the app changes under the running worker: it still runs what it was started with
    redis = "redis://127.0.0.1:6379/9"
    await rig.m.apps.put_app(APP, {}, {}, {"celery_app": CELERY_APP, "broker": redis})
    assert (await rig.view("w1")).to_json()["command"] == started
    await rig.finish(rig.m.instances.stop_instance(APP, "w1"))
    await rig.m.instances.start_instance(APP, "w1")
    # what its next start runs: the app's new broker, in its environment
    await rig.wait_for(lambda: len(rig.fake.spawned) == 2)
    assert rig.fake.spawned[1].env["CELERY_BROKER_URL"] == redis


# Worker limits: flags at start, per-task overrides by remote control ---------------

REDIS_ANY = "redis://127.0.0.1:6379/9"  # (never reached: the rig's remote control is a twin)

TASKS = {
    "shop.resize": {"rate_limit": "600/m"},
    "shop.encode": {"time_limit": 3600, "soft_time_limit": 3500},
}


async def test_limits_are_flags_and_the_apps_rate_is_split_between_its_workers(rig: Rig) -> None:
    await rig.m.apps.patch_app(APP, {"time_limit": 300, "task_overrides": TASKS})
    nodes = {}
    for name in ("w1", "w2"):
        nodes[name] = rig.node(name, queues=["default"])
        nodes[name].tasks = {"shop.resize": {}, "shop.encode": {}}
    await rig.add("w1", queues=["default"], max_memory_per_child=2**20)
    await rig.wait_state("w1", State.RUNNING)
    assert {"--time-limit=300", "--max-memory-per-child=1024"} <= set(rig.fake.spawned[0].argv)
    w1, w2 = nodes["w1"].tasks, nodes["w2"].tasks
    await rig.wait_for(lambda: w1["shop.resize"].get("rate_limit") == "600/m")
    assert w1["shop.encode"] == {"time_limit": 3600, "soft_time_limit": 3500}

    # a second worker: each gets half of the app's total
    await rig.add("w2", queues=["default"])
    await rig.wait_for(lambda: w2["shop.resize"].get("rate_limit") == "300/m")
    await rig.wait_for(lambda: w1["shop.resize"].get("rate_limit") == "300/m")
    # one stops: the other has the whole total again
    await rig.finish(rig.m.instances.stop_instance(APP, "w2"))
    await rig.wait_for(lambda: w1["shop.resize"].get("rate_limit") == "600/m")

    # drift (a worker that forgot them behind branchd's back): the sweep re-applies
    since = len(rig.stub.sent)
    nodes["w1"].tasks = w1 = {"shop.resize": {}, "shop.encode": {}}
    await rig.wait_for(lambda: w1["shop.encode"].get("time_limit") == 3600)
    assert w1["shop.resize"] == {"rate_limit": "600/m"}
    # in line: a sweep reads them back and sends nothing more
    await rig.wait_for(lambda: len(rig.sent("registered", since)) >= 2)
    assert len(rig.sent("rate_limit", since)) == 1
    # a patch merges task by task (null removes one)
    app = await rig.m.apps.patch_app(APP, {"task_overrides": {"shop.encode": None}})
    assert app.celery.limits.task_overrides == {"shop.resize": TaskLimits(rate_limit="600/m")}


class Elsewhere:
    """The cluster as the workers ask it: the app's workers on other branches."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def running_elsewhere(self, app: str) -> int:
        return self.counts.get(app, 0)


async def test_the_apps_rate_is_split_over_its_workers_on_every_branch(make_rig: MakeRig) -> None:
    rig = await make_rig(reconcile_interval=60.0)  # (no sweep brings them in line meanwhile)
    elsewhere = Elsewhere()
    rig.m.workers.count_elsewhere(elsewhere)
    elsewhere.counts[APP] = 2  # two of its workers run on other branches
    await rig.m.apps.patch_app(APP, {"task_overrides": {"shop.resize": {"rate_limit": "600/m"}}})
    node = rig.node("w1", queues=["default"])
    node.tasks = {"shop.resize": {}}
    await rig.add("w1", queues=["default"])
    await rig.wait_state("w1", State.RUNNING)
    rate = lambda: node.tasks["shop.resize"].get("rate_limit")  # noqa: E731
    await rig.wait_for(lambda: rate() == "200/m")  # a third of the total
    # one stopped over there (the cluster saw it after a names fetch): re-split here
    elsewhere.counts[APP] = 1
    rig.m.workers.resplit(APP)
    await rig.wait_for(lambda: rate() == "300/m")
    elsewhere.counts.clear()  # (those branches gone: the whole total)
    rig.m.workers.resplit(APP)
    await rig.wait_for(lambda: rate() == "600/m")
    since = len(rig.stub.sent)
    rig.m.workers.resplit("other")  # another app's count: nothing sent for this one
    await rig.time.pass_time(0.1)
    assert rig.sent("rate_limit", since) == []


async def test_a_changed_declaration_reaches_running_workers_at_once(make_rig: MakeRig) -> None:
    """apps set / instances set of per-task limits or the autoscale range: the
    running workers have them before any sweep (reconcile_interval is far)."""
    rig = await make_rig(reconcile_interval=60.0)
    began = rig.time.now()
    nodes = {}
    for name in ("w1", "w2"):
        nodes[name], _ = await rig.running(name, ["default"])
        nodes[name].tasks = {"shop.tasks.resize": {}}
    since = len(rig.stub.sent)
    await rig.m.apps.patch_app(
        APP, {"task_overrides": {"shop.tasks.resize": {"rate_limit": "300/m"}}}
    )
    rate = lambda name: nodes[name].tasks["shop.tasks.resize"].get("rate_limit")  # noqa: E731
    await rig.wait_for(lambda: rate("w1") == rate("w2") == "150/m")  # each its share
    assert len(rig.sent("rate_limit", since)) == 2
    # an instance's own rate: that worker alone, at once
    since = len(rig.stub.sent)
    own = {"task_overrides": {"shop.tasks.resize": {"rate_limit": "10/s"}}}
    await rig.m.instances.update_instance(APP, "w1", own)
    await rig.wait_for(lambda: rate("w1") == "10/s")
    assert {s.node for s in rig.sent("rate_limit", since)} == {f"w1@{HOST}"}
    # an instance's autoscale range (as `instances set --autoscale` sends it)
    await rig.m.instances.update_instance(APP, "w2", {"autoscale": {"min": 3, "max": 5}})
    await rig.wait_for(lambda: nodes["w2"].autoscale == (5, 3))
    assert rig.time.now() - began < 60.0  # (no sweep did it)
    # a change of no runtime part sends nothing
    since = len(rig.stub.sent)
    await rig.m.instances.update_instance(APP, "w1", {"hung_after": 30})
    await rig.time.pass_time(0.1)
    assert [s for s in rig.stub.sent[since:] if s.command != "ping"] == []
    # nor one of the app's that workers take only at their start (its env)
    await rig.m.apps.patch_app(APP, {"env": {"MODE": "2"}})
    await rig.time.pass_time(0.1)
    assert [s for s in rig.stub.sent[since:] if s.command != "ping"] == []
    # and its rate again reaches both at once
    await rig.m.apps.patch_app(
        APP, {"task_overrides": {"shop.tasks.resize": {"rate_limit": "100/m"}}}
    )
    await rig.wait_for(lambda: rate("w2") == "50/m")


async def test_an_instances_time_limit_under_the_apps_soft_one(rig: Rig) -> None:
    """The guide's lines: apps set --soft-time-limit 270, then a worker's own
    --time-limit 60 must bring its own soft one below it."""
    await rig.m.apps.patch_app(APP, {"time_limit": 300, "soft_time_limit": 270})
    await rig.add("w1", queues=["default"], autostart=False)
    with pytest.raises(Invalid) as caught:
        await rig.m.instances.update_instance(APP, "w1", {"time_limit": 60})
    assert caught.value.message.startswith(
        "soft_time_limit 270 (the app's) must be below time_limit 60 (this instance's)"
    )
    view = await rig.m.instances.update_instance(
        APP, "w1", {"time_limit": 60, "soft_time_limit": 50}
    )
    assert {"--time-limit=60", "--soft-time-limit=50"} <= set(view.to_json()["command"])


async def test_a_threads_worker_is_told_which_task_has_a_time_limit(rig: Rig) -> None:
    await rig.m.apps.patch_app(APP, {"task_overrides": {"shop.tasks.encode": {"time_limit": 3600}}})
    await rig.add("w1", queues=["default"], autostart=False)
    with pytest.raises(Invalid) as caught:
        await rig.m.instances.update_instance(APP, "w1", {"pool": "threads"})
    assert caught.value.message.startswith(
        "task_overrides[shop.tasks.encode].time_limit (the app's): the threads pool enforces "
        "no time limit"
    )


async def test_disable_prefetch_over_a_stored_multiplier(rig: Rig) -> None:
    await rig.m.apps.patch_app(APP, {"prefetch_multiplier": 1})
    with pytest.raises(Invalid) as caught:
        await rig.m.apps.patch_app(APP, {"disable_prefetch": True})
    assert caught.value.message == (
        "disable_prefetch: the app has prefetch_multiplier 1; give one of them "
        f"(branchctl apps set {APP} --reset prefetch_multiplier --disable-prefetch)"
    )
    # what `apps set --reset prefetch_multiplier --disable-prefetch` sends
    app = await rig.m.apps.patch_app(APP, {"prefetch_multiplier": None, "disable_prefetch": True})
    assert (app.celery.limits.prefetch_multiplier, app.celery.limits.disable_prefetch) == (
        None,
        True,
    )
    # an instance's own form of it replaces the app's
    await rig.m.apps.patch_app(APP, {"disable_prefetch": None, "prefetch_multiplier": 1})
    view = await rig.add("w1", queues=["default"], autostart=False, disable_prefetch=True)
    command = view.to_json()["command"]
    assert "--disable-prefetch" in command
    assert not any(a.startswith("--prefetch-multiplier") for a in command)


async def test_limits_a_pool_cannot_enforce_are_refused(rig: Rig) -> None:
    with pytest.raises(Invalid, match="soft_time_limit: the solo pool"):
        await rig.m.apps.patch_app(APP, {"pool": "solo", "soft_time_limit": 10})
    with pytest.raises(Invalid, match=r"max_tasks_per_child \(this instance's\): recycles pool"):
        await rig.add("w1", pool="threads", max_tasks_per_child=5)
    with pytest.raises(Invalid, match="rate_limit 'fast'"):
        await rig.add("w1", task_overrides={"t": {"rate_limit": "fast"}})
    assert rig.m.instances.specs(APP) == []


# The same scenarios over real Celery workers (a representative subset) -------------
#
# Readiness, a hung worker killed, a warm stop: written once, run over the stub
# on the fake clock and over real ``celery worker`` processes on the embedded
# broker (real launcher, kombu remote control, real clock), as dramatiq runs
# one suite over its stub and real brokers.

ROOT = Path(__file__).resolve().parents[2]


class RecordingLauncher(ProcessLauncher):
    """The real launcher, writing its signals on the timeline (as TimelineFake)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeline: list[str]) -> None:
        super().__init__(loop)
        self.timeline = timeline
        self.launched: list[Launched] = []

    def spawn(self, spec: LaunchSpec) -> Launched:
        launched = super().spawn(spec)
        self.launched.append(launched)
        return launched

    def signal(self, pid: int, sig: int, group: bool) -> None:
        self.timeline.append(f"signal {pid} {signal.Signals(sig).name} group={group}")
        super().signal(pid, sig, group)

    def cleanup(self) -> None:
        """Whatever is left of our workers goes (by pid and start time, never by name)."""
        ours: list[psutil.Process] = []
        for launched in self.launched:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(launched.pid)
                if abs(proc.create_time() - launched.create_time) < 0.01:
                    ours.append(proc)
        for proc in ours:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        psutil.wait_procs(ours, timeout=5)


class RecordingRemote(KombuRemoteControl):
    """The kombu remote control, writing its one-way sends on the timeline."""

    def __init__(self, timeline: list[str]) -> None:
        super().__init__()
        self.timeline = timeline

    async def cast(
        self,
        broker: BrokerSpec,
        node: str,
        command: str,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        self.timeline.append(f"casting {command}")
        await super().cast(broker, node, command, arguments)
        self.timeline.append(f"cast {command}")


@dataclass
class Side(Waits):
    """One side of the subset: what differs between the stub and real workers."""

    m: LocalBranch
    time: Time
    timeline: list[str]
    name: str
    #: hung_after of its instances: a real worker needs room for a busy moment.
    hung_after: float
    #: The stub (None over real workers).
    stub: TimelineStub | None = None

    async def add(self, name: str, queues: list[str]) -> InstanceView:
        if self.stub is not None:  # its worker answers, consuming part of its queues
            self.stub.add_node(f"{name}@{HOST}", queues=queues[:1])
        body = {"name": name, "kind": "celery", "hung_after": self.hung_after, "queues": queues}
        return await self.m.instances.create_instance(APP, body)

    def silence(self, name: str, pid: int) -> None:
        """The worker stops answering (it hangs)."""
        if self.stub is not None:
            self.stub.nodes[f"{name}@{HOST}"].alive = False
        else:
            os.kill(pid, signal.SIGSTOP)

    def revive(self, name: str) -> None:
        """The next worker of ``name`` answers (a real one does by itself)."""
        if self.stub is not None:
            self.stub.nodes[f"{name}@{HOST}"].alive = True

    async def live_queues(self, name: str) -> list[str] | None:
        items = await self.m.celery.consumers(APP, name)
        if any(i["live"] is None for i in items):
            return None
        return sorted(i["name"] for i in items if i["live"])


@pytest.fixture(params=["stub_fake_clock", pytest.param("celery_workers", marks=pytest.mark.slow)])
async def side(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Side]:
    base = Config.for_tests(tmp_path)
    config = replace(
        base, celery=replace(base.celery, health_interval=0.05, reconcile_interval=0.5)
    )
    store = Store(config.db_path)
    timeline: list[str] = []
    stub: TimelineStub | None = None
    launcher: TimelineFake | RecordingLauncher
    remote: TimelineStub | RecordingRemote
    t: Time
    if request.param == "stub_fake_clock":
        t = SteppedTime()
        launcher = TimelineFake(timeline)
        remote = stub = TimelineStub(timeline, t.scheduler)
        hung_after = HUNG_AFTER
    else:
        t = RealTime()
        launcher = RecordingLauncher(asyncio.get_running_loop(), timeline)
        remote = RecordingRemote(timeline)
        hung_after = 3.0  # pings wait up to a second for their answer
    m = build(
        store,
        launcher,
        t.clock,
        config,
        store.branch_id(),
        scheduler=t.scheduler,
        remote=remote,
        bus=EventBus(),
        hostname=HOST,
    )
    await m.start()
    try:
        celery = {"celery_app": CELERY_APP, "pool": "threads", "mingle_gossip": False}
        await m.apps.put_app(APP, {"PYTHONPATH": str(ROOT)}, {}, celery)
        yield Side(m, t, timeline, request.param, hung_after, stub)
    finally:
        try:
            await m.shutdown(keep=False)
        finally:
            if isinstance(launcher, RecordingLauncher):
                launcher.cleanup()
            store.close()


async def test_both_starting_until_the_worker_answers_then_in_line(side: Side) -> None:
    view = await side.add("w1", ["default", "high"])
    assert view.runtime.state == State.STARTING
    view = await side.wait_state("w1", State.RUNNING, timeout=30.0)
    assert (view.runtime.restarts, view.runtime.reason) == (0, None)
    # its queues are the declared ones (the stub's worker lacked one: reconciled)
    await side.wait_for_async(lambda: side.live_queues("w1"), ["default", "high"])
    assert not [e for e in side.timeline if e.startswith("signal")]


async def test_both_hung_worker_is_killed_and_restarted(side: Side) -> None:
    await side.add("w1", ["default"])
    first = pid_of(await side.wait_state("w1", State.RUNNING, timeout=30.0))

    side.silence("w1", first)
    began = side.time.now()
    view = await side.wait_view("w1", lambda v: v.runtime.pid not in (None, first), 30.0)
    assert side.time.now() - began >= side.hung_after - 0.06
    assert f"signal {first} SIGKILL group=True" in side.timeline
    rt = view.runtime
    assert (rt.restarts, rt.exit_code) == (1, -signal.SIGKILL)
    assert rt.reason == f"no answer to ping for {side.hung_after:g}s"

    side.revive("w1")
    view = await side.wait_state("w1", State.RUNNING, timeout=30.0)
    assert (view.runtime.restarts, view.runtime.reason) == (1, None)


async def test_both_warm_stop_cancels_queues_then_terms(side: Side) -> None:
    await side.add("w1", ["default", "high"])
    pid = pid_of(await side.wait_state("w1", State.RUNNING, timeout=30.0))
    await side.wait_for_async(lambda: side.live_queues("w1"), ["default", "high"])
    mark = len(side.timeline)

    view = await side.finish(side.m.instances.stop_instance(APP, "w1"))
    # a real worker says it has no task left before the TERM (the stub knows no `active`)
    drained = StopStep.SIGNAL if side.stub is not None else StopStep.DRAIN
    assert (view.runtime.state, view.runtime.stop_step) == (State.STOPPED, drained)
    # (the group's leftovers go after the exit: not part of the stop's order)
    steps = [
        e
        for e in side.timeline[mark:]
        if not e.startswith("casting") and e != f"signal {pid} SIGKILL group=True"
    ]
    assert steps == [
        "cast cancel_consumer",
        "cast cancel_consumer",
        f"signal {pid} SIGTERM group=False",
        "cast ping",
    ]
