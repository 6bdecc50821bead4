"""The worker limit options that 'apps add/set' and 'instances add/set' share."""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

import click

from branchctl.cli.common import _F, ByteSize

_RATE = re.compile(r"^[0-9]+(\.[0-9]+)?(/[smh])?$")
_POSITIVE = click.FloatRange(min=0, min_open=True)

#: Per-task options: their option name, their key in a task's overrides.
_TASK_OPTIONS = {
    "rate_limits": ("--rate-limit", "rate_limit"),
    "task_time_limits": ("--task-time-limit", "time_limit"),
    "task_soft_time_limits": ("--task-soft-time-limit", "soft_time_limit"),
}
_SCALARS = (
    "time_limit",
    "soft_time_limit",
    "max_tasks_per_child",
    "max_memory_per_child",
    "prefetch_multiplier",
    "disable_prefetch",
)
#: Every limit field of an app or a Celery instance (task_overrides last).
LIMIT_FIELDS = (*_SCALARS, "task_overrides")


def limit_options(f: _F) -> _F:
    """Add the limit options to a command (their values: see ``pop_limits``)."""
    options = [
        click.option(
            "--time-limit",
            type=_POSITIVE,
            metavar="SECONDS",
            help="Hard time limit of each task: its pool process is killed (prefork, gevent).",
        ),
        click.option(
            "--soft-time-limit",
            type=_POSITIVE,
            metavar="SECONDS",
            help="Soft time limit: SoftTimeLimitExceeded in the task, below --time-limit "
            "(prefork only).",
        ),
        click.option(
            "--max-tasks-per-child",
            type=click.IntRange(min=1),
            metavar="N",
            help="Replace a pool process after N tasks (prefork only).",
        ),
        click.option(
            "--max-memory-per-child",
            type=ByteSize(),
            help="Replace a pool process whose RSS is over this after its task (512MiB; "
            "prefork only). --memory-limit watches the whole worker instead.",
        ),
        click.option(
            "--prefetch-multiplier",
            type=click.IntRange(min=1),
            metavar="N",
            help="Messages reserved per pool process (Celery's default: 4).",
        ),
        click.option(
            "--disable-prefetch/--prefetch",
            "disable_prefetch",
            default=None,
            help="Take a task only when a process is free (Celery 5.6+).",
        ),
        click.option(
            "--rate-limit",
            "rate_limits",
            multiple=True,
            metavar="TASK=RATE",
            help="Rate limit of task TASK (600/m, 10/s); on an app the total of its "
            "workers (each gets total / N). TASK= removes it; repeat it.",
        ),
        click.option(
            "--task-time-limit",
            "task_time_limits",
            multiple=True,
            metavar="TASK=SECONDS",
            help="Hard time limit of task TASK. TASK= removes it; repeat it.",
        ),
        click.option(
            "--task-soft-time-limit",
            "task_soft_time_limits",
            multiple=True,
            metavar="TASK=SECONDS",
            help="Soft time limit of task TASK. TASK= removes it; repeat it.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _task_value(option: str, key: str, text: str) -> Any:
    if text == "":
        return None  # (removes it)
    if key == "rate_limit":
        if not _RATE.fullmatch(text):
            raise click.BadParameter(
                f"{text!r} is not a rate like 600/m, 10/s, 2/h or 5", param_hint=option
            )
        return text
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise click.BadParameter(f"{text!r} is not a number of seconds above 0", param_hint=option)
    return seconds


def pop_limits(options: MutableMapping[str, Any]) -> dict[str, Any]:
    """Take the limit options out of ``options``: the body fields given (a
    ``task_overrides`` patch: each task's keys given, null removes one)."""
    body = {k: v for k in _SCALARS if (v := options.pop(k, None)) is not None}
    tasks: dict[str, dict[str, Any]] = {}
    for dest, (option, key) in _TASK_OPTIONS.items():
        for item in options.pop(dest, ()) or ():
            task, sep, text = item.partition("=")
            if not sep or not task.strip():
                raise click.BadParameter(f"expected TASK=VALUE, got {item!r}", param_hint=option)
            tasks.setdefault(task.strip(), {})[key] = _task_value(option, key, text.strip())
    if tasks:
        body["task_overrides"] = tasks
    return body
