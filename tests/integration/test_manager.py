"""Scenarios of the ``Manager``, run against both launchers.

Each scenario is written once and runs twice: against the in-memory
``FakeLauncher`` (deaths scripted with ``fake.exit``) and against the real
``ProcessLauncher`` (real ``python -c`` children, deaths with ``os.kill``). A
small ``Side`` object per launcher hides the difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from branchd.celery.stub import StubRemoteControl
from branchd.clock import FakeClock, FakeScheduler, LoopScheduler, SystemClock
from branchd.config import Config
from branchd.errors import Conflict, NotFound, SpawnError
from branchd.events import EventBus
from branchd.local import LocalBranch, build
from branchd.model import Autorestart, Desired, State, StopStep
from branchd.process.fake import FakeLauncher
from branchd.process.launcher import (
    Launched,
    Launcher,
    LaunchSpec,
    ProcessLauncher,
    make_mark,
)
from branchd.store import Store
from branchd.views import InstanceView

PY = sys.executable
DEADLINE = 15.0
APP = "web"

#: Stays up until signalled.
UP = (PY, "-c", "import time; time.sleep(1e9)")
#: Dies at once with code 3.
CRASH = (PY, "-c", "raise SystemExit(3)")
#: Ignores SIGTERM (only SIGKILL ends it); says "ready" once it does.
STUBBORN = (
    PY,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    " print('ready', flush=True); time.sleep(1e9)",
)
#: Cannot be spawned at all.
MISSING = ("/nonexistent/prog",)


async def wait_for(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


async def wait_view(
    manager: LocalBranch,
    name: str,
    predicate: Callable[[InstanceView], bool],
    timeout: float = DEADLINE,
) -> InstanceView:
    deadline = time.monotonic() + timeout
    while True:
        view = await manager.instances.get_instance(APP, name)
        if predicate(view):
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never got there; last seen: {view.runtime}")
        await asyncio.sleep(0.01)


async def wait_state(manager: LocalBranch, name: str, state: State) -> InstanceView:
    return await wait_view(manager, name, lambda v: v.runtime.state == state)


def pid_of(view: InstanceView) -> int:
    assert view.runtime.pid is not None, view.runtime
    return view.runtime.pid


# The two sides ------------------------------------------------------------


class Side:
    """What differs between the launchers; the scenarios only use this."""

    name: str

    @property
    def spawned(self) -> list[int]:
        """pids of every process spawned, across daemon restarts."""
        raise NotImplementedError

    def launcher(self) -> Launcher:
        """The launcher of a new LocalBranch; after the first, as after a daemon restart."""
        raise NotImplementedError

    def kill(self, pid: int) -> None:
        """The process dies of SIGKILL."""
        raise NotImplementedError

    def alive(self, pid: int) -> bool:
        raise NotImplementedError

    async def ready(self, manager: LocalBranch, name: str) -> None:
        """The STUBBORN instance ``name`` has set up its signal handling."""

    def orphan(self, branch: str, instance: str) -> int:
        """A process ``branch`` spawned for ``instance`` and never recorded
        (its daemon was killed between the fork and the commit of the pid)."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """End every process this side started."""


class ScriptedFake(FakeLauncher):
    """The fake, plus the behaviour of the test commands (CRASH, STUBBORN)."""

    def __init__(self) -> None:
        super().__init__()
        self.pids: list[int] = []

    def spawn(self, spec: LaunchSpec) -> Launched:
        if spec.argv == MISSING:  # as the real launcher says it
            raise SpawnError(f"executable {spec.argv[0]!r} not found")
        launched = super().spawn(spec)
        self.pids.append(launched.pid)
        if spec.argv == CRASH:
            asyncio.get_running_loop().call_soon(self.exit, launched.pid, 3)
        elif spec.argv == STUBBORN:
            self.stubborn.add(launched.pid)
        return launched


class FakeSide(Side):
    name = "fake"

    def __init__(self) -> None:
        self.fake = ScriptedFake()
        self._handed_out = False

    @property
    def spawned(self) -> list[int]:
        return self.fake.pids

    def launcher(self) -> Launcher:
        if self._handed_out:  # a daemon restart: the processes are no longer our children
            self.fake.forget_children()
            # The old LocalBranch's shutdown() closed the fake and it has no way to
            # reopen; the new daemon must be able to watch() again.
            self.fake.closed = False
        self._handed_out = True
        return self.fake

    def kill(self, pid: int) -> None:
        self.fake.exit(pid, -signal.SIGKILL)

    def orphan(self, branch: str, instance: str) -> int:
        return self.fake.add_marked(branch, instance).pid

    def alive(self, pid: int) -> bool:
        return pid in self.fake.running()


class RecordingLauncher(ProcessLauncher):
    def __init__(self, loop: asyncio.AbstractEventLoop, record: list[Launched]) -> None:
        super().__init__(loop)
        self._record = record

    def spawn(self, spec: LaunchSpec) -> Launched:
        launched = super().spawn(spec)
        self._record.append(launched)
        return launched


class RealSide(Side):
    name = "real"

    def __init__(self, loop: asyncio.AbstractEventLoop, tmp: Path) -> None:
        self._loop = loop
        self._tmp = tmp
        self.launched: list[Launched] = []
        self.launchers: list[ProcessLauncher] = []

    @property
    def spawned(self) -> list[int]:
        return [launched.pid for launched in self.launched]

    def launcher(self) -> Launcher:
        launcher = RecordingLauncher(self._loop, self.launched)
        self.launchers.append(launcher)
        return launcher

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    def orphan(self, branch: str, instance: str) -> int:
        launcher = RecordingLauncher(self._loop, self.launched)  # (cleanup ends it)
        log = Path(self._tmp) / f"orphan-{instance}.log"
        spec = LaunchSpec(UP, dict(os.environ), None, None, log, log)
        pid = launcher.spawn(replace(spec, mark=make_mark(branch, instance))).pid
        launcher.close()  # the daemon that made it is gone
        return pid

    def alive(self, pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    async def ready(self, manager: LocalBranch, name: str) -> None:
        async def said_ready() -> bool:
            return "ready" in await manager.logs.read_logs(APP, name, "stdout", 10)

        deadline = time.monotonic() + DEADLINE
        while not await said_ready():
            assert time.monotonic() < deadline, f"{name} never said ready"
            await asyncio.sleep(0.01)

    def cleanup(self) -> None:
        for launcher in self.launchers:
            launcher.close()
        ours: list[psutil.Process] = []
        for launched in self.launched:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(launched.pid)
                if abs(proc.create_time() - launched.create_time) < 0.01:
                    ours.append(proc)
        for proc in ours:  # whole group: grandchildren too (by pid, never by name)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        psutil.wait_procs(ours, timeout=5)  # and reap those that are our children


# The fixture ----------------------------------------------------------------


class Supervision:
    """A store on disk, a side, and the Managers started over them."""

    def __init__(self, side: Side, tmp_path: Path) -> None:
        self.side = side
        self.config = Config.for_tests(tmp_path)
        self.store = Store(self.config.db_path)
        self.branch_id = self.store.branch_id()
        self.managers: list[LocalBranch] = []

    async def manager(self) -> LocalBranch:
        """A new LocalBranch (a daemon (re)start) on the same store."""
        m = build(
            self.store,
            self.side.launcher(),
            SystemClock(),
            self.config,
            self.branch_id,
            scheduler=LoopScheduler(SystemClock()),
            remote=StubRemoteControl(),  # no celery instances here: no worker to reach
            bus=EventBus(),
        )
        self.managers.append(m)
        await m.start()
        return m

    async def add(
        self, m: LocalBranch, name: str, command: tuple[str, ...], **fields: Any
    ) -> InstanceView:
        await m.apps.put_app(APP, {}, {})
        fields = {"name": name, "command": list(command), **fields}
        return await m.instances.create_instance(APP, fields)

    async def running(self, m: LocalBranch, name: str, command: tuple[str, ...] = UP) -> int:
        """Add an instance of ``command`` and wait until it runs; its pid."""
        await self.add(m, name, command, startsecs=0.2)
        return pid_of(await wait_state(m, name, State.RUNNING))

    async def close(self) -> None:
        for m in self.managers:
            await m.shutdown(keep=True)  # stops timers and watches; idempotent
        await asyncio.sleep(0)  # let the cancelled log rotators finish
        self.side.cleanup()
        self.store.close()


@pytest.fixture(params=["fake", "real"])
async def sup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Supervision]:
    loop = asyncio.get_running_loop()
    side: Side = FakeSide() if request.param == "fake" else RealSide(loop, tmp_path)
    s = Supervision(side, tmp_path)
    yield s
    await s.close()


# Scenarios ----------------------------------------------------------------


async def test_created_instance_runs(sup: Supervision) -> None:
    m = await sup.manager()
    view = await sup.add(m, "a", UP, startsecs=0.2)
    assert view.runtime.state == State.STARTING
    pid = pid_of(view)
    assert sup.side.spawned == [pid]
    view = await wait_state(m, "a", State.RUNNING)
    assert view.runtime.pid == pid and view.runtime.restarts == 0
    assert view.uptime is not None
    stored = sup.store.load_runtime("a")
    assert (stored.state, stored.pid) == (State.RUNNING, pid)
    assert stored.create_time is not None
    assert sup.side.alive(pid)


async def test_spawns_held_together_are_launched_at_the_end(sup: Supervision) -> None:
    # (an app action's starts: their spawns run at once, on a few threads)
    m = await sup.manager()
    for name, command in (("a", UP), ("b", UP), ("c", MISSING), ("d", UP)):
        await sup.add(m, name, command, startsecs=0, autostart=False)
    with m.instances.spawning_together():
        for name in "abcd":
            view = await m.instances.start_instance(APP, name)
            assert (view.runtime.state, view.runtime.pid) == (State.STARTING, None)
        await m.instances.stop_instance(APP, "d", wait=False)  # stopped before its launch
        assert sup.side.spawned == []
    views = {v.spec.name: v for v in await m.instances.list_instances(APP)}
    assert sorted(sup.side.spawned) == sorted(pid_of(views[n]) for n in "ab")
    assert [views[n].runtime.state for n in "ab"] == [State.RUNNING, State.RUNNING]
    assert views["c"].runtime.state in (State.BACKOFF, State.FATAL)
    assert "not found" in (views["c"].runtime.reason or "")
    assert (views["d"].runtime.state, views["d"].runtime.pid) == (State.STOPPED, None)


async def test_crash_is_restarted(sup: Supervision) -> None:
    m = await sup.manager()
    first = await sup.running(m, "a")
    sup.side.kill(first)
    view = await wait_view(m, "a", lambda v: v.runtime.pid not in (None, first))
    assert view.runtime.restarts == 1
    assert view.runtime.exit_code == -signal.SIGKILL
    view = await wait_state(m, "a", State.RUNNING)
    assert sup.side.alive(pid_of(view))
    assert sup.store.load_runtime("a").restarts == 1


async def test_crash_loop_ends_fatal_with_reason(sup: Supervision) -> None:
    m = await sup.manager()
    await sup.add(m, "bad", CRASH, startsecs=2.0, startretries=3)
    view = await wait_state(m, "bad", State.FATAL)
    rt = view.runtime
    assert rt.pid is None and rt.exit_code == 3
    assert rt.reason == "exited too quickly (code 3); gave up after 3 failed start(s)"
    assert len(sup.side.spawned) == 3 and rt.restarts == 2
    stored = sup.store.load_runtime("bad")
    assert (stored.state, stored.reason) == (State.FATAL, rt.reason)


async def test_a_daemon_restart_resets_neither_the_start_budget_nor_the_backoff(
    sup: Supervision,
) -> None:
    m1 = await sup.manager()
    await sup.add(m1, "bad", CRASH, startsecs=2.0, startretries=6)
    await wait_for(lambda: sup.store.load_runtime("bad").retries >= 2)
    await m1.shutdown(keep=True)
    stored = sup.store.load_runtime("bad")
    assert stored.state == State.BACKOFF and stored.backoff_until is not None
    assert 2 <= stored.retries < 6

    m2 = await sup.manager()
    view = await wait_state(m2, "bad", State.FATAL)
    assert view.runtime.reason == "exited too quickly (code 3); gave up after 6 failed start(s)"
    assert len(sup.side.spawned) == 6  # the budget went on: 6 starts in all, not 6 more


async def test_missing_executable_goes_fatal(sup: Supervision) -> None:
    m = await sup.manager()
    await sup.add(m, "nope", MISSING, startretries=2)
    view = await wait_state(m, "nope", State.FATAL)
    assert view.runtime.reason == (
        "executable '/nonexistent/prog' not found; gave up after 2 failed start(s)"
    )
    assert view.runtime.pid is None and sup.side.spawned == []


async def test_death_within_startsecs_backs_off_then_runs(sup: Supervision) -> None:
    m = await sup.manager()
    view = await sup.add(m, "a", UP, startsecs=1.0)
    first = pid_of(view)
    sup.side.kill(first)  # still STARTING: a failed start
    view = await wait_view(m, "a", lambda v: v.runtime.exit_code is not None)
    assert view.runtime.reason == f"exited too quickly (code {-signal.SIGKILL})"
    view = await wait_state(m, "a", State.RUNNING)
    assert pid_of(view) != first and view.runtime.restarts == 1
    assert view.runtime.reason is None


async def test_stop_ends_the_process(sup: Supervision) -> None:
    m = await sup.manager()
    pid = await sup.running(m, "a")
    view = await m.instances.stop_instance(APP, "a")  # returns once it is stopped
    rt = view.runtime
    assert rt.state == State.STOPPED and rt.pid is None
    assert rt.stop_step == StopStep.SIGNAL and rt.exit_code == -signal.SIGTERM
    assert view.spec.desired == Desired.STOPPED
    await wait_for(lambda: not sup.side.alive(pid))
    stored = sup.store.get_instance("a")
    assert stored is not None and stored.desired == Desired.STOPPED
    assert sup.store.load_runtime("a").stop_step == StopStep.SIGNAL


async def test_stop_kills_what_ignores_the_stop_signal(sup: Supervision) -> None:
    m = await sup.manager()
    await sup.add(m, "s", STUBBORN, startsecs=0.2, stopwaitsecs=0.3)
    pid = pid_of(await wait_state(m, "s", State.RUNNING))
    await sup.side.ready(m, "s")
    view = await m.instances.stop_instance(APP, "s")
    assert view.runtime.state == State.STOPPED
    assert view.runtime.stop_step == StopStep.KILL
    assert view.runtime.exit_code == -signal.SIGKILL
    assert not sup.side.alive(pid)


async def test_restart_gives_a_new_pid(sup: Supervision) -> None:
    m = await sup.manager()
    first = await sup.running(m, "a")
    await m.instances.restart_instance(APP, "a")
    view = await wait_view(
        m, "a", lambda v: v.runtime.state == State.RUNNING and v.runtime.pid != first
    )
    assert view.runtime.restarts == 1
    assert view.runtime.stop_step is None  # the new process was never stopped
    assert not sup.side.alive(first)
    assert sup.side.spawned == [first, pid_of(view)]


async def test_delete_removes_it(sup: Supervision) -> None:
    m = await sup.manager()
    pid = await sup.running(m, "a")
    await m.instances.delete_instance(APP, "a")
    assert sup.store.get_instance("a") is None
    assert "a" not in sup.store.runtimes()
    with pytest.raises(NotFound):
        await m.instances.get_instance(APP, "a")
    assert await m.instances.list_instances() == []
    await wait_for(lambda: not sup.side.alive(pid))


async def test_autostart_false_stays_stopped(sup: Supervision) -> None:
    m = await sup.manager()
    view = await sup.add(m, "idle", UP, autostart=False, startsecs=0.2)
    assert view.runtime.state == State.STOPPED and view.runtime.pid is None
    assert view.spec.desired == Desired.STOPPED
    assert sup.side.spawned == []  # a spawn would have happened inside create
    stored = sup.store.get_instance("idle")
    assert stored is not None and stored.desired == Desired.STOPPED
    await m.instances.start_instance(APP, "idle")
    view = await wait_state(m, "idle", State.RUNNING)
    assert view.runtime.restarts == 0


async def test_manager_restart_adopts_live_processes_and_starts_the_rest(
    sup: Supervision,
) -> None:
    m1 = await sup.manager()
    kept = await sup.running(m1, "kept")
    lost = await sup.running(m1, "lost")
    await sup.add(m1, "idle", UP, autostart=False)
    await m1.shutdown(keep=True)
    assert sup.side.alive(kept) and sup.side.alive(lost)
    sup.side.kill(lost)  # dies while no daemon is watching
    await wait_for(lambda: not sup.side.alive(lost))
    spawned = list(sup.side.spawned)

    m2 = await sup.manager()
    view = await m2.instances.get_instance(APP, "kept")
    assert view.runtime.state == State.RUNNING and view.runtime.pid == kept  # adopted
    assert view.uptime is not None
    new = await wait_view(
        m2, "lost", lambda v: v.runtime.state == State.RUNNING and v.runtime.pid != lost
    )
    assert sup.side.spawned == [*spawned, pid_of(new)]  # only "lost" was spawned again
    idle = await m2.instances.get_instance(APP, "idle")
    assert idle.runtime.state == State.STOPPED and idle.runtime.pid is None
    assert (await m2.instances.get_instance(APP, "kept")).runtime.pid == kept

    # The adopted process is supervised: its death is noticed (code unknown).
    sup.side.kill(kept)
    view = await wait_view(m2, "kept", lambda v: v.runtime.pid not in (None, kept))
    assert view.runtime.restarts == 1 and view.runtime.exit_code is None


async def test_a_process_started_but_never_recorded_is_adopted_never_doubled(
    sup: Supervision,
) -> None:
    m1 = await sup.manager()
    await sup.add(m1, "a", UP, autostart=False, startsecs=0.2)
    await m1.shutdown(keep=True)
    # A user started "a": its desired state was committed, the daemon forked
    # (twice: a retry) and was killed before it committed either pid. It had
    # also forked for "ghost", whose delete then ended.
    sup.store.set_desired("a", Desired.RUNNING)
    older = sup.side.orphan(sup.branch_id, "a")
    newest = sup.side.orphan(sup.branch_id, "a")
    ghost = sup.side.orphan(sup.branch_id, "ghost")
    foreign = sup.side.orphan("another-branch", "a")  # not ours: left alone
    spawned = len(sup.side.spawned)

    m2 = await sup.manager()
    view = await wait_state(m2, "a", State.RUNNING)
    assert view.runtime.pid == newest
    await wait_for(lambda: not sup.side.alive(older) and not sup.side.alive(ghost))
    assert sup.side.alive(newest) and sup.side.alive(foreign)
    assert len(sup.side.spawned) == spawned  # adopted, not started again
    stored = sup.store.load_runtime("a")
    assert stored.pid == newest


async def test_adopted_while_starting_stays_starting_until_startsecs(sup: Supervision) -> None:
    m1 = await sup.manager()
    await sup.add(m1, "slow", UP, startsecs=1.5)
    pid = pid_of(await wait_state(m1, "slow", State.STARTING))
    await m1.shutdown(keep=True)  # the daemon goes while it is still starting
    m2 = await sup.manager()
    view = await m2.instances.get_instance(APP, "slow")
    # adopted, not given "running": it has not stayed up startsecs yet
    assert (view.runtime.state, view.runtime.pid) == (State.STARTING, pid)
    view = await wait_state(m2, "slow", State.RUNNING)  # once the rest of startsecs passed
    assert view.runtime.pid == pid and sup.side.spawned == [pid]


async def test_adopted_while_starting_after_startsecs_is_running(sup: Supervision) -> None:
    m1 = await sup.manager()
    await sup.add(m1, "slow", UP, startsecs=0.3)
    pid = pid_of(await wait_state(m1, "slow", State.STARTING))
    started = time.time()
    await m1.shutdown(keep=True)
    await wait_for(lambda: time.time() > started + 0.5)  # it stays up with no daemon
    m2 = await sup.manager()
    view = await m2.instances.get_instance(APP, "slow")
    assert (view.runtime.state, view.runtime.pid) == (State.RUNNING, pid)


async def test_adopted_while_restarting_is_restarted(sup: Supervision) -> None:
    m1 = await sup.manager()
    await sup.add(m1, "s", STUBBORN, startsecs=0.2, stopwaitsecs=2.0)
    old = pid_of(await wait_state(m1, "s", State.RUNNING))
    await sup.side.ready(m1, "s")
    restarting = asyncio.create_task(m1.instances.restart_instance(APP, "s"))
    await wait_state(m1, "s", State.STOPPING)  # it ignores TERM: the stop lasts
    await m1.shutdown(keep=True)  # the daemon goes in the middle of the restart
    restarting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await restarting
    assert sup.side.alive(old)

    m2 = await sup.manager()
    m2_view = await m2.instances.get_instance(APP, "s")
    assert m2_view.runtime.pid == old  # adopted, and the restart goes on
    # not left running as if no restart had been asked: the old process goes
    await wait_for(lambda: not sup.side.alive(old))
    view = await wait_view(
        m2, "s", lambda v: v.runtime.state == State.RUNNING and v.runtime.pid != old
    )
    assert view.runtime.pid != old


async def test_adopted_process_exit_with_autorestart_never(sup: Supervision) -> None:
    m1 = await sup.manager()
    await sup.add(m1, "once", UP, startsecs=0.2, autorestart=Autorestart.NEVER.value)
    pid = pid_of(await wait_state(m1, "once", State.RUNNING))
    await m1.shutdown(keep=True)
    m2 = await sup.manager()
    assert (await m2.instances.get_instance(APP, "once")).runtime.pid == pid
    sup.side.kill(pid)
    view = await wait_state(m2, "once", State.EXITED)
    assert view.runtime.pid is None and view.runtime.exit_code is None
    assert sup.side.spawned == [pid]


async def test_adopted_process_whose_desired_is_stopped_is_stopped(sup: Supervision) -> None:
    m1 = await sup.manager()
    pid = await sup.running(m1, "a")
    await m1.shutdown(keep=True)
    sup.store.set_desired("a", Desired.STOPPED)  # as if stopped when the daemon went down

    m2 = await sup.manager()
    await wait_state(m2, "a", State.STOPPED)
    await wait_for(lambda: not sup.side.alive(pid))
    assert sup.side.spawned == [pid]


async def test_shutdown_without_keep_stops_everything(sup: Supervision) -> None:
    m = await sup.manager()
    pids = [await sup.running(m, name) for name in ("a", "b")]
    await sup.add(m, "bad", CRASH, startsecs=2.0, startretries=100)
    await wait_state(m, "bad", State.BACKOFF)
    await m.shutdown(keep=False)
    for pid in pids:
        assert not sup.side.alive(pid)
    runtimes = sup.store.runtimes()
    assert {name: rt.state for name, rt in runtimes.items()} == {
        "a": State.STOPPED,
        "b": State.STOPPED,
        "bad": State.STOPPED,
    }
    assert all(rt.pid is None for rt in runtimes.values())
    spawned = len(sup.side.spawned)
    # the backoff timer must not fire any more
    await asyncio.sleep(sup.config.supervision.backoff_max)
    assert len(sup.side.spawned) == spawned


async def test_shutdown_with_keep_leaves_them_running(sup: Supervision) -> None:
    m = await sup.manager()
    pids = {name: await sup.running(m, name) for name in ("a", "b")}
    await m.shutdown(keep=True)
    for name, pid in pids.items():
        assert sup.side.alive(pid)
        rt = sup.store.load_runtime(name)
        assert (rt.state, rt.pid) == (State.RUNNING, pid)


async def test_start_during_delete_leaves_no_orphan(sup: Supervision) -> None:
    m = await sup.manager()
    await sup.add(m, "s", STUBBORN, startsecs=0.2, stopwaitsecs=0.3)
    await wait_state(m, "s", State.RUNNING)
    await sup.side.ready(m, "s")
    deleting = asyncio.create_task(m.instances.delete_instance(APP, "s"))
    await wait_state(m, "s", State.STOPPING)
    with pytest.raises(Conflict):  # e.g. a second API client
        await m.instances.start_instance(APP, "s")
    await deleting
    assert sup.store.get_instance("s") is None
    assert [pid for pid in sup.side.spawned if sup.side.alive(pid)] == []


# The same engine on a fake clock: timers fire when the test moves time -----------------


class TimedFake(ScriptedFake):
    """The scripted fake, noting the clock at each spawn."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.spawned_at: list[float] = []

    def spawn(self, spec: LaunchSpec) -> Launched:
        launched = super().spawn(spec)
        self.spawned_at.append(self.clock.monotonic())
        return launched


@dataclass
class Timed:
    """A LocalBranch over the fake launcher, a fake clock and its scheduler."""

    m: LocalBranch
    fake: TimedFake
    sched: FakeScheduler

    @property
    def now(self) -> float:
        return self.sched.clock.monotonic()

    async def add(self, name: str, command: tuple[str, ...], **fields: Any) -> InstanceView:
        await self.m.apps.put_app(APP, {}, {})
        fields = {"name": name, "command": list(command), **fields}
        view = await self.m.instances.create_instance(APP, fields)
        await self.sched.settle()  # a crash at once (CRASH) is delivered
        return view

    async def state(self, name: str) -> State:
        return (await self.m.instances.get_instance(APP, name)).runtime.state


@pytest.fixture
async def timed(tmp_path: Path) -> AsyncIterator[Timed]:
    config = Config.for_tests(tmp_path)
    store = Store(config.db_path)
    clock = FakeClock()
    sched = FakeScheduler(clock)
    fake = TimedFake(clock)
    m = build(
        store,
        fake,
        clock,
        config,
        store.branch_id(),
        scheduler=sched,
        remote=StubRemoteControl(),
        bus=EventBus(),
    )
    await m.start()
    began = time.monotonic()
    yield Timed(m, fake, sched)
    await m.shutdown(keep=True)
    await asyncio.sleep(0)
    store.close()
    assert time.monotonic() - began < 5.0  # (no real waiting: well under its fake time)


async def test_fake_clock_backoff_doubles_up_to_the_cap(timed: Timed) -> None:
    # backoff_base 0.1, backoff_max 0.5 (Config.for_tests)
    await timed.add("bad", CRASH, startsecs=2.0, startretries=5)
    assert await timed.state("bad") == State.BACKOFF
    await timed.sched.advance(10.0)
    assert await timed.state("bad") == State.FATAL
    at = timed.fake.spawned_at
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(at)]
    assert gaps == [0.1, 0.2, 0.4, 0.5]
    view = await timed.m.instances.get_instance(APP, "bad")
    assert view.runtime.reason == "exited too quickly (code 3); gave up after 5 failed start(s)"


async def test_fake_clock_running_once_startsecs_passed(timed: Timed) -> None:
    await timed.add("a", UP, startsecs=1.0)
    await timed.sched.advance(0.999)
    assert await timed.state("a") == State.STARTING
    await timed.sched.advance(0.001)
    assert await timed.state("a") == State.RUNNING

    # a death within startsecs is a failed start: backoff, then a new start
    await timed.add("b", UP, startsecs=1.0)
    first = timed.fake.pids[-1]
    timed.fake.exit(first, -signal.SIGKILL)
    await timed.sched.settle()
    assert await timed.state("b") == State.BACKOFF
    await timed.sched.advance(0.1)
    view = await timed.m.instances.get_instance(APP, "b")
    assert view.runtime.state == State.STARTING and pid_of(view) != first
    await timed.sched.advance(1.0)
    assert await timed.state("b") == State.RUNNING


async def test_fake_clock_stop_kills_at_stopwaitsecs(timed: Timed) -> None:
    await timed.add("s", STUBBORN, startsecs=0.2, stopwaitsecs=3.0)
    await timed.sched.advance(0.2)
    pid = timed.fake.pids[-1]
    assert await timed.state("s") == State.RUNNING

    stopping = asyncio.create_task(timed.m.instances.stop_instance(APP, "s"))
    await timed.sched.advance(2.999)
    assert not stopping.done() and await timed.state("s") == State.STOPPING
    assert [sig for p, sig, _ in timed.fake.signals if p == pid] == [signal.SIGTERM]
    await timed.sched.advance(0.001)
    view = await stopping
    assert (view.runtime.state, view.runtime.stop_step) == (State.STOPPED, StopStep.KILL)
    assert view.runtime.exit_code == -signal.SIGKILL
    assert (pid, signal.SIGKILL, True) in timed.fake.signals


async def test_fake_clock_forever_never_goes_fatal_and_stays_capped(timed: Timed) -> None:
    # backoff_base 0.1, backoff_max 0.5 (Config.for_tests): 200 failed starts
    await timed.add("loop", CRASH, startsecs=2.0, startretries="forever")
    await timed.sched.advance(0.1 + 0.2 + 0.4 + 0.5 * 197)
    view = await timed.m.instances.get_instance(APP, "loop")
    assert view.runtime.state in (State.BACKOFF, State.STARTING)
    assert view.spec.policy.startretries is None and view.to_json()["startretries"] == "forever"
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(timed.fake.spawned_at)]
    assert len(gaps) >= 199 and gaps[:3] == [0.1, 0.2, 0.4] and set(gaps[3:]) == {0.5}
    assert view.runtime.retries >= 199  # (persisted: a daemon restart resumes the backoff)
    assert view.runtime.reason == "exited too quickly (code 3)"
