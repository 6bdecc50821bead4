"""Snapshots the API answers: frozen views of declarations plus live state.

They sit in the model layer, beside what they show, so that the HTTP edge
reads them without importing the supervision engine or the launcher (and a
remote branch's answer can be rebuilt into the same types later).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from branchd.model import InstanceSpec, Kind, Runtime


@dataclass(frozen=True)
class TreeStats:
    """Resource use of a process and all its descendants."""

    cpu_percent: float = 0.0  # sum over the tree; 100.0 is one core
    memory_rss: int = 0  # bytes, sum over the tree
    processes: int = 0  # live (non-zombie) processes in the tree


@dataclass(frozen=True)
class InstanceView:
    """A snapshot of one instance for the API: declaration plus live state."""

    spec: InstanceSpec
    runtime: Runtime
    uptime: float | None
    #: The argv it runs (for the Celery kind: built from the app).
    command: tuple[str, ...] = ()
    node: str | None = None

    def to_json(self) -> dict[str, Any]:
        s, rt, p = self.spec, self.runtime, self.spec.policy
        out: dict[str, Any] = {
            "name": s.name,
            "app": s.app,
            "kind": s.kind.value,
            "state": rt.state.value,
            "desired": s.desired.value,
            "pid": rt.pid,
            "command": list(self.command or s.command),
            "env": dict(s.env),
            "cwd": s.cwd,
            "user": s.user,
            "autorestart": p.autorestart.value,
            "exitcodes": list(p.exitcodes),
            "startsecs": p.startsecs,
            "startretries": p.startretries,
            "stopsignal": p.stopsignal,
            "stopwaitsecs": p.stopwaitsecs,
            "autostart": s.autostart,
            "log_max_bytes": s.log_max_bytes,
            "log_backups": s.log_backups,
            "restarts": rt.restarts,
            "exit_code": rt.exit_code,
            "started_at": rt.started_at,
            "uptime": self.uptime,
            "stop_step": rt.stop_step.value if rt.stop_step else None,
            "reason": rt.reason,
            "branch": s.branch,
            "created_at": s.created_at,
        }
        if s.kind == Kind.CELERY:
            out.update(
                node=self.node,
                queues=list(s.queues),
                autoscale=s.autoscale.to_json() if s.autoscale else None,
                concurrency=s.concurrency,
                pool=s.pool,
                args=list(s.args),
                loglevel=s.loglevel,
                hung_after=s.hung_after,
                memory_limit=s.memory_limit,
            )
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
        }
        if self.view.spec.kind == Kind.CELERY:
            out["celery"] = dict(self.celery) if self.celery is not None else None
        return out


@dataclass(frozen=True)
class Capacity:
    """What a branch has room for; rides on the gossip later (placement reads it)."""

    cpus: int
    load: tuple[float, float, float]
    memory_total: int
    memory_free: int
    instances: int

    def to_json(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "load": [round(x, 2) for x in self.load],
            "memory_total": self.memory_total,
            "memory_free": self.memory_free,
            "instances": self.instances,
        }


@dataclass(frozen=True)
class BranchRecord:
    """One branch as the API (and later the cluster's directory) shows it."""

    id: str
    hostname: str
    version: str
    started_at: float
    address: str
    capacity: Capacity

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hostname": self.hostname,
            "version": self.version,
            "started_at": self.started_at,
            "address": self.address,
            "capacity": self.capacity.to_json(),
        }
