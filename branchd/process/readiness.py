"""Probes under supervision: readiness while starting, liveness while running.

The engine owns the state machines; this service runs the probes of process
instances (through a ``ProbeRunner``) and the sd_notify sockets, and reports
back as machine events (``Ready``, ``NotReady``, ``LiveOk``, ``LiveFailed``).
What the answers mean is the machine's; when to try again is
``probes.ready_retry_delay``. Every wait is on the injected scheduler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol

from branchd.clock import Scheduler
from branchd.model import InstanceSpec, Kind, State
from branchd.process.machine import Event, LiveFailed, LiveOk, NotReady, Proc, Ready
from branchd.process.prober import NotifySockets, ProbeRunner, sent_by
from branchd.process.probes import Notice, Probe, ProbeKind, parse_probe, ready_retry_delay

log = logging.getLogger(__name__)


class Host(Protocol):
    """What the service needs from the engine."""

    def feed(self, name: str, event: Event) -> None: ...
    def proc(self, name: str) -> Proc | None: ...
    def spec(self, name: str) -> InstanceSpec | None: ...


class Probing:
    def __init__(self, runner: ProbeRunner, notify: NotifySockets, scheduler: Scheduler) -> None:
        self._runner = runner
        self._notify = notify
        self._sched = scheduler
        self._host: Host | None = None
        #: The probe loop of each instance, with the pid and state it is for.
        self._loops: dict[str, tuple[int, State, asyncio.Task[None]]] = {}
        #: What an exec probe runs with: the instance's environment, directory, user.
        self._context: dict[str, tuple[Mapping[str, str], str | None, str | None]] = {}
        self._last_env: Mapping[str, str] = {}

    def bind(self, host: Host) -> None:
        self._host = host

    # what the engine calls ----------------------------------------------------------

    def before_spawn(self, spec: InstanceSpec, env: dict[str, str]) -> None:
        """Ready a spawn: $NOTIFY_SOCKET for a notify probe (into ``env``), and
        the context of its exec probes."""
        if spec.kind != Kind.PROCESS:
            return
        # Instances of one app mostly have the same environment: one copy for
        # a run of them (200 copies were 70 KiB of the daemon's memory; issue
        # 10, part 9). A stored copy is never changed, so sharing it is safe.
        if self._last_env != env:
            self._last_env = dict(env)
        self._context[spec.name] = (self._last_env, spec.cwd, spec.user)
        if spec.ready is not None and parse_probe(spec.ready).kind == ProbeKind.NOTIFY:
            name = spec.name
            env["NOTIFY_SOCKET"] = self._notify.open(
                name, lambda pid, notice: self._notice(name, pid, notice)
            )
        else:
            self._notify.close(spec.name)

    def changed(self, name: str) -> None:
        """The instance's state or pid changed: the loop it needs now runs (and
        no other)."""
        host = self._host
        spec = host.spec(name) if host else None
        proc = host.proc(name) if host else None
        want: tuple[int, State, Probe] | None = None
        if spec is not None and proc is not None and proc.pid is not None:
            want = _wanted(spec, proc.pid, proc.state)
        have = self._loops.get(name)
        if have is not None and want is not None and have[:2] == want[:2]:
            return
        if have is not None:
            have[2].cancel()
            del self._loops[name]
        if want is None:
            return
        pid, state, probe = want
        work = self._ready(name, pid, probe) if state == State.STARTING else self._live(name, pid)
        self._loops[name] = (pid, state, self._task(name, work))

    def forget(self, name: str) -> None:
        have = self._loops.pop(name, None)
        if have is not None:
            have[2].cancel()
        self._context.pop(name, None)
        self._notify.close(name)

    async def close(self) -> None:
        tasks = [t for _, _, t in self._loops.values()]
        for task in tasks:
            task.cancel()
        self._loops.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._notify.close_all()

    # the loops -------------------------------------------------------------------

    def _task(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)

        def done(t: asyncio.Task[None]) -> None:
            have = self._loops.get(name)
            if have is not None and have[2] is t:
                del self._loops[name]
            if not t.cancelled() and t.exception() is not None:
                log.error("probe loop of %s failed", name, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    def _current(self, name: str, pid: int, state: State) -> bool:
        proc = self._host.proc(name) if self._host else None
        return proc is not None and proc.pid == pid and proc.state == state

    def _feed(self, name: str, event: Event) -> None:
        if self._host is not None:
            self._host.feed(name, event)

    async def _check(self, name: str, probe: Probe, timeout: float) -> str | None:
        env, cwd, user = self._context.get(name, (None, None, None))
        return await self._runner.check(probe, timeout, env=env, cwd=cwd, user=user)

    async def _ready(self, name: str, pid: int, probe: Probe) -> None:
        """Try the readiness probe until it passes (the machine's deadline ends
        a start that never does); each new reason it fails for is said."""
        spec = self._host.spec(name) if self._host else None
        if spec is None:
            return
        timeout = min(spec.live_timeout, spec.policy.ready_timeout)
        failures, said = 0, None
        while self._current(name, pid, State.STARTING):
            why = await self._check(name, probe, timeout)
            if not self._current(name, pid, State.STARTING):
                return
            if why is None:
                log.info("%s (pid %d) is ready: %s passed", name, pid, probe.label)
                self._feed(name, Ready())
                return
            failures += 1
            if why != said:
                self._feed(name, NotReady(why))
                said = why
            await self._sched.sleep(ready_retry_delay(failures))

    async def _live(self, name: str, pid: int) -> None:
        spec = self._host.spec(name) if self._host else None
        if spec is None or spec.live is None:
            return
        probe = parse_probe(spec.live)
        while True:
            await self._sched.sleep(spec.live_period)
            if not self._current(name, pid, State.RUNNING):
                return
            why = await self._check(name, probe, spec.live_timeout)
            if not self._current(name, pid, State.RUNNING):
                return
            if why is not None:
                log.warning("%s (pid %d): liveness probe failed: %s", name, pid, why)
            self._feed(name, LiveOk() if why is None else LiveFailed(why))

    def _notice(self, name: str, sender: int | None, notice: Notice) -> None:
        proc = self._host.proc(name) if self._host else None
        if proc is None or proc.pid is None or proc.state != State.STARTING:
            return
        if not sent_by(sender, proc.pid):
            log.warning("%s: notify message from pid %s, not one of its processes", name, sender)
            return
        if notice.status:
            self._feed(name, NotReady(f"no READY=1 yet (status: {notice.status})"))
        if notice.ready:
            log.info("%s (pid %d) is ready: READY=1", name, proc.pid)
            self._feed(name, Ready())


def _wanted(spec: InstanceSpec, pid: int, state: State) -> tuple[int, State, Probe] | None:
    """The probe loop an instance needs in ``state`` (notify needs none: its
    socket is read as datagrams come; a Celery worker has its pings instead)."""
    if spec.kind != Kind.PROCESS:
        return None
    try:
        if state == State.STARTING and spec.ready is not None:
            probe = parse_probe(spec.ready)
            return None if probe.kind == ProbeKind.NOTIFY else (pid, state, probe)
        if state == State.RUNNING and spec.live is not None:
            return (pid, state, parse_probe(spec.live))
    except ValueError:  # (checked when declared: only a record gone bad gets here)
        log.exception("%s: its probe cannot be read", spec.name)
    return None
