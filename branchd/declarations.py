"""Declarations: apps and their queue declarations (validation, storage, the
embedded broker's rule).

This is what the cluster replicates: records a user declares, checked here
once and kept in the store, with a ``DeclarationChanged`` on the bus for each
change. Another branch's copies come in through ``apply_remote`` and win by
the rule of ``branchd/replication.py``. Nothing here runs a process or talks
to a worker: the engine and the Celery runtime read declarations through this
service (and the engine ends an app deleted elsewhere, see ``on_remote_delete``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from branchd import events
from branchd.celery.urls import embedded_exchange_problem
from branchd.clock import Clock
from branchd.errors import Invalid, NotFound
from branchd.events import EventBus
from branchd.hlc import Version
from branchd.model import (
    CELERY_FIELDS,
    NAME_RULE,
    PREFETCH,
    QUEUE_NAME_RULE,
    App,
    Kind,
    Limits,
    Queue,
    valid_name,
    valid_queue_name,
)
from branchd.process.specs import build_spec, celery_settings, merge_task_overrides
from branchd.replication import Outcome, Record, decide
from branchd.store import Store

log = logging.getLogger(__name__)


class Declarations:
    """The apps and queues declared on this branch."""

    def __init__(self, store: Store, clock: Clock, bus: EventBus) -> None:
        self._store = store
        self._clock = clock
        self._bus = bus
        self._end_app: Callable[[str, Version], None] | None = None
        self._end_queue: Callable[[str, str], None] | None = None
        self._check_app: Callable[[App], Awaitable[None]] | None = None

    # apps -------------------------------------------------------------------

    async def list_apps(self) -> list[App]:
        return self._store.list_apps()

    async def get_app(self, name: str) -> App:
        app = self._store.get_app(name)
        if app is None:
            raise NotFound(f"no app {name!r}")
        return app

    def find_app(self, name: str) -> App | None:
        return self._store.get_app(name)

    async def put_app(
        self,
        name: str,
        env: Mapping[str, str],
        defaults: Mapping[str, Any],
        celery: Mapping[str, Any] | None = None,
    ) -> tuple[App, bool]:
        check_name(name, "app")
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
        wanted = [q for s in self._store.list_instances(name) for q in s.queues]
        queues = dict.fromkeys([*defaults.get("queues", ()), *wanted, *decls])
        check_carried(app, list(queues), decls)
        if self._check_app is not None:
            await self._check_app(app)  # (its limits, by its pool and Celery version)
        created = self._store.put_app(app)
        self._bus.publish(events.DeclarationChanged("app", name, name))
        # the record as stored: with its version and origin (the branch that
        # declared it, which an app on the embedded broker is bound to)
        return self._store.get_app(name) or app, created

    async def patch_app(self, name: str, patch: Mapping[str, Any]) -> App:
        """Change what ``patch`` names and keep the rest (JSON merge patch:
        env and defaults merge key by key, null removes a key or resets a
        setting to its default). Validated as a whole, like a PUT."""
        app = await self.get_app(name)
        # (one form of prefetch given while the app keeps the other: a clash
        # the whole-app check would name without saying the other is stored)
        clash = prefetch_clash(app.celery.limits, patch, "the app", f"branchctl apps set {name}")
        if clash:
            raise Invalid(clash)
        env = _merged(app.env, patch.get("env"))
        defaults = _merged(app.defaults, patch.get("defaults"))
        celery = app.celery.to_wire()
        for key, value in patch.items():
            if key == "task_overrides":  # (merged task by task, as env and defaults)
                celery[key] = merge_task_overrides(celery[key], value)
            elif key not in ("env", "defaults"):
                celery[key] = value
        celery = {k: v for k, v in celery.items() if v is not None}
        new, _created = await self.put_app(name, env, defaults, celery)
        return new

    def forget_app(self, name: str, version: Version | None = None) -> None:
        """The last step of an app's delete (its instances are gone): it and its
        queues. ``version``: another branch's delete, whose version it keeps."""
        if self._store.delete_app(name, version) or version is None:
            self._bus.publish(
                events.DeclarationChanged("app", name, name, deleted=True, remote=bool(version))
            )

    # queues -------------------------------------------------------------------

    async def list_queues(self, app: str) -> list[Queue]:
        await self.get_app(app)
        return self._store.list_queues(app)

    async def get_queue(self, app: str, name: str) -> Queue:
        await self.get_app(app)
        queue = self._store.get_queue(app, name)
        if queue is None:
            raise NotFound(f"no queue {name!r} in app {app!r}")
        return queue

    def find_queue(self, app: str, name: str) -> Queue | None:
        return self._store.get_queue(app, name)

    def queue_decls(self, app: str) -> dict[str, Queue]:
        return {q.name: q for q in self._store.list_queues(app)}

    async def put_queue(self, app: str, name: str, fields: Mapping[str, Any]) -> tuple[Queue, bool]:
        app_obj = await self.get_app(app)
        check_name(name, "queue")
        queue = Queue(
            app=app,
            name=name,
            exchange=fields.get("exchange") or None,
            exchange_type=fields.get("exchange_type", "direct"),
            routing_key=fields.get("routing_key") or None,
            options=dict(fields.get("options", {})),
        )
        check_carried(app_obj, [name], {name: queue})
        created = self._store.put_queue(queue)
        self._bus.publish(events.DeclarationChanged("queue", app, name))
        return queue, created

    def forget_queue(self, app: str, name: str) -> None:
        """The last step of a queue's delete (no worker consumes it any more)."""
        self._store.delete_queue(app, name)
        self._bus.publish(events.DeclarationChanged("queue", app, name, deleted=True))

    # replication ---------------------------------------------------------------

    def on_remote_delete(self, end_app: Callable[[str, Version], None]) -> None:
        """Who ends an app that another branch deleted while it has instances
        here (the engine: they stop, then ``forget_app`` with that version)."""
        self._end_app = end_app

    def on_check_app(self, check: Callable[[App], Awaitable[None]]) -> None:
        """Who checks an app's worker limits before it is stored (the workers
        service: the rules depend on its interpreter's Celery version)."""
        self._check_app = check

    def on_remote_queue_delete(self, end_queue: Callable[[str, str], None]) -> None:
        """Who cancels a queue that another branch deleted on this branch's
        workers that consume it (the Celery runtime)."""
        self._end_queue = end_queue

    def records(self, app: str | None = None) -> list[Record]:
        """Every declaration (of ``app`` alone: it and its queues), tombstones included."""
        return self._store.declaration_records(app)

    def digest(self) -> str:
        return self._store.declaration_digest()

    def purge(self, before_ms: int) -> int:
        return self._store.purge_tombstones(before_ms)

    def apply_remote(self, records: Sequence[Record]) -> int:
        """Another branch's copies, each taken if newer than ours (a bad one is
        skipped and said: one branch's bug must not stop the others'); how
        many were taken."""
        taken = 0
        for rec in records:
            try:
                taken += self._apply(rec)
            except (ValueError, KeyError, TypeError, Invalid) as exc:
                log.warning("a %s record from another branch is refused: %s", rec.kind, exc)
        return taken

    def _apply(self, rec: Record) -> bool:
        if rec.kind == "app":
            app = App.from_wire(rec.body)
            check_name(app.name, "app")
            name, queue = app.name, app.name
        else:
            q = Queue.from_wire(rec.body)
            check_name(q.app, "app")
            check_name(q.name, "queue")
            name, queue = q.app, q.name
        outcome = decide(self._store.stamp_of(rec.kind, rec.key), rec.stamp)
        if outcome is Outcome.KEEP:
            self._store.hlc.observe(rec.version)
            return False
        if outcome is Outcome.END and rec.kind == "app":
            self._store.hlc.observe(rec.version)
            if self._end_app is not None and self._store.list_instances(name):
                self._end_app(name, rec.version)  # its instances stop first
            else:
                self.forget_app(name, rec.version)
            return True
        if not self._store.apply_remote(rec):
            return False
        if rec.kind == "queue" and rec.deleted and self._end_queue is not None:
            # deleted there: its consumers here go too, as they did there
            self._end_queue(name, queue)
        self._bus.publish(
            events.DeclarationChanged(rec.kind, name, queue, deleted=rec.deleted, remote=True)
        )
        return True

    def check_queues(self, app: App, queues: Sequence[str]) -> None:
        """Refuse ``queues`` if the app's broker cannot carry them."""
        check_carried(app, queues, self.queue_decls(app.name))


def prefetch_clash(stored: Limits, patch: Mapping[str, Any], owner: str, fix: str) -> str | None:
    """Why a patch that gives one form of prefetch while ``stored`` has the
    other (and the patch keeps it) is refused, with the command that drops it
    (``fix``: the command to change ``owner``, e.g. ``branchctl apps set shop``);
    None: no clash of that kind."""
    flags = {
        "disable_prefetch": "--disable-prefetch",
        "prefetch_multiplier": "--prefetch-multiplier",
    }
    for given, other in (PREFETCH[::-1], PREFETCH):
        have = getattr(stored, other)
        if not patch.get(given) or other in patch or not have:
            continue
        shown = other if have is True else f"{other} {have}"
        flag = flags[given] + ("" if patch[given] is True else f" {patch[given]}")
        return f"{given}: {owner} has {shown}; give one of them ({fix} --reset {other} {flag})"
    return None


def check_carried(app: App, queues: Sequence[str], decls: Mapping[str, Queue]) -> None:
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


def check_name(name: str, what: str) -> None:
    if what == "queue":
        if not isinstance(name, str) or not valid_queue_name(name):
            raise Invalid(f"bad queue name {name!r}: {QUEUE_NAME_RULE}")
    elif not isinstance(name, str) or not valid_name(name):
        raise Invalid(f"bad {what} name {name!r}: {NAME_RULE}")


def _merged(base: Mapping[str, Any], patch: Mapping[str, Any] | None) -> dict[str, Any]:
    """One level of a JSON merge patch: null removes the key."""
    out = dict(base)
    for key, value in (patch or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out
