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

from branchd.hlc import Version

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


#: The most instances one count create makes (a typo of 10000 for 100 must
#: not fork ten thousand processes).
MAX_COUNT = 1000
#: The most instances one rolling batch may hold.
MAX_BATCH = 1000
#: What a count create's name template may hold (``process/groups.py``'s
#: ``expand_names`` applies it).
TEMPLATE_RULE = (
    "a name template holds '{n}' (or '{n:02d}', zero-padded to 2; widths 1-9) once, "
    "and otherwise what a name holds"
)


def valid_name(name: str) -> bool:
    return bool(NAME_RE.fullmatch(name))


def valid_queue_name(name: str) -> bool:
    return bool(QUEUE_NAME_RE.fullmatch(name))


def signal_number(name: str) -> int:
    return int(getattr(signal, "SIG" + name))


#: ``startretries`` of an instance that never gives up (supervisord#487): its
#: failed starts back off up to the cap, and it never goes fatal.
FOREVER = "forever"


def startretries_from(value: int | str | None) -> int | None:
    """A ``startretries`` as given (a count, or "forever") as the policy holds it."""
    if value is None or value == FOREVER:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"startretries must be a count or {FOREVER!r}, not {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"startretries must be a count or {FOREVER!r}, not {value!r}") from None


def startretries_wire(value: int | None) -> int | str:
    return FOREVER if value is None else value


#: What a umask may be given as, in words (for every error about one).
UMASK_RULE = 'an octal string ("022", "0o027") or its value as an integer (0-511)'


def umask_from(value: object) -> int:
    """A umask as a user gives it: an octal string ("022", "0o022"), as
    supervisord's ``umask=022``, or the number itself (18 == 0o022)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # (JSON's 18.0 is JSON Schema's integer 18)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"bad umask {value!r}: {UMASK_RULE}")
    if isinstance(value, int):
        mask = value
    else:
        digits = value.strip().lower().removeprefix("0o")
        if not digits or not digits.isascii() or any(c not in "01234567" for c in digits):
            raise ValueError(f"bad umask {value!r}: {UMASK_RULE}")
        mask = int(digits, 8)
    if not 0 <= mask <= 0o777:
        raise ValueError(f"bad umask {value!r}: {UMASK_RULE}")
    return mask


def umask_text(mask: int) -> str:
    """A umask as shown: three octal digits, as ``umask`` prints them."""
    return f"{mask:03o}"


class Action(StrEnum):
    """An app-wide action (``process/groups.py`` plans it, ``process/actions.py`` runs it)."""

    START = "start"
    STOP = "stop"
    RESTART = "restart"


class State(StrEnum):
    STOPPED = "stopped"
    #: Before a spawn: until the instances it starts ``after`` are running
    #: (ready), with the reason it still waits.
    WAITING = "waiting"
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

    DRAIN = "drain"  # its tasks drained first: it exited on the stop signal with none running
    SIGNAL = "signal"  # it exited after the stop signal
    KILL = "kill"  # stopwaitsecs ran out and SIGKILL went to the group


@dataclass(frozen=True, slots=True)
class Policy:
    """How an instance is supervised (supervisord's program options)."""

    autorestart: Autorestart = Autorestart.ON_FAILURE
    exitcodes: tuple[int, ...] = (0,)
    startsecs: float = 1.0
    #: Failed starts in a row before it goes fatal; None: never (``FOREVER``).
    startretries: int | None = 3
    stopsignal: str = "TERM"
    stopwaitsecs: float = 10.0
    #: Celery kind: running once it answers a ping (startsecs is then the
    #: time allowed for the first answer), not once it stayed up startsecs.
    ready_by_ping: bool = False
    #: The stop signal goes to the whole group; Celery kind: the main process
    #: only, since TERM to pool children kills running tasks (celery#2700).
    stop_group: bool = True
    # Start order and probes (the engine derives the two flags from the spec) --
    #: It has ``after`` names: each spawn waits for them (WAITING) first ...
    awaits: bool = False
    #: ... this long at most; then it is a failed start.
    after_timeout: float = 60.0
    #: A readiness probe is set: running once it passes (``Ready``), not once
    #: it stayed up startsecs ...
    ready_by_probe: bool = False
    #: ... within this long, else the start failed.
    ready_timeout: float = 60.0
    #: Liveness probe failures in a row that restart a running process.
    live_failures: int = 3


@dataclass(frozen=True)
class Autoscale:
    """A Celery worker's concurrency range (``--autoscale=max,min``)."""

    min: int
    max: int

    def to_wire(self) -> dict[str, int]:
        return {"min": self.min, "max": self.max}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Autoscale:
        return cls(min=int(d["min"]), max=int(d["max"]))


@dataclass(frozen=True)
class ScalePolicy:
    """Scaling on queue depth (issue 16, part 5): the pool size of the app's
    workers on this branch follows ``ceil((ready + in flight) / per_worker)``
    of queue ``on``, clamped to ``[min, max]``; down only after ``down_after``
    seconds of lower readings (see ``branchd/scaling.py``)."""

    on: str
    per_worker: int
    min: int
    max: int
    down_after: float = 60.0

    def to_wire(self) -> dict[str, Any]:
        return {
            "on": self.on,
            "per_worker": self.per_worker,
            "min": self.min,
            "max": self.max,
            "down_after": self.down_after,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> ScalePolicy:
        return cls(
            on=str(d["on"]),
            per_worker=int(d["per_worker"]),
            min=int(d["min"]),
            max=int(d["max"]),
            down_after=float(d.get("down_after", 60.0)),
        )


@dataclass(frozen=True)
class TaskLimits:
    """Overrides for one task type, re-applied by remote control after every
    start (Celery forgets them on restart). On an app, ``rate_limit`` is the
    total of all its workers on the branch, split between them."""

    rate_limit: str | None = None  # Celery's form: "600/m", "10/s", "2/h", "5"
    time_limit: float | None = None
    soft_time_limit: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> TaskLimits:
        def num(key: str) -> float | None:
            return None if d.get(key) is None else float(d[key])

        rate = d.get("rate_limit")
        return cls(
            rate_limit=None if rate is None else str(rate),
            time_limit=num("time_limit"),
            soft_time_limit=num("soft_time_limit"),
        )


#: The limit fields of an app (its worker settings) and of an instance (its
#: overrides), by wire key: flat in both wire forms.
LIMIT_FIELDS: tuple[str, ...] = (
    "time_limit",
    "soft_time_limit",
    "max_tasks_per_child",
    "max_memory_per_child",
    "prefetch_multiplier",
    "disable_prefetch",
    "task_overrides",
)


#: One setting in two forms: an instance's one of them replaces the app's pair.
PREFETCH = ("prefetch_multiplier", "disable_prefetch")


@dataclass(frozen=True)
class Limits:
    """A worker's limits (None: not set, Celery's own default or the app's)."""

    time_limit: float | None = None  # seconds (--time-limit)
    soft_time_limit: float | None = None  # seconds (--soft-time-limit)
    max_tasks_per_child: int | None = None
    #: Bytes (the API's unit for every size); the worker flag takes KiB.
    max_memory_per_child: int | None = None
    prefetch_multiplier: int | None = None
    disable_prefetch: bool | None = None  # Celery 5.6+
    task_overrides: Mapping[str, TaskLimits] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "time_limit": self.time_limit,
            "soft_time_limit": self.soft_time_limit,
            "max_tasks_per_child": self.max_tasks_per_child,
            "max_memory_per_child": self.max_memory_per_child,
            "prefetch_multiplier": self.prefetch_multiplier,
            "disable_prefetch": self.disable_prefetch,
            "task_overrides": {k: v.to_wire() for k, v in sorted(self.task_overrides.items())},
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Limits:
        def num(key: str) -> float | None:
            return None if d.get(key) is None else float(d[key])

        def count(key: str) -> int | None:
            return None if d.get(key) is None else int(d[key])

        flag = d.get("disable_prefetch")
        return cls(
            time_limit=num("time_limit"),
            soft_time_limit=num("soft_time_limit"),
            max_tasks_per_child=count("max_tasks_per_child"),
            max_memory_per_child=count("max_memory_per_child"),
            prefetch_multiplier=count("prefetch_multiplier"),
            disable_prefetch=None if flag is None else bool(flag),
            task_overrides={
                str(k): TaskLimits.from_wire(v) for k, v in (d.get("task_overrides") or {}).items()
            },
        )


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
    #: Scaling on queue depth; None: the pool size is the declared one.
    scale: ScalePolicy | None = None
    #: Its workers' limits (an instance's own override them field by field).
    limits: Limits = Limits()

    def to_wire(self) -> dict[str, Any]:
        """Its fields, flat: an app's wire form (and its API body) carries them
        beside the app's own."""
        return {
            "broker": self.broker,
            "celery_app": self.celery_app,
            "python": self.python,
            "pool": self.pool,
            "args": list(self.args),
            "autoscale": self.autoscale.to_wire() if self.autoscale else None,
            "mingle_gossip": self.mingle_gossip,
            "result_backend": self.result_backend,
            "scale": self.scale.to_wire() if self.scale else None,
            **self.limits.to_wire(),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> CelerySettings:
        auto = d.get("autoscale")
        scale = d.get("scale")
        return cls(
            broker=d.get("broker"),
            celery_app=d.get("celery_app"),
            python=d.get("python"),
            pool=d.get("pool", "prefork"),
            args=tuple(d.get("args", ())),
            autoscale=Autoscale.from_wire(auto) if auto else None,
            mingle_gossip=bool(d.get("mingle_gossip", False)),
            result_backend=d.get("result_backend"),
            scale=ScalePolicy.from_wire(scale) if scale else None,
            limits=Limits.from_wire(d),
        )


#: Keys of every record's wire form that say which write it is, not what was
#: declared: kept off the API's answers (see ``views``).
RECORD_KEYS: tuple[str, ...] = ("version", "origin")
_CELERY_KEYS = tuple(CelerySettings().to_wire())


def _record_wire(version: Version | None, origin: str | None) -> dict[str, Any]:
    return {"version": version.to_wire() if version else None, "origin": origin}


def _record_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    text = d.get("version")
    return {"version": Version.from_wire(text) if text else None, "origin": d.get("origin")}


def _check_keys(what: str, d: Mapping[str, Any], known: tuple[str, ...]) -> None:
    """Refuse what this branchd does not know rather than drop it silently
    (a record written back without it would lose it)."""
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) in the wire form of {what}: {', '.join(unknown)}")


@dataclass(frozen=True)
class App:
    name: str
    env: Mapping[str, str] = field(default_factory=dict)
    #: Defaults for the instances of this app (any instance field but name/kind).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    celery: CelerySettings = CelerySettings()
    #: The last write of this record (None: never stored) ...
    version: Version | None = None
    #: ... and the branch where it was declared (kept over updates).
    origin: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The one encoding of an app: the store's, the API's (less RECORD_KEYS)
        and the gossip's. JSON-ready; the Celery settings sit flat beside the rest."""
        return {
            "name": self.name,
            "env": dict(self.env),
            "defaults": dict(self.defaults),
            "created_at": self.created_at,
            **self.celery.to_wire(),
            **_record_wire(self.version, self.origin),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> App:
        """Inverse of ``to_wire``; a missing key takes the field's default."""
        _check_keys("an app", d, _APP_KEYS)
        return cls(
            name=d["name"],
            env=dict(d.get("env", {})),
            defaults=dict(d.get("defaults", {})),
            created_at=float(d.get("created_at", 0.0)),
            celery=CelerySettings.from_wire(d),
            **_record_fields(d),
        )


_APP_KEYS = ("name", "env", "defaults", "created_at", *_CELERY_KEYS, *RECORD_KEYS)


@dataclass(frozen=True)
class Queue:
    """A queue declaration of an app (Celery's ``task_queues`` entry)."""

    app: str
    name: str
    exchange: str | None = None  # None: an exchange named like the queue
    exchange_type: str = "direct"
    routing_key: str | None = None  # None: the queue's name
    options: Mapping[str, Any] = field(default_factory=dict)
    version: Version | None = None  # as App's
    origin: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The one encoding of a queue declaration (None kept: "like the name")."""
        return {
            "app": self.app,
            "name": self.name,
            "exchange": self.exchange,
            "exchange_type": self.exchange_type,
            "routing_key": self.routing_key,
            "options": dict(self.options),
            **_record_wire(self.version, self.origin),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Queue:
        _check_keys("a queue", d, _QUEUE_KEYS)
        return cls(
            app=d["app"],
            name=d["name"],
            exchange=d.get("exchange"),
            exchange_type=d.get("exchange_type", "direct"),
            routing_key=d.get("routing_key"),
            options=dict(d.get("options", {})),
            **_record_fields(d),
        )


_QUEUE_KEYS = ("app", "name", "exchange", "exchange_type", "routing_key", "options", *RECORD_KEYS)


@dataclass(frozen=True, slots=True)
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
    #: Environment files read at each start (systemd's ``EnvironmentFile=``
    #: syntax; a leading "-": skipped when missing), between the app's env
    #: and the instance's own.
    env_file: tuple[str, ...] = ()
    #: The child's umask, set before exec (None: the daemon's).
    umask: int | None = None
    #: cgroup limits of its whole tree (None: none): bytes of memory (swap
    #: included), a share of one core, a number of processes. Enforced by the
    #: kernel, unlike the Celery kind's memory_limit (an RSS check, a restart).
    memory_max: int | None = None
    cpu_max: float | None = None
    pids_max: int | None = None
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
    #: Overrides of the app's limits (flat in the wire form: LIMIT_FIELDS).
    limits: Limits = Limits()
    # Start order and probes (issue 15, part 3) ----------------------------
    #: Instances of the same app it starts after: each spawn waits until they
    #: are running (ready, with a probe), up to ``policy.after_timeout``.
    after: tuple[str, ...] = ()
    #: supervisord's: when the daemon starts (stops) everything, lower starts
    #: first (stops last).
    priority: int = 999
    #: Readiness probe, as text ("tcp:HOST:PORT", "http://...", "exec:ARGV",
    #: "notify"; see ``process.probes``); running means it passed.
    ready: str | None = None
    #: Liveness probe (the same forms), run every ``live_period`` while running,
    #: each given ``live_timeout``; ``policy.live_failures`` in a row restart it.
    live: str | None = None
    live_period: float = 10.0
    live_timeout: float = 5.0
    version: Version | None = None  # as App's
    origin: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.app, self.name)

    def to_wire(self) -> dict[str, Any]:
        """The one encoding of an instance declaration: flat, with the names a
        user gives the fields (the policy's too), as the API shows them.

        The policy's ``ready_by_ping`` and ``stop_group`` are not in it: the
        engine derives them from the kind at each start.
        """
        p = self.policy
        return {
            "app": self.app,
            "name": self.name,
            "kind": self.kind.value,
            "desired": self.desired.value,
            "command": list(self.command),
            "env": dict(self.env),
            "cwd": self.cwd,
            "user": self.user,
            "env_file": list(self.env_file),
            "umask": None if self.umask is None else umask_text(self.umask),
            "memory_max": self.memory_max,
            "cpu_max": self.cpu_max,
            "pids_max": self.pids_max,
            "autorestart": p.autorestart.value,
            "exitcodes": list(p.exitcodes),
            "startsecs": p.startsecs,
            "startretries": startretries_wire(p.startretries),
            "stopsignal": p.stopsignal,
            "stopwaitsecs": p.stopwaitsecs,
            "autostart": self.autostart,
            "log_max_bytes": self.log_max_bytes,
            "log_backups": self.log_backups,
            "branch": self.branch,
            "created_at": self.created_at,
            "queues": list(self.queues),
            "autoscale": self.autoscale.to_wire() if self.autoscale else None,
            "concurrency": self.concurrency,
            "pool": self.pool,
            "args": list(self.args),
            "loglevel": self.loglevel,
            "hung_after": self.hung_after,
            "memory_limit": self.memory_limit,
            **self.limits.to_wire(),
            **self._order_wire(),
            **_record_wire(self.version, self.origin),
        }

    def _order_wire(self) -> dict[str, Any]:
        p = self.policy
        return {
            "after": list(self.after),
            "after_timeout": p.after_timeout,
            "priority": self.priority,
            "ready": self.ready,
            "ready_timeout": p.ready_timeout,
            "live": self.live,
            "live_period": self.live_period,
            "live_timeout": self.live_timeout,
            "live_failures": p.live_failures,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> InstanceSpec:
        """Inverse of ``to_wire``; a missing key takes the field's default."""
        _check_keys("an instance", d, _SPEC_KEYS)
        base = Policy()
        policy = Policy(
            autorestart=Autorestart(d.get("autorestart", base.autorestart)),
            exitcodes=tuple(d.get("exitcodes", base.exitcodes)),
            startsecs=float(d.get("startsecs", base.startsecs)),
            startretries=startretries_from(d.get("startretries", base.startretries)),
            stopsignal=d.get("stopsignal", base.stopsignal),
            stopwaitsecs=float(d.get("stopwaitsecs", base.stopwaitsecs)),
            after_timeout=float(d.get("after_timeout", base.after_timeout)),
            ready_timeout=float(d.get("ready_timeout", base.ready_timeout)),
            live_failures=int(d.get("live_failures", base.live_failures)),
        )
        plain = {k: d[k] for k in _SPEC_PLAIN if k in d}
        if "after" in plain:
            plain["after"] = tuple(plain["after"])
        for key in ("command", "queues", "args", "env_file"):
            if key in plain:
                plain[key] = tuple(plain[key])
        if "env" in plain:
            plain["env"] = dict(plain["env"])
        if plain.get("umask") is not None:
            plain["umask"] = umask_from(plain["umask"])
        if "kind" in plain:
            plain["kind"] = Kind(plain["kind"])
        if "desired" in plain:
            plain["desired"] = Desired(plain["desired"])
        if plain.get("autoscale") is not None:
            plain["autoscale"] = Autoscale.from_wire(plain["autoscale"])
        plain.setdefault("command", ())
        return cls(
            app=d["app"],
            name=d["name"],
            branch=d["branch"],
            policy=policy,
            limits=Limits.from_wire(d),
            **plain,
            **_record_fields(d),
        )


#: An instance's supervision policy, by wire key (fields a user may set).
POLICY_FIELDS = (
    "autorestart",
    "exitcodes",
    "startsecs",
    "startretries",
    "stopsignal",
    "stopwaitsecs",
)
#: Start order and probes, by wire key (fields a user may set); those in
#: _ORDER_POLICY are the policy's (the machine's timers and threshold).
ORDER_FIELDS = (
    "after",
    "after_timeout",
    "priority",
    "ready",
    "ready_timeout",
    "live",
    "live_period",
    "live_timeout",
    "live_failures",
)
#: Those of ORDER_FIELDS that only a process instance has (a Celery worker is
#: ready once it answers a ping, and watched by the health rounds).
PROBE_FIELDS = ("ready", "ready_timeout", "live", "live_period", "live_timeout", "live_failures")
_ORDER_POLICY = ("after_timeout", "ready_timeout", "live_failures")
#: What only a Celery instance has, by wire key (fields a user may set).
CELERY_FIELDS = (
    "queues",
    "autoscale",
    "concurrency",
    "pool",
    "args",
    "loglevel",
    "hung_after",
    "memory_limit",
    *LIMIT_FIELDS,
)
_POLICY_KEYS = (*POLICY_FIELDS, *_ORDER_POLICY)
#: Instance fields whose null is "none" (no directory, user, env file, umask,
#: cgroup limit), kept as given rather than put back to a default.
NULLABLE_SPEC_FIELDS = (
    "cwd",
    "user",
    "env_file",
    "umask",
    "memory_max",
    "cpu_max",
    "pids_max",
)
#: Instance fields a user may set that are InstanceSpec fields under the same
#: name (in a create, a patch or an app's defaults), but the policy's and the
#: Celery ones.
SPEC_FIELDS = (
    "command",
    "env",
    *NULLABLE_SPEC_FIELDS,
    "autostart",
    "log_max_bytes",
    "log_backups",
)
#: Wire keys that are fields of InstanceSpec under the same name.
_SPEC_PLAIN = (
    "kind",
    "desired",
    *SPEC_FIELDS,
    "created_at",
    *(k for k in CELERY_FIELDS if k not in LIMIT_FIELDS),
    *(k for k in ORDER_FIELDS if k not in _ORDER_POLICY),
)
_SPEC_KEYS = ("app", "name", "branch", *_POLICY_KEYS, *_SPEC_PLAIN, *LIMIT_FIELDS, *RECORD_KEYS)


@dataclass(frozen=True, slots=True)
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
    #: Failed starts in a row (the machine's budget against startretries).
    retries: int = 0
    #: While in backoff: when (wall clock) the next start is due.
    backoff_until: float | None = None
