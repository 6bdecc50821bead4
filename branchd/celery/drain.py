"""Pure: the steps of a worker's draining stop, and when each one is due.

A stop drains first: its consumers are cancelled (no new tasks), then the
workers service polls ``active`` and ``reserved`` until nothing is left or
the drain's time is over, and only then sends TERM to the main process; the
machine's own deadline (``stopwaitsecs``) still ends it with SIGKILL to the
group. What the replies mean and when TERM is due lives here, with no clock
or broker, so that it is tested by table (tests/unit/test_drain.py).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

#: How often a draining worker's tasks are looked at (seconds).
DRAIN_POLL = 0.2


class DrainStep(StrEnum):
    """What the drain does after one look at the worker's tasks."""

    WAIT = "wait"  # tasks still run: look again in DRAIN_POLL
    DRAINED = "drained"  # none left: TERM now, it cuts nothing
    TERM = "term"  # time is up, or the worker cannot be seen: TERM now


def term_due(deadline: float | None, now: float, stopwaitsecs: float, grace: float) -> float:
    """When TERM goes at the latest: the stop's kill deadline less a grace for
    the warm shutdown (at most half of ``stopwaitsecs``), so that the whole
    stop stays within ``stopwaitsecs``."""
    end = now + stopwaitsecs if deadline is None else deadline
    return end - min(max(grace, 0.0), stopwaitsecs / 2)


def task_count(reply: dict[str, Any] | None) -> int | None:
    """Tasks in an ``active`` or ``reserved`` reply; None when it says nothing
    (no reply, an error): a worker that cannot be seen is not drained."""
    if reply is None or "error" in reply:
        return None
    tasks = reply.get("ok", reply) if set(reply) == {"ok"} else None
    return len(tasks) if isinstance(tasks, list) else None


def next_step(active: int | None, reserved: int | None, now: float, term_at: float) -> DrainStep:
    """After one look: wait for running and prefetched tasks while there is
    time; a silent worker gets its TERM at once (Celery's own warm shutdown
    still finishes what runs; a solo worker answers only between tasks)."""
    if active is None or reserved is None:
        return DrainStep.TERM
    if active == 0 and reserved == 0:
        return DrainStep.DRAINED
    return DrainStep.WAIT if now < term_at else DrainStep.TERM
