"""One branch's local services, built together and handed their collaborators.

The daemon builds this (tests build it over the twins): the declarations
(apps and queues), the supervision engine (instances), the Celery runtime
operations, the logs and the app-wide actions. The HTTP edge calls these services, through the
Protocols of ``api/backend.py``; none of them builds another.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from branchd.celery.ops import CeleryOps
from branchd.celery.remote import RemoteControl
from branchd.celery.runtime import CeleryRuntime
from branchd.celery.workers import Workers
from branchd.clock import Clock, Scheduler
from branchd.config import Config
from branchd.declarations import Declarations
from branchd.events import EventBus
from branchd.process.actions import AppActions
from branchd.process.engine import Engine
from branchd.process.launcher import Launcher
from branchd.process.logs import LogService
from branchd.store import Store


@dataclass(frozen=True)
class LocalBranch:
    apps: Declarations
    instances: Engine
    celery: CeleryRuntime
    logs: LogService
    #: Count creates and app-wide start, stop, restart (rolling too).
    groups: AppActions

    @property
    def branch_id(self) -> str:
        return self.instances.branch_id

    async def start(self) -> None:
        """Adopt the instances whose processes survived us, start the rest."""
        await self.instances.start()
        self.logs.start()

    async def shutdown(self, *, keep: bool) -> None:
        """Stop every instance (or, with keep, leave them running) and let go."""
        await self.logs.close()
        await self.groups.close()
        await self.instances.shutdown(keep=keep)


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
) -> LocalBranch:
    declarations = Declarations(store, clock, bus)
    workers = Workers(
        CeleryOps(remote, scheduler=scheduler),
        launcher,
        config.state_dir,
        hostname or socket.gethostname(),
        settings=config.celery,  # (only its own section)
        scheduler=scheduler,
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
    )
    # an app deleted on another branch: its instances here stop, then it goes
    declarations.on_remote_delete(engine.end_app)
    return LocalBranch(
        apps=declarations,
        instances=engine,
        celery=CeleryRuntime(engine, declarations, workers, bus),
        logs=LogService(config.log_dir, engine, config.logs.check_interval, scheduler=scheduler),
        groups=AppActions(engine, bus, scheduler, config.supervision),
    )
