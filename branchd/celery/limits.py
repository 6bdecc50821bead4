"""Pure: a worker's limits, their rules per pool and Celery version, and the
per-task overrides to push by remote control (a per-app rate limit split
between the app's running workers).

Facts (Celery 5.7, read in its pools and worker): a hard time limit is
enforced by prefork (the pool kills the child) and gevent (a ``Timeout``);
a soft one needs SIGUSR1 to a pool child, so prefork only; solo, threads and
eventlet enforce none. ``--max-tasks-per-child`` and
``--max-memory-per-child`` recycle pool children: prefork only.
``--disable-prefetch`` exists from Celery 5.6. Remote ``rate_limit`` and
``time_limit`` change one task type on one worker and are lost on restart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from branchd.errors import Invalid
from branchd.model import PREFETCH, Limits, TaskLimits

#: Pools that enforce a hard time limit, a soft one, a per-child recycling.
HARD_LIMIT_POOLS = ("prefork", "gevent")
SOFT_LIMIT_POOLS = ("prefork",)
CHILD_POOLS = ("prefork",)
#: The first Celery with ``--disable-prefetch``.
DISABLE_PREFETCH_SINCE = (5, 6)

RATE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(?:/([smh]))?$")
RATE_RULE = 'a rate as Celery writes it: "600/m", "10/s", "2/h" or "5" (per second), above 0'
#: The task attributes read back from a worker (``registered``) to find drift.
TASK_ITEMS = ("rate_limit", "time_limit", "soft_time_limit")


#: Where a limit of a worker comes from, as messages name it.
APPS, OWN = "the app's", "this instance's"
SCALARS = (
    "time_limit",
    "soft_time_limit",
    "max_tasks_per_child",
    "max_memory_per_child",
    *PREFETCH,
)


def _owner(app: Limits, own: Limits, key: str) -> Limits | None:
    """Whose ``key`` a worker runs with: its own, else the app's (None: not set).
    Prefetch is one setting in two forms: an instance that gives either form
    takes both from itself (else the app's multiplier would clash with its
    own ``disable_prefetch``, and it has no way to drop the app's)."""
    if key in PREFETCH and any(getattr(own, k) is not None for k in PREFETCH):
        return own if getattr(own, key) is not None else None
    if getattr(own, key) is not None:
        return own
    return app if getattr(app, key) is not None else None


def merged(app: Limits, own: Limits) -> Limits:
    """The limits a worker runs with: its own over the app's, field by field
    (per task too). A task's rate here is as declared (see ``worker_tasks``)."""
    scalars = {}
    for k in SCALARS:
        owner = _owner(app, own, k)
        scalars[k] = getattr(owner, k) if owner is not None else None
    tasks = dict(app.task_overrides)
    for name, mine in own.task_overrides.items():
        base = tasks.get(name, TaskLimits())
        tasks[name] = TaskLimits(
            rate_limit=mine.rate_limit if mine.rate_limit is not None else base.rate_limit,
            time_limit=mine.time_limit if mine.time_limit is not None else base.time_limit,
            soft_time_limit=mine.soft_time_limit
            if mine.soft_time_limit is not None
            else base.soft_time_limit,
        )
    return Limits(**scalars, task_overrides=tasks)


def origins(app: Limits, own: Limits) -> dict[str, str]:
    """Where each limit of ``merged(app, own)`` comes from (``APPS`` or
    ``OWN``), by the name a message gives it: ``time_limit``,
    ``task_overrides[NAME].time_limit``. A user who sets one limit of a worker
    must see which of the two declarations holds the other side of a clash."""
    out = {}
    for k in SCALARS:
        owner = _owner(app, own, k)
        if owner is not None:
            out[k] = OWN if owner is own else APPS
    for name in {*app.task_overrides, *own.task_overrides}:
        mine = own.task_overrides.get(name, TaskLimits())
        base = app.task_overrides.get(name, TaskLimits())
        for k in TASK_ITEMS:
            if getattr(mine, k) is not None:
                out[f"task_overrides[{name}].{k}"] = OWN
            elif getattr(base, k) is not None:
                out[f"task_overrides[{name}].{k}"] = APPS
    return out


def _shown(value: float) -> str:
    return f"{value:g}"


def problems(
    limits: Limits,
    pool: str,
    *,
    celery_version: tuple[int, ...] | None = None,
    origin: Mapping[str, str] | None = None,
) -> list[str]:
    """Every rule the limits break for a worker of ``pool`` (on Celery
    ``celery_version``; None: unknown, its rules are not checked).
    ``origin``: where each limit comes from (see ``origins``), named in the
    messages; None: one declaration's own limits, nothing to tell apart."""
    where = origin or {}

    def named(key: str, value: float | None = None) -> str:
        shown = key if value is None else f"{key} {_shown(value)}"
        return f"{shown} ({where[key]})" if key in where else shown

    out: list[str] = []
    overrides = sorted(limits.task_overrides.items())
    hard = [f"task_overrides[{n}].time_limit" for n, t in overrides if t.time_limit]
    soft = [f"task_overrides[{n}].soft_time_limit" for n, t in overrides if t.soft_time_limit]
    if limits.time_limit:
        hard.insert(0, "time_limit")
    if limits.soft_time_limit:
        soft.insert(0, "soft_time_limit")
    # (each field that holds one is named: the one to drop may be a task's, or the app's)
    if hard and pool not in HARD_LIMIT_POOLS:
        out.append(
            f"{', '.join(map(named, hard))}: the {pool} pool enforces no time limit (only "
            f"{', '.join(HARD_LIMIT_POOLS)} do)"
        )
    if soft and pool not in SOFT_LIMIT_POOLS:
        out.append(
            f"{', '.join(map(named, soft))}: the {pool} pool has no soft time limit (it needs "
            "SIGUSR1 to a pool child: prefork only)"
        )
    for what, value in (
        ("max_tasks_per_child", limits.max_tasks_per_child),
        ("max_memory_per_child", limits.max_memory_per_child),
    ):
        if value is not None and pool not in CHILD_POOLS:
            out.append(f"{named(what)}: recycles pool children, which only the prefork pool has")
    if (
        limits.time_limit is not None
        and limits.soft_time_limit is not None
        and limits.soft_time_limit >= limits.time_limit
    ):
        out.append(
            f"{named('soft_time_limit', limits.soft_time_limit)} must be below "
            f"{named('time_limit', limits.time_limit)} (the soft one warns the task first)"
        )
    if limits.disable_prefetch and limits.prefetch_multiplier is not None:
        out.append(
            f"{named('disable_prefetch')} and "
            f"{named('prefetch_multiplier', limits.prefetch_multiplier)}: give one (without "
            "prefetch a worker takes a task only when a process is free)"
        )
    if (
        limits.disable_prefetch
        and celery_version is not None
        and celery_version[:2] < DISABLE_PREFETCH_SINCE
    ):
        have = ".".join(str(p) for p in celery_version)
        out.append(
            f"disable_prefetch: needs Celery 5.6 or later (the app's interpreter has {have})"
        )
    for name, task in overrides:
        if not name or len(name) > 200 or any(c.isspace() for c in name):
            out.append(f"task_overrides: {name!r} is not a task name")
        if task.rate_limit is not None and parse_rate(task.rate_limit) is None:
            out.append(f"task_overrides[{name}].rate_limit {task.rate_limit!r}: {RATE_RULE}")
        for key in ("time_limit", "soft_time_limit"):
            value = getattr(task, key)
            if value is not None and value <= 0:
                out.append(f"task_overrides[{name}].{key} must be more than 0 seconds")
        if task.time_limit and task.soft_time_limit and task.soft_time_limit >= task.time_limit:
            out.append(
                f"{named(f'task_overrides[{name}].soft_time_limit', task.soft_time_limit)} must "
                f"be below {named(f'task_overrides[{name}].time_limit', task.time_limit)}"
            )
    return out


def check(
    limits: Limits,
    pool: str,
    *,
    celery_version: tuple[int, ...] | None = None,
    origin: Mapping[str, str] | None = None,
) -> None:
    """Raise Invalid (a 422) naming the first rule the limits break."""
    found = problems(limits, pool, celery_version=celery_version, origin=origin)
    if found:
        raise Invalid(found[0])


def check_worker(
    app: Limits,
    own: Limits,
    pool: str,
    *,
    celery_version: tuple[int, ...] | None = None,
) -> None:
    """``check`` of the limits an instance's worker runs with (its own over
    the app's), each named with the declaration it comes from."""
    check(merged(app, own), pool, celery_version=celery_version, origin=origins(app, own))


def parse_version(text: str) -> tuple[int, ...] | None:
    """``"5.7.0"`` -> ``(5, 7, 0)``; ``"5.6.0rc1"`` -> ``(5, 6, 0)``."""
    parts = []
    for piece in text.strip().split(".")[:3]:
        digits = re.match(r"[0-9]+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts) if parts else None


def parse_rate(text: str) -> tuple[float, str] | None:
    """``"600/m"`` -> ``(600.0, "m")``; a bare number is per second; None if bad."""
    m = RATE_RE.fullmatch(text.strip())
    if m is None or float(m.group(1)) <= 0:
        return None
    return float(m.group(1)), m.group(2) or "s"


def split_rate(total: str, workers: int) -> str:
    """One worker's share of an app-wide rate among ``workers`` (Celery's
    rate limit is per worker, so N workers at the total would do N times it)."""
    parsed = parse_rate(total)
    if parsed is None:
        raise Invalid(f"rate_limit {total!r}: {RATE_RULE}")
    amount, unit = parsed
    return f"{amount / max(workers, 1):.6g}/{unit}"


def worker_tasks(app: Limits, own: Limits, workers: int) -> dict[str, TaskLimits]:
    """The per-task limits one worker gets: its own, else the app's, where the
    app's rate is a total split between the app's ``workers`` running ones."""
    out: dict[str, TaskLimits] = {}
    for name in sorted({*app.task_overrides, *own.task_overrides}):
        a = app.task_overrides.get(name, TaskLimits())
        o = own.task_overrides.get(name, TaskLimits())
        rate = o.rate_limit
        if rate is None and a.rate_limit is not None:
            rate = split_rate(a.rate_limit, workers)
        out[name] = TaskLimits(
            rate_limit=rate,
            time_limit=o.time_limit if o.time_limit is not None else a.time_limit,
            soft_time_limit=o.soft_time_limit
            if o.soft_time_limit is not None
            else a.soft_time_limit,
        )
    return out


def parse_registered(reply: Any) -> dict[str, dict[str, str]] | None:
    """A ``registered`` reply (``["name [rate_limit=10/m time_limit=5]", ...]``)
    as ``{name: {attribute: text}}``; None if it is not one."""
    items = reply.get("ok", reply) if isinstance(reply, dict) else reply
    if not isinstance(items, list):
        return None
    out: dict[str, dict[str, str]] = {}
    for item in items:
        if not isinstance(item, str):
            continue
        name, _, rest = item.partition(" [")
        attrs = {}
        for pair in rest.rstrip("]").split():
            key, eq, value = pair.partition("=")
            if eq:
                attrs[key] = value
        out[name] = attrs
    return out


@dataclass(frozen=True)
class Command:
    """One remote-control command to send to a worker."""

    name: str  # "rate_limit" or "time_limit"
    arguments: Mapping[str, Any]

    def describe(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.arguments.items() if k != "task_name")
        return f"{self.name} {self.arguments['task_name']} {args}"


def _same_number(live: str | None, want: float | None) -> bool:
    if want is None:
        return True  # not ours to set: left as the app's module has it
    try:
        return live is not None and float(live) == want
    except ValueError:
        return False


def _same_rate(live: str | None, want: str | None) -> bool:
    if want is None:
        return True
    a, b = parse_rate(live or ""), parse_rate(want)
    return a is not None and b is not None and abs(a[0] - b[0]) < 1e-9 and a[1] == b[1]


def _seconds(value: float | None) -> float | int | None:
    return int(value) if value is not None and float(value).is_integer() else value


def drift(
    wanted: Mapping[str, TaskLimits], live: Mapping[str, Mapping[str, str]] | None
) -> list[Command]:
    """The commands that bring a worker's tasks to ``wanted``, given what it
    says it has (``live``: None when it did not say, then everything is sent).
    A task the worker does not know is skipped (another worker's task)."""
    out: list[Command] = []
    for name, want in sorted(wanted.items()):
        have = None if live is None else live.get(name)
        if live is not None and have is None:
            continue
        attrs = have or {}
        if want.rate_limit is not None and (
            have is None or not _same_rate(attrs.get("rate_limit"), want.rate_limit)
        ):
            out.append(Command("rate_limit", {"task_name": name, "rate_limit": want.rate_limit}))
        if (want.time_limit is not None or want.soft_time_limit is not None) and (
            have is None
            or not _same_number(attrs.get("time_limit"), want.time_limit)
            or not _same_number(attrs.get("soft_time_limit"), want.soft_time_limit)
        ):
            # (time_limit sets both: what is not wanted is kept as the worker has it)
            hard = want.time_limit if want.time_limit is not None else _num(attrs, "time_limit")
            soft = (
                want.soft_time_limit
                if want.soft_time_limit is not None
                else _num(attrs, "soft_time_limit")
            )
            out.append(
                Command(
                    "time_limit",
                    {"task_name": name, "hard": _seconds(hard), "soft": _seconds(soft)},
                )
            )
    return out


def _num(attrs: Mapping[str, str], key: str) -> float | None:
    try:
        return float(attrs[key])
    except (KeyError, ValueError):
        return None
