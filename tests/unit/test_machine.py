"""Exhaustive tests of the supervision state machine (``branchd.process.machine``).

First a table: every state against every event, with the exact next ``Proc``
(written as the fields that change) and the exact commands. Then scenarios on
a simulated clock, and a property test over random event sequences.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from branchd.model import Autorestart, Policy, State, StopStep
from branchd.process.machine import (
    Adopt,
    Await,
    Backoff,
    Command,
    DepsReady,
    Event,
    Exited,
    Hung,
    Kill,
    LiveFailed,
    LiveOk,
    NotReady,
    Proc,
    Ready,
    Reap,
    Restart,
    Signal,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    Stop,
    Timeout,
    Waiting,
    step,
)

POLICY = Policy(
    autorestart=Autorestart.ON_FAILURE,
    exitcodes=(0,),
    startsecs=1.0,
    startretries=3,
    stopsignal="TERM",
    stopwaitsecs=5.0,
)
BACKOFF = Backoff(base=1.0, cap=8.0)
NOW = 100.0  # when every event of the table happens...
LATE = 110.0  # ...but "Timeout(due)", which comes after every deadline below
QUICK = "exited too quickly (code 1)"
GAVE_UP = QUICK + "; gave up after 3 failed start(s)"

# The states of the table. Each has been spawned before (restarts=2), so that
# a new spawn shows up in the restarts counter.
STATES: dict[str, Proc] = {
    "stopped": Proc(
        state=State.STOPPED,
        restarts=2,
        exit_code=-15,
        started=90.0,
        stop_step=StopStep.SIGNAL,
        spawned_once=True,
    ),
    "starting": Proc(state=State.STARTING, restarts=2, started=99.5, spawned_once=True),
    "starting+pid": Proc(
        state=State.STARTING,
        pid=42,
        restarts=2,
        started=99.5,
        deadline=100.5,
        spawned_once=True,
    ),
    "running": Proc(state=State.RUNNING, pid=42, restarts=2, started=90.0, spawned_once=True),
    "backoff": Proc(
        state=State.BACKOFF,
        retries=1,
        restarts=2,
        exit_code=1,
        started=99.0,
        deadline=101.0,
        reason=QUICK,
        spawned_once=True,
    ),
    "stopping": Proc(
        state=State.STOPPING,
        pid=42,
        restarts=2,
        started=90.0,
        deadline=103.0,
        spawned_once=True,
    ),
    "exited": Proc(state=State.EXITED, restarts=2, exit_code=0, started=90.0, spawned_once=True),
    "fatal": Proc(
        state=State.FATAL,
        retries=3,
        restarts=4,
        exit_code=1,
        started=95.0,
        reason=GAVE_UP,
        spawned_once=True,
    ),
    # waiting for the instances it starts after (a policy with awaits put it there)
    "waiting": Proc(
        state=State.WAITING,
        restarts=2,
        started=90.0,
        deadline=101.0,
        reason="waiting for db (stopped)",
        not_ready="waiting for db (stopped)",
        spawned_once=True,
    ),
}

EVENTS: dict[str, tuple[Event, float]] = {
    "Start": (Start(), NOW),
    "Stop": (Stop(), NOW),
    "Restart": (Restart(), NOW),
    "Spawned": (Spawned(77), NOW),
    "SpawnFailed": (SpawnFailed("boom"), NOW),
    "Exited(0)": (Exited(0), NOW),
    "Exited(1)": (Exited(1), NOW),
    "Exited(None)": (Exited(None), NOW),
    "Timeout(early)": (Timeout(), NOW),
    "Timeout(due)": (Timeout(), LATE),
    "Adopt": (Adopt(99), NOW),
    # adopted while it was still starting, 0.25 s into startsecs (1.0)
    "Adopt(starting)": (Adopt(99, State.STARTING, 0.25), NOW),
    "Ready": (Ready(), NOW),
    "Hung": (Hung("silent"), NOW),
    # start order and probes
    "DepsReady": (DepsReady(), NOW),
    "Waiting": (Waiting("waiting for db (starting)"), NOW),
    "NotReady": (NotReady("tcp 127.0.0.1:5432 refused"), NOW),
    "LiveFailed": (LiveFailed("http://127.0.0.1:8080/ answered 500"), NOW),
    "LiveOk": (LiveOk(), NOW),
}

Changes = dict[str, Any]
SAME: Changes = {}
NONE: list[Command] = []

# A fresh spawn at NOW: what Start and Restart do from a settled state.
RESPAWN: Changes = {"state": State.STARTING, "started": NOW, "restarts": 3}
STOPPING: Changes = {"state": State.STOPPING, "deadline": NOW + 5.0}
ADOPTED: Changes = {"state": State.RUNNING, "pid": 99, "started": NOW}
#: Adopted while starting: starting still, for the rest of its startsecs.
ADOPTED_STARTING: Changes = {
    "state": State.STARTING,
    "pid": 99,
    "started": NOW,
    "deadline": NOW + 0.75,
    "reason": None,
}
KILLED: Changes = {"killed_for": "silent"}
TERM: list[Command] = [Signal("TERM")]


def quick(code: int | None) -> Changes:
    """A STARTING process died before startsecs: first failed start."""
    return {
        "state": State.BACKOFF,
        "pid": None,
        "exit_code": code,
        "retries": 1,
        "deadline": NOW + 1.0,
        "reason": f"exited too quickly (code {code})",
    }


def stopped_by(code: int | None) -> Changes:
    return {
        "state": State.STOPPED,
        "pid": None,
        "exit_code": code,
        "deadline": None,
        "stop_step": StopStep.SIGNAL,
    }


# fmt: off
TABLE: list[tuple[str, str, Changes, list[Command]]] = [
    # state           event             next Proc (changed fields)           commands
    ("stopped",      "Start",          RESPAWN,                               [Spawn()]),
    ("stopped",      "Stop",           SAME,                                  NONE),
    ("stopped",      "Restart",        RESPAWN,                               [Spawn()]),
    ("stopped",      "Spawned",        SAME,                                  NONE),
    ("stopped",      "SpawnFailed",    SAME,                                  NONE),
    ("stopped",      "Exited(0)",      SAME,                                  NONE),
    ("stopped",      "Exited(1)",      SAME,                                  NONE),
    ("stopped",      "Exited(None)",   SAME,                                  NONE),
    ("stopped",      "Timeout(early)", SAME,                                  NONE),
    ("stopped",      "Timeout(due)",   SAME,                                  NONE),
    ("stopped",      "Adopt",          ADOPTED,                               NONE),
    ("stopped",       "Adopt(starting)", ADOPTED_STARTING,                      NONE),
    ("stopped",       "Ready",           SAME,                                  NONE),
    ("stopped",       "Hung",            SAME,                                  NONE),

    # A spawn is in flight: only its answer (Spawned/SpawnFailed) or a Stop matter.
    ("starting",     "Start",          SAME,                                  NONE),
    ("starting",     "Stop",           {"state": State.STOPPED},              NONE),
    ("starting",     "Restart",        SAME,                                  NONE),
    ("starting",     "Spawned",        {"pid": 77, "started": NOW, "deadline": NOW + 1.0}, NONE),
    ("starting",     "SpawnFailed",    {"state": State.BACKOFF, "retries": 1,
                                        "deadline": NOW + 1.0, "reason": "boom"},   NONE),
    ("starting",     "Exited(0)",      SAME,                                  NONE),
    ("starting",     "Exited(1)",      SAME,                                  NONE),
    ("starting",     "Exited(None)",   SAME,                                  NONE),
    ("starting",     "Timeout(early)", SAME,                                  NONE),
    ("starting",     "Timeout(due)",   SAME,                                  NONE),
    ("starting",     "Adopt",          SAME,                                  NONE),
    ("starting",      "Adopt(starting)", SAME,                                  NONE),
    ("starting",      "Ready",           SAME,                                  NONE),
    ("starting",      "Hung",            SAME,                                  NONE),

    ("starting+pid", "Start",          SAME,                                  NONE),
    ("starting+pid", "Stop",           STOPPING,                              TERM),
    ("starting+pid", "Restart",        {**STOPPING, "then_start": True},      TERM),
    ("starting+pid", "Spawned",        SAME,                                  NONE),
    ("starting+pid", "SpawnFailed",    SAME,                                  NONE),
    ("starting+pid", "Exited(0)",      quick(0),                              [Reap()]),
    ("starting+pid", "Exited(1)",      quick(1),                              [Reap()]),
    ("starting+pid", "Exited(None)",   quick(None),                           [Reap()]),
    ("starting+pid", "Timeout(early)", SAME,                                  NONE),
    ("starting+pid", "Timeout(due)",   {"state": State.RUNNING, "deadline": None}, NONE),
    ("starting+pid", "Adopt",          SAME,                                  NONE),
    ("starting+pid",  "Adopt(starting)", SAME,                                  NONE),
    ("starting+pid",  "Ready",           {"state": State.RUNNING, "deadline": None}, NONE),
    ("starting+pid",  "Hung",            KILLED,                                [Kill()]),

    ("running",      "Start",          SAME,                                  NONE),
    ("running",      "Stop",           STOPPING,                              TERM),
    ("running",      "Restart",        {**STOPPING, "then_start": True},      TERM),
    ("running",      "Spawned",        SAME,                                  NONE),
    ("running",      "SpawnFailed",    SAME,                                  NONE),
    ("running",      "Exited(0)",      {"state": State.EXITED, "pid": None, "exit_code": 0},
                                                                              [Reap()]),
    ("running",      "Exited(1)",      {**RESPAWN, "pid": None, "exit_code": 1},
                                                                              [Reap(), Spawn()]),
    ("running",      "Exited(None)",   {**RESPAWN, "pid": None},              [Reap(), Spawn()]),
    ("running",      "Timeout(early)", SAME,                                  NONE),
    ("running",      "Timeout(due)",   SAME,                                  NONE),
    ("running",      "Adopt",          SAME,                                  NONE),
    ("running",       "Adopt(starting)", SAME,                                  NONE),
    ("running",       "Ready",           SAME,                                  NONE),
    ("running",       "Hung",            KILLED,                                [Kill()]),

    ("backoff",      "Start",          {**RESPAWN, "retries": 0, "reason": None,
                                        "deadline": None},                    [Spawn()]),
    ("backoff",      "Stop",           {"state": State.STOPPED, "deadline": None}, NONE),
    ("backoff",      "Restart",        {**RESPAWN, "retries": 0, "reason": None,
                                        "deadline": None},                    [Spawn()]),
    ("backoff",      "Spawned",        SAME,                                  NONE),
    ("backoff",      "SpawnFailed",    SAME,                                  NONE),
    ("backoff",      "Exited(0)",      SAME,                                  NONE),
    ("backoff",      "Exited(1)",      SAME,                                  NONE),
    ("backoff",      "Exited(None)",   SAME,                                  NONE),
    ("backoff",      "Timeout(early)", SAME,                                  NONE),
    # The retry keeps counting failures (retries stays 1) and the last reason.
    ("backoff",      "Timeout(due)",   {**RESPAWN, "started": LATE, "deadline": None},
                                                                              [Spawn()]),
    ("backoff",      "Adopt",          {**ADOPTED, "deadline": None, "retries": 0,
                                        "reason": None},                      NONE),
    ("backoff",       "Adopt(starting)", ADOPTED_STARTING,                      NONE),
    ("backoff",       "Ready",           SAME,                                  NONE),
    ("backoff",       "Hung",            SAME,                                  NONE),

    ("stopping",     "Start",          {"then_start": True},                  NONE),
    ("stopping",     "Stop",           SAME,                                  NONE),
    ("stopping",     "Restart",        {"then_start": True},                  NONE),
    ("stopping",     "Spawned",        SAME,                                  NONE),
    ("stopping",     "SpawnFailed",    SAME,                                  NONE),
    ("stopping",     "Exited(0)",      stopped_by(0),                         [Reap()]),
    ("stopping",     "Exited(1)",      stopped_by(1),                         [Reap()]),
    ("stopping",     "Exited(None)",   stopped_by(None),                      [Reap()]),
    ("stopping",     "Timeout(early)", SAME,                                  NONE),
    ("stopping",     "Timeout(due)",   {"deadline": None, "stop_step": StopStep.KILL}, [Kill()]),
    ("stopping",     "Adopt",          SAME,                                  NONE),
    ("stopping",      "Adopt(starting)", SAME,                                  NONE),
    ("stopping",      "Ready",           SAME,                                  NONE),
    ("stopping",      "Hung",            SAME,                                  NONE),

    ("exited",       "Start",          RESPAWN,                               [Spawn()]),
    ("exited",       "Stop",           {"state": State.STOPPED},              NONE),
    ("exited",       "Restart",        RESPAWN,                               [Spawn()]),
    ("exited",       "Spawned",        SAME,                                  NONE),
    ("exited",       "SpawnFailed",    SAME,                                  NONE),
    ("exited",       "Exited(0)",      SAME,                                  NONE),
    ("exited",       "Exited(1)",      SAME,                                  NONE),
    ("exited",       "Exited(None)",   SAME,                                  NONE),
    ("exited",       "Timeout(early)", SAME,                                  NONE),
    ("exited",       "Timeout(due)",   SAME,                                  NONE),
    ("exited",       "Adopt",          ADOPTED,                               NONE),
    ("exited",        "Adopt(starting)", ADOPTED_STARTING,                      NONE),
    ("exited",        "Ready",           SAME,                                  NONE),
    ("exited",        "Hung",            SAME,                                  NONE),

    ("fatal",        "Start",          {**RESPAWN, "restarts": 5, "retries": 0, "reason": None},
                                                                              [Spawn()]),
    ("fatal",        "Stop",           {"state": State.STOPPED},              NONE),
    ("fatal",        "Restart",        {**RESPAWN, "restarts": 5, "retries": 0, "reason": None},
                                                                              [Spawn()]),
    ("fatal",        "Spawned",        SAME,                                  NONE),
    ("fatal",        "SpawnFailed",    SAME,                                  NONE),
    ("fatal",        "Exited(0)",      SAME,                                  NONE),
    ("fatal",        "Exited(1)",      SAME,                                  NONE),
    ("fatal",        "Exited(None)",   SAME,                                  NONE),
    ("fatal",        "Timeout(early)", SAME,                                  NONE),
    ("fatal",        "Timeout(due)",   SAME,                                  NONE),
    ("fatal",        "Adopt",          {**ADOPTED, "retries": 0, "reason": None}, NONE),
    ("fatal",         "Adopt(starting)", ADOPTED_STARTING,                      NONE),
    ("fatal",         "Ready",           SAME,                                  NONE),
    ("fatal",         "Hung",            SAME,                                  NONE),

    # Only a policy with awaits gets here; what every event does to it.
    ("waiting",       "Start",           SAME,                                  NONE),
    ("waiting",       "Stop",            {"state": State.STOPPED, "deadline": None}, NONE),
    ("waiting",       "Restart",         SAME,                                  NONE),
    ("waiting",       "Spawned",         SAME,                                  NONE),
    ("waiting",       "SpawnFailed",     SAME,                                  NONE),
    ("waiting",       "Exited(0)",       SAME,                                  NONE),
    ("waiting",       "Exited(1)",       SAME,                                  NONE),
    ("waiting",       "Exited(None)",    SAME,                                  NONE),
    ("waiting",       "Timeout(early)",  SAME,                                  NONE),
    # never ready in time: a failed start (into backoff), saying what it waited for
    ("waiting",       "Timeout(due)",    {"state": State.BACKOFF, "retries": 1,
                                          "deadline": LATE + 1.0,
                                          "reason": "waiting for db (stopped); gave up "
                                                    "waiting after 60s"},    NONE),
    ("waiting",       "Adopt",           {**ADOPTED, "deadline": None, "reason": None}, NONE),
    ("waiting",       "Adopt(starting)", ADOPTED_STARTING,                      NONE),
    ("waiting",       "Ready",           SAME,                                  NONE),
    ("waiting",       "Hung",            SAME,                                  NONE),
    ("waiting",       "DepsReady",       {**RESPAWN, "deadline": None, "not_ready": None,
                                          "reason": None},
                                                                                [Spawn()]),
    ("waiting",       "Waiting",         {"reason": "waiting for db (starting)",
                                          "not_ready": "waiting for db (starting)"}, NONE),
    ("waiting",       "NotReady",        SAME,                                  NONE),
    ("waiting",       "LiveFailed",      SAME,                                  NONE),
    ("waiting",       "LiveOk",          SAME,                                  NONE),

    # The new events in the other states: only a running process counts a
    # liveness failure (one of POLICY's three); the rest is for other policies.
    *[(state, event, SAME, NONE)
      for state in ("stopped", "starting", "starting+pid", "backoff", "stopping", "exited",
                    "fatal")
      for event in ("DepsReady", "Waiting", "NotReady", "LiveFailed", "LiveOk")],
    ("running",       "DepsReady",       SAME,                                  NONE),
    ("running",       "Waiting",         SAME,                                  NONE),
    ("running",       "NotReady",        SAME,                                  NONE),
    ("running",       "LiveFailed",      {"live_failed": 1},                    NONE),
    ("running",       "LiveOk",          SAME,                                  NONE),
]
# fmt: on


def test_the_table_covers_every_state_and_event() -> None:
    pairs = [(state, event) for state, event, _, _ in TABLE]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == {(s, e) for s in STATES for e in EVENTS}


@pytest.mark.parametrize(
    ("state", "event", "changes", "commands"),
    TABLE,
    ids=[f"{state}-{event}" for state, event, _, _ in TABLE],
)
def test_transition(state: str, event: str, changes: Changes, commands: list[Command]) -> None:
    before = STATES[state]
    ev, now = EVENTS[event]
    after, cmds = step(before, ev, POLICY, now, BACKOFF)
    assert after == replace(before, **changes)
    assert cmds == commands


# The same machine under a policy with ``after`` and probes ----------------

PROBED = replace(
    POLICY,
    awaits=True,
    after_timeout=20.0,
    ready_by_probe=True,
    ready_timeout=30.0,
    live_failures=2,
)
PROBED_STATES: dict[str, Proc] = {
    **STATES,
    "starting+probed": replace(STATES["starting+pid"], deadline=NOW + 30.0, not_ready="refused"),
    "running+1": replace(STATES["running"], live_failed=1),
    "stopping+live": replace(
        STATES["stopping"], then_start=True, killed_for="liveness probe failed 2 time(s) in a row"
    ),
}
WAIT: Changes = {"state": State.WAITING, "deadline": NOW + 20.0}
LIVE_WHY = "liveness probe failed 2 time(s) in a row: http://127.0.0.1:8080/ answered 500"

# fmt: off
PROBED_TABLE: list[tuple[str, str, Changes, list[Command]]] = [
    # Every way to a spawn waits for the instances it starts after first...
    ("stopped",         "Start",        WAIT,                                     [Await()]),
    ("exited",          "Restart",      WAIT,                                     [Await()]),
    ("fatal",           "Start",        {**WAIT, "retries": 0, "reason": None},   [Await()]),
    ("backoff",         "Timeout(due)", {**WAIT, "deadline": LATE + 20.0},        [Await()]),
    ("running",         "Exited(1)",    {**WAIT, "pid": None, "exit_code": 1},
                                                                        [Reap(), Await()]),
    ("stopping+live",   "Exited(None)", {**WAIT, "pid": None, "then_start": False,
                                         "killed_for": None, "stop_step": StopStep.SIGNAL,
                                         "reason": "liveness probe failed 2 time(s) in a row"},
                                                                        [Reap(), Await()]),
    # ...and the spawn is counted once, when it happens.
    ("waiting",         "DepsReady",    {**RESPAWN, "deadline": None, "not_ready": None,
                                         "reason": None},
                                                                                  [Spawn()]),
    ("waiting",         "Timeout(due)", {"state": State.BACKOFF, "retries": 1,
                                         "deadline": LATE + 1.0,
                                         "reason": "waiting for db (stopped); gave up waiting "
                                                   "after 20s"},                  NONE),
    # Running means ready: starting until the probe passes, within ready_timeout.
    ("starting",        "Spawned",      {"pid": 77, "started": NOW, "deadline": NOW + 30.0}, NONE),
    ("starting+pid",    "NotReady",     {"not_ready": "tcp 127.0.0.1:5432 refused",
                                         "reason": "not ready: tcp 127.0.0.1:5432 refused"}, NONE),
    ("starting+pid",    "Ready",        {"state": State.RUNNING, "deadline": None},  NONE),
    ("starting+pid",    "Timeout(early)", SAME,                                   NONE),
    ("starting+probed", "Timeout(30s)", {"deadline": None,
                                         "killed_for": "not ready within 30s: refused"}, [Kill()]),
    ("starting+probed", "Exited(-9)",   {"state": State.BACKOFF, "pid": None, "exit_code": -9,
                                         "retries": 1, "deadline": NOW + 1.0,
                                         "reason": "exited too quickly (code -9)"}, [Reap()]),
    ("stopped",         "Adopt(starting)", {"state": State.STARTING, "pid": 99, "started": NOW,
                                            "deadline": NOW + 30.0},              NONE),
    ("running",         "NotReady",     SAME,                                     NONE),
    # Liveness: failures in a row restart it (its stop first), saying why.
    ("running",         "LiveFailed",   {"live_failed": 1},                       NONE),
    ("running+1",       "LiveOk",       {"live_failed": 0},                       NONE),
    ("running+1",       "LiveFailed",   {**STOPPING, "then_start": True, "killed_for": LIVE_WHY},
                                                                                  TERM),
    ("starting+pid",    "LiveFailed",   SAME,                                     NONE),
    ("stopping",        "LiveFailed",   SAME,                                     NONE),
]
# fmt: on


@pytest.mark.parametrize(
    ("state", "event", "changes", "commands"),
    PROBED_TABLE,
    ids=[f"{state}-{event}" for state, event, _, _ in PROBED_TABLE],
)
def test_transition_with_after_and_probes(
    state: str, event: str, changes: Changes, commands: list[Command]
) -> None:
    before = PROBED_STATES[state]
    more: dict[str, tuple[Event, float]] = {
        "Exited(-9)": (Exited(-9), NOW),
        "Timeout(30s)": (Timeout(), NOW + 30.0),
    }
    ev, now = {**EVENTS, **more}[event]
    after, cmds = step(before, ev, PROBED, now, BACKOFF)
    assert after == replace(before, **changes)
    assert cmds == commands


def test_a_dependency_never_ready_ends_fatal_with_its_reason() -> None:
    policy = replace(PROBED, startretries=2)
    proc, cmds = step(Proc(), Start(), policy, 0.0, BACKOFF)
    assert (proc.state, cmds) == (State.WAITING, [Await()])
    why = "waiting for db (not ready: tcp 127.0.0.1:5432 refused)"
    proc, _ = step(proc, Waiting(why), policy, 1.0)
    proc, _ = step(proc, Timeout(), policy, 20.0, BACKOFF)
    assert proc.state == State.BACKOFF and proc.retries == 1
    proc, cmds = step(proc, Timeout(), policy, 21.0, BACKOFF)
    assert (proc.state, cmds) == (State.WAITING, [Await()])  # the retry waits again
    assert proc.reason == why + "; gave up waiting after 20s"  # (until the engine answers)
    proc, _ = step(proc, Waiting(why), policy, 21.0)
    proc, _ = step(proc, Timeout(), policy, 41.0, BACKOFF)
    assert proc.state == State.FATAL and proc.restarts == 0  # never spawned
    assert proc.reason == (
        "waiting for db (not ready: tcp 127.0.0.1:5432 refused); gave up waiting after 20s"
        "; gave up after 2 failed start(s)"
    )


def test_a_probe_never_passing_is_a_failed_start_then_fatal() -> None:
    policy = replace(PROBED, awaits=False, startretries=1)
    proc, _ = step(Proc(), Start(), policy, 0.0, BACKOFF)
    proc, _ = step(proc, Spawned(7), policy, 0.0, BACKOFF)
    proc, _ = step(proc, NotReady("http://127.0.0.1:1/ answered 503"), policy, 1.0, BACKOFF)
    assert proc.state == State.STARTING
    proc, cmds = step(proc, Timeout(), policy, 30.0, BACKOFF)
    assert cmds == [Kill()]
    proc, _ = step(proc, Exited(-9), policy, 30.1, BACKOFF)
    assert proc.state == State.FATAL
    assert proc.reason == (
        "not ready within 30s: http://127.0.0.1:1/ answered 503; gave up after 1 failed start(s)"
    )


# Scenarios on a simulated clock ------------------------------------------


class Sim:
    """One instance driven like the manager drives it: every Spawn is answered
    at once with a fresh pid, and ``wait()`` jumps the clock to the deadline."""

    def __init__(self, policy: Policy = POLICY, backoff: Backoff = BACKOFF) -> None:
        self.policy = policy
        self.backoff = backoff
        self.proc = Proc()
        self.now = 0.0
        self.next_pid = 100
        self.log: list[Command] = []

    def state(self) -> State:  # a call: mypy does not narrow it across feeds
        return self.proc.state

    def feed(self, event: Event) -> list[Command]:
        self.proc, cmds = step(self.proc, event, self.policy, self.now, self.backoff)
        self.log.extend(cmds)
        if Spawn() in cmds:
            self.next_pid += 1
            self.feed(Spawned(self.next_pid))
        return cmds

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait(self) -> float:
        """Jump to the deadline and feed its Timeout; return how long that was."""
        assert self.proc.deadline is not None, self.proc
        waited = self.proc.deadline - self.now
        self.now = self.proc.deadline
        self.feed(Timeout())
        return waited

    def run(self) -> int:
        """Start it and let startsecs pass: RUNNING; return its pid."""
        self.feed(Start())
        self.wait()
        assert self.state() == State.RUNNING and self.proc.pid is not None
        return self.proc.pid

    def crash(self, code: int | None = 1) -> list[Command]:
        return self.feed(Exited(code))


def test_backoff_delay_doubles_up_to_the_cap() -> None:
    b = Backoff(base=0.5, cap=5.0)
    assert [b.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert b.delay(0) == 0.5


def test_backoff_delays_between_failed_starts_grow_and_are_capped() -> None:
    sim = Sim(replace(POLICY, startretries=8), Backoff(base=1.0, cap=8.0))
    sim.feed(Start())
    delays = []
    for _ in range(7):
        sim.advance(0.1)
        sim.crash()
        assert sim.state() == State.BACKOFF
        delays.append(sim.wait())
        assert sim.state() == State.STARTING
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    sim.crash()
    assert sim.state() == State.FATAL
    assert sim.proc.reason == "exited too quickly (code 1); gave up after 8 failed start(s)"
    assert sim.proc.deadline is None and sim.proc.pid is None


def test_backoff_delay_of_a_huge_retry_count_is_the_cap() -> None:
    # (2 ** n as a float overflows past n = 1023: an instance retrying forever gets there)
    b = Backoff(base=1.0, cap=60.0)
    assert [b.delay(n) for n in (7, 8, 1024, 1025, 10**6)] == [60.0] * 5
    assert Backoff(base=0.0, cap=60.0).delay(10**6) == 0.0


FOREVER = replace(POLICY, startretries=None)


def test_forever_never_goes_fatal_and_its_backoff_is_capped() -> None:
    sim = Sim(FOREVER, Backoff(base=1.0, cap=8.0))
    sim.feed(Start())
    delays = []
    for attempt in range(1, 2001):  # past 1,024: where 2.0 ** n overflowed
        sim.advance(0.1)
        sim.crash()
        assert sim.state() == State.BACKOFF and sim.proc.retries == attempt
        delays.append(sim.wait())
        assert sim.state() == State.STARTING
    assert delays[:6] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert max(delays) == 8.0 and delays[-1] == 8.0
    assert sim.proc.reason == QUICK  # the last failure's own words, no "gave up"
    sim.wait()  # this one stays up startsecs: running, and the count starts over
    assert sim.state() == State.RUNNING and sim.proc.retries == 0


def test_forever_spawn_failures_back_off_and_never_go_fatal() -> None:
    proc, now = step(Proc(), Start(), FOREVER, 0.0, BACKOFF)[0], 0.0
    for attempt in range(1, 1101):
        proc, cmds = step(proc, SpawnFailed("no such file"), FOREVER, now, BACKOFF)
        assert (proc.state, proc.retries, cmds) == (State.BACKOFF, attempt, [])
        assert proc.deadline is not None and proc.deadline - now <= BACKOFF.cap
        now = proc.deadline
        proc, cmds = step(proc, Timeout(), FOREVER, now, BACKOFF)
        assert cmds == [Spawn()]
    assert proc.reason == "no such file"


def test_forever_resumes_after_a_stop_and_start_like_any_other() -> None:
    sim = Sim(FOREVER)
    sim.feed(Start())
    for _ in range(5):
        sim.crash()
        sim.wait()
    sim.crash()
    sim.feed(Stop())  # in backoff: nothing to signal
    assert sim.state() == State.STOPPED and sim.proc.retries == 6
    sim.feed(Start())
    assert sim.state() == State.STARTING and sim.proc.retries == 0


def test_spawn_failures_count_like_quick_exits() -> None:
    sim = Sim()
    sim.proc, _ = step(Proc(), Start(), POLICY, 0.0, BACKOFF)
    for attempt in range(1, 3):
        sim.proc, cmds = step(sim.proc, SpawnFailed("no such file"), POLICY, sim.now, BACKOFF)
        assert (sim.state(), sim.proc.retries, cmds) == (State.BACKOFF, attempt, [])
        sim.now = sim.proc.deadline or 0.0
        sim.proc, cmds = step(sim.proc, Timeout(), POLICY, sim.now, BACKOFF)
        assert cmds == [Spawn()]
    sim.proc, _ = step(sim.proc, SpawnFailed("no such file"), POLICY, sim.now, BACKOFF)
    assert sim.state() == State.FATAL
    assert sim.proc.reason == "no such file; gave up after 3 failed start(s)"


def test_startretries_counts_only_consecutive_failures() -> None:
    sim = Sim()  # startretries=3
    sim.feed(Start())
    for _ in range(2):  # two quick deaths: one short of fatal
        sim.crash()
        sim.wait()
    assert sim.state() == State.STARTING and sim.proc.retries == 2
    sim.wait()  # this one lives past startsecs: the count starts over
    assert sim.state() == State.RUNNING and sim.proc.retries == 0
    sim.advance(60)
    sim.crash()  # a crash after running is not a failed start
    assert sim.state() == State.STARTING and sim.proc.retries == 0
    for _ in range(2):
        sim.crash()
        sim.wait()
    assert sim.state() == State.STARTING and sim.proc.retries == 2
    sim.crash()
    assert sim.state() == State.FATAL and sim.proc.retries == 3


@pytest.mark.parametrize(
    ("autorestart", "code", "restarted"),
    [
        (Autorestart.ALWAYS, 0, True),
        (Autorestart.ALWAYS, 2, True),
        (Autorestart.ALWAYS, 1, True),
        (Autorestart.ALWAYS, None, True),
        (Autorestart.ON_FAILURE, 0, False),
        (Autorestart.ON_FAILURE, 2, False),
        (Autorestart.ON_FAILURE, 1, True),
        (Autorestart.ON_FAILURE, -9, True),
        (Autorestart.ON_FAILURE, None, True),  # unknown code: not an expected one
        (Autorestart.NEVER, 0, False),
        (Autorestart.NEVER, 2, False),
        (Autorestart.NEVER, 1, False),
        (Autorestart.NEVER, None, False),
    ],
)
def test_autorestart_after_running(
    autorestart: Autorestart, code: int | None, restarted: bool
) -> None:
    sim = Sim(replace(POLICY, autorestart=autorestart, exitcodes=(0, 2)))
    sim.run()
    sim.advance(30)
    cmds = sim.crash(code)
    assert sim.proc.exit_code == code
    if restarted:
        assert cmds == [Reap(), Spawn()]
        assert sim.state() == State.STARTING
        assert sim.proc.restarts == 1 and sim.proc.started == sim.now
    else:
        assert cmds == [Reap()]
        assert sim.state() == State.EXITED
        assert sim.proc.pid is None and sim.proc.restarts == 0


@pytest.mark.parametrize("autorestart", list(Autorestart))
def test_a_quick_exit_is_a_failed_start_whatever_autorestart_says(
    autorestart: Autorestart,
) -> None:
    sim = Sim(replace(POLICY, autorestart=autorestart))
    sim.feed(Start())
    cmds = sim.crash(0)
    assert cmds == [Reap()]
    assert sim.state() == State.BACKOFF
    assert sim.proc.reason == "exited too quickly (code 0)"


def test_restart_while_stopping_starts_again_once_stopped() -> None:
    sim = Sim()
    first = sim.run()
    assert sim.feed(Stop()) == [Signal("TERM")]
    assert sim.feed(Restart()) == []  # no second signal
    assert sim.state() == State.STOPPING and sim.proc.then_start
    sim.advance(0.5)
    cmds = sim.crash(-15)
    assert cmds == [Reap(), Spawn()]
    assert sim.state() == State.STARTING
    assert sim.proc.pid not in (None, first)
    assert sim.proc.stop_step is None  # cleared by the new Spawned
    assert sim.proc.restarts == 1 and not sim.proc.then_start


def test_stop_after_restart_cancels_the_start() -> None:
    sim = Sim()
    sim.run()
    sim.feed(Restart())
    assert sim.proc.then_start
    sim.feed(Stop())
    assert not sim.proc.then_start
    assert sim.crash(-15) == [Reap()]
    assert sim.state() == State.STOPPED and sim.proc.restarts == 0


def test_restart_of_a_running_process() -> None:
    sim = Sim(replace(POLICY, stopsignal="INT", stopwaitsecs=2.0))
    first = sim.run()
    assert sim.feed(Restart()) == [Signal("INT")]
    assert sim.proc.deadline == sim.now + 2.0
    sim.advance(2.0)
    assert sim.feed(Timeout()) == [Kill()]  # it ignored SIGINT
    cmds = sim.crash(-9)
    assert cmds == [Reap(), Spawn()]
    assert sim.proc.pid != first and sim.proc.restarts == 1
    sim.wait()
    assert sim.state() == State.RUNNING and sim.proc.stop_step is None


def test_startsecs_zero_is_running_at_once() -> None:
    sim = Sim(replace(POLICY, startsecs=0))
    sim.feed(Start())
    assert sim.state() == State.RUNNING
    assert sim.proc.deadline is None and sim.proc.retries == 0 and sim.proc.pid == 101


def test_startsecs_zero_crash_is_restarted_without_backoff() -> None:
    # Documented consequence (as in supervisord): with startsecs=0 every start
    # succeeds, so a crash loop is never FATAL and never backs off.
    sim = Sim(replace(POLICY, startsecs=0))
    sim.feed(Start())
    for n in range(1, 6):
        assert sim.crash() == [Reap(), Spawn()]
        assert sim.state() == State.RUNNING and sim.proc.restarts == n


def test_stop_during_backoff() -> None:
    sim = Sim()
    sim.feed(Start())
    sim.crash()
    assert sim.state() == State.BACKOFF and sim.proc.deadline is not None
    deadline = sim.proc.deadline
    assert sim.feed(Stop()) == []
    assert sim.state() == State.STOPPED and sim.proc.deadline is None
    sim.now = deadline + 1
    assert sim.feed(Timeout()) == []  # the stale timer does nothing
    assert sim.state() == State.STOPPED


def test_stale_timeout_is_ignored() -> None:
    sim = Sim()
    sim.feed(Start())
    sim.advance(0.5)
    assert sim.feed(Timeout()) == []
    assert sim.state() == State.STARTING
    sim.advance(0.5)
    sim.feed(Timeout())
    assert sim.state() == State.RUNNING


def test_stop_signal_then_kill() -> None:
    sim = Sim(replace(POLICY, stopsignal="QUIT", stopwaitsecs=3.0))
    sim.run()
    assert sim.feed(Stop()) == [Signal("QUIT")]
    assert sim.wait() == 3.0
    assert sim.log[-1] == Kill()
    assert sim.state() == State.STOPPING and sim.proc.deadline is None
    assert sim.crash(-9) == [Reap()]
    assert sim.state() == State.STOPPED and sim.proc.stop_step == StopStep.KILL
    assert sim.proc.exit_code == -9


def test_restarts_counter() -> None:
    sim = Sim()
    sim.run()
    assert sim.proc.restarts == 0  # the first spawn is not a restart
    sim.crash()  # autorestart
    assert sim.proc.restarts == 1
    sim.crash()  # a quick death...
    sim.wait()  # ...retried after the backoff
    assert sim.proc.restarts == 2
    sim.wait()
    sim.feed(Stop())
    sim.crash(-15)
    sim.feed(Start())  # a user start after a stop
    assert sim.proc.restarts == 3
    sim.wait()
    sim.feed(Restart())
    sim.crash(-15)
    assert sim.proc.restarts == 4
    assert sim.log.count(Spawn()) == 5


def test_adopted_process_is_running_and_supervised() -> None:
    sim = Sim()
    assert sim.feed(Adopt(555)) == []
    assert sim.state() == State.RUNNING and sim.proc.pid == 555 and sim.proc.restarts == 0
    cmds = sim.crash(None)  # not our child: the code is unknown
    assert cmds == [Reap(), Spawn()]
    assert sim.proc.restarts == 1 and sim.proc.pid == 101


# Property: no event sequence reaches an impossible combination ------------

EXTERNAL = st.one_of(
    st.just(Start()),
    st.just(Stop()),
    st.just(Restart()),
    st.builds(Exited, st.sampled_from([0, 1, 2, -9, -15, None])),
    st.just(Timeout()),
    st.builds(Adopt, st.integers(2, 99)),
    st.builds(
        Adopt, st.integers(2, 99), st.sampled_from(list(State)), st.sampled_from([0.0, 0.5, 9.0])
    ),
    st.just(Ready()),  # the Celery events: a first ping answered, a silent worker
    st.builds(Hung, st.just("silent")),
    # start order and probes (DepsReady and Waiting are also the answers to Await)
    st.just(DepsReady()),
    st.builds(Waiting, st.just("waiting for db (stopped)")),
    st.builds(NotReady, st.just("refused")),
    st.builds(LiveFailed, st.just("refused")),
    st.just(LiveOk()),
    st.builds(Spawned, st.integers(2, 99)),  # stray: the manager never sends these
    st.builds(SpawnFailed, st.just("stray")),
)
#: (event, seconds to advance first, whether a Spawn fails)
STEPS = st.lists(
    st.tuples(EXTERNAL, st.sampled_from([0.0, 0.05, 0.5, 1.0, 3.0, 20.0]), st.booleans()),
    max_size=40,
)
POLICIES = st.builds(
    Policy,
    autorestart=st.sampled_from(list(Autorestart)),
    exitcodes=st.sampled_from([(0,), (0, 2)]),
    startsecs=st.sampled_from([0.0, 1.0]),
    startretries=st.one_of(st.integers(1, 4), st.none()),  # None: forever
    stopwaitsecs=st.sampled_from([0.5, 2.0]),
    # the Celery kind: running once it answers a ping, within startsecs
    ready_by_ping=st.booleans(),
    stop_group=st.booleans(),
    awaits=st.booleans(),
    after_timeout=st.sampled_from([0.5, 5.0]),
    ready_by_probe=st.booleans(),
    ready_timeout=st.sampled_from([0.5, 5.0]),
    live_failures=st.integers(1, 3),
).filter(lambda p: not (p.ready_by_ping and p.startsecs == 0))

SETTLED = (State.STOPPED, State.WAITING, State.EXITED, State.FATAL, State.BACKOFF)


def check_invariants(old: Proc, new: Proc, cmds: list[Command], policy: Policy) -> None:
    # After the manager has answered every Spawn, only live states have a pid.
    if new.state in SETTLED:
        assert new.pid is None, new
    else:
        assert new.pid is not None, new
    timed = new.state in (State.WAITING, State.STARTING, State.BACKOFF) or (
        new.state == State.STOPPING and new.stop_step != StopStep.KILL
    )
    if new.killed_for is None:  # (a process the supervisor killed waits for its exit)
        assert (new.deadline is not None) == timed, new
    if new.state == State.STARTING:
        assert policy.startsecs > 0 or policy.ready_by_probe
    if new.state == State.WAITING:
        assert policy.awaits and new.pid is None, new
    if new.live_failed > old.live_failed:  # counted while running, short of a restart
        assert new.state == State.RUNNING and new.live_failed < policy.live_failures, new
    if new.state == State.RUNNING:
        assert new.retries == 0, new
    if new.state == State.BACKOFF:
        assert new.retries >= 1, new
        assert policy.startretries is None or new.retries < policy.startretries, new
    if policy.startretries is None and old.state != State.FATAL:
        assert new.state != State.FATAL, (old, new)  # forever never gives up
    if new.then_start:
        assert new.state == State.STOPPING, new
    assert new.restarts >= old.restarts
    if old.pid is not None and new.pid != old.pid:  # a live pid is never just dropped
        assert Reap() in cmds, (old, new, cmds)
    for cmd in cmds:
        if isinstance(cmd, Signal):
            assert old.pid is not None and new.state == State.STOPPING
        if isinstance(cmd, Kill):  # a stop's last step, or the supervisor's own kill
            assert old.pid is not None
            assert new.state == State.STOPPING or new.killed_for is not None, new
        if isinstance(cmd, Reap):
            assert old.pid is not None
    if cmds.count(Spawn()):
        assert new.restarts == old.restarts + (1 if old.spawned_once else 0)


@settings(max_examples=300, deadline=None)
@given(policy=POLICIES, steps=STEPS)
def test_random_event_sequences_keep_the_invariants(
    policy: Policy, steps: list[tuple[Event, float, bool]]
) -> None:
    proc, now, pid = Proc(), 0.0, 100
    for event, dt, spawn_fails in steps:
        now += dt
        old = proc
        proc, cmds = step(proc, event, policy, now, BACKOFF)
        if Await() in cmds:  # answered at once, as the engine does
            verdict: Event = Waiting("waiting for db (stopped)") if spawn_fails else DepsReady()
            proc, more = step(proc, verdict, policy, now, BACKOFF)
            assert more in ([], [Spawn()])
            cmds = [*cmds, *more]
        if Spawn() in cmds:  # answered at once, as the manager does
            pid += 1
            answer: Event = SpawnFailed("boom") if spawn_fails else Spawned(pid)
            proc, more = step(proc, answer, policy, now, BACKOFF)
            assert more == []
        check_invariants(old, proc, cmds, policy)


def test_the_first_spawn_after_a_wait_that_timed_out_is_no_restart() -> None:
    # (found by the random sequences: a wait for the instances it starts after
    # gave up, the backoff ended, and its first spawn ever counted as a restart)
    policy = Policy(awaits=True, after_timeout=0.5, startretries=3, startsecs=0.0)
    proc, cmds = step(Proc(), Start(), policy, 0.0, BACKOFF)
    assert proc.state == State.WAITING and cmds == [Await()]
    proc, _ = step(proc, Timeout(), policy, 0.5, BACKOFF)  # nothing to start after came up
    assert proc.state == State.BACKOFF and not proc.spawned_once
    proc, cmds = step(proc, Timeout(), policy, proc.deadline or 0.0, BACKOFF)
    assert proc.state == State.WAITING and cmds == [Await()]
    proc, cmds = step(proc, DepsReady(), policy, 2.0, BACKOFF)
    assert cmds == [Spawn()] and proc.restarts == 0
    proc, _ = step(proc, Spawned(101), policy, 2.0, BACKOFF)
    assert proc.state == State.RUNNING and proc.restarts == 0
