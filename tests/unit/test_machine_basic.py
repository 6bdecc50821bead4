"""Scenario tests of the supervision state machine, on a simulated clock."""

import pytest

from branchd.model import Autorestart, Policy, State, StopStep
from branchd.process.machine import (
    Adopt,
    Backoff,
    Exited,
    Kill,
    Proc,
    Reap,
    Signal,
    Spawn,
    Spawned,
    Start,
    Stop,
    Timeout,
    step,
)

POLICY = Policy(startsecs=1.0, startretries=3, stopwaitsecs=5.0)


def test_start_runs_after_startsecs() -> None:
    p, cmds = step(Proc(), Start(), POLICY, 0.0)
    assert p.state == State.STARTING and cmds == [Spawn()]
    p, _ = step(p, Spawned(42), POLICY, 0.0)
    assert p.deadline == 1.0
    p, _ = step(p, Timeout(), POLICY, 0.5)  # stale: too early
    assert p.state == State.STARTING
    p, _ = step(p, Timeout(), POLICY, 1.0)
    assert p.state == State.RUNNING and p.pid == 42


def test_crash_loop_ends_fatal_with_growing_backoff() -> None:
    backoff = Backoff(base=1.0, cap=60.0)
    p, _ = step(Proc(), Start(), POLICY, 0.0)
    now = 0.0
    delays = []
    for attempt in range(3):
        p, _ = step(p, Spawned(100 + attempt), POLICY, now, backoff)
        p, cmds = step(p, Exited(1), POLICY, now + 0.1, backoff)
        assert cmds[0] == Reap()
        if p.state == State.FATAL:
            break
        assert p.state == State.BACKOFF and p.deadline is not None
        delays.append(p.deadline - (now + 0.1))
        now = p.deadline
        p, cmds = step(p, Timeout(), POLICY, now, backoff)
        assert cmds == [Spawn()]
    assert p.state == State.FATAL
    assert delays == [1.0, 2.0]


def test_stop_timeout_kills_the_group() -> None:
    p = Proc(state=State.RUNNING, pid=7)
    p, cmds = step(p, Stop(), POLICY, 10.0)
    assert p.state == State.STOPPING and cmds == [Signal("TERM")]
    p, cmds = step(p, Timeout(), POLICY, 15.0)
    assert cmds == [Kill()]
    p, cmds = step(p, Exited(-9), POLICY, 15.1)
    assert p.state == State.STOPPED and p.stop_step == StopStep.KILL and cmds == [Reap()]


def test_autorestart_on_failure_keeps_clean_exit() -> None:
    policy = Policy(autorestart=Autorestart.ON_FAILURE)
    p = Proc(state=State.RUNNING, pid=7)
    p0, _ = step(p, Exited(0), policy, 1.0)
    assert p0.state == State.EXITED and p0.exit_code == 0
    p1, cmds = step(p, Exited(3), policy, 1.0)
    assert p1.state == State.STARTING and cmds == [Reap(), Spawn()] and p1.restarts == 1


CELERY = Policy(
    startsecs=30.0, startretries=3, stopwaitsecs=600.0, ready_by_ping=True, stop_group=False
)


def test_celery_runs_once_it_answers_a_ping_not_after_startsecs() -> None:
    from branchd.process.machine import Ready

    p, _ = step(Proc(), Start(), CELERY, 0.0)
    p, _ = step(p, Spawned(9), CELERY, 0.0)
    assert p.state == State.STARTING and p.deadline == 30.0
    p, _ = step(p, Ready(), CELERY, 0.4)
    assert p.state == State.RUNNING and p.deadline is None


def test_celery_start_timeout_kills_and_counts_as_failed_start() -> None:
    p, _ = step(Proc(), Start(), CELERY, 0.0)
    p, _ = step(p, Spawned(9), CELERY, 0.0)
    p, cmds = step(p, Timeout(), CELERY, 30.0)
    assert cmds == [Kill()] and p.state == State.STARTING
    p, cmds = step(p, Exited(-9), CELERY, 30.1)
    assert p.state == State.BACKOFF
    assert p.reason == "no answer to ping within 30s"


def test_celery_stop_signals_the_main_process_only() -> None:
    p = Proc(state=State.RUNNING, pid=9)
    p, cmds = step(p, Stop(), CELERY, 0.0)
    assert cmds == [Signal("TERM", group=False)]
    p, cmds = step(p, Timeout(), CELERY, 600.0)
    assert cmds == [Kill()]  # the group, at the end


def test_hung_worker_is_killed_and_restarted_with_the_reason() -> None:
    from branchd.process.machine import Hung

    p = Proc(state=State.RUNNING, pid=9, spawned_once=True)
    p, cmds = step(p, Hung("no ping answer for 60s"), CELERY, 100.0)
    assert cmds == [Kill()] and p.state == State.RUNNING
    p, cmds = step(p, Exited(-9), CELERY, 100.1)
    assert p.state == State.STARTING and cmds == [Reap(), Spawn()]
    assert p.reason == "no ping answer for 60s" and p.restarts == 1


PING = Policy(startsecs=30.0, ready_by_ping=True, stop_group=False)


@pytest.mark.parametrize(
    ("policy", "was", "up_for", "state", "deadline"),
    [
        (POLICY, State.RUNNING, 0.1, State.RUNNING, None),
        (POLICY, State.STOPPING, 0.1, State.RUNNING, None),  # the user's Stop follows
        (POLICY, State.STARTING, 0.25, State.STARTING, 100.75),  # the rest of startsecs
        (POLICY, State.STARTING, 1.0, State.RUNNING, None),  # stayed up while we were away
        (POLICY, State.STARTING, -5.0, State.STARTING, 101.0),  # a clock step back
        (PING, State.RUNNING, 0.1, State.RUNNING, None),
        (PING, State.STARTING, 99.0, State.STARTING, 130.0),  # running only once it answers
    ],
)
def test_adoption_re_enters_the_state_it_was_in(
    policy: Policy, was: State, up_for: float, state: State, deadline: float | None
) -> None:
    p, cmds = step(Proc(), Adopt(7, was, up_for), policy, 100.0)
    assert cmds == []
    assert (p.state, p.pid, p.deadline) == (state, 7, deadline)
    if state == State.STARTING:  # and from there on it is an ordinary start
        p, _ = step(p, Timeout(), policy, deadline or 0.0)
        assert p.state == (State.STARTING if policy.ready_by_ping else State.RUNNING)


def test_a_crash_at_start_gives_its_last_stderr_line_in_the_reason() -> None:
    p, _ = step(Proc(), Start(), POLICY, 0.0)
    p, _ = step(p, Spawned(42), POLICY, 0.0)
    line = "ModuleNotFoundError: No module named 'shop'"
    p, _ = step(p, Exited(2, line), POLICY, 0.1)
    assert p.state == State.BACKOFF
    assert p.reason == f"exited too quickly (code 2): {line}"
    # a clean exit, or an exit while running, keeps the plain reason
    p, _ = step(p, Timeout(), POLICY, 10.0)
    p, _ = step(p, Spawned(43), POLICY, 10.0)
    p, _ = step(p, Exited(0, "bye"), POLICY, 10.1)
    assert p.reason == "exited too quickly (code 0)"
