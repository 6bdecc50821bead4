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

#: Signals a user may name as ``stopsignal`` (without the SIG prefix).
STOP_SIGNALS: tuple[str, ...] = ("TERM", "INT", "QUIT", "HUP", "KILL", "USR1", "USR2")


def valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name))


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


@dataclass(frozen=True)
class App:
    name: str
    env: Mapping[str, str] = field(default_factory=dict)
    #: Defaults for the instances of this app (any instance field but name/kind).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "env": dict(self.env),
            "defaults": dict(self.defaults),
            "created_at": self.created_at,
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
