"""Pure: what in an app's effective Celery config will hurt, and why.

The input is what a running worker answers to the remote-control ``conf``
command (``with_defaults``: every setting, secrets masked by Celery) plus
what branchd knows and the worker's config does not say (the pool given on
its command line, the broker's kind). One finding per trap, one line each;
the table is in tests/unit/test_lint.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from branchd.model import Limits

#: Redis transport's default visibility_timeout (kombu), seconds.
REDIS_VISIBILITY_TIMEOUT = 3600.0
#: RabbitMQ's default consumer_timeout (3.8.15 and later: 30 min), seconds.
RABBITMQ_CONSUMER_TIMEOUT = 1800.0
#: Pools that run tasks in child processes (the only ones with a per-child limit).
PROCESS_POOLS = ("prefork", "processes")


class Severity(StrEnum):
    ERROR = "error"  # tasks are lost or run twice
    WARNING = "warning"  # a setting that does not do what it seems to
    INFO = "info"  # worth knowing, safe to keep


@dataclass(frozen=True)
class Finding:
    rule: str
    message: str
    severity: Severity

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "message": self.message, "severity": self.severity.value}


@dataclass(frozen=True)
class TaskTimeLimit:
    """A per-task hard time limit branchd hands the workers (``task_overrides``:
    set by remote control and the loader, so not in what ``conf`` answers)."""

    task: str
    seconds: float
    where: str  # whose override: "the app's", "instance w1's"


@dataclass(frozen=True)
class Context:
    """What the worker's config does not say."""

    pool: str = "prefork"  # the pool it runs (``--pool`` wins over ``worker_pool``)
    transport: str = "amqp"  # amqp | redis | filesystem | ...
    stops_drain: bool = True  # branchd's stops drain, then TERM, then KILL
    depth_scaling: bool = False  # the app scales on queue depth
    task_time_limits: tuple[TaskTimeLimit, ...] = ()


#: The worker flags branchd gives from an app's limits, and the setting each
#: overrides in the worker (a flag is not in what ``conf`` answers).
_FLAGS = {
    "time_limit": "task_time_limit",
    "soft_time_limit": "task_soft_time_limit",
    "max_memory_per_child": "worker_max_memory_per_child",
    "prefetch_multiplier": "worker_prefetch_multiplier",
    "disable_prefetch": "worker_disable_prefetch",
}


def with_flags(conf: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """``conf`` as the worker runs it: the limits branchd passes as flags win."""
    out = dict(conf)
    for field_, key in _FLAGS.items():
        value = getattr(limits, field_)
        if value is not None:
            out[key] = value
    return out


def task_time_limits(app: Limits, instances: Mapping[str, Limits]) -> tuple[TaskTimeLimit, ...]:
    """The per-task hard time limits of an app's ``task_overrides`` and of its
    instances' own (those that differ from the app's), task by task."""
    out = [
        TaskTimeLimit(task, t.time_limit, "the app's")
        for task, t in sorted(app.task_overrides.items())
        if t.time_limit is not None
    ]
    for name, limits in sorted(instances.items()):
        for task, t in sorted(limits.task_overrides.items()):
            theirs = app.task_overrides.get(task)
            if t.time_limit is not None and (theirs is None or theirs.time_limit != t.time_limit):
                out.append(TaskTimeLimit(task, t.time_limit, f"instance {name}'s"))
    return tuple(out)


def transport_of(url: str) -> str:
    """The broker kind of a URL (``rediss://`` is Redis; no URL: the embedded one)."""
    scheme = url.partition("://")[0].lower() if "://" in url else "filesystem"
    if scheme in ("redis", "rediss", "sentinel", "redis+socket"):
        return "redis"
    if scheme in ("amqp", "amqps", "pyamqp", "librabbitmq"):
        return "amqp"
    return scheme


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _secs(value: float) -> str:
    return f"{value:g}s"


def lint(conf: Mapping[str, Any], ctx: Context) -> list[Finding]:
    """Every trap found in ``conf``, in a stable order."""
    out: list[Finding] = []
    acks_late = bool(conf.get("task_acks_late"))
    if acks_late and not conf.get("task_reject_on_worker_lost"):
        out.append(
            Finding(
                "acks_late_without_reject_on_worker_lost",
                "task_acks_late without task_reject_on_worker_lost: a task whose worker is "
                "killed (OOM, a stop's SIGKILL) is acknowledged and lost, not delivered again",
                Severity.ERROR,
            )
        )
    out += _redelivery(conf, ctx, acks_late)
    multiplier = _number(conf.get("worker_prefetch_multiplier"))
    if multiplier is not None and multiplier > 1 and not conf.get("worker_disable_prefetch"):
        out.append(
            Finding(
                "prefetch_too_high",
                f"worker_prefetch_multiplier {multiplier:g}: each worker holds up to "
                f"concurrency x {multiplier:g} messages that depth scaling does not count as "
                "ready and a new worker cannot take (1, or worker_disable_prefetch on 5.6+)",
                Severity.WARNING if ctx.depth_scaling else Severity.INFO,
            )
        )
    per_child = _number(conf.get("worker_max_memory_per_child"))
    if per_child and ctx.pool not in PROCESS_POOLS:
        out.append(
            Finding(
                "max_memory_per_child_without_prefork",
                f"worker_max_memory_per_child has no effect with the {ctx.pool} pool (prefork "
                "only): use the instance's memory_limit",
                Severity.WARNING,
            )
        )
    if ctx.stops_drain and not _number(conf.get("worker_soft_shutdown_timeout")):
        out.append(
            Finding(
                "soft_shutdown_unset",
                "worker_soft_shutdown_timeout unset: a stop drains, then TERM, then KILL at "
                "stopwaitsecs; with a soft shutdown (Celery 5.5+) a task still running at "
                "the cold shutdown gets that long to finish (and, acks_late, goes back)",
                Severity.INFO,
            )
        )
    return out


def _redelivery(conf: Mapping[str, Any], ctx: Context, acks_late: bool) -> list[Finding]:
    """A delivery the broker sees unacknowledged for longer than it waits is
    delivered again. With acks_late that is a task still running; without
    it a task is acked as it starts, and only the messages a worker reserved
    (prefetch) wait unacked, behind its running tasks."""
    if ctx.transport == "redis":
        options = conf.get("broker_transport_options")
        given = _number(options.get("visibility_timeout")) if isinstance(options, Mapping) else None
        bound, name = given or REDIS_VISIBILITY_TIMEOUT, "Redis visibility_timeout"
        rule = "time_limit_beyond_visibility_timeout"
        again = "it is delivered again"
    elif ctx.transport == "amqp":
        bound, name = RABBITMQ_CONSUMER_TIMEOUT, "RabbitMQ's default consumer_timeout"
        rule = "time_limit_beyond_consumer_timeout"
        again = "RabbitMQ closes the worker's channel and delivers it again"
    else:
        return []
    if acks_late:
        why = (
            f"with task_acks_late a task still running then is unacknowledged: {again}, "
            "and it runs twice"
        )
    elif conf.get("worker_disable_prefetch"):
        return []  # acked as it starts, and nothing waits reserved behind it
    else:
        why = (
            "a task is acknowledged as it starts, but a message its worker reserved "
            f"(prefetch) stays unacknowledged while it waits behind such a task: {again}, "
            "and it may run twice (worker_disable_prefetch, Celery 5.6+, avoids it)"
        )
    severity = Severity.ERROR if acks_late else Severity.WARNING
    out = []
    limit = _number(conf.get("task_time_limit"))
    if limit is not None and limit > bound:
        out.append(
            Finding(
                rule,
                f"task_time_limit {_secs(limit)} is beyond {name} ({_secs(bound)}): {why}",
                severity,
            )
        )
    elif not limit and acks_late:
        out.append(
            Finding(
                rule,
                f"task_acks_late with no task_time_limit: a task running past {name} "
                f"({_secs(bound)}) is still unacknowledged: {again}, and it runs twice",
                Severity.WARNING,
            )
        )
    for t in ctx.task_time_limits:
        if t.seconds > bound:
            out.append(
                Finding(
                    rule,
                    f"task {t.task}: time_limit {_secs(t.seconds)} ({t.where} task_overrides) "
                    f"is beyond {name} ({_secs(bound)}): {why}",
                    severity,
                )
            )
    return out
