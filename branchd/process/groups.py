"""The pure part of an app's instances handled together: the names of a
count create (supervisord's ``numprocs`` and ``process_name``), the batches
of an action (all at once, or rolling), and what each instance's state means
for the action's outcome. No I/O, no clock: ``process/actions.py`` runs it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from branchd.errors import Invalid
from branchd.model import MAX_COUNT, NAME_RULE, TEMPLATE_RULE, Action, State, valid_name
from branchd.views import InstanceView

#: ``{n}`` or ``{n:03d}`` (zero-padded, width 1-9): the only placeholder a name
#: template takes. Anything else in braces is refused rather than passed to
#: ``str.format``, which would let a template read attributes (``{n.__class__}``).
_PLACEHOLDER = re.compile(r"\{n(?::0?([1-9])d)?\}")


def expand_names(template: str, count: int, start_at: int = 0) -> list[str]:
    """The ``count`` names of ``template``, numbered from ``start_at``; Invalid
    naming the rule when the template or a name it makes breaks one."""
    if not 1 <= count <= MAX_COUNT:
        raise Invalid(f"count {count} is out of range: 1 to {MAX_COUNT} instances at once")
    if start_at < 0:
        raise Invalid(f"start_at {start_at} is negative: numbers start at 0 or more")
    found = list(_PLACEHOLDER.finditer(template))
    rest = _PLACEHOLDER.sub("", template)
    if len(found) != 1 or "{" in rest or "}" in rest:
        raise Invalid(f"bad name template {template!r}: {TEMPLATE_RULE}")
    match = found[0]
    width = int(match.group(1) or 0)
    head, tail = template[: match.start()], template[match.end() :]
    numbers = range(start_at, start_at + count)
    names = [f"{head}{n:0{width}d}{tail}" for n in numbers]
    for name in (names[0], names[-1]):  # the shortest and the longest
        if not valid_name(name):
            raise Invalid(f"name template {template!r} makes {name!r}, a bad name: {NAME_RULE}")
    return names


class Outcome(StrEnum):
    """How one instance came out of an app action."""

    RUNNING = "running"  # started (or restarted) and running
    STOPPED = "stopped"
    FAILED = "failed"  # it did not get there (the error says why)
    TIMEOUT = "timeout"  # still on its way when the action's wait ended
    PENDING = "pending"  # asked, not waited for (wait=false)
    SKIPPED = "skipped"  # a rolling action stopped before its batch


#: The outcomes an action counts as done right.
GOOD = frozenset({Outcome.RUNNING, Outcome.STOPPED, Outcome.PENDING})


def batches(names: Sequence[str], rolling: bool, batch: int = 1) -> list[list[str]]:
    """The order of an action: every instance at once, or rolling, ``batch``
    at a time (the next batch once the one before is done right)."""
    if not rolling:
        return [list(names)] if names else []
    if batch < 1:
        raise Invalid(f"batch {batch} is out of range: at least 1 instance at a time")
    return [list(names[i : i + batch]) for i in range(0, len(names), batch)]


def outcome(action: Action, state: State, pid: int | None, old_pid: int | None) -> Outcome | None:
    """What ``state`` (with ``pid``; ``old_pid`` before the action) means for
    one instance of ``action``: an outcome, or None while it is on its way."""
    if action is Action.STOP:
        if state in (State.STOPPED, State.EXITED, State.FATAL):
            return Outcome.STOPPED
        return None
    if state == State.RUNNING:
        # a restart is done when another process runs (not the one it stops)
        fresh = action is Action.START or old_pid is None or pid != old_pid
        return Outcome.RUNNING if fresh else None
    if state in (State.STARTING, State.STOPPING, State.WAITING):
        return None  # (waiting: for the instances it starts after)
    return Outcome.FAILED  # backoff (a failed start), fatal, exited, stopped again


def failure(state: State, reason: str | None) -> str:
    """Why an instance did not get where the action wanted it."""
    return f"{state.value}: {reason}" if reason else state.value


def halts(outcomes: Mapping[str, Outcome]) -> bool:
    """A rolling action goes no further once a batch did not come out right."""
    return any(o not in GOOD for o in outcomes.values())


@dataclass(frozen=True)
class Wait:
    """How long one instance may take through an action (its own stop and
    start times, the daemon's SIGKILL grace, a margin for the machine)."""

    stopwaitsecs: float
    startsecs: float
    kill_grace: float
    margin: float = 10.0

    def limit(self, action: Action) -> float:
        stop = self.stopwaitsecs + self.kill_grace if action is not Action.START else 0.0
        start = self.startsecs if action is not Action.STOP else 0.0
        return stop + start + self.margin


@dataclass(frozen=True)
class Item:
    """One instance's part of an app action's answer."""

    outcome: Outcome
    view: InstanceView
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.view.spec.name,
            "outcome": self.outcome.value,
            "error": self.error,
            "instance": self.view.to_json(listing=True),
        }
