"""Declarations on every branch: the apps and queues declared on any branch
are pushed to every live member at once, and anti-entropy mends what a push
missed (a branch down, stopped or partitioned, a push lost).

- push: each local ``DeclarationChanged`` sends the app's records (it and its
  queues, tombstones included) to every live member (``decl.put``); one that
  does not answer is left to anti-entropy, never retried here;
- anti-entropy: every ``SYNC_EVERY`` seconds, and at once when a member
  appears, this branch compares digests with one live member, picked at
  random (``decl.digest``); when they differ both send their every record
  in one call (``decl.all``), and each takes what is newer by the rule of
  ``branchd/replication.py``. A random partner makes a change reach all
  of N branches in O(log N) rounds, as push-pull gossip does;
- tombstones older than ``TOMBSTONE_RETENTION`` are purged now and then.

It talks through the cluster service's peer channel (``call``) and reads the
declarations through the small ``Declared`` Protocol (the Declarations
service), never the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from branchd.clock import Scheduler, deadline
from branchd.errors import BadRequest
from branchd.events import DeclarationChanged, Event, EventBus, MemberChanged
from branchd.replication import TOMBSTONE_RETENTION, Record

log = logging.getLogger(__name__)

#: How often one member's digest is compared with ours (s).
SYNC_EVERY = 2.0
#: How often expired tombstones are purged (s).
PURGE_EVERY = 600.0
#: The peer-channel operations answered here.
OPS = ("decl.put", "decl.digest", "decl.all")


class Declared(Protocol):
    """What the sync needs of the declarations (``branchd.declarations``)."""

    def records(self, app: str | None = None) -> list[Record]: ...
    def digest(self) -> str: ...
    def apply_remote(self, records: Sequence[Record]) -> int: ...
    def purge(self, before_ms: int) -> int: ...


#: A peer call: (API URL, op, args) -> the answer.
Call = Callable[[str, str, dict[str, Any]], Awaitable[Any]]
#: The live members but this branch: (id, API URL).
Peers = Callable[[], list[tuple[str, str]]]


def _records(value: Any) -> list[Record]:
    if not isinstance(value, list):
        raise BadRequest("peer call: records must be a list")
    out = []
    for item in value:
        try:
            out.append(Record.from_wire(item))
        except ValueError as exc:
            log.warning("a declaration record from another branch is refused: %s", exc)
    return out


class DeclarationSync:
    def __init__(
        self,
        declared: Declared,
        *,
        call: Call,
        peers: Peers,
        scheduler: Scheduler,
        bus: EventBus,
        every: float = SYNC_EVERY,
        rng: random.Random | None = None,
    ) -> None:
        self._decls = declared
        self._call = call
        self._peers = peers
        self._sched = scheduler
        self._bus = bus
        self._every = every
        self._rng = rng or random.Random()
        self._fresh: list[str] = []  # members just seen: synced with first
        self._wake = asyncio.Event()
        self._purged = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()
        self._stack = contextlib.ExitStack()
        self._said: set[str] = set()

    # the answering side ------------------------------------------------------------

    def answer(self, op: str, args: dict[str, Any]) -> Any:
        """Answer one of ``OPS`` (the peer channel's ``decl.*``)."""
        match op:
            case "decl.put":
                return {"taken": self._decls.apply_remote(_records(args.get("records")))}
            case "decl.digest":
                return {"digest": self._decls.digest()}
            case "decl.all":
                theirs = _records(args.get("records"))
                mine = [r.to_wire() for r in self._decls.records()]
                self._decls.apply_remote(theirs)
                return {"records": mine}
        raise BadRequest(f"peer call: unknown op {op!r}")

    # the calling side ---------------------------------------------------------------

    async def push(self, records: Sequence[Record]) -> None:
        """``records`` to every live member at once; what fails is left to
        anti-entropy."""
        body = {"records": [r.to_wire() for r in records]}
        peers = self._peers()
        results = await asyncio.gather(
            *(self._call(url, "decl.put", body) for _, url in peers), return_exceptions=True
        )
        for (mid, _), result in zip(peers, results, strict=True):
            if isinstance(result, BaseException):
                self._once(f"push:{mid}:{type(result).__name__}", result, f"push to {mid}")

    async def sync_with(self, api_url: str) -> bool:
        """Compare digests with the branch at ``api_url``; when they differ,
        exchange every record. True if they differed."""
        mine = self._decls.digest()
        answer = await self._call(api_url, "decl.digest", {})
        if isinstance(answer, dict) and answer.get("digest") == mine:
            return False
        answer = await self._call(
            api_url, "decl.all", {"records": [r.to_wire() for r in self._decls.records()]}
        )
        if not isinstance(answer, dict):
            raise BadRequest(f"{api_url} answered decl.all with no object")
        self._decls.apply_remote(_records(answer.get("records")))
        return True

    async def step(self) -> bool:
        """One round of anti-entropy: with a member just seen, else a random
        live one; and the purge of old tombstones when due. True if a sync
        found a difference."""
        now = self._sched.clock.monotonic()
        if now - self._purged >= PURGE_EVERY:
            self._purged = now
            wall_ms = int((self._sched.clock.wall() - TOMBSTONE_RETENTION) * 1000)
            gone = self._decls.purge(wall_ms)
            if gone:
                log.info("purged %d tombstone(s) of declarations older than a day", gone)
        peers = dict(self._peers())
        if not peers:
            return False
        while self._fresh and self._fresh[0] not in peers:
            self._fresh.pop(0)  # (gone again, or its API not known yet: random will do)
        mid = self._fresh.pop(0) if self._fresh else self._rng.choice(sorted(peers))
        return await self.sync_with(peers[mid])

    # loops ------------------------------------------------------------------------------

    def start(self) -> None:
        # subscribed now, not in the task: no change is missed in between
        sub = self._stack.enter_context(self._bus.subscribe(_wanted))
        self._spawn(self._push_loop(sub.get, sub.queue))
        self._spawn(self._sync_loop())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._stack.close()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push_loop(
        self, get: Callable[[], Awaitable[Event]], queue: asyncio.Queue[Event]
    ) -> None:
        while True:
            batch = [await get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            apps: list[str] = []
            for ev in batch:
                if isinstance(ev, MemberChanged):
                    self._fresh.append(ev.id)
                    self._wake.set()
                elif isinstance(ev, DeclarationChanged) and ev.app not in apps:
                    apps.append(ev.app)
            try:
                records = [r for app in apps for r in self._decls.records(app)]
            except Exception as exc:
                self._once("records", exc, "cannot read the declarations")
                continue
            if records:
                # a member that does not answer must not hold up the next push
                self._spawn(self.push(records))

    async def _sync_loop(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._once(f"sync:{type(exc).__name__}", exc, "anti-entropy")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with deadline(self._sched, self._sched.clock.monotonic() + self._every):
                    await self._wake.wait()

    def _once(self, cause: str, exc: BaseException, what: str) -> None:
        first = cause not in self._said
        self._said.add(cause)
        text = str(exc) or type(exc).__name__
        log.log(logging.WARNING if first else logging.DEBUG, "declarations: %s: %s", what, text)


def _wanted(ev: Event) -> bool:
    """Local declaration changes (another branch's are not told again), and
    members that appear (alive), to sync with at once."""
    if isinstance(ev, DeclarationChanged):
        return not ev.remote
    return isinstance(ev, MemberChanged) and ev.state == "alive" and not ev.reaped
