"""``drain --move``: a draining branch's instances, made again elsewhere one
at a time, each new one running before the old one stops.

For each instance this branch holds, in name order:

1. a branch is picked for it as for a new instance (``placement.pick``
   among the other live branches, on what it declares it needs), and its
   declaration is created there under its own name (``specs.creation_fields``:
   every field as it has it now; a stopped one is made stopped);
2. once the new one is running there (as its own ``startsecs`` and probes
   say: a Celery worker answers a ping), this branch stops and removes its
   own, with the same stop as a delete (a worker finishes its tasks);
3. a new one that does not get running (fatal, or not in time) is removed
   there again, and the old one stays: the move of that one failed, and the
   rest go on.

While both exist the name is held by two branches; the names' collision
rule would keep the new one (its branch does not drain) and the move itself
removes the old one, so the rule leaves a copy being moved alone
(``Holdings.moving``). An instance of an app on this branch's embedded
broker cannot move (its workers and producers share this machine's folder):
it is reported and stays. An undrain stops the move after the instance under
way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from branchd.api.backend import Local
from branchd.api.proxy import HttpForwarder, Placing
from branchd.clock import Scheduler
from branchd.errors import BranchdError, Conflict, Full, Invalid
from branchd.model import Desired, State
from branchd.placement import pick
from branchd.process.specs import creation_fields
from branchd.views import BranchRecord, need_for

log = logging.getLogger(__name__)

#: How often the new copy's state is looked at while it starts (s).
POLL = 0.25
#: How long a new copy may take to get running, past its own startsecs (s).
START_GRACE = 30.0


class Moving(Protocol):
    """The set of ``app/name`` being moved away (``local.Holdings``)."""

    moving_away: set[str]


@dataclass
class MoveStatus:
    """Where a move stands (``GET /v1/branches/{id}/drain``)."""

    #: moving, done, or stopped (an undrain ended it).
    state: str = "moving"
    #: ``app/name`` not moved yet, the one under way first.
    left: list[str] = field(default_factory=list)
    moved: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "left": list(self.left),
            "moved": list(self.moved),
            "failed": list(self.failed),
        }


class Mover:
    def __init__(
        self,
        forwarder: HttpForwarder,
        peers: Placing,
        local: Local,
        moving: Moving,
        scheduler: Scheduler,
        *,
        draining: Callable[[], bool],
        rng: random.Random | None = None,
    ) -> None:
        self._fwd = forwarder
        self._peers = peers
        self._local = local
        self._moving = moving
        self._sched = scheduler
        self._draining = draining
        self._rng = rng or random.Random()
        self.status: MoveStatus | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> dict[str, Any]:
        """Begin moving this branch's instances away (or go on with the move
        under way); where it stands."""
        if self._task is None or self._task.done():
            self.status = MoveStatus()
            self._task = asyncio.ensure_future(self._run(self.status))
        assert self.status is not None
        return self.status.to_json()

    def current(self) -> dict[str, Any] | None:
        """Where the last move stands (None: none since the daemon started)."""
        return self.status.to_json() if self.status is not None else None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, status: MoveStatus) -> None:
        views = await self._local.instances.list_instances()
        status.left = sorted(f"{v.spec.app}/{v.spec.name}" for v in views)
        log.info("moving %d instance(s) off this branch", len(status.left))
        while status.left:
            if not self._draining():
                status.state = "stopped"
                log.info("undrained: the move stops (%d not moved)", len(status.left))
                return
            key = status.left[0]
            app, name = key.split("/", 1)
            try:
                to = await self.move(app, name)
            except asyncio.CancelledError:
                raise
            except BranchdError as exc:
                status.failed.append({"instance": key, "error": exc.message})
                log.warning("%s not moved: %s", key, exc.message)
            except Exception as exc:  # (a bug of ours must not end the move of the rest)
                status.failed.append({"instance": key, "error": f"{type(exc).__name__}: {exc}"})
                log.exception("%s not moved", key)
            else:
                status.moved.append({"instance": key, "to": to})
                log.info("%s moved to branch %s", key, to)
            status.left.pop(0)
        status.state = "done"

    async def move(self, app: str, name: str) -> str:
        """Make ``app/name`` again on another branch, then remove it here;
        the id of the branch it went to."""
        spec = (await self._local.instances.get_instance(app, name)).spec
        app_obj = await self._local.apps.get_app(app)
        if app_obj.celery.broker is None:
            raise Invalid(
                f"app {app!r} is on this branch's embedded broker: its instances run here "
                "(its workers and producers share this machine's folder)"
            )
        others = [r for r in self._peers.alive() if r.id != self._peers.self_id]
        order = pick(others, need_for(spec, app_obj), self._rng, app=app)
        key = f"{app}/{name}"
        self._moving.moving_away.add(key)
        try:
            to = await self._create(order, app, creation_fields(spec))
            if spec.desired == Desired.RUNNING:
                await self._until_running(to, app, name, spec.policy.startsecs + START_GRACE)
            await self._local.instances.delete_instance(app, name, wait=True)
        finally:
            self._moving.moving_away.discard(key)
        return to

    async def _create(
        self, order: tuple[BranchRecord, ...], app: str, body: dict[str, Any]
    ) -> str:
        tried = []
        path = f"/v1/apps/{app}/instances"
        for choice in order:
            status, answer = await self._fwd.own("POST", choice.id, path, body)
            if status == 201:
                return str(choice.id)
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            if status == 503 and error.get("code") == "full":
                tried.append(f"{choice.id} (full)")
                continue
            raise Conflict(
                f"branch {choice.id} did not take it: {status} {error.get('message', answer)}"
            )
        raise Full(f"no other branch has room for it (tried {', '.join(tried) or 'none'})")

    async def _until_running(self, to: str, app: str, name: str, within: float) -> None:
        path = f"/v1/apps/{app}/instances/{name}"
        clock = self._sched.clock
        until = clock.monotonic() + within
        state, reason = "unknown", ""
        while clock.monotonic() < until:
            status, got = await self._fwd.own("GET", to, path)
            if status == 200 and isinstance(got, dict):
                state, reason = str(got.get("state")), str(got.get("reason") or "")
                if state == State.RUNNING:
                    return
                if state in (State.FATAL, State.EXITED, State.STOPPED):
                    break
            await self._sched.sleep(POLL)
        with contextlib.suppress(BranchdError):  # (unreachable: its own branch owns it)
            await self._fwd.own("DELETE", to, path + "?wait=false")
        raise Invalid(
            f"its new copy on branch {to} did not get running ({state}"
            + (f": {reason}" if reason else "")
            + "): removed there again, this one stays"
        )

