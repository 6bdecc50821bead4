"""Snapshots the API answers: frozen views of declarations plus live state.

They sit in the model layer, beside what they show, so that the HTTP edge
reads them without importing the supervision engine or the launcher (and a
remote branch's answer can be rebuilt into the same types later).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, overload

from branchd.model import (
    CELERY_FIELDS,
    LIMIT_FIELDS,
    NULLABLE_SPEC_FIELDS,
    ORDER_FIELDS,
    PROBE_FIELDS,
    RECORD_KEYS,
    App,
    InstanceSpec,
    Kind,
    Queue,
    Runtime,
)


@dataclass(frozen=True)
class CgroupStats:
    """What an instance's cgroup counts (a figure its machine lacks: None)."""

    memory_current: int | None = None  # bytes charged to it (page cache included)
    cpu_usage_usec: int | None = None  # cpu time of every process it ever held
    oom_kills: int = 0  # processes its OOM killer ended (memory_max)

    def to_json(self) -> dict[str, Any]:
        return {
            "memory_current": self.memory_current,
            "cpu_usage_usec": self.cpu_usage_usec,
            "oom_kills": self.oom_kills,
        }


@dataclass(frozen=True)
class TreeStats:
    """Resource use of a process and all its descendants (with cgroups: of
    every process in its instance's cgroup, those that left its tree too)."""

    cpu_percent: float = 0.0  # sum over the tree; 100.0 is one core
    memory_rss: int = 0  # bytes, sum over the tree
    processes: int = 0  # live (non-zombie) processes in the tree
    cgroup: CgroupStats | None = None  # None: the branch runs without cgroups


@dataclass(frozen=True)
class InstanceView:
    """A snapshot of one instance for the API: declaration plus live state."""

    spec: InstanceSpec
    runtime: Runtime
    uptime: float | None
    #: The argv it runs (for the Celery kind: built from the app).
    command: tuple[str, ...] = ()
    node: str | None = None

    def to_json(self, *, listing: bool = False) -> dict[str, Any]:
        """The declaration's wire form (less RECORD_KEYS, and for a process
        less the Celery fields) with the live state, in the API's order; in a
        ``listing``, env values are hidden (``hide_env``)."""
        s, rt = self.spec, self.runtime
        out = {**s.to_wire(), **_live(self, rt)}
        if listing:
            out["env"] = hide_env(out["env"])
        keys = _INSTANCE_KEYS + (_CELERY_INSTANCE_KEYS if s.kind == Kind.CELERY else ())
        if s.kind == Kind.CELERY:  # (a worker is ready by its ping: no probes)
            keys = tuple(k for k in keys if k not in PROBE_FIELDS)
        return {k: out[k] for k in keys}


def _live(view: InstanceView, rt: Runtime) -> dict[str, Any]:
    return {
        "state": rt.state.value,
        "pid": rt.pid,
        "command": [redact_urls(arg) for arg in view.command or view.spec.command],
        "restarts": rt.restarts,
        "exit_code": rt.exit_code,
        "started_at": rt.started_at,
        "uptime": view.uptime,
        "stop_step": rt.stop_step.value if rt.stop_step else None,
        "reason": rt.reason,
        "node": view.node,
    }


#: An instance answer's keys, in order (clients read them by name; people read the order).
_INSTANCE_KEYS: tuple[str, ...] = (
    "name",
    "app",
    "kind",
    "state",
    "desired",
    "pid",
    "command",
    "env",
    *NULLABLE_SPEC_FIELDS,
    "autorestart",
    "exitcodes",
    "startsecs",
    "startretries",
    "stopsignal",
    "stopwaitsecs",
    "autostart",
    "log_max_bytes",
    "log_backups",
    "restarts",
    "exit_code",
    "started_at",
    "uptime",
    "stop_step",
    "reason",
    "branch",
    "created_at",
    *ORDER_FIELDS,  # (issue 15, part 3)
)
_CELERY_INSTANCE_KEYS: tuple[str, ...] = ("node", *CELERY_FIELDS)


def app_answer(
    app: App,
    effective_broker: str | None = None,
    effective_backend: str | None = None,
    *,
    listing: bool = False,
) -> dict[str, Any]:
    """An app's wire form as the API answers it (less RECORD_KEYS), with the
    broker and result store its workers really use, in the API's order; in a
    ``listing``, env values are hidden (``hide_env``)."""
    wire = app.to_wire()
    if listing:
        wire["env"] = hide_env(wire["env"])
    return {
        **{k: wire[k] for k in ("name", "env", "defaults", "created_at")},
        "broker": redact_urls(effective_broker or app.celery.broker),
        "embedded_broker": app.celery.broker is None,
        "result_backend": redact_urls(effective_backend or app.celery.result_backend),
        **{k: wire[k] for k in ("celery_app", "python", "pool", "args", "autoscale")},
        "mingle_gossip": wire["mingle_gossip"],
        "scale": wire["scale"],
        # An app on the embedded broker is bound to the branch that declared it
        # (its workers and producers share that machine's folder): its
        # instances run there. Any other app's may run on any branch.
        "scope": "branch" if app.celery.broker is None else "cluster",
        "branch": app.origin if app.celery.broker is None else None,
        **{k: wire[k] for k in LIMIT_FIELDS},
    }


def queue_answer(queue: Queue) -> dict[str, Any]:
    """A queue's wire form as the API answers it: less RECORD_KEYS, and an
    exchange or routing key left to the default shown as what it is (the name)."""
    out = {k: v for k, v in queue.to_wire().items() if k not in RECORD_KEYS}
    out["exchange"] = queue.exchange or queue.name
    out["routing_key"] = queue.routing_key or queue.name
    return out


@dataclass(frozen=True)
class Stats:
    view: InstanceView
    tree: TreeStats
    celery: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        v = self.view.to_json()
        out = {
            "app": v["app"],
            "name": v["name"],
            "state": v["state"],
            "pid": v["pid"],
            "uptime": v["uptime"],
            "restarts": v["restarts"],
            "exit_code": v["exit_code"],
            "cpu_percent": self.tree.cpu_percent,
            "memory_rss": self.tree.memory_rss,
            "processes": self.tree.processes,
            "branch": self.view.spec.branch,
            "cgroup": self.tree.cgroup.to_json() if self.tree.cgroup is not None else None,
        }
        if self.view.spec.kind == Kind.CELERY:
            out["celery"] = dict(self.celery) if self.celery is not None else None
        return out

    def listed(self) -> dict[str, Any]:
        """Its item in a listing of an app's instances' figures (no Celery part)."""
        out = self.to_json()
        out.pop("celery", None)
        return out


@dataclass(frozen=True)
class Need:
    """What an instance takes from the branch that runs it."""

    #: Free slots it takes (``need_for``: its largest concurrency).
    slots: int = 1
    #: Free memory it takes (bytes; 0: nothing declared, nothing checked).
    memory: int = 0

    def __str__(self) -> str:
        text = f"{self.slots} slot{'s' if self.slots != 1 else ''}"
        return text + (f" and {mib(self.memory)} of memory" if self.memory else "")


def need_for(
    spec: InstanceSpec,
    app: App | None = None,
    memory_estimate: int = 0,
    *,
    cpus: int = 1,
) -> Need:
    """What ``spec`` declares it needs.

    Slots: the most pool processes it may run (its autoscale max, else its
    fixed concurrency, else the app's autoscale max), 1 for a plain process.
    A worker that says none of these runs Celery's default, the host's CPU
    count: ``cpus`` (the branch that runs it knows its own; a sender placing
    it does not know the host yet and counts 1, the host's admission check
    then counts its own).
    Memory: its ``memory_limit`` (the most it is let grow to), else
    ``memory_estimate`` (what the caller knows of the app's instances).
    """
    slots = 1
    if spec.kind == Kind.CELERY:
        if spec.autoscale is not None:
            slots = spec.autoscale.max
        elif spec.concurrency is not None:
            slots = spec.concurrency
        elif app is not None and app.celery.autoscale is not None:
            slots = app.celery.autoscale.max
        else:
            slots = cpus
    memory = spec.memory_limit if spec.memory_limit is not None else memory_estimate
    return Need(slots=max(1, slots), memory=max(0, memory))


def mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class Capacity:
    """What a branch has room for; rides on the gossip later (placement reads it)."""

    cpus: int
    load: tuple[float, float, float]
    memory_total: int
    memory_free: int
    instances: int
    #: The instances this branch may hold (``cluster.max_instances``).
    max_instances: int = 0
    #: Taking no new instance (placement skips it); its own keep running.
    draining: bool = False
    #: The pool processes this branch may run (``cluster.slots``): a Celery
    #: instance takes its largest concurrency, a plain process one.
    slots: int = 0
    #: What its instances take of them (``need_for``).
    slots_used: int = 0

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.slots_used)

    @property
    def free_instances(self) -> int:
        return max(0, self.max_instances - self.instances)

    def to_json(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "load": [round(x, 2) for x in self.load],
            "memory_total": self.memory_total,
            "memory_free": self.memory_free,
            "instances": self.instances,
            "max_instances": self.max_instances,
            "slots": self.slots,
            "slots_used": self.slots_used,
            "free_slots": self.free_slots,
            "draining": self.draining,
        }


@dataclass(frozen=True)
class BranchRecord:
    """One branch as the API (and later the cluster's directory) shows it."""

    id: str
    hostname: str
    version: str
    started_at: float
    address: str  # HOST:PORT of the API as others dial it
    capacity: Capacity
    #: This run of the branch (a restart has a higher one).
    epoch: int = 0
    #: The API's URL and the gossip's HOST:PORT ("": not in a cluster).
    api_url: str = ""
    gossip_addr: str = ""
    #: ``app/name`` of every instance it holds, sorted.
    instances: tuple[str, ...] = ()
    #: When this record was last read from the host (wall clock, s).
    refreshed: float = 0.0
    #: The digest of its instance names (and running workers) its gossiped
    #: meta carries ("": not from the gossip); it changes with each new set.
    digest: str = ""
    #: ``app/name`` of its Celery workers running now, sorted: an app's rate
    #: limits are split over its running workers across the cluster.
    running: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hostname": self.hostname,
            "version": self.version,
            "started_at": self.started_at,
            "address": self.address,
            "epoch": self.epoch,
            "api_url": self.api_url,
            "gossip_addr": self.gossip_addr,
            "capacity": self.capacity.to_json(),
            "instances": list(self.instances),
            "running": list(self.running),
        }


#: ``scheme://user:password@`` in a URL (or in an argument holding one).
_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s;]*:)(?P<secret>[^@/\s;]+)@")


@overload
def redact_urls(text: str) -> str: ...
@overload
def redact_urls(text: None) -> None: ...
def redact_urls(text: str | None) -> str | None:
    """``text`` with the password of every URL in it shown as ``**``
    (``amqp://guest:**@host//``): answers never carry a broker's password
    (only ``celery-config``, whose use is to hand a producer its broker)."""
    if text is None or "@" not in text:
        return text  # (no URL with a user in it: the common case, on every listing)
    return _PASSWORD.sub(lambda m: f"{m['head']}**@", text)


#: What a listing shows instead of an env value.
HIDDEN = "**"


def hide_env(env: Mapping[str, str]) -> dict[str, str]:
    """Env values are secrets more often than not (keys, passwords, DSNs): a
    listing, which dashboards poll and show, names the variables only; the
    answer about one app or instance, which a token holder asks for, has them."""
    return dict.fromkeys(env, HIDDEN)


# Between branches: the headers of a forwarded request --------------------------

#: Set on a request one branch forwards to another: it is answered there,
#: never forwarded again (a forward never loops).
HOP_HEADER = "X-Branchd-Hop"
#: The forwarding branch's proof, sealed with the cluster key (method, path,
#: a digest of the body, a timestamp and a nonce): the caller's token was
#: checked at the first branch, and branches need not share one.
PROOF_HEADER = "X-Branchd-Forwarded"
