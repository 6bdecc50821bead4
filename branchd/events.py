"""The event bus: what changed, published by the services, read by whoever
subscribes (a wait for a stop today; the API's event stream, the gossip's
capacity record and the metrics later).

An instance, never a module global: the daemon builds one and hands it to
each service. Publishing never blocks and never fails: each subscriber has a
bounded queue, and one that falls behind loses its oldest events (and is told
how many), so a slow reader cannot hold up supervision.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from branchd.model import Kind, State


@dataclass(frozen=True, slots=True)
class InstanceChanged:
    """An instance's state, pid or reason changed (after it was persisted)."""

    app: str
    name: str
    state: State
    pid: int | None
    reason: str | None
    #: Its kind: the branch record keeps which Celery workers run (the
    #: cluster splits an app's rate limits over them).
    kind: Kind = Kind.PROCESS


@dataclass(frozen=True, slots=True)
class InstanceAdded:
    app: str
    name: str


@dataclass(frozen=True, slots=True)
class InstanceRemoved:
    app: str
    name: str


@dataclass(frozen=True, slots=True)
class RuntimeChanged:
    """A running worker's consumers or autoscale range were changed (confirmed)."""

    app: str
    name: str
    what: str  # "consumers" | "autoscale"


@dataclass(frozen=True, slots=True)
class DeclarationChanged:
    """An app or a queue declaration was created, changed or deleted."""

    kind: str  # "app" | "queue"
    app: str
    name: str
    deleted: bool = False
    #: Another branch's write, applied here: the cluster does not tell it again.
    remote: bool = False


@dataclass(frozen=True, slots=True)
class MemberChanged:
    """A cluster member appeared, changed state or run, or was forgotten.

    ``state`` is the membership state's value (``alive``, ``suspect``,
    ``dead`` or ``left``: this layer does not import the cluster's enum);
    ``reaped`` says the member was forgotten (its last state given).
    """

    id: str
    addr: str
    state: str
    incarnation: int
    reaped: bool = False


Event = (
    InstanceChanged
    | InstanceAdded
    | InstanceRemoved
    | RuntimeChanged
    | DeclarationChanged
    | MemberChanged
)


@dataclass
class Subscription:
    """One reader's queue of the events it asked for."""

    accepts: Callable[[Event], bool]
    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(1024))
    dropped: int = 0  # events lost because the reader fell behind

    async def get(self) -> Event:
        return await self.queue.get()

    def offer(self, event: Event) -> None:
        if not self.accepts(event):
            return
        if self.queue.full():
            self.queue.get_nowait()  # the oldest goes: a slow reader never blocks anyone
            self.dropped += 1
        self.queue.put_nowait(event)


class EventBus:
    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []
        self._listeners: list[Callable[[Event], None]] = []

    def publish(self, event: Event) -> None:
        for listener in list(self._listeners):
            listener(event)
        for sub in list(self._subscriptions):
            sub.offer(event)

    def listen(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener`` with each event as it is published (it must not
        block or raise: the API's event journal numbers them this way, none
        lost to a full queue); returns what ends it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    @contextlib.contextmanager
    def subscribe(
        self, accepts: Callable[[Event], bool] = lambda _: True
    ) -> Iterator[Subscription]:
        sub = Subscription(accepts)
        self._subscriptions.append(sub)
        try:
            yield sub
        finally:
            self._subscriptions.remove(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)
