"""Queue depth of an app's queues, and the loop that scales its workers on it
(issue 16, parts 4 and 5).

:class:`DepthService` reads a depth: the broker's count (``depth.py``, one
read for all the queues asked) plus what this branch's running workers hold
(``active`` + ``reserved``, asked of each worker once per read, concurrently).

:class:`DepthScaler` polls, every ``interval`` seconds on the injected
scheduler, each app with a ``scale`` policy, feeds the reading to the pure
core (``branchd/scaling.py``) and drives what there is to drive on this
branch: the autoscale range of the app's running workers that consume the
policy's queue: its max is the target (split across them), its min the
policy's min, through the same path as ``PUT .../autoscale`` (persisted
first, then Celery's ``autoscale`` control).

Why the target is the max and not min = max: Celery's ``autoscale`` control
with a min above the pool only raises the pool's process count, and the
processes come at the pool's next maintenance (a 5 s timer, later under
load); Celery's own autoscaler, ticking every second, grows the pool to
``min(reserved tasks, max)`` and starts the processes at once, and raising
the max raises the prefetch with it, so a deep queue fills the new range
within about a second. Lowering the max shrinks at once, but only idle
processes (billiard's ``shrink``): a busy process stays until it is idle,
and the next poll asks again. billiard also takes for idle a process that is
being handed a reserved task (the race that makes Celery's own autoscaler
lose tasks with ``WorkerLostError``), so the max is lowered only at a poll
where the worker holds no reserved task: every task it has is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from branchd import scaling
from branchd.celery.depth import BrokerReading, DepthReader, in_flight
from branchd.celery.ops import effective_autoscale, pool_counted, pool_size
from branchd.celery.runtime import CeleryRuntime
from branchd.celery.workers import Workers
from branchd.clock import Scheduler
from branchd.declarations import Declarations
from branchd.errors import BranchdError, NotFound
from branchd.model import App, InstanceSpec, Kind
from branchd.process.engine import Engine

log = logging.getLogger(__name__)

#: Celery's queue when an app names none.
DEFAULT_QUEUE = "celery"


@dataclass(frozen=True)
class Depth:
    queue: str
    ready: int
    in_flight: int
    consumers: int
    at: float
    #: of in_flight, the tasks executing now
    running: int = 0
    #: Redis only: unacked messages of the whole database (not per queue)
    unacked: int | None = None
    #: Workers consuming the queue that did not say what they hold in time:
    #: ``in_flight`` is then a lower bound, not a count.
    unanswered: int = 0

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "queue": self.queue,
            "ready": self.ready,
            "in_flight": self.in_flight,
            "consumers": self.consumers,
            "at": self.at,
            "running": self.running,
        }
        if self.unacked is not None:
            out["unacked"] = self.unacked
        if self.unanswered:
            out["unanswered"] = self.unanswered
        return out


@dataclass(frozen=True)
class _Held:
    """What one worker holds, per queue."""

    spec: InstanceSpec
    queues: tuple[str, ...]
    held: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    pool: int | None = None
    #: The processes the pool counts (fewer than ``pool`` while some exit).
    counted: int | None = None
    #: It answered both ``active`` and ``reserved`` (else ``held`` is partial).
    answered: bool = True


class DepthService:
    def __init__(
        self,
        engine: Engine,
        declarations: Declarations,
        workers: Workers,
        reader: DepthReader,
        scheduler: Scheduler,
    ) -> None:
        self._engine = engine
        self._decls = declarations
        self._workers = workers
        self.reader = reader
        self._clock = scheduler.clock

    def app_queues(self, app: App) -> list[str]:
        """The queues of an app: declared, consumed by an instance, in its defaults."""
        names: list[str] = list(self._decls.queue_decls(app.name))
        names += [q for s in self._engine.specs(app.name) for q in s.queues]
        names += list(app.defaults.get("queues", ()))
        if app.celery.scale is not None:
            names.append(app.celery.scale.on)
        if not names or any(not s.queues for s in self._celery_specs(app.name)):
            names.append(DEFAULT_QUEUE)  # a worker with no -Q consumes Celery's own
        return sorted(dict.fromkeys(names))

    def _celery_specs(self, app: str) -> list[InstanceSpec]:
        return [s for s in self._engine.specs(app) if s.kind == Kind.CELERY]

    async def queue_depth(self, app: str, queue: str) -> dict[str, Any]:
        """One queue of the app's, or Celery's default: a producer's
        ``delay()`` sends there even when no worker consumes it."""
        app_obj = await self._decls.get_app(app)
        if queue != DEFAULT_QUEUE and queue not in self.app_queues(app_obj):
            raise NotFound(
                f"app {app!r} has no queue {queue!r} (none declared, consumed by an "
                f"instance or in its defaults; Celery's default {DEFAULT_QUEUE!r} is read "
                "always)"
            )
        (depth,), _ = await self.read(app_obj, [queue])
        return depth.to_wire()

    async def app_depth(self, app: str) -> list[dict[str, Any]]:
        """Every queue of the app's, and Celery's default when it holds
        messages (tasks sent with no queue that no worker of the app takes)."""
        app_obj = await self._decls.get_app(app)
        queues = self.app_queues(app_obj)
        extra = [] if DEFAULT_QUEUE in queues else [DEFAULT_QUEUE]
        depths, _ = await self.read(app_obj, [*queues, *extra])
        shown = [d for d in depths if d.queue in queues or d.ready or d.in_flight]
        return [d.to_wire() for d in sorted(shown, key=lambda d: d.queue)]

    async def read(
        self, app: App, queues: Sequence[str], *, pools: bool = False
    ) -> tuple[list[Depth], list[_Held]]:
        """One depth per queue, and what each running worker holds (with its
        pool size if ``pools``)."""
        broker = self._workers.broker(app)
        specs = [s for s in self._celery_specs(app.name) if self._engine.running(s.name)]
        reading, held = await asyncio.gather(
            self.reader.read(broker, queues),
            asyncio.gather(*(self._held(app, s, pools) for s in specs)),
        )
        return self._combine(reading, list(held), queues), list(held)

    async def _held(self, app: App, spec: InstanceSpec, pools: bool) -> _Held:
        w = self._workers.worker(spec)
        consumed = spec.queues or (DEFAULT_QUEUE,)
        calls = [self._workers.ops.call(w, "active"), self._workers.ops.call(w, "reserved")]
        if pools:
            calls.append(self._workers.ops.stats(w))
        replies = await asyncio.gather(*calls, return_exceptions=True)
        active, reserved = (r if isinstance(r, dict) else None for r in replies[:2])
        routing = {
            q.name: q.routing_key or q.name for q in self._decls.queue_decls(app.name).values()
        }
        held, running = in_flight(active, reserved, consumed, routing)
        stats = replies[2] if pools and isinstance(replies[2], dict) else None
        answered = active is not None and reserved is not None
        return _Held(
            spec,
            tuple(consumed),
            held,
            running,
            pool_size(stats),
            pool_counted(stats),
            answered=answered,
        )

    def _combine(
        self, reading: BrokerReading, held: list[_Held], queues: Sequence[str]
    ) -> list[Depth]:
        at = self._clock.wall()
        out = []
        for q in queues:
            broker = reading.queues.get(q)
            ours = sum(1 for h in held if q in h.queues)
            consumers = broker.consumers if broker and broker.consumers is not None else ours
            out.append(
                Depth(
                    queue=q,
                    ready=broker.ready if broker else 0,
                    in_flight=sum(h.held.get(q, 0) for h in held),
                    consumers=consumers,
                    at=at,
                    running=sum(h.running.get(q, 0) for h in held),
                    unacked=reading.unacked,
                    unanswered=sum(1 for h in held if q in h.queues and not h.answered),
                )
            )
        return out


@dataclass(frozen=True)
class ScaleView:
    """The last poll of an app's policy, for views and tests."""

    depth: Depth
    target: int
    pools: dict[str, int | None]


def _dispatching(held: _Held) -> bool:
    """The worker holds tasks it has not started yet (reserved, not active)."""
    return sum(held.held.values()) > sum(held.running.values())


def _exiting(held: _Held) -> bool:
    """Processes an earlier shrink terminated are still in the pool's list."""
    return held.pool is not None and held.counted is not None and held.pool > held.counted


class DepthScaler:
    """The polling loop; ``step()`` is one poll of every app with a policy."""

    def __init__(
        self,
        depth: DepthService,
        runtime: CeleryRuntime,
        declarations: Declarations,
        scheduler: Scheduler,
        *,
        interval: float = 2.0,
    ) -> None:
        self._depth = depth
        self._runtime = runtime
        self._decls = declarations
        self._sched = scheduler
        self.interval = interval
        self._states: dict[str, scaling.ScaleState] = {}
        self.last: dict[str, ScaleView] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing: dict[str, str] = {}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    def known_depths(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The depth each app's policy read at its last poll (the metrics show it)."""
        return {
            (app, view.depth.queue): {
                "ready": view.depth.ready,
                "in_flight": view.depth.in_flight,
                "consumers": view.depth.consumers,
            }
            for app, view in self.last.items()
        }

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            await self.step()
            await self._sched.sleep(self.interval)

    async def step(self) -> None:
        apps = [a for a in await self._decls.list_apps() if a.celery.scale is not None]
        for gone in set(self._states) - {a.name for a in apps}:
            self._states.pop(gone, None)
            self.last.pop(gone, None)
        for app in apps:
            try:
                await self._scale(app)
            except Exception as exc:  # a broker down, a worker that does not answer
                cause = str(exc)
                if self._failing.get(app.name) != cause:  # said once per cause
                    log.warning("cannot scale app %s on depth: %s", app.name, cause)
                self._failing[app.name] = cause
            else:
                if self._failing.pop(app.name, None) is not None:
                    log.info("scaling app %s on depth works again", app.name)

    async def _scale(self, app: App) -> None:
        policy = app.celery.scale
        assert policy is not None
        (depth,), held = await self._depth.read(app, [policy.on], pools=True)
        now = self._sched.clock.monotonic()
        reading = scaling.Reading(depth.ready, depth.in_flight, depth.running)
        before = self._states.get(app.name, scaling.ScaleState())
        state = scaling.step(before, reading, policy, now)
        # a worker that did not answer may hold tasks this reading missed: it
        # may raise the target, never lower it
        lower = (state.target or 0) < (before.target or 0)
        if depth.unanswered and lower:
            state = before
        self._states[app.name] = state
        assert state.target is not None
        log.debug(
            "%s: %s ready %d, in flight %d (running %d): target %d, pools %s",
            app.name,
            policy.on,
            depth.ready,
            depth.in_flight,
            depth.running,
            state.target,
            {h.spec.name: h.pool for h in held},
        )
        # a worker with a fixed --concurrency has no autoscaler to drive (it
        # would need a restart): left as it is
        drive = [
            h
            for h in held
            if policy.on in h.queues and effective_autoscale(app, h.spec) is not None
        ]
        drive.sort(key=lambda h: h.spec.name)
        for h, (low, high) in zip(
            drive, scaling.ranges(state.target, policy.min, len(drive)), strict=True
        ):
            declared = effective_autoscale(app, h.spec)
            # a busy process outlives a shrink: ask again until the pool has come down
            settled = h.pool is None or h.pool <= high
            if declared is not None and (declared.min, declared.max) == (low, high) and settled:
                continue
            if declared is not None and high < declared.max and _dispatching(h):
                # billiard's shrink takes the processes it sees idle, and a
                # process being handed a reserved task still looks idle: it
                # would be killed with that task (WorkerLostError, as under
                # Celery's own autoscaler). Shrink once nothing waits.
                continue
            if declared is not None and high <= declared.max and _exiting(h):
                # A terminated process stays in billiard's list until it is
                # reaped (a second or so after its TERM), and its shrink takes
                # processes from that list: a second shrink meanwhile can pick
                # the exiting one again and count it twice, and the pool then
                # keeps a process more than it counts, for good (the next
                # asks see the count at the max and shrink nothing). Wait
                # until the list and the count agree.
                continue
            try:
                await self._runtime.set_autoscale(app.name, h.spec.name, low, high)
            except BranchdError as exc:
                log.info("%s/%s: autoscale %d not applied: %s", app.name, h.spec.name, high, exc)
        self.last[app.name] = ScaleView(depth, state.target, {h.spec.name: h.pool for h in held})
