"""Pure: is a worker that answers pings still taking work? (celery#10205, #8030)

A worker can stay alive, answer every ping and yet consume nothing: its
consumer was cancelled, or a broker reconnect left it without one. What
shows it is work left waiting: its declared queues hold ready messages, and
for ``stall_after`` it has neither a task running or prefetched nor taken a
new one (the ``total`` of its ``stats`` did not move). Idle with nothing to
take is no stall, and a look that cannot see everything says nothing.
The workers service gathers each look and restarts the worker on a reason;
the tables are in tests/unit/test_stall.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Look:
    """One look at a worker and its queues."""

    #: Ready messages per declared queue (None: that queue's count is unknown).
    ready: Mapping[str, int | None]
    #: Tasks it took since its start (the sum of ``stats.total``); None: no answer.
    taken: int | None = None
    #: Whether it runs or holds any task (``active``/``reserved``); None: no answer.
    busy: bool | None = None


@dataclass(frozen=True)
class StallWatch:
    """What the looks remember of one worker."""

    since: float | None = None  # when it last took work, or had none to take
    taken: int | None = None


def taken_total(stats: Mapping[str, Any] | None) -> int | None:
    """Tasks taken since start, from a ``stats`` reply (``total``: name -> count)."""
    if stats is None or "error" in stats:
        return None
    total = stats.get("total")
    if not isinstance(total, Mapping):
        return None
    counts = [n for n in total.values() if isinstance(n, int)]
    return sum(counts) if len(counts) == len(total) else None


def decide(
    watch: StallWatch, look: Look, now: float, stall_after: float
) -> tuple[StallWatch, str | None]:
    """The watch after ``look``, and why the worker must be restarted, if it must."""
    if stall_after <= 0:
        return StallWatch(), None
    waiting = {q: n for q, n in look.ready.items() if n}
    if not waiting:  # nothing to take: idle is healthy
        return StallWatch(since=now, taken=look.taken), None
    if look.taken is None or look.busy is None:  # cannot see it: no verdict either way
        return watch, None
    moved = watch.taken is not None and look.taken != watch.taken
    if look.busy or moved:
        return StallWatch(since=now, taken=look.taken), None
    if watch.taken is None:
        # The first count since it was idle (or since its start): the span
        # starts now. Counting from the last idle look instead restarted a
        # worker whose looks paused for stall_after (a broker outage, a busy
        # loop) at the first look that saw work, with no second look at all.
        return StallWatch(since=now, taken=look.taken), None
    since = now if watch.since is None else watch.since
    if now - since < stall_after:
        return StallWatch(since=since, taken=look.taken), None
    shown = ", ".join(f"{q} ({n})" for q, n in sorted(waiting.items()))
    return StallWatch(), (
        f"stalled: no task taken for {stall_after:g}s while its queues hold ready messages: {shown}"
    )
