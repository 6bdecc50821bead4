"""The supervision engine: runs the pure state machine of each instance
against the store (declared state) and the launcher (processes): spawn,
watch, adopt, schedule, persist.

Events come up (a pid died, a timer fired, a user asked), the machine decides,
and the commands it returns go down to the launcher. Every acknowledged user
change is in SQLite before the method returns. Declarations (apps, queues)
are the ``Declarations`` service's; the conversations with Celery workers
are the ``Workers`` service's; logs are the ``LogService``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal as _signal
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from branchd import events
from branchd.clock import Clock, Scheduler, Timer, deadline
from branchd.config import SupervisionSection
from branchd.declarations import Declarations, check_name
from branchd.errors import (
    BranchdError,
    Conflict,
    Invalid,
    NotFound,
    StorageFailure,
)
from branchd.events import EventBus
from branchd.hlc import Version
from branchd.model import (
    App,
    Desired,
    InstanceSpec,
    Kind,
    Policy,
    Queue,
    Runtime,
    State,
    signal_number,
)
from branchd.process import logs
from branchd.process.cgroups import Limits
from branchd.process.launcher import (
    Launched,
    Launcher,
    LaunchSpec,
    Marked,
    base_env,
    make_mark,
    read_env_files,
    user_env,
)
from branchd.process.machine import (
    Adopt,
    Await,
    Backoff,
    Command,
    DepsReady,
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
    Waiting,
    step,
)
from branchd.process.prober import NetProber, NotifySockets, ProbeRunner
from branchd.process.probes import Dep, after_problem, start_order, stop_tiers, waiting_for
from branchd.process.readiness import Probing
from branchd.process.specs import apply_fields, build_spec, check_kind_fields, reset_fields
from branchd.store import Store
from branchd.views import InstanceView, Stats, TreeStats

log = logging.getLogger(__name__)

#: The longest pause between retries of a write the database refused.
_FLUSH_PAUSE_MAX = 5.0

#: Recorded states of an instance that was failing to start when the daemon went.
_LOOPING = (State.BACKOFF, State.STARTING, State.WAITING)

#: The store's note of an app delete under way (``removing_app:<app>``).
_REMOVING_APP = "removing_app:"

#: Threads that launch held spawns at once (``spawning_together``).
_SPAWNERS = 4


if TYPE_CHECKING:
    from branchd.celery.workers import Host


class CeleryWorkers(Protocol):
    """What the engine asks of the Celery workers service (``celery/workers.py``'s
    ``Workers``; the daemon hands it one that loads the Celery layer at its first
    use, so a branch without Celery apps never imports it)."""

    def bind(self, host: Host) -> None: ...
    def start(self) -> None: ...
    async def close(self) -> None: ...
    def remember_argv(self, name: str, argv: tuple[str, ...]) -> None: ...
    def spawned(self, name: str, pid: int) -> None: ...
    def adopted(self, name: str) -> None: ...
    def stop(self, spec: InstanceSpec, pid: int, signum: int) -> None: ...
    def remove_embedded(self, app: str) -> None: ...
    def redeclared(self, app_name: str, name: str | None = None) -> None: ...
    async def check_limits(self, app: App, spec: InstanceSpec | None = None) -> None: ...
    async def worker_stats(self, spec: InstanceSpec) -> dict[str, Any]: ...
    def command(self, spec: InstanceSpec, live: bool = False) -> tuple[str, ...]: ...
    def node(self, spec: InstanceSpec) -> str: ...
    def prepare_spawn(
        self, spec: InstanceSpec, env: dict[str, str]
    ) -> tuple[tuple[str, ...], dict[str, str]]: ...


class Engine:
    """Supervises the instances of this branch."""

    def __init__(
        self,
        store: Store,
        launcher: Launcher,
        clock: Clock,
        settings: SupervisionSection,
        log_dir: Path,
        branch_id: str,
        *,
        declarations: Declarations,
        workers: CeleryWorkers,
        bus: EventBus,
        scheduler: Scheduler,
        prober: ProbeRunner | None = None,
    ) -> None:
        self._store = store
        self._bus = bus
        self._launcher = launcher
        self._clock = clock
        self._sched = scheduler
        self._settings = settings
        self._log_dir = log_dir
        self.branch_id = branch_id
        self._decls = declarations
        self._backoff = Backoff(settings.backoff_base, settings.backoff_max)
        self._specs: dict[str, InstanceSpec] = {}
        self._procs: dict[str, Proc] = {}
        self._runtime: dict[str, Runtime] = {}
        self._timers: dict[str, Timer] = {}
        self._deleting: set[str] = set()
        self._deleting_apps: set[str] = set()
        #: Deletes answered before their instance stopped (wait=False), still running.
        self._forgetting: dict[str, asyncio.Task[None]] = {}
        #: App deletes under way, by app.
        self._app_removals: dict[str, asyncio.Task[None]] = {}
        self._env = dict(os.environ)
        self._workers = workers
        workers.bind(self)
        #: Instances whose runtime or desired state the database could not take
        #: (a full disk): memory is right, and the flusher writes them once it can.
        self._dirty: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        #: Spawns held back to be launched together (``spawning_together``).
        self._held: list[tuple[str, InstanceSpec]] | None = None
        #: Readiness and liveness probes, sd_notify sockets (process instances).
        self._probes = Probing(prober or NetProber(scheduler), NotifySockets(branch_id), scheduler)
        self._probes.bind(self)
        #: A look at the waiting instances is due (see ``_recheck_soon``).
        self._recheck_timer: Timer | None = None

    # lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Adopt the instances whose processes survived us; start the rest."""
        runtimes = self._store.runtimes()
        marked: dict[str, list[Marked]] = {}
        for m in self._launcher.marked(self.branch_id):
            marked.setdefault(m.instance, []).append(m)
        to_start: list[InstanceSpec] = []
        for spec in self._store.list_instances():
            name = spec.name
            rt = self._claim_marked(name, runtimes.get(name, Runtime()), marked.pop(name, []))
            self._specs[name] = spec
            self._procs[name] = Proc(
                retries=rt.retries,
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
                self._adopt_probes(spec)
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
                    self._launcher.release(name)  # (and all its cgroup holds)
                if spec.desired == Desired.RUNNING and rt.state == State.FATAL:
                    # it gave up before we went: it starts again only when a
                    # user starts it, as with no daemon restart in between
                    self._procs[name] = replace(self._procs[name], state=State.FATAL)
                    self._persist(name)
                elif spec.desired == Desired.RUNNING and rt.retries and rt.state in _LOOPING:
                    # crash-looping when we went: its start budget and its
                    # backoff go on (a restart of the daemon resets neither)
                    self._resume_backoff(name, rt)
                elif spec.desired == Desired.RUNNING:
                    to_start.append(spec)
                else:
                    self._persist(name)
            if spec.desired == Desired.REMOVED:
                # a delete was under way when the daemon went: it ends now
                self._deleting.add(name)
                self._begin_forget(name)
        # supervisord's priority: lower first (and what others start after, first)
        for name in start_order(to_start):
            self._feed(name, Start())
        for found in marked.values():
            for m in found:  # spawned for an instance that is no more: no orphans
                log.warning("killing pid %d: spawned for %s, which is no more", m.pid, m.instance)
                self._kill_group(m.pid)
        self._launcher.prune(set(self._specs))
        for app in self._store.marks(_REMOVING_APP):
            # an app delete was under way when the daemon went: it ends now
            if self._store.get_app(app) is None:
                with contextlib.suppress(StorageFailure):  # (done again at the next start)
                    self._store.set_mark(f"{_REMOVING_APP}{app}", False)
            else:
                self._begin_app_removal(app)
        self._workers.start()

    def _adopt_probes(self, spec: InstanceSpec) -> None:
        """An adopted instance's probes run as at its spawn: its notify socket
        is bound again, its exec probes get its environment."""
        if spec.ready is None and spec.live is None:
            return
        try:
            self._probes.before_spawn(spec, self._child_env(spec))
        except Exception:  # (its probes fail then, and say why: never the daemon's start)
            log.exception("%s: cannot set up its probes again", spec.name)

    def _resume_backoff(self, name: str, rt: Runtime) -> None:
        wall = self._clock.wall()
        wait = max(0.0, (rt.backoff_until or wall) - wall)
        deadline = self._clock.monotonic() + wait
        # (spawned before the daemon went: its next spawn is a restart)
        self._procs[name] = replace(
            self._procs[name], state=State.BACKOFF, deadline=deadline, spawned_once=True
        )
        log.info("%s: backoff goes on (%d failed start(s), next in %.1fs)", name, rt.retries, wait)
        self._schedule(name, deadline)
        self._persist(name)

    def _claim_marked(self, name: str, rt: Runtime, found: list[Marked]) -> Runtime:
        """The runtime to adopt from: the recorded process if it lives, else the
        newest process marked for this instance (spawned by a daemon that went
        before it committed the pid); any other marked one is a second copy
        and goes."""
        recorded = bool(rt.pid and rt.create_time and self._launcher.alive(rt.pid, rt.create_time))
        if not recorded and found:
            # (create_time ticks in 10 ms: within one tick, the higher pid came later)
            newest = max(found, key=lambda m: (m.create_time, m.pid))
            if rt.pid and _gone_or_zombie(rt.pid):
                self._kill_group(rt.pid)  # what the dead recorded one left
            log.warning("%s: pid %d was started but never recorded; adopting it", name, newest.pid)
            rt = replace(
                rt,
                pid=newest.pid,
                create_time=newest.create_time,
                started_at=newest.create_time,
                state=State.STARTING,
            )  # (saved once the adoption is fed)
        for m in found:
            if m.pid != rt.pid:
                log.warning("%s: killing pid %d, a second copy of it", name, m.pid)
                self._kill_group(m.pid)
        return rt

    def _kill_group(self, pid: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._launcher.signal(pid, _signal.SIGKILL, True)

    async def shutdown(self, *, keep: bool) -> None:
        """Stop every instance (or, with keep, leave them running) and let go."""
        if not keep:
            # (fatal and exited ones stay so: their state is what the next daemon shows)
            live = (State.WAITING, State.STARTING, State.RUNNING, State.STOPPING, State.BACKOFF)
            names = [n for n, p in self._procs.items() if p.state in live]
            # in tiers, the reverse of the start order: higher priority numbers
            # first, and what starts after others before them
            for tier in stop_tiers([self._specs[n] for n in names]):
                for name in tier:
                    self._feed(name, Stop())
                await asyncio.gather(*(self._wait_stopped(n) for n in tier))
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
        if self._recheck_timer is not None:
            self._recheck_timer.cancel()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            if self._dirty:
                log.error("exiting with unsaved state of %s", ", ".join(sorted(self._dirty)))
        await self._workers.close()
        await self._probes.close()
        self._launcher.close()

    # apps: their end (the declarations are the Declarations service's) ------

    async def delete_app(self, name: str, *, wait: bool = True) -> App:
        """Stop and remove the app's instances, then it and its queues; answers
        the app as the delete began. Without ``wait`` it answers at once and
        the rest goes on in the background (each instance's removal is durable)."""
        app = await self._decls.get_app(name)
        task = self._app_removals.get(name)
        if task is None:  # (a second delete waits for the one under way)
            # Durable: a daemon that goes before the end finishes the delete.
            self._store.set_mark(f"{_REMOVING_APP}{name}", True)
            task = self._begin_app_removal(name)
        if wait:
            await asyncio.shield(task)
        return app

    def end_app(self, name: str, version: Version) -> None:
        """Another branch deleted app ``name`` (its tombstone has ``version``):
        its instances here stop and go, then it is forgotten with that version,
        not a later one of ours (which would undo a declaration made since)."""
        if name in self._app_removals:
            return
        self._store.set_mark(f"{_REMOVING_APP}{name}", True)
        self._begin_app_removal(name, version)

    def _begin_app_removal(self, name: str, version: Version | None = None) -> asyncio.Task[None]:
        self._deleting_apps.add(name)
        removal = self._remove_app(name, version)
        return _tracked(self._app_removals, name, removal, "removing app")

    async def _remove_app(self, name: str, version: Version | None = None) -> None:
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
            mark = f"{_REMOVING_APP}{name}"
            await self._until_stored(
                lambda: self._decls.forget_app(name, version), f"remove app {name}"
            )
            await self._until_stored(lambda: self._store.set_mark(mark, False), f"end {mark}")
        finally:
            self._deleting_apps.discard(name)

    # instances ------------------------------------------------------------

    async def list_instances(self, app: str | None = None) -> list[InstanceView]:
        if app is not None:
            await self._decls.get_app(app)
        names = sorted(self._specs, key=lambda n: (self._specs[n].app, n))
        return [self._view(n) for n in names if app is None or self._specs[n].app == app]

    async def get_instance(self, app: str, name: str) -> InstanceView:
        return self._view(self.lookup(app, name).name)

    async def create_instance(self, app_name: str, fields: Mapping[str, Any]) -> InstanceView:
        app = await self._decls.get_app(app_name)
        if app_name in self._deleting_apps:
            raise Conflict(f"app {app_name!r} is being deleted")
        fields = dict(fields)
        name = fields.pop("name", None) or self._new_name(app_name)
        check_name(name, "instance")
        if name in self._specs:
            # (names are unique on the branch, across apps: a worker's node is name@host)
            owner = self._specs[name].app
            raise Conflict(
                f"instance name {name!r} is taken by {owner}/{name}: instance names are "
                "unique on a branch, across apps"
            )
        spec = build_spec(app, name, fields, self.branch_id, self._clock.wall())
        if spec.kind == Kind.CELERY:
            self._decls.check_queues(app, spec.queues)
            await self._workers.check_limits(app, spec)
        if spec.kind == Kind.CELERY and not app.celery.celery_app:
            raise Invalid(
                f"app {app_name!r} has no celery_app (the module for celery -A), so it "
                "cannot run a celery worker; a process instance needs a command "
                f"(branchctl instances add {app_name} -- COMMAND...), a worker an app with "
                f"a module (branchctl apps set {app_name} --celery-app MODULE)"
            )
        self._check_after(spec)
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
        spec = self.lookup(app, name)
        for key in ("name", "kind"):
            if key in fields:
                raise Invalid(f"{key} cannot be changed")
        check_kind_fields(spec.kind, fields)
        app_obj = self._decls.find_app(app)
        fields = reset_fields(spec, app_obj.defaults if app_obj else {}, fields)
        new = apply_fields(spec, fields)
        if new.kind == Kind.CELERY and app_obj is not None:
            self._decls.check_queues(app_obj, new.queues)
            await self._workers.check_limits(app_obj, new)
        if "after" in fields:
            self._check_after(new)
        self._store.update_instance(new)
        self._specs[name] = new
        if "after" in fields:
            self._recheck_soon()  # (a waiting one waits for its new list now)
        if new.kind == Kind.CELERY and _live_part(new) != _live_part(spec):
            self._workers.redeclared(app, name)  # (its running worker takes it now)
        return self._view(name)

    async def delete_instance(self, app: str, name: str, *, wait: bool = True) -> InstanceView:
        """Stop and forget an instance; answers its view as the stop began.

        Without ``wait`` it answers at once and the rest (the wait for the
        stop, the removal) goes on in the background.
        """
        spec = self.lookup(app, name)
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
            await self._until_stored(
                lambda: self._store.delete_instance(name), f"remove instance {name}"
            )
            self._dirty.discard(name)
            handle = self._timers.pop(name, None)
            if handle:
                handle.cancel()
            app = self._specs[name].app
            del self._specs[name], self._procs[name], self._runtime[name]
            self._probes.forget(name)
            self._launcher.release(name)  # (its cgroup)
            self._bus.publish(events.InstanceRemoved(app, name))
            self._recheck_soon()  # (what started after it says so)
        finally:
            self._deleting.discard(name)

    async def start_instance(self, app: str, name: str) -> InstanceView:
        self._set_desired(self.lookup(app, name, starting=True), Desired.RUNNING)
        self._feed(name, Start())
        return self._view(name)

    async def stop_instance(self, app: str, name: str, *, wait: bool = True) -> InstanceView:
        """Stop an instance; with ``wait``, answer once it has stopped.

        A stop is always carried out: if the database cannot record it, the
        answer is that storage error with ``applied`` (the flusher records it
        once it can)."""
        failure = self._set_desired(self.lookup(app, name), Desired.STOPPED, anyway=True)
        self._feed(name, Stop())
        if wait:
            await self._wait_stopped(name)
        if failure is not None:
            raise type(failure)(
                f"{name} was stopped, but not recorded: {failure.message}; the record "
                "is written once the database takes writes again",
                applied=True,
            )
        if not wait:  # the caller watches the state instead (a stop can take stopwaitsecs)
            return self._view(name)
        return self._settled_view(app, name)

    async def restart_instance(self, app: str, name: str, *, wait: bool = True) -> InstanceView:
        """Restart an instance; with ``wait``, answer once the old process has stopped."""
        self._set_desired(self.lookup(app, name, starting=True), Desired.RUNNING)
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
        spec = self.lookup(app, name)
        view = self._view(name)
        pid = view.runtime.pid
        tree = self._launcher.tree_stats(pid) if pid else TreeStats(0.0, 0, 0)
        celery: dict[str, Any] | None = None
        if spec.kind == Kind.CELERY and view.runtime.state == State.RUNNING:
            celery = await self._workers.worker_stats(spec)
        return Stats(view, tree, celery)

    async def app_stats(self, app: str) -> list[Stats]:
        """Every instance of ``app`` here with its process-tree figures (no
        Celery calls: a listing must not wait on each worker)."""
        if self._decls.find_app(app) is None:
            raise NotFound(f"no app {app!r}")
        out = []
        for spec in sorted(self.specs(app), key=lambda s: s.name):
            view = self._view(spec.name)
            pid = view.runtime.pid
            tree = self._launcher.tree_stats(pid) if pid else TreeStats(0.0, 0, 0)
            out.append(Stats(view, tree))
        return out

    def instance_names(self) -> list[str]:
        return list(self._specs)

    # what the Celery runtime and the logs read ------------------------------------

    def specs(self, app: str | None = None) -> list[InstanceSpec]:
        return [s for s in self._specs.values() if app is None or s.app == app]

    def running(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.state == State.RUNNING

    # what the workers service needs (workers.Host) ----------------------------------

    def feed(self, name: str, event: Event) -> None:
        self._feed(name, event)

    def proc(self, name: str) -> Proc | None:
        return self._procs.get(name)

    def spec(self, name: str) -> InstanceSpec | None:
        return self._specs.get(name)

    def app(self, name: str) -> App | None:
        return self._decls.find_app(name)

    def queue_decls(self, app: str) -> dict[str, Queue]:
        return self._decls.queue_decls(app)

    def celery_instances(self) -> list[InstanceSpec]:
        return [s for s in self._specs.values() if s.kind == Kind.CELERY]

    # internals --------------------------------------------------------------

    def lookup(self, app: str, name: str, *, starting: bool = False) -> InstanceSpec:
        spec = self._specs.get(name)
        if spec is None or spec.app != app:
            if self._decls.find_app(app) is None:
                raise NotFound(f"no app {app!r}")
            raise NotFound(f"no instance {name!r} in app {app!r}")
        if starting and name in self._deleting:
            raise Conflict(f"instance {name!r} is being deleted")
        return spec

    def celery_lookup(self, app: str, name: str) -> InstanceSpec:
        spec = self.lookup(app, name)
        if spec.kind != Kind.CELERY:
            raise Invalid(f"instance {name!r} is not a celery instance")
        return spec

    def update_spec(self, spec: InstanceSpec) -> InstanceSpec:
        """Persist first: a runtime change that fails later keeps the declaration."""
        self._store.update_instance(spec)
        self._specs[spec.name] = spec
        return spec

    def _policy(self, spec: InstanceSpec) -> Policy:
        celery = spec.kind == Kind.CELERY
        return replace(
            spec.policy,
            ready_by_ping=celery,
            stop_group=not celery,
            awaits=bool(spec.after),
            ready_by_probe=not celery and spec.ready is not None,
        )

    def _new_name(self, app: str) -> str:
        while True:
            name = f"{app[:54]}-{secrets.token_hex(4)}"
            if name not in self._specs:
                return name

    def _set_desired(
        self, spec: InstanceSpec, desired: Desired, *, anyway: bool = False
    ) -> StorageFailure | None:
        """Persist, then change, the desired state. With ``anyway`` (a stop) a
        storage failure changes it in memory too, is left to the flusher and
        is returned; else it is raised and nothing changed."""
        if spec.desired != desired:
            try:
                self._store.set_desired(spec.name, desired)
            except StorageFailure as exc:
                if not anyway:
                    raise
                self._specs[spec.name] = replace(spec, desired=desired)
                self._mark_dirty(spec.name, exc)
                return exc
            self._specs[spec.name] = replace(spec, desired=desired)
        return None

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
            if (proc.state, proc.pid) != (old.state, old.pid):
                self._probes.changed(name)
            self._recheck_soon()
            self._bus.publish(
                events.InstanceChanged(
                    spec.app, name, proc.state, proc.pid, proc.reason, spec.kind
                )
            )

    def _run(self, name: str, spec: InstanceSpec, old: Proc, command: Command) -> None:
        pid = self._procs[name].pid
        match command:
            case Spawn() if self._held is not None:
                self._held.append((name, spec))
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
            case Await():
                self._await_after(name)

    # start order (``after``) ------------------------------------------------------

    def _check_after(self, spec: InstanceSpec) -> None:
        """Refuse (422) an ``after`` naming no instance of the app, itself, or a cycle."""
        if not spec.after:
            return
        app = [s for s in self._specs.values() if s.app == spec.app and s.name != spec.name]
        others = {s.name: s.after for s in app}
        problem = after_problem(spec.app, spec.name, spec.after, others)
        if problem:
            raise Invalid(problem)

    def _await_after(self, name: str) -> None:
        """Answer a waiting instance's Await: spawn it if all it starts after
        are running (ready), else say what it still waits for."""
        spec = self._specs[name]
        deps = []
        for dep in spec.after:
            other = self._specs.get(dep)
            if other is None or other.app != spec.app:
                deps.append(Dep(dep, None))
            else:
                deps.append(Dep(dep, self._procs[dep].state, self._procs[dep].reason))
        why = waiting_for(deps)
        self._feed(name, DepsReady() if why is None else Waiting(why))

    def _recheck_soon(self) -> None:
        """Look at the waiting instances again at the next turn of the loop (not
        inside the feed that changed another: a spawn there would nest in it)."""
        if self._recheck_timer is not None:
            return
        if not any(p.state == State.WAITING for p in self._procs.values()):
            return
        self._recheck_timer = self._sched.call_at(self._clock.monotonic(), self._recheck)

    def _recheck(self) -> None:
        self._recheck_timer = None
        for name in [n for n, p in self._procs.items() if p.state == State.WAITING]:
            if self._procs.get(name) is not None and self._procs[name].state == State.WAITING:
                self._await_after(name)

    def _child_env(self, spec: InstanceSpec) -> dict[str, str]:
        """A clean environment: the documented base, then the app's, the env
        files' and the instance's (never the daemon's own, which holds its token).
        The env files are read at each start: an edited one applies at the next."""
        app = self._decls.find_app(spec.app)
        files, skipped = read_env_files(spec.env_file) if spec.env_file else ({}, [])
        for warning in skipped:
            log.warning("%s: env file %s", spec.name, warning)
        return {
            **base_env(self._env, spec.user),
            **user_env(app.env if app else {}),
            **user_env(files),
            **user_env(spec.env),
        }

    @contextlib.contextmanager
    def spawning_together(self) -> Iterator[None]:
        """Hold the spawns that the starts inside ask for, and launch them
        together at the end, on a few threads: a spawn mostly waits for its
        child to exec, so N of them at once take a fraction of N in turn. The
        body must not await (a held instance stays ``starting`` with no pid
        until the end); each one's outcome is fed as a spawn alone feeds it."""
        if self._held is not None:  # (already holding: the outer one launches)
            yield
            return
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            self._launch_held(held)

    def _launch_held(self, held: list[tuple[str, InstanceSpec]]) -> None:
        prepared: list[tuple[str, InstanceSpec, LaunchSpec]] = []
        for name, spec in held:
            proc = self._procs.get(name)
            if proc is None or proc.state != State.STARTING or proc.pid is not None:
                continue  # stopped or deleted since: nothing to launch
            try:
                prepared.append((name, spec, self._launch_spec(name, spec)))
            except Exception as exc:
                self._spawn_failed(name, exc)
        if not prepared:
            return
        with ThreadPoolExecutor(min(_SPAWNERS, len(prepared))) as pool:
            futures = [pool.submit(self._launcher.spawn, ls) for _, _, ls in prepared]
        for (name, spec, _), future in zip(prepared, futures, strict=True):
            error = future.exception()
            if error is not None:
                self._spawn_failed(name, error)
            else:
                self._launched(name, spec, future.result())

    def _spawn(self, name: str, spec: InstanceSpec) -> None:
        try:
            launched = self._launcher.spawn(self._launch_spec(name, spec))
        except Exception as exc:  # any failure to start is a failed start, never a crash
            self._spawn_failed(name, exc)
            return
        self._launched(name, spec, launched)

    def _launch_spec(self, name: str, spec: InstanceSpec) -> LaunchSpec:
        argv = spec.command
        out, err = logs.log_paths(self._log_dir, spec.app, spec.name)
        env = self._child_env(spec)
        self._probes.before_spawn(spec, env)  # ($NOTIFY_SOCKET; what exec probes run with)
        if spec.kind == Kind.CELERY:
            argv, env = self._workers.prepare_spawn(spec, env)
        return LaunchSpec(
            argv=argv,
            env=env,
            cwd=spec.cwd,
            user=spec.user,
            stdout_path=out,
            stderr_path=err,
            mark=make_mark(self.branch_id, name),
            umask=spec.umask,
            log_max_bytes=spec.log_max_bytes,
            log_backups=spec.log_backups,
            cgroup=name,
            limits=Limits(spec.memory_max, spec.cpu_max, spec.pids_max),
        )

    def _spawn_failed(self, name: str, exc: BaseException) -> None:
        message = exc.message if isinstance(exc, BranchdError) else str(exc) or repr(exc)
        if not isinstance(exc, BranchdError | OSError):
            log.error("unexpected failure starting %s", name, exc_info=exc)
        log.warning("cannot start %s: %s", name, message)
        self._feed(name, SpawnFailed(message))

    def _launched(self, name: str, spec: InstanceSpec, launched: Launched) -> None:
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
                crash = self._start_crash_line(name, proc, code)
                self._feed(name, Exited(code, crash, cause=self._launcher.exit_cause(pid, code)))

        self._launcher.watch(pid, on_exit)

    def _start_crash_line(self, name: str, proc: Proc, code: int | None) -> str | None:
        """The last stderr line of an instance that failed at start (a bounded read)."""
        spec = self._specs.get(name)
        if spec is None or proc.state != State.STARTING or code in (0, None):
            return None
        _, err = logs.log_paths(self._log_dir, spec.app, spec.name)
        started = self._runtime[name].started_at
        # mtime has a coarse clock on some filesystems: allow a little slack
        return logs.last_line(err, since=started - 1.0 if started else None)

    def _schedule(self, name: str, when: float | None) -> None:
        handle = self._timers.pop(name, None)
        if handle:
            handle.cancel()
        if when is not None:
            self._timers[name] = self._sched.call_at(when, lambda: self._feed(name, Timeout()))

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
            retries=proc.retries,
            backoff_until=self._backoff_until(rt, proc),
        )
        if rt != self._runtime[name]:
            self._runtime[name] = rt
            self._save(name)

    def _save(self, name: str) -> None:
        """Write an instance's runtime and desired state; on a storage failure
        mark it dirty for the flusher instead: supervision never waits on it."""
        if name in self._dirty:
            return  # the flusher writes the latest of both
        try:
            self._store.save_runtime(name, self._runtime[name])
        except StorageFailure as exc:
            self._mark_dirty(name, exc)

    def _mark_dirty(self, name: str, exc: BranchdError) -> None:
        if not self._dirty:
            log.warning("state not saved (%s); retrying in the background", exc.message)
        self._dirty.add(name)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        """Write the dirty instances until the database takes them (backoff to _FLUSH_PAUSE_MAX)."""
        pause = 0.5
        while self._dirty:
            await self._sched.sleep(pause)
            for name in list(self._dirty):
                spec, rt = self._specs.get(name), self._runtime.get(name)
                try:
                    if spec is not None and rt is not None:
                        self._store.set_desired(name, spec.desired)
                        self._store.save_runtime(name, rt)
                except NotFound:
                    pass  # deleted meanwhile
                except StorageFailure:
                    pause = min(_FLUSH_PAUSE_MAX, pause * 2)
                    break
                self._dirty.discard(name)
            else:
                pause = 0.5
        log.warning("state saved again: the database takes writes")

    async def _until_stored(self, write: Callable[[], object], what: str) -> None:
        """Retry a background write the database refuses, until it takes it."""
        pause = 0.5
        while True:
            try:
                write()
                return
            except StorageFailure as exc:
                if pause == 0.5:
                    log.warning("cannot %s yet (%s); retrying", what, exc.message)
                await self._sched.sleep(pause)
                pause = min(_FLUSH_PAUSE_MAX, pause * 2)

    def _backoff_until(self, rt: Runtime, proc: Proc) -> float | None:
        """When (wall clock) a backoff's next start is due; kept as first written
        while the backoff lasts (the two clocks would make it jitter)."""
        if proc.state != State.BACKOFF or proc.deadline is None:
            return None
        same = rt.state == State.BACKOFF and rt.retries == proc.retries
        if same and rt.backoff_until is not None:
            return rt.backoff_until
        return round(self._clock.wall() + (proc.deadline - self._clock.monotonic()), 3)

    async def _wait_stopped(self, name: str) -> None:
        """Wait until a stop that was fed has ended (or a concurrent start took over)."""
        spec = self._specs.get(name)
        if spec is None:
            return
        limit = spec.policy.stopwaitsecs + self._settings.kill_grace
        end = self._clock.monotonic() + limit

        def about_it(event: events.Event) -> bool:
            return getattr(event, "name", None) == name

        with self._bus.subscribe(about_it) as changes:
            while name in self._procs and self._procs[name].state == State.STOPPING:
                if self._clock.monotonic() >= end:
                    log.warning("%s did not stop within %.1fs", name, limit)
                    return
                with contextlib.suppress(TimeoutError):
                    async with deadline(self._sched, end):
                        await changes.get()


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


def _live_part(spec: InstanceSpec) -> tuple[object, ...]:
    """What of a worker's declaration a running worker takes by remote control
    (the rest waits for its next start): its queues, its autoscale range, its
    per-task limits."""
    return (spec.queues, spec.autoscale, spec.concurrency, spec.limits.task_overrides)
