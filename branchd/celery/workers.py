"""Celery workers under supervision: readiness, warm stop, health, reconcile.

The manager owns the state machines; this service owns the conversations
with the workers (over ``CeleryOps``) and reports back to the manager as
machine events (``Ready``, ``Hung``). Every loop here logs and carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from branchd.celery import drain, stall
from branchd.celery import limits as task_limits
from branchd.celery.broker import (
    BrokerSpec,
    backend_for,
    clear_node_leftovers,
    ensure_results_dir,
    hook_dir,
    prune_dead_fanout,
    remove_embedded,
)
from branchd.celery.depth import DepthReader, KombuDepthReader
from branchd.celery.ops import (
    CeleryOps,
    Worker,
    broker_for,
    check_broker,
    command_for,
    effective_autoscale,
    env_for,
    node_name,
    pool_size,
    producer_config,
    producer_env,
    python_for,
    start_bindings,
)
from branchd.celery.ready import DepthReadyCounter, ReadyCounter
from branchd.clock import Scheduler, deadline, wait_first
from branchd.config import CelerySection
from branchd.errors import BranchdError, BrokerMisconfigured, BrokerUnavailable, NotFound
from branchd.model import App, InstanceSpec, Limits, Queue, State
from branchd.process import health
from branchd.process.launcher import Launcher
from branchd.process.machine import Drained, Event, Hung, Proc, Ready

log = logging.getLogger(__name__)

#: How long the app's interpreter may take to say its Celery version.
VERSION_TIMEOUT = 10.0



class Host(Protocol):
    """What the workers service needs from the manager."""

    def feed(self, name: str, event: Event) -> None: ...
    def proc(self, name: str) -> Proc | None: ...
    def spec(self, name: str) -> InstanceSpec | None: ...
    def app(self, name: str) -> App | None: ...
    def queue_decls(self, app: str) -> dict[str, Queue]: ...
    def celery_instances(self) -> list[InstanceSpec]: ...


class RunningElsewhere(Protocol):
    """How many of an app's Celery workers run on the other branches."""

    def running_elsewhere(self, app: str) -> int: ...


class _NoneElsewhere:
    """A cluster of one: nowhere else."""

    def running_elsewhere(self, app: str) -> int:
        return 0


class _Unbound:
    """No engine yet: every lookup finds nothing."""

    def feed(self, name: str, event: Event) -> None:
        pass

    def proc(self, name: str) -> Proc | None:
        return None

    def spec(self, name: str) -> InstanceSpec | None:
        return None

    def app(self, name: str) -> App | None:
        return None

    def queue_decls(self, app: str) -> dict[str, Queue]:
        return {}

    def celery_instances(self) -> list[InstanceSpec]:
        return []


class Workers:
    def __init__(
        self,
        ops: CeleryOps,
        launcher: Launcher,
        state_dir: Path,
        hostname: str,
        *,
        settings: CelerySection,
        scheduler: Scheduler,
        ready: ReadyCounter | None = None,
        depth: DepthReader | None = None,
    ) -> None:
        self._host: Host = _Unbound()
        self._sched = scheduler
        self._clock = scheduler.clock
        self.ops = ops
        self._launcher = launcher
        self._state_dir = state_dir
        self._hostname = hostname
        self._settings = settings
        #: The worker-side loader's folder, installed once (views build commands often).
        self._hook = hook_dir(state_dir)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watch: dict[str, health.Watch] = {}
        self._started: dict[str, Worker] = {}
        #: The argv each worker was last started with (what `ps` shows).
        self._argv: dict[str, tuple[str, ...]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._prune_failures: dict[BrokerSpec, str] = {}
        self._loop_task: asyncio.Task[None] | None = None
        #: When the health loop's next round also sweeps (reconcile, prune).
        self._next_sweep: float | None = None
        #: Ready messages of the workers' queues, for the stall check.
        self._ready: ReadyCounter = ready or DepthReadyCounter(
            self.broker, depth or KombuDepthReader()
        )
        self._stalls: dict[str, stall.StallWatch] = {}
        #: Our connections to each worker's broker, as counted at its last round.
        self._connects_seen: dict[str, int] = {}
        #: When each worker is looked at for a stall next (monotonic).
        self._next_stall_look: dict[str, float] = {}
        #: The Celery version of each interpreter, asked once (None: unknown).
        self._versions: dict[str, tuple[int, ...] | None] = {}
        #: Each worker's last figures (active, processed, pool_size), from
        #: the last stats asked of it: the metrics read these, never the worker.
        self._figures: dict[str, dict[str, int | None]] = {}
        #: Set by the first metrics scrape: from then on each sweep asks every
        #: running worker's stats too (two calls a worker a reconcile interval).
        self.figures_wanted = False
        #: How many of an app's workers run on the other branches (a cluster
        #: of one: none); an app's rate is split over them and ours.
        self._elsewhere: RunningElsewhere = _NoneElsewhere()
        #: Closed: a declaration changed after it starts no reconcile.
        self._closed = False

    def bind(self, host: Host) -> None:
        """The engine that owns the machines (it binds itself as it is built)."""
        self._host = host

    def count_elsewhere(self, elsewhere: RunningElsewhere) -> None:
        """Where to ask how many of an app's workers run on the other branches
        (the cluster, as the daemon wires it). Call ``resplit`` when it changes."""
        self._elsewhere = elsewhere

    # worker identity ----------------------------------------------------------

    def worker(self, spec: InstanceSpec) -> Worker:
        """How to reach the instance's worker: the broker it was started with
        (an app's broker may have changed since), else the app's current one."""
        started = self._started.get(spec.name)
        if started is not None:
            return started
        app = self._host.app(spec.app)
        if app is None:
            raise NotFound(f"no app {spec.app!r}")
        return Worker(node_name(spec.name, self._hostname), self.broker(app))

    def broker(self, app: App) -> BrokerSpec:
        return broker_for(app, self._state_dir, self._hook)

    def remember_argv(self, name: str, argv: tuple[str, ...]) -> None:
        """The argv of an adopted worker (as the kernel has it), for its view."""
        if argv:
            self._argv[name] = argv

    async def worker_stats(self, spec: InstanceSpec) -> dict[str, Any]:
        """What a running worker says of itself (its part of an instance's stats)."""
        w = self.worker(spec)
        stats, active = await asyncio.gather(
            self.ops.stats(w), self.ops.call(w, "active"), return_exceptions=True
        )
        stats = stats if isinstance(stats, dict) else None
        out = {
            "node": w.node,
            "pool_size": pool_size(stats),
            "stats": stats,
            "active": _unwrap(active) if isinstance(active, dict) else None,
        }
        self._figures[spec.name] = figures_of(out)
        return out

    def figures(self) -> dict[tuple[str, str], dict[str, int | None]]:
        """The last figures of each running worker, by (app, name)."""
        out = {}
        for spec in self._host.celery_instances():
            proc = self._host.proc(spec.name)
            known = self._figures.get(spec.name)
            if known is not None and proc is not None and proc.state == State.RUNNING:
                out[(spec.app, spec.name)] = known
        return out

    def remove_embedded(self, app: str) -> None:
        """Forget a deleted app's embedded broker folders and result store."""
        remove_embedded(self._state_dir, app)

    def result_backend(self, app: App) -> str | None:
        return backend_for(app, self._state_dir)

    def producer_setup(self, app: App) -> dict[str, Any]:
        """What a producer or Celery's CLI needs to talk to the app's workers."""
        broker, backend = self.broker(app), self.result_backend(app)
        decls = self._host.queue_decls(app.name)
        if not app.celery.result_backend:
            # the default store is ours, in the state dir: a producer needs it to exist
            ensure_results_dir(backend)
        return {
            "app": app.name,
            "celery_app": app.celery.celery_app,
            "python": python_for(app),
            "cwd": app.defaults.get("cwd"),
            "config": producer_config(broker, backend, decls),
            "env": producer_env(broker, backend, decls, self._hook),
        }

    def command(self, spec: InstanceSpec, live: bool = False) -> tuple[str, ...]:
        """The argv the worker runs (``live``: the one it was started with, even
        if its app changed since), else would run; () if the app cannot build one."""
        if live and spec.name in self._argv:
            return self._argv[spec.name]
        app = self._host.app(spec.app)
        if app is None:
            return ()
        try:
            # what its next start will run: the app as it is now
            return tuple(command_for(app, spec, self.node(spec)))
        except BranchdError:
            return ()

    def _pool(self, spec: InstanceSpec) -> str:
        app = self._host.app(spec.app)
        return spec.pool or (app.celery.pool if app else "prefork")

    def node(self, spec: InstanceSpec) -> str:
        return node_name(spec.name, self._hostname)

    def prepare_spawn(
        self, spec: InstanceSpec, env: dict[str, str]
    ) -> tuple[tuple[str, ...], dict[str, str]]:
        """argv and environment of a worker about to start; raises Invalid."""
        app = self._host.app(spec.app)
        if app is None:
            raise NotFound(f"no app {spec.app!r}")
        check_broker(app)
        w = Worker(node_name(spec.name, self._hostname), self.broker(app))
        backend = self.result_backend(app)
        argv = command_for(app, spec, w.node)
        ensure_results_dir(backend)
        self._started[spec.name] = w
        self._argv[spec.name] = tuple(argv)
        # The filesystem transport replays a node's old control messages (an
        # old shutdown!) to its next run unless they are cleared first.
        clear_node_leftovers(w.broker, w.node)
        bindings = start_bindings(spec.queues, self._host.queue_decls(spec.app))
        # Its per-task limits from its first task (a remote time_limit is not
        # used by a running Celery 5.7 consumer); its share of the app's rates
        # counts it among the app's running workers, here and elsewhere.
        others = [s for s in self._running_of(spec.app) if s.name != spec.name]
        workers = len(others) + 1 + self._elsewhere.running_elsewhere(spec.app)
        tasks = task_limits.worker_tasks(app.celery.limits, spec.limits, workers)
        annotations = {name: t.to_wire() for name, t in tasks.items()}
        return tuple(argv), env_for(w.broker, env, bindings, self._hook, backend, annotations)

    # limits ---------------------------------------------------------------------

    async def celery_version(self, app: App) -> tuple[int, ...] | None:
        """The Celery version of the app's interpreter (None: it could not say)."""
        python = python_for(app)
        if python not in self._versions:
            self._versions[python] = await _ask_version(python)
        return self._versions[python]

    async def check_limits(self, app: App, spec: InstanceSpec | None = None) -> None:
        """Raise Invalid (422) if the limits of the app (and of the instance
        ``spec`` of it) break a rule of its pool or of its Celery version."""
        own = spec.limits if spec is not None else Limits()
        merged = task_limits.merged(app.celery.limits, own)
        pool = (spec.pool if spec is not None else None) or app.celery.pool
        version = await self.celery_version(app) if merged.disable_prefetch else None
        if spec is None:
            task_limits.check(merged, pool, celery_version=version)
        else:  # (its messages say which side of a clash is the app's)
            task_limits.check_worker(app.celery.limits, own, pool, celery_version=version)

    def _running_of(self, app: str) -> list[InstanceSpec]:
        specs = [s for s in self._host.celery_instances() if s.app == app]
        return [s for s in specs if (p := self._host.proc(s.name)) and p.state == State.RUNNING]

    def redeclared(self, app_name: str, name: str | None = None) -> None:
        """The declaration of an app (``name`` None: each of its running
        workers) or of its instance ``name`` changed, here or on another
        branch: its per-task limits, autoscale range or queues reach the
        running workers now, not at the next sweep (``reconcile_interval``)."""
        if self._closed:
            return
        for spec in self._running_of(app_name):
            if name is None or spec.name == name:
                self._spawn_task(self._reconcile(spec.name))

    def resplit(self, app_name: str) -> None:
        """The count of the app's workers running elsewhere changed: each of
        ours has a new share of the app's rate limits."""
        self._resplit(app_name, skip="")

    def _resplit(self, app_name: str, skip: str) -> None:
        """A worker of the app started or stops: the others' share of the
        app's rate limits changes (total / N), so bring them in line now."""
        app = self._host.app(app_name)
        if app is None or not any(t.rate_limit for t in app.celery.limits.task_overrides.values()):
            return
        for other in self._running_of(app_name):
            if other.name != skip:
                self._spawn_task(self._reconcile(other.name))

    # lifecycle hooks ------------------------------------------------------------

    def spawned(self, name: str, pid: int) -> None:
        self._spawn_task(self._await_ready(name, pid))

    def adopted(self, name: str) -> None:
        self._spawn_task(self._reconcile(name))

    def stop(self, spec: InstanceSpec, pid: int, signum: int) -> None:
        """Warm stop: no new tasks, TERM to the main process, a ping to wake it."""
        self._spawn_task(self._warm_stop(spec, pid, signum))
        self._resplit(spec.app, skip=spec.name)  # (it is stopping: no longer counted)

    def start(self) -> None:
        self._next_sweep = self._clock.monotonic() + self._settings.reconcile_interval
        self._loop_task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        self._closed = True
        if self._loop_task:
            self._loop_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._loop_task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await self.ops.remote.close()
        await asyncio.to_thread(self._ready.close)

    # internals --------------------------------------------------------------------

    def _spawn_task(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker task failed", exc_info=task.exception())

    def _current(self, name: str, pid: int, state: State) -> bool:
        proc = self._host.proc(name)
        return proc is not None and proc.pid == pid and proc.state == state

    async def _await_ready(self, name: str, pid: int) -> None:
        """Re-send pings until the new worker answers (a ping sent before its
        control queue exists is lost), then bring it in line with its declaration."""
        spec = self._host.spec(name)
        if spec is None:
            return
        w = self.worker(spec)
        clock = self._clock
        began = clock.monotonic()
        # A broker we cannot even publish to: say so well before the startsecs
        # deadline, whose own kill would only say "no answer to ping".
        startsecs = spec.policy.startsecs
        unreachable_after = min(startsecs / 2, 10.0) if startsecs > 0 else 10.0
        # Pings overlap: a new one every ready_ping_every, each waiting up to
        # a second for its answer, so that a worker is seen within a few ms of
        # binding its control queue (a ping sent before that is dropped).
        pending: set[asyncio.Task[bool]] = set()
        next_ping = clock.monotonic()
        try:
            while self._current(name, pid, State.STARTING):
                if clock.monotonic() >= next_ping:
                    pending.add(asyncio.create_task(self.ops.ping(w, timeout=1.0)))
                    next_ping = clock.monotonic() + self._settings.ready_ping_every
                # Wake on an answer or at the next ping, never sooner: a remote
                # control that says "no reply" at once must not make a ping storm.
                done = await wait_first(self._sched, pending, next_ping)
                pending -= done
                failure: BrokerUnavailable | None = None
                answered = False
                for task in done:
                    exc = task.exception()
                    if isinstance(exc, BrokerUnavailable):
                        failure = exc
                    elif exc is None and task.result():
                        answered = True
                if answered and self._current(name, pid, State.STARTING):
                    self._watch[name] = health.Watch(last_pong=clock.monotonic())
                    self._stalls.pop(name, None)  # a new worker: its stall clock starts anew
                    self._host.feed(name, Ready())
                    await self._reconcile(name)
                    self._resplit(spec.app, skip=name)
                    return
                if failure is not None:
                    if clock.monotonic() - began > unreachable_after:
                        # a transport we cannot load is no outage: say what it is
                        why = (
                            "cannot use the broker"
                            if isinstance(failure, BrokerMisconfigured)
                            else "cannot reach the broker"
                        )
                        self._host.feed(name, Hung(f"{why}: {failure.message}"))
                        return
                    await self._sched.sleep(0.25)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _warm_stop(self, spec: InstanceSpec, pid: int, signum: int) -> None:
        w = self.worker(spec)
        # No new tasks: cancel its consumers, all at once and briefly, since the
        # stop's clock (stopwaitsecs) is already running. (A worker on Celery's
        # default queues has none declared: TERM alone stops its consuming.)
        casts = [
            self.ops.remote.cast(w.broker, w.node, "cancel_consumer", {"queue": queue})
            for queue in spec.queues
        ]
        until = self._clock.monotonic() + self._settings.warm_stop_cancel_wait
        with contextlib.suppress(BrokerUnavailable, TimeoutError):
            async with deadline(self._sched, until):
                await asyncio.gather(*casts)
        if spec.queues:
            # Then its running and prefetched tasks finish before the TERM, up
            # to the stop's time less the warm shutdown's grace. (Without
            # declared queues it still consumes Celery's default: TERM at once.)
            await self._drain(spec, w, pid)
        if not self._current(spec.name, pid, State.STOPPING):
            log.debug("%s: gone before its warm stop's signal", spec.name)
            return  # it exited (or was killed) meanwhile: that pid is not ours now
        log.debug("%s: signal %d to pid %d (warm stop)", spec.name, signum, pid)
        self._launcher.signal(pid, signum, False)
        # An idle worker notices TERM only when its loop wakes (1-10 s): a ping wakes it.
        with contextlib.suppress(BrokerUnavailable, TimeoutError):
            async with deadline(self._sched, self._clock.monotonic() + 1.0):
                await self.ops.remote.cast(w.broker, w.node, "ping")

    async def _drain(self, spec: InstanceSpec, w: Worker, pid: int) -> None:
        """Wait until the stopping worker runs and holds no task (then the
        machine hears ``Drained``), its time is up, or it cannot be seen."""
        proc = self._host.proc(spec.name)
        term_at = drain.term_due(
            proc.deadline if proc else None,
            self._clock.monotonic(),
            spec.policy.stopwaitsecs,
            self._settings.drain_term_grace,
        )
        while self._current(spec.name, pid, State.STOPPING):
            try:
                active, reserved = await asyncio.gather(
                    self.ops.call(w, "active"), self.ops.call(w, "reserved")
                )
            except BrokerUnavailable:
                return
            got = drain.next_step(
                drain.task_count(active),
                drain.task_count(reserved),
                self._clock.monotonic(),
                term_at,
            )
            if got is drain.DrainStep.DRAINED:
                self._host.feed(spec.name, Drained())
                return
            if got is drain.DrainStep.TERM:
                log.info("%s: TERM with its tasks still running (drain over)", spec.name)
                return
            await self._sched.sleep(drain.DRAIN_POLL)

    def lock(self, name: str) -> asyncio.Lock:
        """One runtime change of an instance at a time (API call or reconcile):
        a reconcile that read the declaration before a change must not undo it."""
        return self._locks.setdefault(name, asyncio.Lock())

    async def _reconcile(self, name: str) -> bool:
        """Bring the worker in line with its declaration; False if it could not be."""
        async with self.lock(name):
            return await self._reconcile_locked(name)

    async def _reconcile_locked(self, name: str) -> bool:
        spec = self._host.spec(name)
        app = self._host.app(spec.app) if spec else None
        if spec is None or app is None:
            return True
        proc = self._host.proc(name)
        if proc is None or proc.state != State.RUNNING:
            return True
        try:
            changes = await self.ops.reconcile(
                self.worker(spec),
                spec.queues,
                self._host.queue_decls(spec.app),
                effective_autoscale(app, spec),
            )
            workers = len(self._running_of(spec.app))
            workers += self._elsewhere.running_elsewhere(spec.app)
            wanted = task_limits.worker_tasks(app.celery.limits, spec.limits, workers)
            changes += await self.ops.task_limits(self.worker(spec), wanted)
        except (BranchdError, BrokerUnavailable) as exc:
            log.warning("reconcile of %s failed: %s", name, exc)
            return False
        if changes:
            log.info("reconciled %s: %s", name, " ".join(changes))
        return True

    async def _health_loop(self) -> None:
        while True:
            await self._sched.sleep(self._settings.health_interval)
            try:
                await self.run_once()
            except Exception:
                log.exception("health check failed")

    async def run_once(self) -> None:
        """One step of the health loop: a round of pings, with a sweep (every
        worker reconciled, dead nodes pruned) once per reconcile interval."""
        now = self._clock.monotonic()
        if self._next_sweep is None:  # never started: the first sweep is one interval away
            self._next_sweep = now + self._settings.reconcile_interval
        sweep = now >= self._next_sweep
        if sweep:
            self._next_sweep = now + self._settings.reconcile_interval
        await self.check_all(sweep=sweep)

    async def check_all(self, *, sweep: bool = False) -> None:
        """One round of pings (and memory checks) over every running worker."""
        running = [
            s
            for s in self._host.celery_instances()
            if (p := self._host.proc(s.name)) is not None and p.state == State.RUNNING
        ]
        await asyncio.gather(*(self._check(s, sweep) for s in running))
        if sweep:
            await self._prune_fanout()

    async def _check(self, spec: InstanceSpec, sweep: bool) -> None:
        name = spec.name
        proc = self._host.proc(name)
        if proc is None or proc.pid is None:
            return
        pid = proc.pid
        now = self._clock.monotonic()
        if spec.memory_limit:
            too_big = health.over_memory(
                self._launcher.tree_stats(pid).memory_rss, spec.memory_limit
            )
            if too_big:
                self._host.feed(name, Hung(too_big))
                return
        try:
            answered = await self.ops.ping(self.worker(spec))
            ping = health.Ping.ANSWERED if answered else health.Ping.SILENT
        except BrokerUnavailable:
            ping = health.Ping.BROKER_DOWN
        if ping != health.Ping.BROKER_DOWN and not self._current(name, pid, State.RUNNING):
            return
        watch = self._watch.get(name, health.Watch())
        if self._reconnected(spec):
            # The broker was away, however briefly: the worker may be back
            # without the consumers it was given at runtime (celery#987).
            watch = replace(watch, silent=True)
        verdict = health.decide(
            watch,
            ping,
            now,
            hung_after=spec.hung_after,
            solo=self._pool(spec) == "solo",
            sweep=sweep,
        )
        self._watch[name] = verdict.watch
        if verdict.kill:
            self._host.feed(name, Hung(verdict.kill))
            return
        if verdict.reconcile and not await self._reconcile(name):
            # not done (no answer, a refusal): again at the next answered ping
            self._watch[name] = replace(verdict.watch, silent=True)
        if sweep and self.figures_wanted and ping == health.Ping.ANSWERED:
            await self.worker_stats(spec)  # (cached for the metrics)
        if ping == health.Ping.ANSWERED:
            await self._stall_check(spec, pid)

    def _reconnected(self, spec: InstanceSpec) -> bool:
        """Whether our connection to the worker's broker was made anew since
        this worker's last round (the first round only notes the count)."""
        broker = self.worker(spec).broker
        now = self.ops.remote.connects(broker)
        seen = self._connects_seen.get(spec.name)
        self._connects_seen[spec.name] = now
        return seen is not None and seen != now

    async def _stall_check(self, spec: InstanceSpec, pid: int) -> None:
        """Restart a worker that answers pings but takes no work while work
        waits in its queues (``stall_after``; looked at ten times in that span)."""
        stall_after = self._settings.stall_after
        app = self._host.app(spec.app)
        now = self._clock.monotonic()
        if stall_after <= 0 or not spec.queues or app is None:
            return
        if now < self._next_stall_look.get(spec.name, now):
            return
        self._next_stall_look[spec.name] = now + stall_after / 10
        counts = await asyncio.gather(*(self._ready.ready(app, q) for q in spec.queues))
        ready = dict(zip(spec.queues, counts, strict=True))
        look = stall.Look(ready)
        if any(ready.values()):  # (asked only when work waits: the worker is seen cheaply)
            w = self.worker(spec)
            try:
                stats, active, reserved = await asyncio.gather(
                    self.ops.stats(w), self.ops.call(w, "active"), self.ops.call(w, "reserved")
                )
            except BrokerUnavailable:
                return
            tasks = [drain.task_count(active), drain.task_count(reserved)]
            busy = None if None in tasks else any(tasks)
            look = stall.Look(ready, taken=stall.taken_total(stats), busy=busy)
        before = self._stalls.get(spec.name, stall.StallWatch())
        watch, why = stall.decide(before, look, self._clock.monotonic(), stall_after)
        self._stalls[spec.name] = watch
        if why and self._current(spec.name, pid, State.RUNNING):
            log.warning("%s: %s", spec.name, why)
            self._host.feed(spec.name, Hung(why))

    async def _prune_fanout(self) -> None:
        by_broker: dict[BrokerSpec, list[str]] = {}
        for spec in self._host.celery_instances():
            app = self._host.app(spec.app)
            if app is None:
                continue
            proc = self._host.proc(spec.name)
            nodes = by_broker.setdefault(self.broker(app), [])
            if proc is not None and proc.pid is not None:
                nodes.append(self.node(spec))
        # Each broker on its own: one that fails must not stop the others.
        for broker, nodes in by_broker.items():
            try:
                # File locks shared with the workers: off the event loop.
                await asyncio.to_thread(prune_dead_fanout, broker, nodes)
            except Exception as exc:
                cause = f"{type(exc).__name__}: {exc}"
                if self._prune_failures.get(broker) != cause:  # said once per cause
                    log.warning("cannot prune dead nodes on %s: %s", broker.redacted(), cause)
                self._prune_failures[broker] = cause
            else:
                if self._prune_failures.pop(broker, None) is not None:
                    log.info("pruning dead nodes on %s works again", broker.redacted())


async def _ask_version(python: str) -> tuple[int, ...] | None:
    """Ask an interpreter for its Celery version (without importing celery in it)."""
    code = "import importlib.metadata as m; print(m.version('celery'))"
    try:
        proc = await asyncio.create_subprocess_exec(
            python,
            "-c",
            code,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), VERSION_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    if proc.returncode != 0:
        return None
    return task_limits.parse_version(out.decode(errors="replace"))


def figures_of(stats: Mapping[str, Any]) -> dict[str, int | None]:
    """What the metrics show of a worker's stats (``worker_stats``'s answer)."""
    active = stats.get("active")
    totals = (stats.get("stats") or {}).get("total")
    processed = None
    if isinstance(totals, dict):
        processed = sum(n for n in totals.values() if isinstance(n, int))
    return {
        "active": len(active) if isinstance(active, list) else None,
        "processed": processed,
        "pool_size": stats.get("pool_size"),
    }


def _unwrap(reply: dict[str, Any]) -> Any:
    """Inspect replies that are not objects arrive wrapped as {"ok": ...}."""
    return reply.get("ok", reply) if set(reply) == {"ok"} else reply
