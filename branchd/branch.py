"""This branch's record: who it is and what it has room for.

Built by a service, fed by the event bus (which instances it holds, which
of its Celery workers run) and a timer (CPU load and free memory, read from
the host through a small probe), so that a request never waits on psutil
and the gossip can carry the same record. ``refresh()`` is the timer's one
step, ``seen()`` the bus's; tests call them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Protocol

import psutil

from branchd import events
from branchd.clock import Scheduler, deadline
from branchd.events import EventBus
from branchd.model import Kind, State
from branchd.views import BranchRecord, Capacity

log = logging.getLogger(__name__)


class HostProbe(Protocol):
    def cpus(self) -> int: ...
    def load(self) -> tuple[float, float, float]: ...
    def memory(self) -> tuple[int, int]:
        """(total, available) bytes."""
        ...


class SystemProbe:
    def cpus(self) -> int:
        return psutil.cpu_count() or 1

    def load(self) -> tuple[float, float, float]:
        return os.getloadavg()

    def memory(self) -> tuple[int, int]:
        mem = psutil.virtual_memory()
        return int(mem.total), int(mem.available)


class BranchService:
    def __init__(
        self,
        base: BranchRecord,
        probe: HostProbe,
        bus: EventBus,
        instances: Iterable[str],  # app/name of each held at start
        *,
        scheduler: Scheduler,
        interval: float = 5.0,
        max_instances: int = 0,
        slots: int = 0,
        slots_used: Callable[[], int] | None = None,
        running: Iterable[str] = (),  # app/name of each Celery worker running at start
    ) -> None:
        self._record = base
        self._max = max_instances
        self._slots = slots
        #: What this branch's instances take of its slots now (their specs say).
        self._used = slots_used or (lambda: 0)
        #: Called after each change of the record (a refresh, an instance come
        #: or gone): the cluster re-announces it. Set by whoever listens.
        self.on_change: Callable[[], None] | None = None
        self._sched = scheduler
        self._clock = scheduler.clock
        self._probe = probe
        self._bus = bus
        self._names = set(instances)
        self._running = set(running)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._changes: contextlib.AbstractContextManager[events.Subscription] | None = None
        self.refresh()

    def record(self) -> BranchRecord:
        capacity = replace(
            self._record.capacity,
            instances=len(self._names),
            max_instances=self._max,
            slots=self._slots,
            slots_used=self._used(),
        )
        return replace(
            self._record,
            capacity=capacity,
            instances=tuple(sorted(self._names)),
            running=tuple(sorted(self._running)),
        )

    def with_address(self, **fields: str) -> None:
        """Set where this branch is reached (its API URL and gossip address,
        known once the cluster's sockets are bound)."""
        self._record = replace(self._record, **fields)  # type: ignore[arg-type]

    def set_draining(self, on: bool) -> None:
        """Take no new instance (``on``), or take them again: told at once."""
        if self._record.capacity.draining == on:
            return
        self._record = replace(self._record, capacity=replace(self._record.capacity, draining=on))
        self._changed()

    def refresh(self) -> None:
        """One step of the timer: the host's figures now."""
        total, free = self._probe.memory()
        capacity = Capacity(
            self._probe.cpus(),
            self._probe.load(),
            total,
            free,
            len(self._names),
            draining=self._record.capacity.draining,
        )
        self._record = replace(self._record, capacity=capacity, refreshed=self._clock.wall())
        self._changed()

    def seen(self, event: events.Event) -> None:
        """One event of the bus: instances come and go, workers start and stop."""
        before = (len(self._names), len(self._running))
        match event:
            case events.InstanceAdded(app, name):
                self._names.add(f"{app}/{name}")
            case events.InstanceRemoved(app, name):
                self._names.discard(f"{app}/{name}")
                self._running.discard(f"{app}/{name}")
            case events.InstanceChanged(app, name, state, kind=Kind.CELERY):
                if state == State.RUNNING:
                    self._running.add(f"{app}/{name}")
                else:  # (a stopping worker no longer counts: its share goes to the others)
                    self._running.discard(f"{app}/{name}")
        if (len(self._names), len(self._running)) != before:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change()
        except Exception:  # a listener's failure is its own; the record stands
            log.exception("a listener of the branch record failed")

    def start(self) -> None:
        # Subscribed now, not when the loop first runs: a worker that becomes
        # ready in between would be missed (what was running before, the
        # daemon gave as ``running``).
        self._changes = self._bus.subscribe(_about_the_record)
        self._task = asyncio.create_task(self._run(self._changes.__enter__()))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._changes is not None:
            self._changes.__exit__(None, None, None)
            self._changes = None

    async def _run(self, changes: events.Subscription) -> None:
        clock = self._clock
        next_refresh = clock.monotonic() + self._interval
        while True:
            try:
                async with deadline(self._sched, next_refresh):
                    self.seen(await changes.get())
                    continue
            except TimeoutError:
                pass
            try:
                self.refresh()
            except Exception:  # a probe that fails once must not end the loop
                log.warning("cannot read the host's load and memory", exc_info=True)
            next_refresh = clock.monotonic() + self._interval


def _about_the_record(event: events.Event) -> bool:
    """The events that change the record: instances come and go, Celery
    workers' states (a plain process's state is not in it)."""
    if isinstance(event, events.InstanceChanged):
        return event.kind == Kind.CELERY
    return isinstance(event, events.InstanceAdded | events.InstanceRemoved)
