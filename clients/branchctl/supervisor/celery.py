"""A Celery worker's command line, read back into branchd's fields.

``celery -A proj worker -Q a,b -c 4``, ``/venv/bin/celery --app=x worker``,
``python -m celery -A proj worker`` (and Celery 4's ``celery worker -A
proj``). branchd builds a worker's argv itself (``-n <instance>@<host>``,
``-Q``, ``--autoscale``...), so what it builds is taken out and the rest kept
as the instance's ``args``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: Celery pools branchd runs (``processes`` is Celery's old name of prefork).
POOLS = ("prefork", "solo", "threads", "gevent", "eventlet")
_POOL_ALIASES = {"processes": "prefork"}
LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOGLEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}

_PYTHON = re.compile(r"^python[0-9.]*$")

#: Options of ``celery`` itself (before the subcommand) that take a value.
_GLOBAL_VALUE = {"-A", "--app", "-b", "--broker", "--result-backend", "--workdir", "--config"}
_GLOBAL_VALUE_OTHER = {"--loader"}
#: ``worker`` options that take a value (the rest are flags, kept as they are).
_WORKER_VALUE = {
    "-Q", "--queues", "-c", "--concurrency", "--autoscale", "-P", "--pool",
    "-l", "--loglevel", "-n", "--hostname", "-f", "--logfile", "--pidfile",
    "-X", "--exclude-queues", "-O", "--max-tasks-per-child",
    "--max-memory-per-child", "-s", "--schedule", "--statedb", "--time-limit",
    "--soft-time-limit", "--prefetch-multiplier", "-S", "--scheduler",
    "--include", "-I", "--uid", "--gid", "--umask", "--executable",
}  # fmt: skip


@dataclass(frozen=True)
class Worker:
    """What a worker command line says, in branchd's terms."""

    #: The app's Celery settings: ``celery_app`` (-A), ``broker`` (-b),
    #: ``result_backend``, ``python`` (the interpreter or virtualenv).
    app: dict[str, Any] = field(default_factory=dict)
    #: The instance's fields: queues, concurrency or autoscale, pool, loglevel, args.
    instance: dict[str, Any] = field(default_factory=dict)
    #: The instance's working directory (``--workdir``), if given.
    workdir: str | None = None
    #: What branchd sets itself or cannot carry: (option, why).
    dropped: tuple[tuple[str, str], ...] = ()


def split_option(argv: Sequence[str], i: int, takes_value: set[str]) -> tuple[str, str | None, int]:
    """The option at ``argv[i]``: (name, value or None, index of the next word)."""
    word = argv[i]
    if word.startswith("--") and "=" in word:
        name, _, value = word.partition("=")
        return name, value, i + 1
    if word in takes_value:
        return word, (argv[i + 1] if i + 1 < len(argv) else ""), i + 2
    if len(word) > 2 and word[0] == "-" and word[1] != "-" and word[:2] in takes_value:
        return word[:2], word[2:], i + 1  # -Qa,b  -c4
    return word, None, i + 1


def worker_of(argv: Sequence[str]) -> Worker | None:
    """The worker ``argv`` runs, or None when it is no Celery worker."""
    if not argv:
        return None
    python: str | None = None
    base = os.path.basename(argv[0])
    if base == "celery":
        rest = list(argv[1:])
        # /venv/bin/celery: the virtualenv is the interpreter branchd runs it with
        if os.path.basename(os.path.dirname(argv[0])) == "bin":
            python = os.path.dirname(os.path.dirname(argv[0]))
    elif _PYTHON.match(base) and list(argv[1:3]) == ["-m", "celery"]:
        rest = list(argv[3:])
        python = argv[0]
    else:
        return None
    app: dict[str, Any] = {}
    if python:
        app["python"] = python
    workdir: str | None = None
    dropped: list[tuple[str, str]] = []
    i, seen_worker = 0, False
    args: list[str] = []
    inst: dict[str, Any] = {}
    while i < len(rest):
        word = rest[i]
        if not word.startswith("-"):
            if seen_worker:
                args.append(word)
                i += 1
                continue
            if word != "worker":
                return None  # beat, flower, multi...: not a worker
            seen_worker = True
            i += 1
            continue
        name, value, i = split_option(rest, i, _GLOBAL_VALUE | _GLOBAL_VALUE_OTHER | _WORKER_VALUE)
        if name in ("-A", "--app"):
            app["celery_app"] = value
        elif name in ("-b", "--broker"):
            app["broker"] = value
        elif name == "--result-backend":
            app["result_backend"] = value
        elif name == "--workdir":
            workdir = value
        elif not seen_worker:
            dropped.append(
                (
                    _shown(name, value),
                    "an option of celery itself, before 'worker': "
                    "branchd's worker command line has no place for it",
                )
            )
        elif name in ("-Q", "--queues"):
            inst["queues"] = [q for q in (value or "").split(",") if q]
        elif name in ("-c", "--concurrency") and value and value.isdigit() and int(value) > 0:
            inst["concurrency"] = int(value)
        elif name == "--autoscale" and _autoscale(value) is not None:
            inst["autoscale"] = _autoscale(value)
        elif name in ("-P", "--pool") and _POOL_ALIASES.get(value or "", value) in POOLS:
            inst["pool"] = _POOL_ALIASES.get(value or "", value)
        elif name in ("-l", "--loglevel") and _loglevel(value):
            inst["loglevel"] = _loglevel(value)
        elif name in ("-n", "--hostname"):
            dropped.append((_shown(name, value), "branchd names each worker <instance>@<host>"))
        else:
            if value is None:
                args.append(name)
            else:  # as Celery reads it back: --name=value, -X value
                args += [f"{name}={value}"] if name.startswith("--") else [name, value]
    if not seen_worker:
        return None
    if "concurrency" in inst and "autoscale" in inst:
        del inst["concurrency"]  # Celery takes the autoscale range over -c; so does branchd
        dropped.append(("--concurrency", "--autoscale is given too, which Celery uses"))
    if args:
        inst["args"] = args
    return Worker(app, inst, workdir, tuple(dropped))


def _shown(name: str, value: str | None) -> str:
    return name if value is None else f"{name} {value}"


def _autoscale(value: str | None) -> dict[str, int] | None:
    """Celery's ``--autoscale=MAX[,MIN]`` (MIN 0 when not given)."""
    parts = (value or "").split(",")
    if not all(p.strip().isdigit() for p in parts) or not 1 <= len(parts) <= 2:
        return None
    high = int(parts[0])
    low = int(parts[1]) if len(parts) == 2 else 0
    return {"min": low, "max": high} if high >= max(1, low) else None


def _loglevel(value: str | None) -> str | None:
    level = (value or "").upper()
    level = _LOGLEVEL_ALIASES.get(level, level)
    return level if level in LOGLEVELS else None
