"""The local supervisor: runs the pure state machine of each instance against
the store (declared state) and the launcher (processes).

Events come up (a pid died, a timer fired, a user asked), the machine decides,
and the commands it returns go down to the launcher. Every acknowledged user
change is in SQLite before the method returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal as _signal
import socket
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from branchd import events
from branchd.celery.remote import RemoteControl
from branchd.celery.urls import embedded_exchange_problem
from branchd.clock import Clock
from branchd.config import Config
from branchd.errors import (
    BranchdError,
    Conflict,
    Invalid,
    NotFound,
    RestartRequired,
)
from branchd.events import EventBus
from branchd.model import (
    NAME_RULE,
    QUEUE_NAME_RULE,
    App,
    Desired,
    InstanceSpec,
    Kind,
    Policy,
    Queue,
    Runtime,
    State,
    signal_number,
    valid_name,
    valid_queue_name,
)
from branchd.process import logs
from branchd.process.celery_ops import (
    CeleryOps,
    autoscaler_range,
    fixed_concurrency,
    pool_size,
)
from branchd.process.launcher import Launcher, LaunchSpec, base_env, user_env
from branchd.process.machine import (
    Adopt,
    Backoff,
    Command,
    Event,
    Exited,
    Kill,
    Proc,
    Reap,
    Restart,
    Signal,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    Stop,
    Timeout,
    step,
)
from branchd.process.specs import (
    CELERY_FIELDS,
    apply_fields,
    autoscale_from,
    build_spec,
    celery_settings,
    check_kind_fields,
)
from branchd.process.workers import Workers
from branchd.store import Store, celery_to_dict
from branchd.views import InstanceView, Stats, TreeStats

log = logging.getLogger(__name__)

#: The store's note of an app delete under way (``removing_app:<app>``).
_REMOVING_APP = "removing_app:"



class Manager:
    """Supervises the instances of this branch; the API's backend."""

    def __init__(
        self,
        store: Store,
        launcher: Launcher,
        clock: Clock,
        config: Config,
        branch_id: str,
        remote: RemoteControl,
        bus: EventBus,
        hostname: str | None = None,
    ) -> None:
        self._store = store
        self._bus = bus
        self._launcher = launcher
        self._clock = clock
        self._config = config
        self.branch_id = branch_id
        self._backoff = Backoff(config.supervision.backoff_base, config.supervision.backoff_max)
        self._specs: dict[str, InstanceSpec] = {}
        self._procs: dict[str, Proc] = {}
        self._runtime: dict[str, Runtime] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._deleting: set[str] = set()
        self._deleting_apps: set[str] = set()
        #: Deletes answered before their instance stopped (wait=False), still running.
        self._forgetting: dict[str, asyncio.Task[None]] = {}
        #: App deletes under way, by app.
        self._app_removals: dict[str, asyncio.Task[None]] = {}
        self._rotator: asyncio.Task[None] | None = None
        self._env = dict(os.environ)
        self._workers = Workers(
            self,
            CeleryOps(remote),
            launcher,
            config.state_dir,
            hostname or socket.gethostname(),
            settings=config.celery,  # (only its own section)
        )

    # lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Adopt the instances whose processes survived us; start the rest."""
        runtimes = self._store.runtimes()
        for spec in self._store.list_instances():
            name = spec.name
            rt = runtimes.get(name, Runtime())
            self._specs[name] = spec
            self._procs[name] = Proc(
                restarts=rt.restarts,
                exit_code=rt.exit_code,
                stop_step=rt.stop_step,
                reason=rt.reason,
            )
            self._runtime[name] = replace(rt, state=State.STOPPED, pid=None)
            if rt.pid and rt.create_time and self._launcher.alive(rt.pid, rt.create_time):
                log.info("adopting %s (pid %d, %s)", name, rt.pid, rt.state)
                self._runtime[name] = replace(
                    self._runtime[name], create_time=rt.create_time, started_at=rt.started_at
                )
                up_for = self._clock.wall() - (rt.started_at or rt.create_time)
                self._feed(name, Adopt(rt.pid, rt.state, up_for))
                self._watch(name, rt.pid)
                if spec.kind == Kind.CELERY:
                    # what it runs is what it was started with, not today's app
                    self._workers.remember_argv(name, _cmdline(rt.pid))
                if spec.desired != Desired.RUNNING:
                    self._feed(name, Stop())
                elif rt.state == State.STOPPING:
                    # stopping while it should run: a restart was under way
                    self._feed(name, Restart())
                elif spec.kind == Kind.CELERY and self._procs[name].state == State.STARTING:
                    self._workers.spawned(name, rt.pid)  # running once it answers a ping
                elif spec.kind == Kind.CELERY:
                    self._workers.adopted(name)
            else:
                if rt.pid and _gone_or_zombie(rt.pid):
                    # Its main process died while we were away; what it left in
                    # its group goes now (a gone pid cannot be reused while its
                    # group still has members). No orphans, ever.
                    with contextlib.suppress(OSError, ValueError):
                        self._launcher.signal(rt.pid, _signal.SIGKILL, True)
                if spec.desired == Desired.RUNNING and rt.state == State.FATAL:
                    # it gave up before we went: it starts again only when a
                    # user starts it, as with no daemon restart in between
                    self._procs[name] = replace(self._procs[name], state=State.FATAL)
                    self._persist(name)
                elif spec.desired == Desired.RUNNING:
                    self._feed(name, Start())
                else:
                    self._persist(name)
            if spec.desired == Desired.REMOVED:
                # a delete was under way when the daemon went: it ends now
                self._deleting.add(name)
                self._begin_forget(name)
        for app in self._store.marks(_REMOVING_APP):
            # an app delete was under way when the daemon went: it ends now
            if self._store.get_app(app) is None:
                self._store.set_mark(f"{_REMOVING_APP}{app}", False)
            else:
                self._begin_app_removal(app)
        self._rotator = asyncio.create_task(self._rotate_logs())
        self._workers.start()

    async def shutdown(self, *, keep: bool) -> None:
        """Stop every instance (or, with keep, leave them running) and let go."""
        if self._rotator:
            self._rotator.cancel()
        if not keep:
            # (fatal and exited ones stay so: their state is what the next daemon shows)
            live = (State.STARTING, State.RUNNING, State.STOPPING, State.BACKOFF)
            names = [n for n, p in self._procs.items() if p.state in live]
            for name in names:
                self._feed(name, Stop())
            await asyncio.gather(*(self._wait_stopped(n) for n in names))
            # Deletes already under way end now that their instances stopped.
            await asyncio.gather(*self._forgetting.values(), return_exceptions=True)
            await asyncio.gather(*self._app_removals.values(), return_exceptions=True)
        else:
            removals = list(self._app_removals.values())
            for removal in removals:
                removal.cancel()
            await asyncio.gather(*removals, return_exceptions=True)
            # their declarations say "removed": the next daemon ends them
            for task in self._forgetting.values():
                task.cancel()
            await asyncio.gather(*self._forgetting.values(), return_exceptions=True)
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        await self._workers.close()
        self._launcher.close()

    # apps -------------------------------------------------------------------

    async def list_apps(self) -> list[App]:
        return self._store.list_apps()

    async def get_app(self, name: str) -> App:
        app = self._store.get_app(name)
        if app is None:
            raise NotFound(f"no app {name!r}")
        return app

    async def put_app(
        self,
        name: str,
        env: Mapping[str, str],
        defaults: Mapping[str, Any],
        celery: Mapping[str, Any] | None = None,
    ) -> tuple[App, bool]:
        _check_name(name, "app")
        existing = self._store.get_app(name)
        app = App(
            name=name,
            env=dict(env),
            defaults=dict(defaults),
            created_at=existing.created_at if existing else self._clock.wall(),
            celery=celery_settings(celery or {}),
        )
        if defaults:
            # The defaults must make a valid instance of some kind (a celery
            # one when they hold only what a worker takes).
            worker = any(k in CELERY_FIELDS for k in defaults) and "command" not in defaults
            probe = {"kind": Kind.CELERY} if worker else {"command": ["x"]}
            build_spec(app, "probe", probe, "", 0.0)
        # What the app's workers will consume must be carried by its (new) broker.
        decls = self.queue_decls(name)
        wanted = [q for s in self._specs.values() if s.app == name for q in s.queues]
        queues = dict.fromkeys([*defaults.get("queues", ()), *wanted, *decls])
        self._check_carried(app, list(queues), decls)
        created = self._store.put_app(app)
        self._bus.publish(events.DeclarationChanged("app", name, name))
        return app, created

    async def patch_app(self, name: str, patch: Mapping[str, Any]) -> App:
        """Change what ``patch`` names and keep the rest (JSON merge patch:
        env and defaults merge key by key, null removes a key or resets a
        setting to its default). Validated as a whole, like a PUT."""
        app = await self.get_app(name)
        env = _merged(app.env, patch.get("env"))
        defaults = _merged(app.defaults, patch.get("defaults"))
        celery = celery_to_dict(app.celery)
        for key, value in patch.items():
            if key not in ("env", "defaults"):
                celery[key] = value
        celery = {k: v for k, v in celery.items() if v is not None}
        new, _created = await self.put_app(name, env, defaults, celery)
        return new

    def effective_broker(self, app: App) -> str:
        """The URL a producer uses (the embedded broker's is ``filesystem://``:
        its folders ride in the transport options of ``celery_config``)."""
        return self._workers.broker(app).url

    def effective_backend(self, app: App) -> str | None:
        return self._workers.result_backend(app)

    async def celery_config(self, name: str) -> dict[str, Any]:
        return self._workers.producer_setup(await self.get_app(name))

    async def delete_app(self, name: str, *, wait: bool = True) -> App:
        """Stop and remove the app's instances, then it and its queues; answers
        the app as the delete began. Without ``wait`` it answers at once and
        the rest goes on in the background (each instance's removal is durable)."""
        app = await self.get_app(name)
        task = self._app_removals.get(name)
        if task is None:  # (a second delete waits for the one under way)
            # Durable: a daemon that goes before the end finishes the delete.
            self._store.set_mark(f"{_REMOVING_APP}{name}", True)
            task = self._begin_app_removal(name)
        if wait:
            await asyncio.shield(task)
        return app

    def _begin_app_removal(self, name: str) -> asyncio.Task[None]:
        self._deleting_apps.add(name)
        return _tracked(self._app_removals, name, self._remove_app(name), "removing app")

    async def _remove_app(self, name: str) -> None:
        try:
            # every instance stops at once: the delete lasts the longest stop, not their sum
            for spec in [s for s in self._specs.values() if s.app == name]:
                if spec.name not in self._forgetting:
                    await self.delete_instance(name, spec.name, wait=False)
            stops = [t for n, t in self._forgetting.items() if self._specs[n].app == name]
            await asyncio.gather(*(asyncio.shield(t) for t in stops))
            app = self._store.get_app(name)
            if app is not None and app.celery.broker is None:
                # its embedded broker and results go with it (before the app: a
                # new app of that name must not run the old one's leftover tasks)
                await asyncio.to_thread(self._workers.remove_embedded, name)
            self._store.delete_app(name)
            self._store.set_mark(f"{_REMOVING_APP}{name}", False)
            self._bus.publish(events.DeclarationChanged("app", name, name, deleted=True))
        finally:
            self._deleting_apps.discard(name)

    # instances ------------------------------------------------------------

    async def list_instances(self, app: str | None = None) -> list[InstanceView]:
        if app is not None:
            await self.get_app(app)
        names = sorted(self._specs, key=lambda n: (self._specs[n].app, n))
        return [self._view(n) for n in names if app is None or self._specs[n].app == app]

    async def get_instance(self, app: str, name: str) -> InstanceView:
        return self._view(self._lookup(app, name).name)

    async def create_instance(self, app_name: str, fields: Mapping[str, Any]) -> InstanceView:
        app = await self.get_app(app_name)
        if app_name in self._deleting_apps:
            raise Conflict(f"app {app_name!r} is being deleted")
        fields = dict(fields)
        name = fields.pop("name", None) or self._new_name(app_name)
        _check_name(name, "instance")
        if name in self._specs:
            # (names are unique on the branch, across apps: a worker's node is name@host)
            owner = self._specs[name].app
            raise Conflict(
                f"instance name {name!r} is taken by {owner}/{name}: instance names are "
                "unique on a branch, across apps"
            )
        spec = build_spec(app, name, fields, self.branch_id, self._clock.wall())
        if spec.kind == Kind.CELERY:
            self._check_carried(app, spec.queues, self.queue_decls(app_name))
        if spec.kind == Kind.CELERY and not app.celery.celery_app:
            raise Invalid(
                f"app {app_name!r} has no celery_app (the module for celery -A), so it "
                "cannot run a celery worker; a process instance needs a command "
                f"(branchctl instances add {app_name} -- COMMAND...), a worker an app with "
                f"a module (branchctl apps set {app_name} --celery-app MODULE)"
            )
        if not spec.autostart:
            spec = replace(spec, desired=Desired.STOPPED)
        self._store.add_instance(spec)
        self._bus.publish(events.InstanceAdded(app_name, name))
        self._specs[name] = spec
        self._procs[name] = Proc()
        self._runtime[name] = Runtime()
        self._persist(name)
        if spec.desired == Desired.RUNNING:
            self._feed(name, Start())
        return self._view(name)

    async def update_instance(self, app: str, name: str, fields: Mapping[str, Any]) -> InstanceView:
        spec = self._lookup(app, name)
        for key in ("name", "kind"):
            if key in fields:
                raise Invalid(f"{key} cannot be changed")
        check_kind_fields(spec.kind, fields)
        new = apply_fields(spec, fields)
        app_obj = self._store.get_app(app)
        if new.kind == Kind.CELERY and app_obj is not None:
            self._check_carried(app_obj, new.queues, self.queue_decls(app))
        self._store.update_instance(new)
        self._specs[name] = new
        return self._view(name)

    async def delete_instance(self, app: str, name: str, *, wait: bool = True) -> InstanceView:
        """Stop and forget an instance; answers its view as the stop began.

        Without ``wait`` it answers at once and the rest (the wait for the
        stop, the removal) goes on in the background.
        """
        spec = self._lookup(app, name)
        under_way = self._forgetting.get(name)
        if under_way is not None:  # a second delete waits for the one under way
            view = self._view(name)
            if wait:
                await asyncio.shield(under_way)
            return view
        if name in self._deleting:
            raise Conflict(f"instance {name!r} is being deleted")
        # While it stops, nobody may start it again: the process would outlive
        # its declaration (an orphan).
        self._deleting.add(name)
        try:
            # Durable: a daemon that goes before the stop ended finishes the delete.
            self._set_desired(spec, Desired.REMOVED)
            self._feed(name, Stop())
            view = self._view(name)
        except BaseException:
            self._deleting.discard(name)
            raise
        task = self._begin_forget(name)
        if wait:
            await asyncio.shield(task)
        return view

    def _begin_forget(self, name: str) -> asyncio.Task[None]:
        return _tracked(self._forgetting, name, self._forget(name), "removing")

    async def _forget(self, name: str) -> None:
        """The end of a delete: wait for the stop, then remove the instance."""
        try:
            await self._wait_stopped(name)
            pid = self._procs[name].pid
            if pid:  # did not stop in time: no orphans, ever
                self._launcher.signal(pid, _signal.SIGKILL, True)
            self._store.delete_instance(name)
            handle = self._timers.pop(name, None)
            if handle:
                handle.cancel()
            app = self._specs[name].app
            del self._specs[name], self._procs[name], self._runtime[name]
            self._bus.publish(events.InstanceRemoved(app, name))
        finally:
            self._deleting.discard(name)

    async def start_instance(self, app: str, name: str) -> InstanceView:
        self._set_desired(self._lookup(app, name, starting=True), Desired.RUNNING)
        self._feed(name, Start())
        return self._view(name)

    async def stop_instance(self, app: str, name: str, *, wait: bool = True) -> InstanceView:
        """Stop an instance; with ``wait``, answer once it has stopped."""
        self._set_desired(self._lookup(app, name), Desired.STOPPED)
        self._feed(name, Stop())
        if not wait:  # the caller watches the state instead (a stop can take stopwaitsecs)
            return self._view(name)
        await self._wait_stopped(name)
        return self._settled_view(app, name)

    async def restart_instance(self, app: str, name: str, *, wait: bool = True) -> InstanceView:
        """Restart an instance; with ``wait``, answer once the old process has stopped."""
        self._set_desired(self._lookup(app, name, starting=True), Desired.RUNNING)
        self._feed(name, Restart())
        if not wait:
            return self._view(name)
        await self._wait_stopped(name)
        return self._settled_view(app, name)

    def _settled_view(self, app: str, name: str) -> InstanceView:
        # A delete may have ended the instance while we waited.
        if name not in self._specs:
            raise NotFound(f"instance {name!r} of app {app!r} was deleted")
        return self._view(name)

    async def instance_stats(self, app: str, name: str) -> Stats:
        spec = self._lookup(app, name)
        view = self._view(name)
        pid = view.runtime.pid
        tree = self._launcher.tree_stats(pid) if pid else TreeStats(0.0, 0, 0)
        celery: dict[str, Any] | None = None
        if spec.kind == Kind.CELERY and view.runtime.state == State.RUNNING:
            w = self._workers.worker(spec)
            stats, active = await asyncio.gather(
                self._workers.ops.stats(w),
                self._workers.ops.call(w, "active"),
                return_exceptions=True,
            )
            stats = stats if isinstance(stats, dict) else None
            celery = {
                "node": w.node,
                "pool_size": pool_size(stats),
                "stats": stats,
                "active": _unwrap(active) if isinstance(active, dict) else None,
            }
        return Stats(view, tree, celery)

    def log_path(self, app: str, name: str, stream: str) -> Path:
        spec = self._lookup(app, name)
        out, err = logs.log_paths(self._config.log_dir, spec.app, spec.name)
        return err if stream == "stderr" else out

    async def read_logs(self, app: str, name: str, stream: str, tail: int) -> list[str]:
        path = self.log_path(app, name, stream)
        return await asyncio.to_thread(logs.tail, path, tail)

    def follow_logs(self, app: str, name: str, stream: str) -> AsyncIterator[str]:
        return logs.follow(self.log_path(app, name, stream))

    def instance_names(self) -> list[str]:
        return list(self._specs)

    # queues (declarations of an app) --------------------------------------------

    async def list_queues(self, app: str) -> list[Queue]:
        await self.get_app(app)
        return self._store.list_queues(app)

    async def get_queue(self, app: str, name: str) -> Queue:
        await self.get_app(app)
        queue = self._store.get_queue(app, name)
        if queue is None:
            raise NotFound(f"no queue {name!r} in app {app!r}")
        return queue

    async def put_queue(self, app: str, name: str, fields: Mapping[str, Any]) -> tuple[Queue, bool]:
        app_obj = await self.get_app(app)
        _check_name(name, "queue")
        queue = Queue(
            app=app,
            name=name,
            exchange=fields.get("exchange") or None,
            exchange_type=fields.get("exchange_type", "direct"),
            routing_key=fields.get("routing_key") or None,
            options=dict(fields.get("options", {})),
        )
        self._check_carried(app_obj, [name], {name: queue})
        created = self._store.put_queue(queue)
        self._bus.publish(events.DeclarationChanged("queue", app, name))
        return queue, created

    async def delete_queue(self, app: str, name: str) -> None:
        """Cancel the queue on every instance of the app, then forget it."""
        await self.get_queue(app, name)
        for spec in [s for s in self._specs.values() if s.app == app and name in s.queues]:
            await self.remove_consumer(app, spec.name, name)
        self._store.delete_queue(app, name)
        self._bus.publish(events.DeclarationChanged("queue", app, name, deleted=True))

    # consumers and autoscale (runtime changes of a celery instance) ---------------

    async def consumers(self, app: str, name: str) -> list[dict[str, Any]]:
        spec = self._celery_lookup(app, name)
        live: list[str] | None = None
        if self._procs[name].state == State.RUNNING:
            live = await self._workers.ops.active_queues(self._workers.worker(spec))
        return self._consumer_items(spec, live)

    async def add_consumer(self, app: str, name: str, queue: str) -> list[dict[str, Any]]:
        self._celery_lookup(app, name)
        _check_name(queue, "queue")
        self._check_carried(await self.get_app(app), [queue], self.queue_decls(app))
        async with self._workers.lock(name):
            spec = self._celery_lookup(app, name)
            if queue not in spec.queues:
                spec = self._update_spec(replace(spec, queues=(*spec.queues, queue)))
            live = None
            if self._procs[name].state == State.RUNNING:
                decl = self._store.get_queue(app, queue)
                live = await self._workers.ops.add_consumer(self._workers.worker(spec), queue, decl)
                self._bus.publish(events.RuntimeChanged(app, name, "consumers"))
            return self._consumer_items(spec, live)

    async def remove_consumer(self, app: str, name: str, queue: str) -> list[dict[str, Any]]:
        self._celery_lookup(app, name)
        async with self._workers.lock(name):
            spec = self._celery_lookup(app, name)
            if queue in spec.queues:
                spec = self._update_spec(
                    replace(spec, queues=tuple(q for q in spec.queues if q != queue))
                )
            live = None
            if self._procs[name].state == State.RUNNING:
                live = await self._workers.ops.cancel_consumer(self._workers.worker(spec), queue)
                self._bus.publish(events.RuntimeChanged(app, name, "consumers"))
            return self._consumer_items(spec, live)

    def _consumer_items(self, spec: InstanceSpec, live: list[str] | None) -> list[dict[str, Any]]:
        declared = {q.name for q in self._store.list_queues(spec.app)}
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

    async def get_autoscale(self, app: str, name: str) -> dict[str, Any]:
        spec = self._celery_lookup(app, name)
        app_obj = await self.get_app(app)
        want = spec.autoscale or app_obj.celery.autoscale
        live = None
        if self._procs[name].state == State.RUNNING:
            got = autoscaler_range(await self._workers.ops.stats(self._workers.worker(spec)))
            live = got.to_json() if got else None
        return {**(want.to_json() if want else {"min": None, "max": None}), "live": live}

    async def set_autoscale(self, app: str, name: str, low: int, high: int) -> dict[str, Any]:
        self._celery_lookup(app, name)
        want = autoscale_from({"min": low, "max": high})
        assert want is not None
        async with self._workers.lock(name):
            old = self._celery_lookup(app, name)
            running = self._procs[name].state == State.RUNNING
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
            spec = self._update_spec(replace(old, autoscale=want, concurrency=None))
            if running:
                try:
                    await self._workers.ops.autoscale(self._workers.worker(spec), want)
                except RestartRequired:
                    self._update_spec(old)
                    raise
                self._bus.publish(events.RuntimeChanged(app, name, "autoscale"))
            return await self.get_autoscale(app, name)

    # what the workers service needs (workers.Host) ----------------------------------

    def feed(self, name: str, event: Event) -> None:
        self._feed(name, event)

    def proc(self, name: str) -> Proc | None:
        return self._procs.get(name)

    def spec(self, name: str) -> InstanceSpec | None:
        return self._specs.get(name)

    def app(self, name: str) -> App | None:
        return self._store.get_app(name)

    def queue_decls(self, app: str) -> dict[str, Queue]:
        return {q.name: q for q in self._store.list_queues(app)}

    def celery_instances(self) -> list[InstanceSpec]:
        return [s for s in self._specs.values() if s.kind == Kind.CELERY]

    # internals --------------------------------------------------------------

    def _lookup(self, app: str, name: str, *, starting: bool = False) -> InstanceSpec:
        spec = self._specs.get(name)
        if spec is None or spec.app != app:
            if self._store.get_app(app) is None:
                raise NotFound(f"no app {app!r}")
            raise NotFound(f"no instance {name!r} in app {app!r}")
        if starting and name in self._deleting:
            raise Conflict(f"instance {name!r} is being deleted")
        return spec

    def _celery_lookup(self, app: str, name: str) -> InstanceSpec:
        spec = self._lookup(app, name)
        if spec.kind != Kind.CELERY:
            raise Invalid(f"instance {name!r} is not a celery instance")
        return spec

    @staticmethod
    def _check_carried(app: App, queues: Sequence[str], decls: Mapping[str, Queue]) -> None:
        """Refuse queues the app's broker cannot carry: on the embedded broker a
        queue's exchange (its own name unless declared) must be a plain file name."""
        if app.celery.broker is not None:
            return
        for queue in queues:
            decl = decls.get(queue)
            exchange = decl.exchange if decl is not None and decl.exchange else queue
            problem = embedded_exchange_problem(exchange)
            if problem:
                raise Invalid(
                    f"queue {queue!r}: {problem}; declare the queue with such an exchange "
                    f"(branchctl queues add {app.name} {queue} --exchange NAME)"
                )

    def _update_spec(self, spec: InstanceSpec) -> InstanceSpec:
        """Persist first: a runtime change that fails later keeps the declaration."""
        self._store.update_instance(spec)
        self._specs[spec.name] = spec
        return spec

    def _policy(self, spec: InstanceSpec) -> Policy:
        celery = spec.kind == Kind.CELERY
        return replace(spec.policy, ready_by_ping=celery, stop_group=not celery)

    def _new_name(self, app: str) -> str:
        while True:
            name = f"{app[:54]}-{secrets.token_hex(4)}"
            if name not in self._specs:
                return name

    def _set_desired(self, spec: InstanceSpec, desired: Desired) -> None:
        if spec.desired != desired:
            self._store.set_desired(spec.name, desired)
            self._specs[spec.name] = replace(spec, desired=desired)

    def _view(self, name: str) -> InstanceView:
        rt = self._runtime[name]
        uptime = None
        if rt.pid and rt.started_at and rt.state in (State.RUNNING, State.STARTING, State.STOPPING):
            uptime = max(0.0, round(self._clock.wall() - rt.started_at, 3))
        spec = self._specs[name]
        if spec.kind == Kind.CELERY:
            command = self._workers.command(spec, live=rt.pid is not None)
            return InstanceView(spec, rt, uptime, command, self._workers.node(spec))
        return InstanceView(spec, rt, uptime)

    def _feed(self, name: str, event: Event) -> None:
        """Run one event through the machine and carry out its commands."""
        spec = self._specs.get(name)
        if spec is None:
            return
        old = self._procs[name]
        proc, commands = step(
            old, event, self._policy(spec), self._clock.monotonic(), self._backoff
        )
        self._procs[name] = proc
        for command in commands:
            self._run(name, spec, old, command)
        proc = self._procs[name]  # a Spawn has fed Spawned/SpawnFailed back in
        self._schedule(name, proc.deadline)
        self._persist(name)
        if (proc.state, proc.pid, proc.reason) != (old.state, old.pid, old.reason):
            self._bus.publish(
                events.InstanceChanged(spec.app, name, proc.state, proc.pid, proc.reason)
            )

    def _run(self, name: str, spec: InstanceSpec, old: Proc, command: Command) -> None:
        pid = self._procs[name].pid
        match command:
            case Spawn():
                self._spawn(name, spec)
            case Signal(name=sig) if pid and spec.kind == Kind.CELERY:
                self._workers.stop(spec, pid, signal_number(sig))
            case Signal(name=sig, group=group) if pid:
                self._launcher.signal(pid, signal_number(sig), group)
            case Kill() if pid:
                self._launcher.signal(pid, _signal.SIGKILL, True)
            case Reap() if old.pid:
                # No orphans: whatever the main process left in its group goes too.
                self._launcher.signal(old.pid, _signal.SIGKILL, True)

    def _spawn(self, name: str, spec: InstanceSpec) -> None:
        app = self._store.get_app(spec.app)
        # A clean environment: the documented base, then the app's and the
        # instance's (never the daemon's own, which holds its token).
        env = {
            **base_env(self._env, spec.user),
            **user_env(app.env if app else {}),
            **user_env(spec.env),
        }
        argv = spec.command
        out, err = logs.log_paths(self._config.log_dir, spec.app, spec.name)
        try:
            if spec.kind == Kind.CELERY:
                argv, env = self._workers.prepare_spawn(spec, env)
            launched = self._launcher.spawn(
                LaunchSpec(
                    argv=argv,
                    env=env,
                    cwd=spec.cwd,
                    user=spec.user,
                    stdout_path=out,
                    stderr_path=err,
                )
            )
        except Exception as exc:  # any failure to start is a failed start, never a crash
            message = exc.message if isinstance(exc, BranchdError) else str(exc) or repr(exc)
            if not isinstance(exc, BranchdError | OSError):
                log.exception("unexpected failure starting %s", name)
            log.warning("cannot start %s: %s", name, message)
            self._feed(name, SpawnFailed(message))
            return
        self._runtime[name] = replace(
            self._runtime[name], create_time=launched.create_time, started_at=self._clock.wall()
        )
        self._feed(name, Spawned(launched.pid))
        self._watch(name, launched.pid)
        if spec.kind == Kind.CELERY:
            self._workers.spawned(name, launched.pid)

    def _watch(self, name: str, pid: int) -> None:
        def on_exit(code: int | None) -> None:
            proc = self._procs.get(name)
            if proc is not None and proc.pid == pid:
                how = "code unknown: adopted, not our child" if code is None else code
                log.info("%s (pid %d) exited (%s)", name, pid, how)
                self._feed(name, Exited(code, self._start_crash_line(name, proc, code)))

        self._launcher.watch(pid, on_exit)

    def _start_crash_line(self, name: str, proc: Proc, code: int | None) -> str | None:
        """The last stderr line of an instance that failed at start (a bounded read)."""
        spec = self._specs.get(name)
        if spec is None or proc.state != State.STARTING or code in (0, None):
            return None
        _, err = logs.log_paths(self._config.log_dir, spec.app, spec.name)
        started = self._runtime[name].started_at
        # mtime has a coarse clock on some filesystems: allow a little slack
        return logs.last_line(err, since=started - 1.0 if started else None)

    def _schedule(self, name: str, deadline: float | None) -> None:
        handle = self._timers.pop(name, None)
        if handle:
            handle.cancel()
        if deadline is not None:
            delay = max(0.0, deadline - self._clock.monotonic())
            loop = asyncio.get_running_loop()
            self._timers[name] = loop.call_later(delay, self._feed, name, Timeout())

    def _persist(self, name: str) -> None:
        proc = self._procs[name]
        rt = self._runtime[name]
        rt = replace(
            rt,
            state=proc.state,
            pid=proc.pid,
            create_time=rt.create_time if proc.pid else None,
            started_at=rt.started_at if proc.pid else None,
            restarts=proc.restarts,
            exit_code=proc.exit_code,
            stop_step=proc.stop_step,
            reason=proc.reason,
        )
        if rt != self._runtime[name]:
            self._runtime[name] = rt
            self._store.save_runtime(name, rt)

    async def _wait_stopped(self, name: str) -> None:
        """Wait until a stop that was fed has ended (or a concurrent start took over)."""
        spec = self._specs.get(name)
        if spec is None:
            return
        limit = spec.policy.stopwaitsecs + self._config.supervision.kill_grace
        loop = asyncio.get_running_loop()
        end = loop.time() + limit

        def about_it(event: events.Event) -> bool:
            return getattr(event, "name", None) == name

        with self._bus.subscribe(about_it) as changes:
            while name in self._procs and self._procs[name].state == State.STOPPING:
                remaining = end - loop.time()
                if remaining <= 0:
                    log.warning("%s did not stop within %.1fs", name, limit)
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changes.get(), remaining)

    async def _rotate_logs(self) -> None:
        interval = self._config.logs.check_interval
        while True:
            await asyncio.sleep(interval)
            # Rotation copies up to max_bytes: keep that off the event loop.
            await asyncio.to_thread(self._rotate_all, list(self._specs.values()))

    def _rotate_all(self, specs: list[InstanceSpec]) -> None:
        for spec in specs:
            for path in logs.log_paths(self._config.log_dir, spec.app, spec.name):
                try:
                    logs.rotate_if_needed(path, spec.log_max_bytes, spec.log_backups)
                except OSError:
                    log.warning("cannot rotate %s", path, exc_info=True)


def _tracked(
    tasks: dict[str, asyncio.Task[None]], name: str, work: Coroutine[Any, Any, None], what: str
) -> asyncio.Task[None]:
    """Run ``work`` as a task kept in ``tasks`` under ``name`` until it ends;
    a failure is logged with its cause (nobody awaits a background task)."""
    task = asyncio.create_task(work)
    tasks[name] = task

    def done(t: asyncio.Task[None]) -> None:
        if tasks.get(name) is t:
            del tasks[name]
        if not t.cancelled() and t.exception() is not None:
            log.error("%s %s failed", what, name, exc_info=t.exception())

    task.add_done_callback(done)
    return task


def _cmdline(pid: int) -> tuple[str, ...]:
    try:
        return tuple(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ()


def _gone_or_zombie(pid: int) -> bool:
    """The pid is free or a zombie: its old process group, if any, is still ours
    (Linux does not reuse a pid while a group of that id has members)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _merged(base: Mapping[str, Any], patch: Mapping[str, Any] | None) -> dict[str, Any]:
    """One level of a JSON merge patch: null removes the key."""
    out = dict(base)
    for key, value in (patch or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _unwrap(reply: dict[str, Any]) -> Any:
    """Inspect replies that are not objects arrive wrapped as {"ok": ...}."""
    return reply.get("ok", reply) if set(reply) == {"ok"} else reply


def _check_name(name: str, what: str) -> None:
    if what == "queue":
        if not isinstance(name, str) or not valid_queue_name(name):
            raise Invalid(f"bad queue name {name!r}: {QUEUE_NAME_RULE}")
    elif not isinstance(name, str) or not valid_name(name):
        raise Invalid(f"bad {what} name {name!r}: {NAME_RULE}")
