"""Frozen snapshots of the API's JSON shapes (see docs/api.md).

``from_json`` ignores fields it does not know, so a newer daemon does not
break an older client, and keeps the whole answer in ``raw``. A malformed
answer (not an object, a required field missing) raises ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

_T = TypeVar("_T")

_Convert = Mapping[str, Callable[[Any], Any]]


def _build(cls: type[_T], data: Any, convert: _Convert | None = None) -> _T:
    """Instantiate dataclass ``cls`` from the known keys of the object ``data``."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    convert = convert or {}
    kwargs: dict[str, Any] = {"raw": data}
    try:
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name == "raw" or f.name not in data:
                continue
            value, conv = data[f.name], convert.get(f.name)
            if conv is not None:
                if value is None:  # null where a container is expected: the default
                    continue
                value = conv(value)
            kwargs[f.name] = value
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a required field missing, a bad container
        raise ValueError(f"{cls.__name__}: {exc}") from None


def _strings(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in dict(value).items()}


def _str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # not a list of characters
        raise ValueError(f"expected a list, got {value!r}")
    return tuple(str(v) for v in value)


def _bounds(value: Any) -> dict[str, Any]:
    """An ``{"min": n, "max": n}`` object (kept as a plain dict)."""
    return dict(value)


@dataclass(frozen=True)
class App:
    name: str
    env: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    created_at: float | None = None
    # Celery settings of the app's workers (absent from a daemon without them)
    broker: str | None = None
    embedded_broker: bool | None = None
    celery_app: str | None = None
    python: str | None = None
    pool: str | None = None
    args: tuple[str, ...] = ()
    autoscale: Mapping[str, Any] | None = None
    mingle_gossip: bool | None = None
    result_backend: str | None = None
    #: Scaling on queue depth: on, per_worker, min, max, down_after (None: off).
    scale: Mapping[str, Any] | None = None
    #: Worker limits (an app's: its workers' defaults; an instance's: overrides;
    #: None: not set). Seconds; max_memory_per_child in bytes.
    time_limit: float | None = None
    soft_time_limit: float | None = None
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None
    prefetch_multiplier: int | None = None
    disable_prefetch: bool | None = None
    #: {task name: {"rate_limit", "time_limit", "soft_time_limit"}}; on an app
    #: a rate_limit is the total of its running workers on the branch.
    task_overrides: Mapping[str, Any] = field(default_factory=dict)
    #: "branch": its instances run on the branch that declared it (``branch``);
    #: "cluster": on any branch.
    scope: str | None = None
    branch: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> App:
        return _build(
            cls,
            data,
            {
                "env": _strings,
                "defaults": dict,
                "args": _str_tuple,
                "autoscale": _bounds,
                "task_overrides": dict,
            },
        )


@dataclass(frozen=True)
class Instance:
    app: str
    name: str
    state: str
    desired: str | None = None
    kind: str = "process"
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    #: Env files read at each start (a leading "-": skipped when missing).
    env_file: tuple[str, ...] = ()
    #: The child's umask in octal ("022"); None: the daemon's.
    umask: str | None = None
    #: cgroup limits of its whole tree: bytes (swap included), a share of
    #: one core, processes; None: none.
    memory_max: int | None = None
    cpu_max: float | None = None
    pids_max: int | None = None
    autorestart: str = "on-failure"
    exitcodes: tuple[int, ...] = (0,)
    startsecs: float = 1.0
    #: A count, or "forever" (never fatal).
    startretries: int | str = 3
    stopsignal: str = "TERM"
    stopwaitsecs: float = 10.0
    #: Instances of its app it starts after (each start waits until they run).
    after: tuple[str, ...] = ()
    after_timeout: float = 60.0
    #: Lower starts first (and stops last) when the daemon starts everything.
    priority: int = 999
    #: Readiness and liveness probes as text ("tcp:HOST:PORT", a URL, "exec:...",
    #: "notify"); None: none (and always None for a celery instance).
    ready: str | None = None
    ready_timeout: float | None = None
    live: str | None = None
    live_period: float | None = None
    live_timeout: float | None = None
    live_failures: int | None = None
    autostart: bool = True
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5
    pid: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    started_at: float | None = None
    uptime: float | None = None
    stop_step: str | None = None
    reason: str | None = None
    branch: str | None = None
    created_at: float | None = None
    # kind "celery" only
    node: str | None = None
    queues: tuple[str, ...] = ()
    autoscale: Mapping[str, Any] | None = None
    concurrency: int | None = None
    pool: str | None = None
    args: tuple[str, ...] = ()
    loglevel: str | None = None
    hung_after: float | None = None
    memory_limit: int | None = None
    #: Worker limits (an app's: its workers' defaults; an instance's: overrides;
    #: None: not set). Seconds; max_memory_per_child in bytes.
    time_limit: float | None = None
    soft_time_limit: float | None = None
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None
    prefetch_multiplier: int | None = None
    disable_prefetch: bool | None = None
    #: {task name: {"rate_limit", "time_limit", "soft_time_limit"}}; on an app
    #: a rate_limit is the total of its running workers on the branch.
    task_overrides: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Instance:
        return _build(
            cls,
            data,
            {
                "command": tuple,
                "exitcodes": tuple,
                "env": _strings,
                "env_file": _str_tuple,
                "after": _str_tuple,
                "queues": _str_tuple,
                "args": _str_tuple,
                "autoscale": _bounds,
                "task_overrides": dict,
            },
        )


@dataclass(frozen=True)
class ActionItem:
    """One instance's part of an app action (``start_app``, ``stop_app``,
    ``restart_app``): ``outcome`` is ``running``, ``stopped``, ``failed``,
    ``timeout``, ``pending`` (not waited for) or ``skipped`` (a rolling action
    stopped before its batch); ``error`` says why when it is not done right."""

    name: str
    outcome: str
    error: str | None = None
    instance: Instance | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.outcome in ("running", "stopped", "pending")

    @classmethod
    def from_json(cls, data: Any) -> ActionItem:
        return _build(cls, data, {"instance": Instance.from_json})


@dataclass(frozen=True)
class LintFinding:
    """One trap ``lint_app`` found in an app's Celery config: ``severity`` is
    ``error`` (tasks lost or run twice), ``warning`` or ``info``."""

    rule: str
    message: str
    severity: str
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> LintFinding:
        return _build(cls, data, {})


@dataclass(frozen=True)
class Stats:
    app: str
    name: str
    state: str
    pid: int | None = None
    uptime: float | None = None
    restarts: int = 0
    exit_code: int | None = None
    cpu_percent: float | None = None
    memory_rss: int | None = None
    processes: int = 0
    #: The id of the branch that runs it.
    branch: str | None = None
    #: What its cgroup counts ({"memory_current", "cpu_usage_usec", "oom_kills"});
    #: None when the branch runs without cgroups.
    cgroup: Mapping[str, Any] | None = None
    # kind "celery": {"node", "stats", "active"} (Celery's replies); None when not running
    celery: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Stats:
        return _build(cls, data, {"celery": dict, "cgroup": dict})


@dataclass(frozen=True)
class Queue:
    """A queue declaration of an app."""

    app: str
    name: str
    exchange: str | None = None
    exchange_type: str = "direct"
    routing_key: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Queue:
        return _build(cls, data, {"options": dict})


@dataclass(frozen=True)
class Consumer:
    """A queue of a celery instance: wanted (persisted), declared, live (None: not running)."""

    name: str
    wanted: bool = False
    declared: bool = False
    live: bool | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Consumer:
        return _build(cls, data)


@dataclass(frozen=True)
class QueueDepth:
    """A queue's depth: ``ready`` (the broker's count), ``in_flight`` (held by
    this branch's workers, ``running`` of them executing), ``consumers``, and
    ``at`` (wall time of the reading); ``unacked``: Redis only, the database's."""

    ready: int
    in_flight: int
    consumers: int
    at: float
    queue: str | None = None
    running: int | None = None
    unacked: int | None = None
    #: Workers that did not say what they hold in time (in_flight: at least).
    unanswered: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> QueueDepth:
        return _build(cls, data)


@dataclass(frozen=True)
class Autoscale:
    """The autoscale bounds of a celery instance; ``live`` what the running worker reports."""

    min: int
    max: int
    live: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Autoscale:
        return _build(cls, data, {"live": _bounds})


@dataclass(frozen=True)
class Capacity:
    cpus: int | None = None
    load: tuple[float, ...] = ()
    memory_total: int | None = None
    memory_free: int | None = None
    instances: int | None = None
    max_instances: int | None = None
    #: Pool processes the branch may run, what its instances take of them, the rest.
    slots: int | None = None
    slots_used: int | None = None
    free_slots: int | None = None
    draining: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Capacity:
        return _build(cls, data, {"load": tuple})


@dataclass(frozen=True)
class Branch:
    """The branch answering (``GET /v1/branch``): its record."""

    id: str
    hostname: str | None = None
    version: str | None = None
    started_at: float | None = None
    address: str | None = None
    capacity: Capacity = field(default_factory=Capacity)
    epoch: int | None = None
    api_url: str | None = None
    gossip_addr: str | None = None
    instances: tuple[str, ...] = ()
    #: Its Celery workers running now (absent from an older daemon).
    running: tuple[str, ...] = ()
    # the daemon answering (absent from a daemon older than issue 15)
    pid: int | None = None
    state_dir: str | None = None
    #: How instance process trees are kept and ended: "cgroup-v2",
    #: "cgroup-v1-hybrid" or "process-group".
    supervision: str | None = None
    #: This branch's instances by state.
    instance_states: Mapping[str, int] = field(default_factory=dict)
    #: None: not in a cluster; else {"members": {state: count}}.
    cluster: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Branch:
        conv = {"capacity": Capacity.from_json, "instances": _str_tuple, "running": _str_tuple}
        return _build(cls, data, conv)


@dataclass(frozen=True)
class Member:
    """A branch as the cluster's membership knows it (``GET /v1/branches``):
    its state (alive, suspect, dead, left) beside its record."""

    id: str
    state: str
    incarnation: int
    self: bool
    age: float
    api_url: str
    gossip_addr: str
    epoch: int | None = None
    since: float | None = None
    hostname: str | None = None
    version: str | None = None
    address: str | None = None
    started_at: float | None = None
    capacity: Capacity = field(default_factory=Capacity)
    instances: tuple[str, ...] = ()
    #: Its Celery workers running now (``GET /v1/branches/{id}`` only).
    running: tuple[str, ...] = ()
    instances_stale: bool = False
    #: This branch's own entry only: its gossip's counters (sent, got, dropped).
    gossip: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Member:
        conv = {"capacity": Capacity.from_json, "instances": _str_tuple, "running": _str_tuple}
        return _build(cls, data, conv)
