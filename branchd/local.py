"""One branch's local services, built together and handed their collaborators.

The daemon builds this (tests build it over the twins): the declarations
(apps and queues), the supervision engine (instances), the Celery runtime
operations, the logs and the app-wide actions. The HTTP edge calls these services, through the
Protocols of ``api/backend.py``; none of them builds another.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field

from branchd.celery.depth import DepthReader, KombuDepthReader
from branchd.celery.ops import CeleryOps
from branchd.celery.ready import ReadyCounter
from branchd.celery.remote import RemoteControl
from branchd.celery.runtime import CeleryRuntime
from branchd.celery.scaler import DepthScaler, DepthService
from branchd.celery.workers import Workers
from branchd.clock import Clock, Scheduler
from branchd.config import Config
from branchd.declarations import Declarations
from branchd.events import EventBus
from branchd.process.actions import AppActions
from branchd.process.engine import Engine
from branchd.process.launcher import Launcher
from branchd.process.logpipes import LogPipes
from branchd.process.logs import LogService
from branchd.process.prober import ProbeRunner
from branchd.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalBranch:
    apps: Declarations
    instances: Engine
    celery: CeleryRuntime
    logs: LogService
    holdings: Holdings
    #: Count creates and app-wide start, stop, restart (rolling too).
    groups: AppActions
    #: Queue depth reads (issue 16, part 4) ...
    depth: DepthService
    #: ... and the loop that scales workers on them (part 5).
    scaler: DepthScaler
    #: The Celery workers' conversations (the daemon tells it, in a cluster,
    #: how many of an app's workers run elsewhere).
    workers: Workers

    @property
    def branch_id(self) -> str:
        return self.instances.branch_id

    async def start(self) -> None:
        """Adopt the instances whose processes survived us, start the rest."""
        await self.instances.start()
        self.logs.start()
        self.scaler.start()

    async def shutdown(self, *, keep: bool) -> None:
        """Stop every instance (or, with keep, leave them running) and let go."""
        await self.scaler.close()
        await self.depth.reader.close()
        await self.logs.close()
        await self.groups.close()
        await self.instances.shutdown(keep=keep)


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
    remote: RemoteControl,
    bus: EventBus,
    hostname: str | None = None,
    prober: ProbeRunner | None = None,
    log_pipes: LogPipes | None = None,
    depth_reader: DepthReader | None = None,
    ready: ReadyCounter | None = None,
) -> LocalBranch:
    declarations = Declarations(store, clock, bus)
    # one broker depth reader: the depth scaler's and the stall check's
    reader = depth_reader or KombuDepthReader()
    workers = Workers(
        CeleryOps(remote, scheduler=scheduler),
        launcher,
        config.state_dir,
        hostname or socket.gethostname(),
        settings=config.celery,  # (only its own section)
        scheduler=scheduler,
        ready=ready,
        depth=reader,
    )
    engine = Engine(
        store,
        launcher,
        clock,
        config.supervision,
        config.log_dir,
        branch_id,
        declarations=declarations,
        workers=workers,
        bus=bus,
        scheduler=scheduler,
        prober=prober,  # (None: the real one)
    )
    # an app deleted on another branch: its instances here stop, then it goes
    declarations.on_remote_delete(engine.end_app)
    declarations.on_check_app(workers.check_limits)
    celery = CeleryRuntime(engine, declarations, workers, bus)
    declarations.on_remote_queue_delete(celery.drop_queue)
    depth = DepthService(engine, declarations, workers, reader, scheduler)
    return LocalBranch(
        apps=declarations,
        instances=engine,
        celery=celery,
        holdings=Holdings(engine),
        logs=LogService(
            config.log_dir,
            engine,
            config.logs.check_interval,
            scheduler=scheduler,
            pipes=log_pipes,
        ),
        groups=AppActions(engine, bus, scheduler, config.supervision),
        depth=depth,
        scaler=DepthScaler(
            depth, celery, declarations, scheduler, interval=config.celery.depth_poll_interval
        ),
        workers=workers,
    )
