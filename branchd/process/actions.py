"""An app's instances handled together: a count create (supervisord's
``numprocs``), and start, stop or restart of every instance of an app, all at
once or rolling (``process/groups.py`` holds the pure plan and verdicts).

Each instance goes through the engine's own start, stop or restart, so a
stop drains as it does alone (a celery worker's warm shutdown); this module
only orders them and waits, on the event bus, for each to get there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from branchd import events
from branchd.clock import Scheduler, deadline
from branchd.config import SupervisionSection
from branchd.errors import BranchdError, Conflict
from branchd.events import EventBus
from branchd.model import Action
from branchd.process.engine import Engine
from branchd.process.groups import (
    Item,
    Outcome,
    Wait,
    batches,
    expand_names,
    failure,
    halts,
    outcome,
)
from branchd.views import InstanceView

log = logging.getLogger(__name__)


class AppActions:
    """Count creates and app-wide actions of this branch's instances."""

    def __init__(
        self, engine: Engine, bus: EventBus, scheduler: Scheduler, settings: SupervisionSection
    ) -> None:
        self._engine = engine
        self._bus = bus
        self._sched = scheduler
        self._settings = settings
        #: Rolling actions under way (wait=false goes on here), by app.
        self._rolling: dict[str, asyncio.Task[list[Item]]] = {}

    # count creates --------------------------------------------------------

    async def create_instances(
        self, app: str, fields: Mapping[str, Any], count: int, template: str, start_at: int = 0
    ) -> list[InstanceView]:
        """``count`` instances of ``app`` from one set of fields, named by
        ``template``. All or nothing: every rule is checked (the names, that
        none is taken, the fields, by the first create) before the second is
        made; they differ by name alone."""
        names = expand_names(template, count, start_at)
        taken = [n for n in names if self._engine.spec(n) is not None]
        if taken:
            shown = ", ".join(f"{self._spec_app(n)}/{n}" for n in taken[:5])
            more = f" and {len(taken) - 5} more" if len(taken) > 5 else ""
            raise Conflict(
                f"instance name(s) taken: {shown}{more}: instance names are unique on a "
                "branch, across apps; nothing was created"
            )
        made: list[InstanceView] = []
        try:
            # (no await in here gives the loop away: no other request comes
            # between, and the spawns held meanwhile are launched together)
            with self._engine.spawning_together():
                for name in names:
                    made.append(await self._engine.create_instance(app, {**fields, "name": name}))
            made = [await self._engine.get_instance(app, v.spec.name) for v in made]
        except BranchdError as exc:
            if made:
                log.warning("count create of %s failed after %d: %s", app, len(made), exc.message)
            for view in made:  # all or nothing, even when the disk fills half-way
                with contextlib.suppress(BranchdError):
                    await self._engine.delete_instance(app, view.spec.name, wait=False)
            raise
        return made

    def _spec_app(self, name: str) -> str:
        spec = self._engine.spec(name)
        return spec.app if spec is not None else "?"

    # app actions ----------------------------------------------------------

    async def act(
        self, app: str, action: Action, *, rolling: bool = False, batch: int = 1, wait: bool = True
    ) -> list[Item]:
        """Start, stop or restart every instance of ``app`` on this branch:
        all at once, or rolling (``batch`` at a time, the next batch once the
        one before runs again; a batch that does not stops the roll, and the
        rest are ``skipped``). Answers each instance's outcome; without
        ``wait`` at once (a rolling one goes on in the background)."""
        views = await self._engine.list_instances(app)  # (NotFound: no such app)
        names = [v.spec.name for v in views]
        before = {v.spec.name: v for v in views}
        plan = batches(names, rolling, batch)
        if rolling:
            if app in self._rolling:
                raise Conflict(f"a rolling {action.value} of app {app!r} is under way")
            task = asyncio.create_task(self._roll(app, action, plan, before))
            self._rolling[app] = task
            task.add_done_callback(lambda t: self._rolled(app, t))
            if wait:
                return await asyncio.shield(task)
            return [Item(Outcome.PENDING, v) for v in views]
        return await self._batch(app, action, names, wait, before)

    def _rolled(self, app: str, task: asyncio.Task[list[Item]]) -> None:
        if self._rolling.get(app) is task:
            del self._rolling[app]
        if not task.cancelled() and task.exception() is not None:
            log.error("rolling action on %s failed", app, exc_info=task.exception())

    async def _roll(
        self, app: str, action: Action, plan: list[list[str]], before: Mapping[str, InstanceView]
    ) -> list[Item]:
        done: list[Item] = []
        for i, names in enumerate(plan):
            items = await self._batch(app, action, names, True, before)
            done += items
            if halts({it.view.spec.name: it.outcome for it in items}):
                bad = ", ".join(it.view.spec.name for it in items if it.outcome != Outcome.RUNNING)
                why = f"the rolling {action.value} stopped at batch {i + 1}: {bad} did not run"
                log.warning("%s: %s", app, why)
                for rest in plan[i + 1 :]:
                    done += [await self._item(app, n, Outcome.SKIPPED, why, before) for n in rest]
                break
        return done

    async def _batch(
        self,
        app: str,
        action: Action,
        names: list[str],
        wait: bool,
        before: Mapping[str, InstanceView],
    ) -> list[Item]:
        """Act on ``names`` at once; with ``wait``, until each got there or its
        time ran out."""
        errors: dict[str, str] = {}
        old: dict[str, int | None] = {}
        with self._bus.subscribe(lambda e: isinstance(e, events.InstanceChanged)) as changes:
            # (no await in here gives the loop away: the spawns the starts ask
            # for are held and launched together, see Engine.spawning_together)
            with self._engine.spawning_together():
                for name in names:
                    proc = self._engine.proc(name)
                    old[name] = proc.pid if proc is not None else None
                    try:
                        await self._one(app, name, action)
                    except BranchdError as exc:
                        errors[name] = exc.message
            results: dict[str, tuple[Outcome, str | None]] = {
                n: (Outcome.FAILED, e) for n, e in errors.items()
            }
            asked = [n for n in names if n not in errors]
            if wait:
                results.update(await self._settle(action, asked, old, changes))
            else:
                results.update((n, (Outcome.PENDING, None)) for n in asked)
        return [await self._item(app, n, *results[n], before) for n in names]

    async def _one(self, app: str, name: str, action: Action) -> None:
        engine = self._engine
        if action is Action.START:
            await engine.start_instance(app, name)
        elif action is Action.STOP:
            await engine.stop_instance(app, name, wait=False)
        else:
            await engine.restart_instance(app, name, wait=False)

    async def _settle(
        self,
        action: Action,
        names: list[str],
        old: Mapping[str, int | None],
        changes: events.Subscription,
    ) -> dict[str, tuple[Outcome, str | None]]:
        """Each instance's outcome once it has one (or its time ran out)."""
        clock = self._sched.clock
        limit = max((self._wait(n).limit(action) for n in names), default=0.0)
        end = clock.monotonic() + limit
        out: dict[str, tuple[Outcome, str | None]] = {}
        look = set(names)  # whose state to look at (at first all; then those that changed)
        dropped = changes.dropped
        while True:
            for name in names:
                if name in out or name not in look:
                    continue
                proc = self._engine.proc(name)
                if proc is None:
                    out[name] = (Outcome.FAILED, "deleted meanwhile")
                    continue
                got = outcome(action, proc.state, proc.pid, old.get(name))
                if got is not None:
                    why = failure(proc.state, proc.reason) if got is Outcome.FAILED else None
                    out[name] = (got, why)
            if len(out) == len(names):
                return out
            if clock.monotonic() >= end:
                break
            look = set()
            with contextlib.suppress(TimeoutError):
                async with deadline(self._sched, end):
                    look.add(_about(await changes.get()))
            while not changes.queue.empty():  # (the rest that came meanwhile, without waiting)
                look.add(_about(changes.queue.get_nowait()))
            if changes.dropped != dropped:  # some were lost: look at every one again
                look, dropped = set(names), changes.dropped
        for name in names:
            if name not in out:
                proc = self._engine.proc(name)
                state = proc.state.value if proc is not None else "gone"
                out[name] = (Outcome.TIMEOUT, f"still {state} after {limit:g}s; it goes on")
        return out

    def _wait(self, name: str) -> Wait:
        spec = self._engine.spec(name)
        policy = spec.policy if spec is not None else None
        start = 0.0
        if spec is not None and policy is not None:
            # its own start, and what it may wait for first (the instances it
            # starts after, a readiness probe)
            up = max(policy.startsecs, policy.ready_timeout if spec.ready else 0.0)
            start = up + (policy.after_timeout if spec.after else 0.0)
        return Wait(
            stopwaitsecs=policy.stopwaitsecs if policy else 0.0,
            startsecs=start,
            kill_grace=self._settings.kill_grace,
        )

    async def _item(
        self,
        app: str,
        name: str,
        got: Outcome,
        error: str | None,
        before: Mapping[str, InstanceView],
    ) -> Item:
        try:
            return Item(got, await self._engine.get_instance(app, name), error)
        except BranchdError:  # deleted during the action: as it was before
            return Item(Outcome.FAILED, before[name], error or "deleted during the action")

    async def close(self) -> None:
        """Rolling actions under way end here (the daemon goes)."""
        tasks = list(self._rolling.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _about(event: events.Event) -> str:
    """The instance an event is about ("" for any other)."""
    return str(getattr(event, "name", ""))
