"""One branch's local services, built together and handed their collaborators.

The daemon builds this (tests build it over the twins): the declarations
(apps and queues), the supervision engine (instances), the Celery runtime
operations, the logs and the app-wide actions. The HTTP edge calls these services, through the
Protocols of ``api/backend.py``; none of them builds another.

The Celery layer (``branchd/celery/``: the workers service, runtime operations,
depth reads and scaler, remote control) is built at its first need
(:class:`CeleryLayer`): the first Celery app declared here or found in the
store at the start, the first Celery instance, the first Celery route. A
branch that supervises plain processes only never imports it (about 1 MiB of
the daemon's memory, issue 10 part 9).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchd.celery.urls import backend_for, broker_url
from branchd.clock import Clock, Scheduler
from branchd.config import Config, SupervisionSection
from branchd.declarations import Declarations
from branchd.events import DeclarationChanged, Event, EventBus
from branchd.model import App, CelerySettings, InstanceSpec, Kind
from branchd.process.engine import Engine
from branchd.process.launcher import Launcher
from branchd.process.logpipes import LogPipes
from branchd.process.logs import LogService
from branchd.process.prober import ProbeRunner
from branchd.store import Store

if TYPE_CHECKING:
    from collections.abc import Mapping

    from branchd.celery.depth import DepthReader
    from branchd.celery.ready import ReadyCounter
    from branchd.celery.remote import RemoteControl
    from branchd.celery.runtime import CeleryRuntime
    from branchd.celery.scaler import DepthScaler, DepthService
    from branchd.celery.workers import Host, RunningElsewhere, Workers
    from branchd.model import Action
    from branchd.process.actions import AppActions
    from branchd.process.groups import Item
    from branchd.views import InstanceView

log = logging.getLogger(__name__)


class Groups:
    """Count creates and app-wide actions (``process/actions.py``), built at
    the first of them: a branch never asked for one does not import them."""

    def __init__(
        self, engine: Engine, bus: EventBus, scheduler: Scheduler, settings: SupervisionSection
    ) -> None:
        self._args = (engine, bus, scheduler, settings)
        self._actions: AppActions | None = None

    def _built(self) -> AppActions:
        if self._actions is None:
            from branchd.process.actions import AppActions

            self._actions = AppActions(*self._args)
        return self._actions

    async def create_instances(
        self, app: str, fields: Mapping[str, Any], count: int, template: str, start_at: int = 0
    ) -> list[InstanceView]:
        return await self._built().create_instances(app, fields, count, template, start_at)

    async def act(
        self, app: str, action: Action, *, rolling: bool = False, batch: int = 1, wait: bool = True
    ) -> list[Item]:
        return await self._built().act(app, action, rolling=rolling, batch=batch, wait=wait)

    async def close(self) -> None:
        if self._actions is not None:
            await self._actions.close()


@dataclass(frozen=True)
class LocalBranch:
    apps: Declarations
    instances: Engine
    logs: LogService
    holdings: Holdings
    #: Count creates and app-wide start, stop, restart (rolling too).
    groups: Groups
    #: The Celery services below, built at their first need.
    layer: CeleryLayer

    @property
    def celery(self) -> CeleryFront:
        """The Celery runtime operations (an app's view needs none of the layer)."""
        return self.layer.front

    @property
    def depth(self) -> DepthService:
        """Queue depth reads (issue 16, part 4) ..."""
        return self.layer.parts().depth

    @property
    def scaler(self) -> DepthScaler:
        """... and the loop that scales workers on them (part 5)."""
        return self.layer.parts().scaler

    @property
    def workers(self) -> Workers:
        """The Celery workers' conversations."""
        return self.layer.parts().workers

    @property
    def branch_id(self) -> str:
        return self.instances.branch_id

    async def start(self) -> None:
        """Adopt the instances whose processes survived us, start the rest."""
        self.layer.load_if_needed()
        await self.instances.start()
        self.logs.start()
        self.layer.start_scaler()

    async def shutdown(self, *, keep: bool) -> None:
        """Stop every instance (or, with keep, leave them running) and let go."""
        await self.layer.close_scaler()
        await self.logs.close()
        await self.groups.close()
        await self.instances.shutdown(keep=keep)


def is_celery_app(app: App) -> bool:
    """An app with any Celery setting of its own (a plain one has the defaults)."""
    return app.celery != CelerySettings()


@dataclass(frozen=True)
class CeleryParts:
    workers: Workers
    celery: CeleryRuntime
    depth: DepthService
    scaler: DepthScaler


class CeleryLayer:
    """The Celery services, built at their first need, with what was asked of
    them before: the engine bound, the workers' and scaler's loops started if
    the branch started, the count of workers elsewhere, the metrics' wish for
    figures. Until then nothing of it can have work: no Celery instance exists
    (its create, adoption or view builds the layer), no Celery app either (its
    declaration does, here or replicated; so does one in the store at the
    start)."""

    def __init__(
        self,
        make: Callable[[], CeleryParts],
        store: Store,
        state_dir: Path,
    ) -> None:
        self._make = make
        self._store = store
        self.state_dir = state_dir
        self._parts: CeleryParts | None = None
        self._host: Host | None = None
        self._workers_started = False
        self._scaler_started = False
        self._elsewhere: RunningElsewhere | None = None
        self._figures_wanted = False
        #: The engine's view of the workers service (it loads the layer when used).
        self.workers = _DeferredWorkers(self)
        #: The API's view of the Celery runtime.
        self.front = CeleryFront(self)

    @property
    def loaded(self) -> bool:
        return self._parts is not None

    def parts(self) -> CeleryParts:
        if self._parts is None:
            log.debug("loading the Celery layer")
            parts = self._parts = self._make()
            if self._host is not None:
                parts.workers.bind(self._host)
            if self._elsewhere is not None:
                parts.workers.count_elsewhere(self._elsewhere)
            if self._figures_wanted:
                parts.celery.worker_figures()
            if self._workers_started:
                parts.workers.start()
            if self._scaler_started:
                parts.scaler.start()
        return self._parts

    def load_if_needed(self) -> None:
        """At the start: a Celery app or instance in the store needs the layer."""
        if any(is_celery_app(a) for a in self._store.list_apps()) or any(
            s.kind == Kind.CELERY for s in self._store.list_instances()
        ):
            self.parts()

    def on_event(self, event: Event) -> None:
        """A Celery app declared (here or by another branch) needs the layer."""
        if isinstance(event, DeclarationChanged) and not event.deleted and not self.loaded:
            app = self._store.get_app(event.app)
            if app is not None and (event.kind == "queue" or is_celery_app(app)):
                self.parts()

    async def check_app(self, app: App) -> None:
        # the limits of a plain app are the defaults, which break no rule
        if is_celery_app(app):
            await self.parts().workers.check_limits(app)

    def drop_queue(self, app: str, name: str) -> None:
        if self.loaded:  # (else no worker here consumes it)
            self.parts().celery.drop_queue(app, name)

    def bind(self, host: Host) -> None:
        """The engine (it binds itself to the workers service as it is built)."""
        self._host = host
        if self._parts is not None:
            self._parts.workers.bind(host)

    def start_workers(self) -> None:
        self._workers_started = True
        if self._parts is not None:
            self._parts.workers.start()

    def start_scaler(self) -> None:
        self._scaler_started = True
        if self._parts is not None:
            self._parts.scaler.start()

    async def close_scaler(self) -> None:
        if self._parts is not None:
            await self._parts.scaler.close()
            await self._parts.depth.reader.close()

    # what the daemon asks of the workers service --------------------------------

    def count_elsewhere(self, elsewhere: RunningElsewhere) -> None:
        self._elsewhere = elsewhere
        if self._parts is not None:
            self._parts.workers.count_elsewhere(elsewhere)

    def resplit(self, app: str) -> None:
        if self._parts is not None:  # (else no worker of it runs here)
            self._parts.workers.resplit(app)

    def worker_figures(self) -> dict[tuple[str, str], dict[str, int | None]]:
        if self._parts is None:
            self._figures_wanted = True
            return {}
        return self._parts.celery.worker_figures()

    def known_depths(self) -> dict[tuple[str, str], dict[str, Any]]:
        return self._parts.scaler.known_depths() if self._parts is not None else {}


class _DeferredWorkers:
    """The engine's workers service (``engine.CeleryWorkers``): each call about
    a Celery instance builds the layer; binding, starting and closing wait for it."""

    def __init__(self, layer: CeleryLayer) -> None:
        self._layer = layer

    def _w(self) -> Workers:
        return self._layer.parts().workers

    def bind(self, host: Host) -> None:
        self._layer.bind(host)

    def start(self) -> None:
        self._layer.start_workers()

    async def close(self) -> None:
        if self._layer.loaded:
            await self._w().close()

    def remember_argv(self, name: str, argv: tuple[str, ...]) -> None:
        self._w().remember_argv(name, argv)

    def spawned(self, name: str, pid: int) -> None:
        self._w().spawned(name, pid)

    def adopted(self, name: str) -> None:
        self._w().adopted(name)

    def stop(self, spec: InstanceSpec, pid: int, signum: int) -> None:
        self._w().stop(spec, pid, signum)

    def remove_embedded(self, app: str) -> None:
        if self._layer.loaded:
            self._w().remove_embedded(app)
        else:  # (the same, without loading the layer for a plain app's delete)
            from branchd.celery.broker import remove_embedded

            remove_embedded(self._layer.state_dir, app)

    async def check_limits(self, app: App, spec: InstanceSpec | None = None) -> None:
        await self._w().check_limits(app, spec)

    def redeclared(self, app_name: str, name: str | None = None) -> None:
        if self._layer.loaded:  # (else no worker of it runs here)
            self._w().redeclared(app_name, name)

    async def worker_stats(self, spec: InstanceSpec) -> dict[str, Any]:
        return await self._w().worker_stats(spec)

    def command(self, spec: InstanceSpec, live: bool = False) -> tuple[str, ...]:
        return self._w().command(spec, live)

    def node(self, spec: InstanceSpec) -> str:
        return self._w().node(spec)

    def prepare_spawn(
        self, spec: InstanceSpec, env: dict[str, str]
    ) -> tuple[tuple[str, ...], dict[str, str]]:
        return self._w().prepare_spawn(spec, env)


class CeleryFront:
    """The API's Celery runtime (``api.backend.CeleryRuntime``): an app's
    broker and result store as its view shows them need nothing of the layer;
    everything else builds it."""

    def __init__(self, layer: CeleryLayer) -> None:
        self._layer = layer

    def _rt(self) -> CeleryRuntime:
        return self._layer.parts().celery

    def effective_broker(self, app: App) -> str:
        return broker_url(app)  # (CeleryRuntime.effective_broker's)

    def effective_backend(self, app: App) -> str | None:
        return backend_for(app, self._layer.state_dir)  # (Workers.result_backend's)

    def worker_figures(self) -> dict[tuple[str, str], dict[str, int | None]]:
        return self._layer.worker_figures()

    async def celery_config(self, name: str) -> dict[str, Any]:
        return await self._rt().celery_config(name)

    async def delete_queue(self, app: str, name: str) -> None:
        await self._rt().delete_queue(app, name)

    async def consumers(self, app: str, name: str) -> list[dict[str, Any]]:
        return await self._rt().consumers(app, name)

    async def add_consumer(self, app: str, name: str, queue: str) -> list[dict[str, Any]]:
        return await self._rt().add_consumer(app, name, queue)

    async def remove_consumer(self, app: str, name: str, queue: str) -> list[dict[str, Any]]:
        return await self._rt().remove_consumer(app, name, queue)

    async def get_autoscale(self, app: str, name: str) -> dict[str, Any]:
        return await self._rt().get_autoscale(app, name)

    async def set_autoscale(self, app: str, name: str, low: int, high: int) -> dict[str, Any]:
        return await self._rt().set_autoscale(app, name, low, high)

    async def lint(self, app: str) -> list[dict[str, str]]:
        return await self._rt().lint(app)


@dataclass
class Holdings:
    """This branch's instances as the cluster's names see them
    (``cluster.names.Holdings``): when each was made, which are being moved
    away, and the giving up of a copy another branch's copy beat."""

    engine: Engine
    #: ``app/name`` of the instances a ``drain --move`` is moving away.
    moving_away: set[str] = field(default_factory=set)
    _tasks: set[asyncio.Task[object]] = field(default_factory=set)

    def created_at(self, app: str, name: str) -> float | None:
        spec = next((s for s in self.engine.specs(app) if s.name == name), None)
        return spec.created_at if spec is not None else None

    def moving(self, app: str, name: str) -> bool:
        return f"{app}/{name}" in self.moving_away

    def give_up(self, app: str, name: str, why: str) -> None:
        task = asyncio.ensure_future(self._give_up(app, name, why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_up(self, app: str, name: str, why: str) -> None:
        try:
            await self.engine.delete_instance(app, name, wait=False)
        except Exception as exc:  # (gone meanwhile: nothing left to give up)
            log.info("%s/%s: not given up (%s): %s", app, name, why, exc)


def build(
    store: Store,
    launcher: Launcher,
    clock: Clock,
    config: Config,
    branch_id: str,
    *,
    scheduler: Scheduler,
    remote: RemoteControl | None = None,
    bus: EventBus,
    hostname: str | None = None,
    prober: ProbeRunner | None = None,
    log_pipes: LogPipes | None = None,
    depth_reader: DepthReader | None = None,
    ready: ReadyCounter | None = None,
) -> LocalBranch:
    """``remote``: the Celery workers' remote control (None: kombu's, made with
    the Celery layer)."""
    declarations = Declarations(store, clock, bus)
    engine: Engine | None = None

    def make_celery() -> CeleryParts:
        from branchd.celery.depth import KombuDepthReader
        from branchd.celery.ops import CeleryOps
        from branchd.celery.remote import KombuRemoteControl
        from branchd.celery.runtime import CeleryRuntime
        from branchd.celery.scaler import DepthScaler, DepthService
        from branchd.celery.workers import Workers

        assert engine is not None  # (the engine is built before anything can need it)
        # one broker depth reader: the depth scaler's and the stall check's
        reader = depth_reader or KombuDepthReader()
        workers = Workers(
            CeleryOps(remote or KombuRemoteControl(), scheduler=scheduler),
            launcher,
            config.state_dir,
            hostname or socket.gethostname(),
            settings=config.celery,  # (only its own section)
            scheduler=scheduler,
            ready=ready,
            depth=reader,
        )
        celery = CeleryRuntime(engine, declarations, workers, bus)
        depth = DepthService(engine, declarations, workers, reader, scheduler)
        scaler = DepthScaler(
            depth, celery, declarations, scheduler, interval=config.celery.depth_poll_interval
        )
        return CeleryParts(workers, celery, depth, scaler)

    layer = CeleryLayer(make_celery, store, config.state_dir)
    engine = Engine(
        store,
        launcher,
        clock,
        config.supervision,
        config.log_dir,
        branch_id,
        declarations=declarations,
        workers=layer.workers,
        bus=bus,
        scheduler=scheduler,
        prober=prober,  # (None: the real one)
    )
    # an app deleted on another branch: its instances here stop, then it goes
    declarations.on_remote_delete(engine.end_app)
    declarations.on_check_app(layer.check_app)
    declarations.on_remote_queue_delete(layer.drop_queue)
    bus.listen(layer.on_event)
    return LocalBranch(
        apps=declarations,
        instances=engine,
        holdings=Holdings(engine),
        logs=LogService(
            config.log_dir,
            engine,
            config.logs.check_interval,
            scheduler=scheduler,
            pipes=log_pipes,
        ),
        groups=Groups(engine, bus, scheduler, config.supervision),
        layer=layer,
    )
