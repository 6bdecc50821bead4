"""The draining stop as tables: when TERM is due, what a look at the tasks
says, and what the machine makes of ``Drained`` (which step ended a stop)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from branchd.celery.drain import DrainStep, next_step, task_count, term_due
from branchd.model import Policy, State, StopStep
from branchd.process.machine import Drained, Exited, Proc, Stop, Timeout, step

POLICY = Policy(stopwaitsecs=60.0)


@pytest.mark.parametrize(("deadline", "now", "stopwaitsecs", "grace", "due"), [
    (160.0, 100.0, 60.0, 10.0, 150.0),   # TERM 10 s before the kill
    (160.0, 100.0, 60.0, 0.0,  160.0),   # no grace: TERM at the kill's deadline
    (104.0, 100.0, 4.0,  10.0, 102.0),   # a short stop: half of it for the warm shutdown
    (None,  100.0, 60.0, 10.0, 150.0),   # no deadline known: from now
    (160.0, 100.0, 60.0, -1.0, 160.0),   # a negative grace is none
    (100.0, 100.0, 0.0,  10.0, 100.0),   # stopwaitsecs 0: TERM at once
])
def test_term_due(
    deadline: float | None, now: float, stopwaitsecs: float, grace: float, due: float
) -> None:
    assert term_due(deadline, now, stopwaitsecs, grace) == due


@pytest.mark.parametrize(("reply", "count"), [
    ({"ok": []}, 0),
    ({"ok": [{"id": "a"}, {"id": "b"}]}, 2),
    (None, None),                                # no reply: cannot be seen
    ({"error": "KeyError('active')"}, None),     # an error reply says nothing
    ({"ok": "pong"}, None),                      # not a list of tasks
    ({"ok": [], "other": 1}, None),              # not the shape of a wrapped list
])
def test_task_count(reply: dict[str, Any] | None, count: int | None) -> None:
    assert task_count(reply) == count


@pytest.mark.parametrize(("active", "reserved", "now", "step_"), [
    (0,    0,    10.0, DrainStep.DRAINED),
    (0,    0,    99.0, DrainStep.DRAINED),   # drained even when time is up
    (1,    0,    10.0, DrainStep.WAIT),
    (0,    3,    10.0, DrainStep.WAIT),      # prefetched tasks run before the TERM too
    (1,    0,    50.0, DrainStep.TERM),      # time is up: TERM with the task running
    (None, 0,    10.0, DrainStep.TERM),      # silent: TERM at once (warm shutdown waits)
    (0,    None, 10.0, DrainStep.TERM),
])
def test_next_step(active: int | None, reserved: int | None, now: float, step_: DrainStep) -> None:
    assert next_step(active, reserved, now, term_at=50.0) == step_


def _stopping() -> Proc:
    running = Proc(state=State.RUNNING, pid=42, started=0.0)
    proc, _ = step(running, Stop(), POLICY, 100.0)
    assert proc.state == State.STOPPING and proc.stop_step is None
    return proc


def test_a_drained_stop_says_drain_and_a_kill_still_wins() -> None:
    drained, cmds = step(_stopping(), Drained(), POLICY, 101.0)
    assert (drained.stop_step, cmds) == (StopStep.DRAIN, [])
    gone, _ = step(drained, Exited(0), POLICY, 102.0)
    assert (gone.state, gone.stop_step) == (State.STOPPED, StopStep.DRAIN)
    # drained, then TERM, but it did not exit in time: the kill ended it
    killed, _ = step(drained, Timeout(), POLICY, 160.0)
    assert killed.stop_step == StopStep.KILL
    gone, _ = step(killed, Exited(-9), POLICY, 160.1)
    assert gone.stop_step == StopStep.KILL


def test_drained_means_nothing_outside_a_stop() -> None:
    running = Proc(state=State.RUNNING, pid=42, started=0.0)
    assert step(running, Drained(), POLICY, 1.0) == (running, [])
    undrained, _ = step(_stopping(), Exited(0), POLICY, 101.0)
    assert undrained.stop_step == StopStep.SIGNAL
    killed = replace(_stopping(), stop_step=StopStep.KILL)
    assert step(killed, Drained(), POLICY, 1.0) == (killed, [])
