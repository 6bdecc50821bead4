"""The vocabulary of branchd as frozen dataclasses and str enums.

Nothing here does I/O; the store persists these, the API serializes them.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

#: Names of apps, instances and queues; also path segments, so no dots-only or
#: slashes can sneak in ("no path tricks").
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
NAME_RE = re.compile(NAME_PATTERN)
#: NAME_PATTERN in words, for every error about a bad name.
NAME_RULE = "use letters, digits, '_', '.', '-' (1-63, starting with a letter or digit)"

#: Names of queues (and exchanges): what Celery users put in them ("high:prio",
#: "tasks.email", "q@host"): printable ASCII but '/' (a path segment), ','
#: (``-Q`` splits on it), '*', '?', '\\' and spaces, not starting with '.'.
_QUEUE_CHAR = r"!-)+\-0-9:->@A-Z\[\]-~"
QUEUE_NAME_PATTERN = rf"^[{_QUEUE_CHAR}][.{_QUEUE_CHAR}]{{0,199}}$"
QUEUE_NAME_RE = re.compile(QUEUE_NAME_PATTERN)
QUEUE_NAME_RULE = (
    "use 1-200 printable ASCII characters but '/', ',', '*', '?', '\\' and spaces, "
    "not starting with '.'"
)

#: Signals a user may name as ``stopsignal`` (without the SIG prefix).
STOP_SIGNALS: tuple[str, ...] = ("TERM", "INT", "QUIT", "HUP", "KILL", "USR1", "USR2")


def valid_name(name: str) -> bool:
    return bool(NAME_RE.fullmatch(name))


def valid_queue_name(name: str) -> bool:
    return bool(QUEUE_NAME_RE.fullmatch(name))


def signal_number(name: str) -> int:
    return int(getattr(signal, "SIG" + name))


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"


class Desired(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    #: A delete under way: stop it, then forget it (also after a daemon restart).
    REMOVED = "removed"


class Kind(StrEnum):
    PROCESS = "process"
    CELERY = "celery"


class Autorestart(StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class StopStep(StrEnum):
    """Which step of a stop ended the process (shown in the instance JSON)."""

    SIGNAL = "signal"  # it exited after the stop signal
    KILL = "kill"  # stopwaitsecs ran out and SIGKILL went to the group


@dataclass(frozen=True)
class Policy:
    """How an instance is supervised (supervisord's program options)."""

    autorestart: Autorestart = Autorestart.ON_FAILURE
    exitcodes: tuple[int, ...] = (0,)
    startsecs: float = 1.0
    startretries: int = 3
    stopsignal: str = "TERM"
    stopwaitsecs: float = 10.0
    #: Celery kind: running once it answers a ping (startsecs is then the
    #: time allowed for the first answer), not once it stayed up startsecs.
    ready_by_ping: bool = False
    #: The stop signal goes to the whole group; Celery kind: the main process
    #: only, since TERM to pool children kills running tasks (celery#2700).
    stop_group: bool = True


@dataclass(frozen=True)
class Autoscale:
    """A Celery worker's concurrency range (``--autoscale=max,min``)."""

    min: int
    max: int

    def to_json(self) -> dict[str, int]:
        return {"min": self.min, "max": self.max}


#: Celery pools a worker may run (``--pool``).
POOLS: tuple[str, ...] = ("prefork", "solo", "threads", "gevent", "eventlet")


@dataclass(frozen=True)
class CelerySettings:
    """The Celery side of an app: how its worker instances are started."""

    broker: str | None = None  # None: the embedded filesystem broker
    celery_app: str | None = None  # the module given to ``-A``
    python: str | None = None  # interpreter (or virtualenv) of the workers
    pool: str = "prefork"
    args: tuple[str, ...] = ()
    autoscale: Autoscale | None = None
    #: Celery's mingle and gossip cost a second at each start; off unless asked.
    mingle_gossip: bool = False
    #: Where task results go (``--result-backend``). None: on the embedded
    #: broker, a ``file://`` store in the state dir; elsewhere the app module's.
    result_backend: str | None = None


@dataclass(frozen=True)
class App:
    name: str
    env: Mapping[str, str] = field(default_factory=dict)
    #: Defaults for the instances of this app (any instance field but name/kind).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    celery: CelerySettings = CelerySettings()

    def to_json(
        self, effective_broker: str | None = None, effective_backend: str | None = None
    ) -> dict[str, Any]:
        c = self.celery
        return {
            "name": self.name,
            "env": dict(self.env),
            "defaults": dict(self.defaults),
            "created_at": self.created_at,
            "broker": effective_broker or c.broker,
            "embedded_broker": c.broker is None,
            "result_backend": effective_backend or c.result_backend,
            "celery_app": c.celery_app,
            "python": c.python,
            "pool": c.pool,
            "args": list(c.args),
            "autoscale": c.autoscale.to_json() if c.autoscale else None,
            "mingle_gossip": c.mingle_gossip,
        }


@dataclass(frozen=True)
class Queue:
    """A queue declaration of an app (Celery's ``task_queues`` entry)."""

    app: str
    name: str
    exchange: str | None = None  # None: an exchange named like the queue
    exchange_type: str = "direct"
    routing_key: str | None = None  # None: the queue's name
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "name": self.name,
            "exchange": self.exchange or self.name,
            "exchange_type": self.exchange_type,
            "routing_key": self.routing_key or self.name,
            "options": dict(self.options),
        }


@dataclass(frozen=True)
class InstanceSpec:
    """What a user declared for one instance; persisted as is."""

    app: str
    name: str
    command: tuple[str, ...]
    branch: str
    kind: Kind = Kind.PROCESS
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    policy: Policy = Policy()
    autostart: bool = True
    desired: Desired = Desired.RUNNING
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5
    created_at: float = 0.0
    # Celery kind only -------------------------------------------------------
    queues: tuple[str, ...] = ()
    autoscale: Autoscale | None = None  # None: the app's, else --concurrency
    concurrency: int | None = None
    pool: str | None = None  # None: the app's pool
    args: tuple[str, ...] = ()  # after the app's args
    loglevel: str = "INFO"
    #: A running worker silent to pings this long is hung: restarted.
    hung_after: float = 60.0
    #: Restart when the whole process tree's RSS passes this (bytes).
    memory_limit: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.app, self.name)


@dataclass(frozen=True)
class Runtime:
    """What branchd knows of the live process, persisted for adoption."""

    state: State = State.STOPPED
    pid: int | None = None
    #: psutil create_time of pid: a pid alone may have been reused.
    create_time: float | None = None
    started_at: float | None = None  # wall clock
    restarts: int = 0
    exit_code: int | None = None
    stop_step: StopStep | None = None
    reason: str | None = None
