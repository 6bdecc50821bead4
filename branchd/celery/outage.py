"""Pure: what a retrying broker connection says about its failures, and when.

A broker that stays down must not write a warning at every reconnect attempt
(every 2 s, forever): the cause is said once when it appears and again when
it changes, then recalled at growing intervals up to :data:`REMIND_MAX`, and
the recovery gets one line. Reconnect attempts keep their own, faster pace;
this decides only what is logged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

#: The first reminder of an unchanged failure comes this long after it was said...
REMIND_FIRST = 2.0
#: ...and each later one twice as long after the previous one, up to this.
REMIND_MAX = 30.0


class Say(StrEnum):
    FAILED = "failed"  # a new failure, or a new cause
    STILL = "still"  # the same cause, recalled
    RECOVERED = "recovered"


@dataclass(frozen=True)
class Outage:
    """The failure state of one connection; ``cause`` None means healthy."""

    cause: str | None = None
    since: float = 0.0  # when the current cause was first seen
    attempts: int = 0  # failed attempts since the connection last worked
    next_remind: float = 0.0
    remind_every: float = REMIND_FIRST


def failed(outage: Outage, cause: str, now: float) -> tuple[Outage, Say | None]:
    """One failed attempt with ``cause``; what to log about it, if anything."""
    attempts = outage.attempts + 1
    if cause != outage.cause:
        nxt = Outage(cause, now, attempts, now + REMIND_FIRST, REMIND_FIRST)
        return nxt, Say.FAILED
    if now >= outage.next_remind:
        every = min(outage.remind_every * 2, REMIND_MAX)
        return replace(outage, attempts=attempts, next_remind=now + every, remind_every=every), (
            Say.STILL
        )
    return replace(outage, attempts=attempts), None


def recovered(outage: Outage) -> tuple[Outage, Say | None]:
    """The connection works (again); one line if it had failed."""
    return Outage(), (Say.RECOVERED if outage.cause is not None else None)
