"""The Celery kind: worker argv, readiness by ping, reconcile, consumers, autoscale.

Everything here speaks to workers through a ``RemoteControl`` (kombu alone;
the daemon never imports celery). Facts it relies on are in design.md:
``add_consumer``/``cancel_consumer`` answer before acting (confirm with
``active_queues``), errors come back as ``{"error": ...}`` replies, a ping
sent before the worker's control queue exists is lost (keep re-sending).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from branchd.celery import limits as task_limits
from branchd.celery.argv import worker_argv
from branchd.celery.broker import (
    BrokerSpec,
    embedded,
    worker_env,
)
from branchd.celery.remote import RemoteControl
from branchd.celery.urls import broker_url_problem, is_embedded_url
from branchd.clock import Scheduler
from branchd.errors import BrokerUnavailable, ControlFailed, Invalid, RestartRequired
from branchd.model import App, Autoscale, InstanceSpec, Queue

log = logging.getLogger(__name__)

Reply = dict[str, Any]

#: Confirmation polls start this tight and back off to the cap (seconds).
CONFIRM_FIRST_PAUSE = 0.002
CONFIRM_MAX_PAUSE = 0.1


@dataclass(frozen=True)
class Worker:
    """How to reach one running worker."""

    node: str
    broker: BrokerSpec


def node_name(instance: str, hostname: str) -> str:
    return f"{instance}@{hostname}"


def broker_for(app: App, state_dir: Path, hook: str | None = None) -> BrokerSpec:
    """The app's broker (never raises: a bad URL stored before URLs were
    checked is refused by :func:`check_broker`, at the worker's start)."""
    if is_embedded_url(app.celery.broker):
        return embedded(state_dir, app.name, hook)
    return BrokerSpec(app.celery.broker or "")


def check_broker(app: App) -> None:
    """Raise Invalid if the app's broker URL is bad (an app from an older
    database may hold one): its workers then fail to start, saying why."""
    if app.celery.broker:
        problem = broker_url_problem(app.celery.broker)
        if problem:
            raise Invalid(f"app {app.name!r} has a bad broker URL: {problem}")


def python_for(app: App) -> str:
    """The app's interpreter; a virtualenv directory means its bin/python."""
    python = app.celery.python
    if not python:
        return sys.executable
    if os.path.isdir(python):
        return os.path.join(python, "bin", "python")
    return python


def effective_autoscale(app: App, spec: InstanceSpec) -> Autoscale | None:
    if spec.concurrency is not None and spec.autoscale is None:
        return None  # a fixed --concurrency asked for explicitly
    return spec.autoscale or app.celery.autoscale


def command_for(app: App, spec: InstanceSpec, node: str) -> list[str]:
    """The worker's argv (no URL: the broker and the result store are in its
    environment, see ``env_for``).

    ``-Q`` names every queue of the instance. A name given to ``-Q`` alone would
    get Celery's default binding in the worker's queue table, and a later
    ``add_consumer`` of that name reuses the table's entry and ignores the
    exchange and routing key it is sent (Celery 5.7,
    ``Consumer.add_task_queue``): so the queues with a declared binding go to
    the worker's ``task_queues`` too, through :func:`env_for`.
    """
    if not app.celery.celery_app:
        raise Invalid(f"app {app.name!r} has no celery_app (the module given to celery -A)")
    auto = effective_autoscale(app, spec)
    limits = task_limits.merged(app.celery.limits, spec.limits)
    task_limits.check_worker(app.celery.limits, spec.limits, spec.pool or app.celery.pool)
    return worker_argv(
        python=python_for(app),
        celery_app=app.celery.celery_app,
        node=node,
        # The broker and the result store go in the environment (env_for), not
        # in argv: `ps` shows a command line, with its passwords, to every user.
        broker_url=None,
        queues=list(spec.queues),
        autoscale=(auto.max, auto.min) if auto else None,
        concurrency=spec.concurrency,
        pool=spec.pool or app.celery.pool,
        loglevel=spec.loglevel,
        extra=[*app.celery.args, *spec.args],
        without_mingle_gossip=not app.celery.mingle_gossip,
        limits=limits,
    )


def start_bindings(queues: Sequence[str], decls: Mapping[str, Queue]) -> dict[str, Any]:
    """The declared bindings a worker of ``queues`` must know from its start
    (Celery's ``task_queues`` dict form); queues bound the default way need none."""
    return {
        name: _binding(name, decls[name])
        for name in queues
        if custom_binding(decls.get(name))
    }


def env_for(
    broker: BrokerSpec,
    env: Mapping[str, str],
    bindings: Mapping[str, Mapping[str, Any]] | None = None,
    hook: str | None = None,
    result_backend: str | None = None,
    annotations: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, str]:
    """The worker's environment: ``env`` plus its broker and result store
    (Celery reads ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` before its
    app's own settings, as ``-b`` and ``--result-backend`` do), what the broker
    needs to reach it and the declared ``bindings`` of its queues (handed over
    by the loader in ``hook``), with its per-task limits (``annotations``)."""
    extra = worker_env(
        broker,
        env.get("PYTHONPATH"),
        task_queues=bindings,
        hook=hook,
        task_annotations=annotations,
        worker=True,
    )
    urls = {"CELERY_BROKER_URL": broker.url}
    if result_backend:
        urls["CELERY_RESULT_BACKEND"] = result_backend
    return {**env, **urls, **extra}


def producer_config(
    broker: BrokerSpec, backend: str | None, decls: Mapping[str, Queue]
) -> dict[str, Any]:
    """The Celery settings a producer of the app needs, for ``app.conf.update(...)``.

    ``task_queues`` is in Celery's dict form (``{name: {exchange, exchange_type,
    routing_key, ...}}``, which ``Queues.add_compat`` takes): on Redis and the
    embedded broker a producer that does not declare a topic exchange drops
    its messages without a word.
    """
    out: dict[str, Any] = {"broker_url": broker.url}
    if broker.transport_options:
        out["broker_transport_options"] = dict(broker.transport_options)
    if backend:
        out["result_backend"] = backend
    if decls:
        out["task_queues"] = {
            name: _binding(name, d) for name, d in sorted(decls.items())
        }
    return out


def producer_env(
    broker: BrokerSpec,
    backend: str | None,
    decls: Mapping[str, Queue] | None = None,
    hook: str | None = None,
) -> dict[str, str]:
    """The same settings as environment variables, for Celery's own CLI and
    for producers that read their settings from the environment (Celery reads
    ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND``; transport options and
    queue declarations come through branchd's loader in ``hook``, as for the
    workers)."""
    env = {"CELERY_BROKER_URL": broker.url}
    if backend:
        env["CELERY_RESULT_BACKEND"] = backend
    queues = {name: _binding(name, d) for name, d in sorted((decls or {}).items())}
    return {**env, **worker_env(broker, task_queues=queues, hook=hook)}


def _binding(name: str, decl: Queue) -> dict[str, Any]:
    return {k: v for k, v in consumer_arguments(name, decl).items() if k != "queue"}


def consumer_arguments(name: str, decl: Queue | None) -> dict[str, Any]:
    """Arguments of ``add_consumer``; an undeclared queue gets Celery's defaults (as -Q)."""
    if decl is None:
        return {"queue": name}
    return {
        "queue": name,
        "exchange": decl.exchange or name,
        "exchange_type": decl.exchange_type,
        "routing_key": decl.routing_key or name,
        **dict(decl.options),
    }


def custom_binding(decl: Queue | None) -> bool:
    """Does the declaration differ from what ``-Q name`` sets up by itself?"""
    if decl is None:
        return False
    return (
        (decl.exchange or decl.name) != decl.name
        or decl.exchange_type != "direct"
        or (decl.routing_key or decl.name) != decl.name
        or bool(decl.options)
    )


def queue_names(reply: Reply | None) -> list[str] | None:
    """Queue names out of an ``active_queues`` reply; None if there was none."""
    if reply is None:
        return None
    items = reply.get("ok", reply)
    if not isinstance(items, list):
        return None
    return [q["name"] for q in items if isinstance(q, dict) and "name" in q]


def autoscaler_range(stats: Reply | None) -> Autoscale | None:
    if not stats or not isinstance(stats.get("autoscaler"), dict):
        return None
    a = stats["autoscaler"]
    try:
        return Autoscale(min=int(a["min"]), max=int(a["max"]))
    except (KeyError, TypeError, ValueError):
        return None


def pool_size(stats: Reply | None) -> int | None:
    """How many processes (or threads) the worker's pool has now.

    Under ``--autoscale``, ``pool.max-concurrency`` is the size at start and
    goes stale; the pool's process list (prefork) or the autoscaler's
    ``current`` is the live figure.
    """
    if not stats:
        return None
    pool = stats.get("pool")
    if isinstance(pool, dict):
        if isinstance(pool.get("processes"), list):
            return len(pool["processes"])
        if isinstance(pool.get("threads"), int):
            return int(pool["threads"])
    scaler = stats.get("autoscaler")
    if isinstance(scaler, dict) and isinstance(scaler.get("current"), int):
        return int(scaler["current"])
    if isinstance(pool, dict) and isinstance(pool.get("max-concurrency"), int):
        return int(pool["max-concurrency"])
    return None


def pool_counted(stats: Reply | None) -> int | None:
    """How many processes the pool counts (the autoscaler's ``current``):
    fewer than it lists while processes a shrink terminated are still exiting."""
    scaler = (stats or {}).get("autoscaler")
    if isinstance(scaler, dict) and isinstance(scaler.get("current"), int):
        return int(scaler["current"])
    return None


def fixed_concurrency(w: Worker) -> str:
    """The message of a refused autoscale change on a fixed-concurrency worker."""
    return (
        f"fixed concurrency: {w.node} was started without --autoscale, so its "
        "concurrency cannot change at runtime; restart it with an autoscale range "
        "(branchctl instances update APP NAME --autoscale MIN,MAX, then instances "
        "restart; or PATCH its autoscale); nothing was changed"
    )


def _error(reply: Reply | None) -> str | None:
    if reply is None:
        return "no reply"
    if "error" in reply:
        return str(reply["error"])
    return None


class CeleryOps:
    """Remote-control operations on workers, each bounded by a deadline."""

    def __init__(
        self,
        remote: RemoteControl,
        *,
        scheduler: Scheduler,
        call_timeout: float = 1.0,
        confirm_timeout: float = 10.0,
    ) -> None:
        self.remote = remote
        self._sched = scheduler
        self._clock = scheduler.clock
        self.call_timeout = call_timeout
        self.confirm_timeout = confirm_timeout

    async def ping(self, w: Worker, timeout: float | None = None) -> bool:
        reply = await self.remote.call(w.broker, w.node, "ping", None, timeout or self.call_timeout)
        return reply is not None and "error" not in reply

    async def call(self, w: Worker, command: str, **arguments: Any) -> Reply | None:
        return await self.remote.call(w.broker, w.node, command, arguments, self.call_timeout)

    async def active_queues(self, w: Worker) -> list[str] | None:
        return queue_names(await self.call(w, "active_queues"))

    async def stats(self, w: Worker) -> Reply | None:
        return await self.call(w, "stats")

    async def add_consumer(self, w: Worker, name: str, decl: Queue | None) -> list[str]:
        """Returns the worker's queues once it confirmed it consumes ``name``."""
        err = _error(await self.call(w, "add_consumer", **consumer_arguments(name, decl)))
        if err:
            raise ControlFailed(f"{w.node} refused add_consumer {name}: {err}")
        return await self._confirm(w, lambda qs: name in qs, f"consumer {name}")

    async def cancel_consumer(self, w: Worker, name: str) -> list[str]:
        """Returns the worker's queues once it confirmed it left ``name``."""
        err = _error(await self.call(w, "cancel_consumer", queue=name))
        if err:
            raise ControlFailed(f"{w.node} refused cancel_consumer {name}: {err}")
        return await self._confirm(w, lambda qs: name not in qs, f"cancel of {name}")

    async def autoscale(self, w: Worker, want: Autoscale) -> None:
        err = _error(await self.call(w, "autoscale", max=want.max, min=want.min))
        if err and "Autoscale not enabled" in err:
            # Celery's answer to a worker started without --autoscale: not a
            # failure to retry (the reconcile never could), a restart is needed.
            raise RestartRequired(fixed_concurrency(w))
        if err:
            raise ControlFailed(f"{w.node} refused autoscale: {err}")
        deadline = self._clock.monotonic() + self.confirm_timeout
        pause = CONFIRM_FIRST_PAUSE
        while autoscaler_range(await self.stats(w)) != want:
            if self._clock.monotonic() > deadline:
                raise ControlFailed(f"{w.node} did not confirm autoscale {want.min},{want.max}")
            await self._sched.sleep(pause)
            pause = min(pause * 1.5, CONFIRM_MAX_PAUSE)

    async def task_limits(self, w: Worker, wanted: Mapping[str, Any]) -> list[str]:
        """Bring the worker's per-task limits to ``wanted`` ({task: TaskLimits});
        returns what it changed. Celery forgets them on restart, so this runs
        after each start, after a broker reconnect and on each sweep (drift)."""
        if not wanted:
            return []
        reply = await self.call(w, "registered", taskinfoitems=list(task_limits.TASK_ITEMS))
        live = task_limits.parse_registered(reply) if not _error(reply) else None
        if live is None:
            # Not "nothing to change": a worker that did not answer (a reply
            # lost while it rebinds after a broker restart) must be tried again
            # at the next answered ping, not counted as in line until the sweep.
            raise ControlFailed(f"{w.node} gave no registered tasks to compare limits with")
        changes: list[str] = []
        for command in task_limits.drift(wanted, live):
            err = _error(await self.call(w, command.name, **command.arguments))
            if err:
                raise ControlFailed(f"{w.node} refused {command.describe()}: {err}")
            changes.append(command.describe())
        return changes

    async def _confirm(self, w: Worker, ok: Any, what: str) -> list[str]:
        # The worker answers "ok" before it acts (it defers the change to its
        # loop, ~10-15 ms on RabbitMQ): poll active_queues, first tightly.
        deadline = self._clock.monotonic() + self.confirm_timeout
        pause = CONFIRM_FIRST_PAUSE
        while True:
            names = await self.active_queues(w)
            if names is not None and ok(names):
                return names
            if self._clock.monotonic() > deadline:
                raise ControlFailed(f"{w.node} did not confirm {what} in time")
            await self._sched.sleep(pause)
            pause = min(pause * 1.5, CONFIRM_MAX_PAUSE)

    async def reconcile(
        self,
        w: Worker,
        queues: Sequence[str],
        decls: Mapping[str, Queue],
        autoscale: Autoscale | None,
    ) -> list[str]:
        """Make the live worker equal to its declaration; returns what it changed.

        A worker gets every queue with its declared binding at its start
        (:func:`command_for`, :func:`start_bindings`); this adds what a worker
        lost or never had (a runtime change while it was away, a broker
        reconnect). A binding cannot be changed on a queue the worker already
        knows: a cancel and a new ``add_consumer`` of the same name bring back
        the old binding (restart the worker).
        """
        changes: list[str] = []
        live = await self.active_queues(w)
        if live is None:  # (not "nothing to change": the caller tries again)
            raise ControlFailed(f"{w.node} gave no active_queues to reconcile with")
        for name in queues:
            if name not in live:
                await self.add_consumer(w, name, decls.get(name))
                changes.append(f"+{name}")
        # No queues declared means Celery's defaults (no -Q): nothing to cancel.
        for name in live if queues else ():
            if name not in queues:
                await self.cancel_consumer(w, name)
                changes.append(f"-{name}")
        if autoscale is not None:
            current = autoscaler_range(await self.stats(w))
            if current is not None and current != autoscale:
                await self.autoscale(w, autoscale)
                changes.append(f"autoscale {autoscale.min},{autoscale.max}")
        return changes


__all__ = [
    "BrokerUnavailable",
    "CeleryOps",
    "ControlFailed",
    "Worker",
    "broker_for",
    "command_for",
    "env_for",
    "node_name",
    "producer_config",
    "producer_env",
]
