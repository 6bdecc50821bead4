"""The supervision state machine of one instance: pure, no I/O, no clock.

``step(proc, event, policy, now)`` returns the next ``Proc`` and the commands
the manager must carry out. Timers are data: ``Proc.deadline`` says when the
manager must feed a ``Timeout``; a stale ``Timeout`` (before the deadline) is
ignored, so the manager never has to cancel one precisely.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from branchd.model import Autorestart, Policy, State, StopStep


@dataclass(frozen=True, slots=True)
class Proc:
    state: State = State.STOPPED
    pid: int | None = None
    retries: int = 0  # failed starts in a row; reset once running
    restarts: int = 0  # every spawn after the first one
    exit_code: int | None = None
    started: float | None = None  # monotonic time of the last spawn
    deadline: float | None = None  # when the manager must feed Timeout
    then_start: bool = False  # a restart: start again once the stop is done
    stop_step: StopStep | None = None
    reason: str | None = None
    spawned_once: bool = False
    killed_for: str | None = None  # why the supervisor itself killed the process
    #: Why it is not ready yet, this spawn: its readiness probe's last failure
    #: (starting), or what it still waits for (waiting).
    not_ready: str | None = None
    live_failed: int = 0  # liveness probe failures in a row, this spawn


@dataclass(frozen=True)
class Backoff:
    """Exponential delay between failed starts: base, 2*base, 4*base... up to cap."""

    base: float = 1.0
    cap: float = 60.0

    def delay(self, retries: int) -> float:
        # The exponent stops at 60 (2**60 s is past any cap): an instance that
        # retries forever counts past 1,024 failed starts, where base * 2**n
        # no longer fits in a float (OverflowError, in the engine's loop).
        return float(min(self.cap, self.base * 2.0 ** min(60, max(0, retries - 1))))


# Events -----------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """A user (or autostart) wants it running."""


@dataclass(frozen=True)
class Stop:
    """A user wants it stopped."""


@dataclass(frozen=True)
class Restart:
    """Stop if running, then start."""


@dataclass(frozen=True)
class Spawned:
    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    reason: str


@dataclass(frozen=True)
class Exited:
    code: int | None  # None: unknown (an adopted process is not our child)
    #: The last line it wrote to stderr, if the manager read one (the cause
    #: of a crash at start: "ModuleNotFoundError: No module named 'shop'").
    stderr: str | None = None
    #: What ended it, when the launcher knows more than the code (the OOM
    #: killer of its cgroup at memory_max): its reason.
    cause: str | None = None


@dataclass(frozen=True)
class Timeout:
    """The deadline in ``Proc.deadline`` has come."""


@dataclass(frozen=True)
class Ready:
    """A Celery worker answered its first ping."""


@dataclass(frozen=True)
class Hung:
    """A running worker went silent (or passed its memory limit): kill it."""

    reason: str


@dataclass(frozen=True)
class Drained:
    """A stopping worker has no task left (its consumers were cancelled and
    its running tasks finished): the stop signal that follows cuts nothing."""


@dataclass(frozen=True)
class DepsReady:
    """Every instance it starts after is running (ready): spawn it now."""


@dataclass(frozen=True)
class Waiting:
    """It still waits for the instances it starts after, for this reason."""

    reason: str


@dataclass(frozen=True)
class NotReady:
    """Its readiness probe failed (or said where it is): not running yet."""

    reason: str


@dataclass(frozen=True)
class LiveFailed:
    """Its liveness probe failed once."""

    reason: str


@dataclass(frozen=True)
class LiveOk:
    """Its liveness probe passed: the count of failures in a row starts over."""


@dataclass(frozen=True)
class Adopt:
    """A live process from before a daemon restart is ours again.

    ``was`` is the state it had then and ``up_for`` how long it has lived:
    one adopted while still starting must earn ``running`` again (by its
    first ping, or by staying up ``startsecs``), never be given it.
    """

    pid: int
    was: State = State.RUNNING
    up_for: float = float("inf")


Event = (
    Start
    | Stop
    | Restart
    | Spawned
    | SpawnFailed
    | Exited
    | Timeout
    | Adopt
    | Ready
    | Hung
    | Drained
    | DepsReady
    | Waiting
    | NotReady
    | LiveFailed
    | LiveOk
)

# Commands ---------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Start the process; the manager answers with Spawned or SpawnFailed."""


@dataclass(frozen=True)
class Signal:
    name: str  # "TERM", "INT"... without SIG
    group: bool = True  # to the whole process group, or the main process only


@dataclass(frozen=True)
class Kill:
    """SIGKILL to the whole process group."""


@dataclass(frozen=True)
class Reap:
    """The main process is gone: SIGKILL whatever is left of its group."""


@dataclass(frozen=True)
class Await:
    """Look at the instances it starts after: answer DepsReady, or Waiting."""


Command = Spawn | Signal | Kill | Reap | Await

_LIVE = (State.STARTING, State.RUNNING, State.STOPPING)


def step(
    proc: Proc,
    event: Event,
    policy: Policy,
    now: float,
    backoff: Backoff = Backoff(),
) -> tuple[Proc, list[Command]]:
    """Apply one event; return the new state and the commands to run."""
    s = proc.state
    match event:
        case Start() | Restart() if s in (State.STOPPED, State.EXITED, State.FATAL, State.BACKOFF):
            fresh = replace(proc, retries=0, reason=None)
            return _start(fresh, policy, now, restart=proc.spawned_once)
        case Start():
            if s == State.STOPPING:
                return replace(proc, then_start=True), []
            return proc, []  # already starting or running
        case Restart():
            if s == State.STOPPING:
                return replace(proc, then_start=True), []
            if proc.pid is None:  # a spawn is in flight: what comes up is fresh already
                return proc, []
            return _begin_stop(replace(proc, then_start=True), policy, now)
        case Stop():
            if s in (State.STARTING, State.RUNNING):
                return _begin_stop(replace(proc, then_start=False), policy, now)
            if s == State.STOPPING:
                return replace(proc, then_start=False), []
            return replace(proc, state=State.STOPPED, deadline=None, pid=None), []
        # Only the answer to our own Spawn: a stray one never replaces a live pid.
        case Spawned(pid=pid) if s == State.STARTING and proc.pid is None:
            proc = replace(proc, pid=pid, started=now, stop_step=None)
            if policy.ready_by_probe:
                return replace(proc, deadline=now + policy.ready_timeout), []
            if policy.ready_by_ping:
                deadline = now + policy.startsecs if policy.startsecs > 0 else None
                return replace(proc, deadline=deadline), []
            if policy.startsecs <= 0:
                return replace(proc, state=State.RUNNING, retries=0, deadline=None), []
            return replace(proc, deadline=now + policy.startsecs), []
        case SpawnFailed(reason=reason) if s == State.STARTING and proc.pid is None:
            return _failed_start(replace(proc, pid=None), policy, now, backoff, reason)
        case Exited(code=code, stderr=stderr, cause=cause) if s in _LIVE and proc.pid is not None:
            if cause and not proc.killed_for:
                proc = replace(proc, killed_for=cause)
            return _exited(proc, code, policy, now, backoff, stderr)
        case Timeout() if proc.deadline is not None and now >= proc.deadline:
            return _timeout(proc, policy, now, backoff)
        case Ready() if s == State.STARTING and proc.pid is not None:
            return replace(proc, state=State.RUNNING, retries=0, deadline=None, reason=None), []
        case Hung(reason=reason) if s in (State.STARTING, State.RUNNING) and proc.pid is not None:
            return replace(proc, killed_for=reason), [Kill()]
        case Drained() if s == State.STOPPING and proc.stop_step is None:
            return replace(proc, stop_step=StopStep.DRAIN), []
        case DepsReady() if s == State.WAITING:
            # (its reason said what it waited for: over now)
            return _spawn(replace(proc, reason=None), now, restart=proc.spawned_once)
        case Waiting(reason=reason) if s == State.WAITING:
            return replace(proc, not_ready=reason, reason=reason), []
        case NotReady(reason=reason) if (
            s == State.STARTING and proc.pid is not None and policy.ready_by_probe
        ):
            return replace(proc, not_ready=reason, reason=f"not ready: {reason}"), []
        case LiveFailed(reason=reason) if s == State.RUNNING and proc.pid is not None:
            failed = proc.live_failed + 1
            if failed < policy.live_failures:
                return replace(proc, live_failed=failed), []
            why = f"liveness probe failed {failed} time(s) in a row: {reason}"
            return _begin_stop(replace(proc, then_start=True, killed_for=why), policy, now)
        case LiveOk() if s == State.RUNNING and proc.live_failed:
            return replace(proc, live_failed=0), []
        case Adopt(pid=pid, was=was, up_for=up_for) if s not in _LIVE:
            return _adopt(proc, pid, was, up_for, policy, now), []
    return proc, []


def _adopt(proc: Proc, pid: int, was: State, up_for: float, policy: Policy, now: float) -> Proc:
    live = replace(proc, pid=pid, started=now, spawned_once=True, reason=None)
    if was == State.STARTING:
        if policy.ready_by_probe:  # as for a ping: a full window from now
            return replace(live, state=State.STARTING, deadline=now + policy.ready_timeout)
        if policy.ready_by_ping:
            # running only once it answers a ping: a full window for that from now
            deadline = now + policy.startsecs if policy.startsecs > 0 else None
            return replace(live, state=State.STARTING, deadline=deadline)
        left = policy.startsecs - max(0.0, up_for)
        if left > 0:
            return replace(live, state=State.STARTING, deadline=now + left)
    return replace(live, state=State.RUNNING, retries=0, deadline=None)


def _start(proc: Proc, policy: Policy, now: float, *, restart: bool) -> tuple[Proc, list[Command]]:
    """A spawn, or, for an instance that starts after others, the wait for them
    first (the restart is counted at the spawn itself)."""
    if not policy.awaits:
        return _spawn(proc, now, restart=restart)
    waiting = replace(
        proc,
        state=State.WAITING,
        pid=None,
        deadline=now + policy.after_timeout,
        then_start=False,
        not_ready=None,
        # (what came up before is gone: it is counted again, as a restart, at its spawn)
        spawned_once=proc.spawned_once or restart,
    )
    return waiting, [Await()]


def _spawn(proc: Proc, now: float, *, restart: bool) -> tuple[Proc, list[Command]]:
    return (
        replace(
            proc,
            state=State.STARTING,
            pid=None,
            started=now,
            deadline=None,
            then_start=False,
            restarts=proc.restarts + (1 if restart else 0),
            spawned_once=True,
            not_ready=None,
            live_failed=0,
        ),
        [Spawn()],
    )


def _begin_stop(proc: Proc, policy: Policy, now: float) -> tuple[Proc, list[Command]]:
    if proc.pid is None:  # nothing to signal
        return replace(proc, state=State.STOPPED, deadline=None), []
    nxt = replace(proc, state=State.STOPPING, deadline=now + policy.stopwaitsecs, stop_step=None)
    return nxt, [Signal(policy.stopsignal, group=policy.stop_group)]


def _failed_start(
    proc: Proc, policy: Policy, now: float, backoff: Backoff, reason: str
) -> tuple[Proc, list[Command]]:
    retries = proc.retries + 1
    if policy.startretries is not None and retries >= policy.startretries:
        msg = f"{reason}; gave up after {retries} failed start(s)"
        return (
            replace(proc, state=State.FATAL, pid=None, retries=retries, deadline=None, reason=msg),
            [],
        )
    return (
        replace(
            proc,
            state=State.BACKOFF,
            pid=None,
            retries=retries,
            deadline=now + backoff.delay(retries),
            reason=reason,
        ),
        [],
    )


def _exited(
    proc: Proc,
    code: int | None,
    policy: Policy,
    now: float,
    backoff: Backoff,
    stderr: str | None = None,
) -> tuple[Proc, list[Command]]:
    gone = replace(proc, pid=None, exit_code=code, deadline=None, killed_for=None)
    if proc.killed_for:
        gone = replace(gone, reason=proc.killed_for)
    if proc.state == State.STOPPING:
        step_ = proc.stop_step or StopStep.SIGNAL
        gone = replace(gone, stop_step=step_)
        if proc.then_start:
            # (a restart the supervisor decided keeps saying why, as a kill does)
            anew = replace(gone, retries=0, reason=proc.killed_for)
            nxt, cmds = _start(anew, policy, now, restart=True)
            return nxt, [Reap(), *cmds]
        return replace(gone, state=State.STOPPED), [Reap()]
    if proc.state == State.STARTING:
        why = proc.killed_for or f"exited too quickly (code {code})"
        if not proc.killed_for and code not in (0, None) and stderr:
            why = f"{why}: {stderr}"  # a crash at start: its own words say why
        nxt, cmds = _failed_start(gone, policy, now, backoff, why)
        return nxt, [Reap(), *cmds]
    # RUNNING
    expected = code is not None and code in policy.exitcodes
    again = policy.autorestart == Autorestart.ALWAYS or (
        policy.autorestart == Autorestart.ON_FAILURE and not expected
    )
    if again:
        nxt, cmds = _start(replace(gone, retries=0), policy, now, restart=True)
        return nxt, [Reap(), *cmds]
    return replace(gone, state=State.EXITED), [Reap()]


def _timeout(
    proc: Proc, policy: Policy, now: float, backoff: Backoff
) -> tuple[Proc, list[Command]]:
    if proc.state == State.STARTING and proc.pid is not None and policy.ready_by_probe:
        # Never ready in time: kill it; its exit counts as a failed start.
        reason = f"not ready within {policy.ready_timeout:g}s"
        if proc.not_ready:
            reason = f"{reason}: {proc.not_ready}"
        return replace(proc, deadline=None, killed_for=reason), [Kill()]
    if proc.state == State.STARTING and proc.pid is not None and policy.ready_by_ping:
        # No answer in time: kill it; its exit counts as a failed start.
        reason = f"no answer to ping within {policy.startsecs:g}s"
        return replace(proc, deadline=None, killed_for=reason), [Kill()]
    if proc.state == State.STARTING and proc.pid is not None:
        return replace(proc, state=State.RUNNING, retries=0, deadline=None, reason=None), []
    if proc.state == State.BACKOFF:
        # (a restart only if it ever ran: the backoff of a wait for the
        # instances it starts after may come before its first spawn)
        return _start(proc, policy, now, restart=proc.spawned_once)
    if proc.state == State.WAITING:
        why = proc.not_ready or "waiting for the instances it starts after"
        return _failed_start(
            replace(proc, deadline=None),
            policy,
            now,
            backoff,
            f"{why}; gave up waiting after {policy.after_timeout:g}s",
        )
    if proc.state == State.STOPPING:
        return replace(proc, deadline=None, stop_step=StopStep.KILL), [Kill()]
    return replace(proc, deadline=None), []
