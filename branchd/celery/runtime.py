"""Celery runtime operations: what a user changes in running workers without a
restart (consumers, autoscale), a queue's delete across the app's workers, and
what a producer needs to reach them.

Each change is declared first (the engine persists the new spec), then sent
to a running worker over remote control and confirmed; a ``RuntimeChanged``
goes on the bus once the worker has it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

from branchd import events
from branchd.celery import limits as task_limits
from branchd.celery import lint
from branchd.celery.broker import broker_url
from branchd.celery.ops import autoscaler_range, fixed_concurrency
from branchd.celery.workers import Workers
from branchd.declarations import Declarations, check_name
from branchd.errors import Conflict, ControlFailed, RestartRequired
from branchd.events import EventBus
from branchd.model import App, InstanceSpec, Kind, Queue
from branchd.process.engine import Engine
from branchd.process.specs import autoscale_from

log = logging.getLogger(__name__)


class CeleryRuntime:
    def __init__(
        self, engine: Engine, declarations: Declarations, workers: Workers, bus: EventBus
    ) -> None:
        self._engine = engine
        self._decls = declarations
        self._workers = workers
        self._bus = bus
        self._drops: set[asyncio.Task[None]] = set()
        #: What running workers take of each app at runtime, as last declared.
        self._runtime_seen: dict[str, tuple[dict[str, Any], Any]] = {}
        bus.listen(self._declared)

    def _declared(self, event: events.Event) -> None:
        """An app declared anew (a PATCH here, a record from another branch):
        its running workers get their new per-task limits and autoscale range
        at once, as ``instances set`` gives an instance's own."""
        match event:
            case events.DeclarationChanged(kind="app", app=app, deleted=False):
                if self._runtime_changed(app):
                    self._workers.redeclared(app)
            case events.DeclarationChanged(kind="app", app=app, deleted=True):
                self._runtime_seen.pop(app, None)  # (a new app of that name starts anew)
            case _:
                pass

    def _runtime_changed(self, name: str) -> bool:
        """Whether the app's parts that running workers take at runtime (its
        per-task limits, its autoscale range) differ from the last declaration
        seen: any other change (its env, its flags) reaches a worker only at
        its next start, so none of its workers is asked anything for it."""
        app = self._decls.find_app(name)
        if app is None:
            self._runtime_seen.pop(name, None)
            return False
        now = (dict(app.celery.limits.task_overrides), app.celery.autoscale)
        before = self._runtime_seen.get(name)
        self._runtime_seen[name] = now
        return before is None or before != now

    def worker_figures(self) -> dict[tuple[str, str], dict[str, int | None]]:
        """Each running worker's last figures, for the metrics (no call to any
        worker); from the first ask on, the health loop's sweep refreshes them."""
        self._workers.figures_wanted = True
        return self._workers.figures()

    # what a producer needs ------------------------------------------------------

    def effective_broker(self, app: App) -> str:
        """The URL a producer uses (the embedded broker's is ``filesystem://``:
        its folders ride in the transport options of ``celery_config``)."""
        return broker_url(app)

    def effective_backend(self, app: App) -> str | None:
        return self._workers.result_backend(app)

    async def celery_config(self, name: str) -> dict[str, Any]:
        return self._workers.producer_setup(await self._decls.get_app(name))

    # lint ---------------------------------------------------------------------------

    async def lint(self, app_name: str) -> list[dict[str, str]]:
        """The traps in the app's effective Celery config, as a running worker
        of it on this branch has it (remote control ``conf``)."""
        app = await self._decls.get_app(app_name)
        running = [
            s
            for s in self._engine.specs(app_name)
            if s.kind == Kind.CELERY and self._engine.running(s.name)
        ]
        if not running:
            raise Conflict(
                f"no running worker of app {app_name!r} on this branch: lint reads the "
                "effective config of a running one (start one)"
            )
        spec = running[0]
        w = self._workers.worker(spec)
        reply = await self._workers.ops.call(w, "conf", with_defaults=True)
        if reply is None or "error" in reply:
            why = "no reply" if reply is None else str(reply["error"])
            raise ControlFailed(f"{w.node} did not give its config: {why}")
        workers = {s.name: s.limits for s in self._engine.specs(app_name) if s.kind == Kind.CELERY}
        ctx = lint.Context(
            pool=spec.pool or app.celery.pool,
            transport=lint.transport_of(broker_url(app)),
            depth_scaling=app.celery.scale is not None,
            task_time_limits=lint.task_time_limits(app.celery.limits, workers),
        )
        flags = task_limits.merged(app.celery.limits, spec.limits)
        return [f.to_json() for f in lint.lint(lint.with_flags(reply, flags), ctx)]

    # queues -------------------------------------------------------------------------

    async def delete_queue(self, app: str, name: str) -> None:
        """Cancel the queue on every instance of the app, then forget it."""
        await self._decls.get_queue(app, name)
        for spec in [s for s in self._engine.specs(app) if name in s.queues]:
            await self.remove_consumer(app, spec.name, name)
        self._decls.forget_queue(app, name)

    def drop_queue(self, app: str, name: str) -> None:
        """Another branch deleted queue ``name``: cancel it on this branch's
        instances of ``app`` that consume it (in the background: a worker's
        confirm takes a while, and the declaration is already gone)."""
        specs = [s.name for s in self._engine.specs(app) if name in s.queues]
        if specs:
            task = asyncio.ensure_future(self._drop(app, specs, name))
            self._drops.add(task)
            task.add_done_callback(self._drops.discard)

    async def _drop(self, app: str, instances: list[str], queue: str) -> None:
        for instance in instances:
            try:
                await self.remove_consumer(app, instance, queue)
            except Exception as exc:  # (gone meanwhile, a worker that does not answer)
                # the spec no longer wants it: a worker that missed the cancel
                # drops the queue at its next start
                log.warning("cannot cancel queue %r on %s/%s: %s", queue, app, instance, exc)

    # consumers ------------------------------------------------------------------------

    async def consumers(self, app: str, name: str) -> list[dict[str, Any]]:
        spec = self._engine.celery_lookup(app, name)
        live: list[str] | None = None
        if self._engine.running(name):
            live = await self._workers.ops.active_queues(self._workers.worker(spec))
        return self._consumer_items(spec, live)

    async def add_consumer(self, app: str, name: str, queue: str) -> list[dict[str, Any]]:
        self._engine.celery_lookup(app, name)
        check_name(queue, "queue")
        self._decls.check_queues(await self._decls.get_app(app), [queue])
        async with self._workers.lock(name):
            spec = self._engine.celery_lookup(app, name)
            if queue not in spec.queues:
                spec = self._engine.update_spec(replace(spec, queues=(*spec.queues, queue)))
            live = None
            if self._engine.running(name):
                decl = self._decls.find_queue(app, queue)
                live = await self._workers.ops.add_consumer(self._workers.worker(spec), queue, decl)
                self._bus.publish(events.RuntimeChanged(app, name, "consumers"))
            return self._consumer_items(spec, live)

    async def remove_consumer(self, app: str, name: str, queue: str) -> list[dict[str, Any]]:
        self._engine.celery_lookup(app, name)
        async with self._workers.lock(name):
            spec = self._engine.celery_lookup(app, name)
            if queue in spec.queues:
                spec = self._engine.update_spec(
                    replace(spec, queues=tuple(q for q in spec.queues if q != queue))
                )
            live = None
            if self._engine.running(name):
                live = await self._workers.ops.cancel_consumer(self._workers.worker(spec), queue)
                self._bus.publish(events.RuntimeChanged(app, name, "consumers"))
            return self._consumer_items(spec, live)

    def _consumer_items(self, spec: InstanceSpec, live: list[str] | None) -> list[dict[str, Any]]:
        declared: dict[str, Queue] = self._decls.queue_decls(spec.app)
        names = list(spec.queues) + [q for q in (live or []) if q not in spec.queues]
        return [
            {
                "name": q,
                "wanted": q in spec.queues,
                "declared": q in declared,
                "live": None if live is None else q in live,
            }
            for q in names
        ]

    # autoscale -----------------------------------------------------------------------

    async def get_autoscale(self, app: str, name: str) -> dict[str, Any]:
        spec = self._engine.celery_lookup(app, name)
        app_obj = await self._decls.get_app(app)
        want = spec.autoscale or app_obj.celery.autoscale
        live = None
        if self._engine.running(name):
            got = autoscaler_range(await self._workers.ops.stats(self._workers.worker(spec)))
            live = got.to_wire() if got else None
        return {**(want.to_wire() if want else {"min": None, "max": None}), "live": live}

    async def set_autoscale(self, app: str, name: str, low: int, high: int) -> dict[str, Any]:
        self._engine.celery_lookup(app, name)
        want = autoscale_from({"min": low, "max": high})
        assert want is not None
        async with self._workers.lock(name):
            old = self._engine.celery_lookup(app, name)
            running = self._engine.running(name)
            if running:
                # A worker started with a fixed --concurrency has no autoscaler and
                # refuses the change: say so (409) and keep the declaration as it
                # is, rather than store a range the running worker does not have.
                w = self._workers.worker(old)
                stats = await self._workers.ops.stats(w)
                # (no reply, or an error reply, says nothing either way: send it)
                fixed = stats is not None and "error" not in stats and not stats.get("autoscaler")
                if fixed:
                    raise RestartRequired(fixed_concurrency(w))
            spec = self._engine.update_spec(replace(old, autoscale=want, concurrency=None))
            if running:
                try:
                    await self._workers.ops.autoscale(self._workers.worker(spec), want)
                except RestartRequired:
                    self._engine.update_spec(old)
                    raise
                self._bus.publish(events.RuntimeChanged(app, name, "autoscale"))
            return await self.get_autoscale(app, name)
