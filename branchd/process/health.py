"""Pure: is a running Celery worker healthy? One decision per health round.

The workers service gathers the facts (the process tree's RSS, the answer to
one ping) and acts on the verdict (kill it as hung, re-apply its declaration);
what the facts mean lives here, with no clock, broker or process of its own,
so that it is tested by table (tests/unit/test_health.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class Ping(StrEnum):
    """What one ping of the round gave."""

    ANSWERED = "answered"
    SILENT = "silent"  # no reply within the call's timeout
    BROKER_DOWN = "broker_down"  # the ping could not even be sent


@dataclass(frozen=True)
class Watch:
    """What the health rounds remember of one worker."""

    last_pong: float | None = None  # when it last answered (or the clock restarted)
    silent: bool = False  # went without an answer since: re-apply when it is back


@dataclass(frozen=True)
class Verdict:
    watch: Watch
    kill: str | None = None  # why it must be killed (and restarted), if it must
    reconcile: bool = False  # bring it in line with its declaration now


def over_memory(rss: int, limit: int | None) -> str | None:
    """Why a worker's tree is too big, or None.

    The reason names the check: branchd's ``memory_limit`` counts the whole
    tree (main process and pool children) and restarts the worker, unlike
    Celery's ``max_memory_per_child``, which replaces one pool child after its
    task, and the cgroup's ``memory_max``, where the kernel's OOM killer acts.
    """
    if limit and rss > limit:
        return (
            f"memory_limit: the worker's process tree uses {rss} bytes (RSS), over its "
            f"memory_limit of {limit}"
        )
    return None


def decide(
    watch: Watch, ping: Ping, now: float, *, hung_after: float, solo: bool, sweep: bool
) -> Verdict:
    """The verdict of one round on a running worker.

    A broker outage is not a hung worker: the silence clock starts again once
    it is over. A solo worker answers pings only between tasks, so its silence
    is a long task, never a hang. An answer after silence (a broker restart,
    a reconnect) or on the slow sweep re-applies the declaration, since a
    worker may have lost consumers added at runtime (celery#987).
    """
    if ping == Ping.BROKER_DOWN:
        return Verdict(Watch(last_pong=now, silent=True))
    if ping == Ping.ANSWERED:
        return Verdict(Watch(last_pong=now), reconcile=watch.silent or sweep)
    last = now if watch.last_pong is None else watch.last_pong
    silent = replace(watch, last_pong=last, silent=True)
    if not solo and now - last >= hung_after:
        return Verdict(Watch(), kill=f"no answer to ping for {hung_after:g}s")
    return Verdict(silent)
