"""Start order and probes through the engine, on a fake clock, the fake
launcher and the fake probe runner: nothing real waits, every timer fires
when the test moves time (issue 15, part 3)."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from branchd.celery.stub import StubRemoteControl
from branchd.clock import FakeClock, FakeScheduler
from branchd.config import Config
from branchd.events import EventBus
from branchd.local import LocalBranch, build
from branchd.model import State
from branchd.process.fake import FakeLauncher
from branchd.process.launcher import Launched, LaunchSpec
from branchd.process.prober import FakeProber
from branchd.process.probes import Probe
from branchd.store import Store

APP = "web"
TCP = "tcp:127.0.0.1:5432"
REFUSED = "tcp 127.0.0.1:5432 refused"


class Launcher(FakeLauncher):
    """The fake, noting which instance each spawn was for, and when."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.starts: list[tuple[str, float]] = []
        self.names: dict[int, str] = {}

    def spawn(self, spec: LaunchSpec) -> Launched:
        launched = super().spawn(spec)
        name = spec.argv[-1]  # (each test command ends with its instance's name)
        self.starts.append((name, self.clock.monotonic()))
        self.names[launched.pid] = name
        return launched

    def terms(self) -> list[str]:
        return [self.names[pid] for pid, sig, _ in self.signals if sig == signal.SIGTERM]


class Prober(FakeProber):
    """The fake runner, noting the clock at each try."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.times: list[float] = []

    async def check(self, probe: Probe, timeout: float, **kw: Any) -> str | None:
        self.times.append(self.clock.monotonic())
        return await super().check(probe, timeout, **kw)


@dataclass
class Rig:
    m: LocalBranch
    launcher: Launcher
    prober: Prober
    sched: FakeScheduler
    store: Store
    config: Config

    @property
    def now(self) -> float:
        return self.sched.clock.monotonic()

    async def add(self, name: str, **fields: Any) -> None:
        body = {"name": name, "command": ["sleep", name], **fields}
        await self.m.instances.create_instance(APP, body)
        await self.sched.settle()

    async def view(self, name: str) -> tuple[State, str | None]:
        rt = (await self.m.instances.get_instance(APP, name)).runtime
        return rt.state, rt.reason

    def spawned(self, name: str) -> list[float]:
        return [t for n, t in self.launcher.starts if n == name]


async def _branch(store: Store, config: Config, clock: FakeClock, sched: FakeScheduler) -> Rig:
    launcher, prober = Launcher(clock), Prober(clock)
    m = build(
        store,
        launcher,
        clock,
        config,
        store.branch_id(),
        scheduler=sched,
        remote=StubRemoteControl(),
        bus=EventBus(),
        prober=prober,
    )
    await m.start()
    return Rig(m, launcher, prober, sched, store, config)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    config = Config.for_tests(tmp_path)
    store = Store(config.db_path)
    clock = FakeClock()
    r = await _branch(store, config, clock, FakeScheduler(clock))
    await r.m.apps.put_app(APP, {}, {})
    yield r
    await r.m.shutdown(keep=True)
    store.close()


async def test_a_dependent_waits_until_its_dependency_is_ready(rig: Rig) -> None:
    rig.prober.set(TCP, REFUSED)
    await rig.add("db", ready=TCP)
    assert await rig.view("db") == (State.STARTING, f"not ready: {REFUSED}")
    await rig.add("api", after=["db"], startsecs=0.5)
    assert await rig.view("api") == (State.WAITING, f"waiting for db (not ready: {REFUSED})")
    await rig.sched.advance(30.0)  # as long as it takes
    assert rig.spawned("api") == []
    assert (await rig.view("db"))[0] == State.STARTING
    rig.prober.set(TCP, None)
    tries = len(rig.prober.tries)
    await rig.sched.advance(0.5)  # (retries are 0.5 s apart by now)
    assert len(rig.prober.tries) == tries + 1
    ready_at = rig.prober.times[-1]  # when the probe passed
    assert (await rig.view("db"))[0] == State.RUNNING
    assert rig.spawned("api") == [ready_at]  # at once, and not before
    await rig.sched.advance(0.5)
    assert await rig.view("api") == (State.RUNNING, None)


async def test_a_dependency_stopped_makes_a_restart_wait_again(rig: Rig) -> None:
    await rig.add("db", startsecs=0.1)
    await rig.add("api", after=["db"], startsecs=0.1)
    await rig.sched.advance(0.3)
    assert (await rig.view("api"))[0] == State.RUNNING
    await rig.m.instances.stop_instance(APP, "db")
    await rig.m.instances.restart_instance(APP, "api")
    await rig.sched.settle()
    assert await rig.view("api") == (State.WAITING, "waiting for db (stopped)")
    await rig.m.instances.start_instance(APP, "db")
    await rig.sched.advance(0.2)
    assert (await rig.view("api"))[0] == State.RUNNING
    assert len(rig.spawned("api")) == 2


async def test_never_ready_is_a_failed_start_with_the_probes_reason(rig: Rig) -> None:
    rig.prober.set(TCP, REFUSED)
    await rig.add("db", ready=TCP, ready_timeout=2.0, startretries=1)
    await rig.sched.advance(2.0)
    state, reason = await rig.view("db")
    assert state == State.FATAL
    assert reason == f"not ready within 2s: {REFUSED}; gave up after 1 failed start(s)"


async def test_liveness_failures_in_a_row_restart_it_once_with_the_reason(rig: Rig) -> None:
    rig.prober.set(TCP, None)
    await rig.add("lv", live=TCP, live_period=1.0, live_failures=2, startsecs=0.5)
    await rig.sched.advance(0.5)
    assert (await rig.view("lv"))[0] == State.RUNNING
    for answer in (REFUSED, None, REFUSED, None):  # never two in a row
        rig.prober.set(TCP, answer)
        await rig.sched.advance(1.0)
    assert len(rig.spawned("lv")) == 1
    rig.prober.set(TCP, REFUSED)
    await rig.sched.advance(2.0)
    assert len(rig.spawned("lv")) == 2
    why = f"liveness probe failed 2 time(s) in a row: {REFUSED}"
    assert await rig.view("lv") == (State.STARTING, why)
    assert rig.launcher.terms() == ["lv"]  # stopped as a stop does, then started


async def test_priority_orders_the_daemons_start_and_stop_of_everything(rig: Rig) -> None:
    await rig.add("a", priority=10, startsecs=0.1)
    await rig.add("b", priority=1, startsecs=0.1)
    await rig.add("c", priority=5, startsecs=0.1)
    await rig.add("d", priority=1, after=["b"], startsecs=0.1)
    await rig.sched.advance(0.5)
    await rig.m.shutdown(keep=False)  # the daemon's stop: it goes in tiers
    assert rig.launcher.terms() == ["a", "c", "d", "b"]
    # the next daemon starts them by priority, d once b runs
    clock = FakeClock()
    nxt = await _branch(rig.store, rig.config, clock, FakeScheduler(clock))
    try:
        assert [n for n, _ in nxt.launcher.starts] == ["b", "c", "a"]
        await nxt.sched.advance(0.1)
        assert [n for n, _ in nxt.launcher.starts] == ["b", "c", "a", "d"]
    finally:
        await nxt.m.shutdown(keep=True)
    rig.m = nxt.m  # (the fixture's own shutdown: on this one too, harmless)
