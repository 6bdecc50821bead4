"""Queue depth read from the broker with kombu (issue 16, part 4).

What each broker can say of a queue, without its management plugin:

- RabbitMQ: a passive ``queue.declare`` answers the ready messages and the
  consumers (of every branch: the broker is shared). One channel, reused; a
  missing queue closes it (404), so that queue reads 0 and a new channel is
  opened. That costs ~2 ms a queue (100 missing queues: ~230 ms a poll), so a
  queue found missing reads 0 without asking again for ``MISSING_RECHECK``
  seconds (a worker declares its queues when it starts: a queue that
  appears later is seen within that long).
- Redis (kombu's transport): one list per priority step, ``queue``,
  ``queue\\x06\\x163``, ``\\x06\\x166``, ``\\x06\\x169`` (``_q_for_pri``): the
  ready messages are the sum of their ``LLEN``, all queues read in one
  pipelined round trip. Messages delivered and not yet acked sit in one
  ``unacked`` hash for the whole database, keyed by delivery tag; its entries
  carry the exchange and routing key but not the queue, so a count per queue
  would mean reading every entry at every poll: ``HLEN`` gives the total only
  (``unacked``), and in flight per queue comes from the workers.
- The embedded broker: one file per ready message, ``<ms>_<uuid>.<queue>.msg``;
  a listing of its data folder counts them all.

Redis and the embedded broker know nothing of consumers: the caller counts
the workers it knows. In flight (running plus reserved) always comes from the
workers' ``active`` and ``reserved`` (remote control), see :func:`in_flight`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from branchd.celery.broker import BrokerSpec
from branchd.celery.remote import ConnectionFactory, failure_error, kombu_connection
from branchd.errors import BrokerUnavailable

log = logging.getLogger(__name__)

#: kombu's Redis transport defaults (``Channel.sep``, ``PRIORITY_STEPS``).
REDIS_SEP = "\x06\x16"
REDIS_STEPS: tuple[int, ...] = (0, 3, 6, 9)
#: Seconds a RabbitMQ queue found missing reads 0 before it is asked again.
MISSING_RECHECK = 10.0


@dataclass(frozen=True)
class BrokerDepth:
    """What the broker says of one queue. ``consumers`` is None where the
    broker does not know (Redis, the embedded broker)."""

    ready: int
    consumers: int | None = None


@dataclass(frozen=True)
class BrokerReading:
    """One read of several queues of one broker."""

    queues: Mapping[str, BrokerDepth]
    #: Redis: messages delivered and not acked, the whole database (see above).
    unacked: int | None = None


class DepthReader(Protocol):
    async def read(self, broker: BrokerSpec, queues: Sequence[str]) -> BrokerReading:
        """The ready messages (and consumers) of ``queues``; a queue the broker
        does not have reads 0. Raises BrokerUnavailable."""
        ...

    async def close(self) -> None: ...


# pure helpers ---------------------------------------------------------------------


def redis_keys(queue: str, steps: Iterable[int] = REDIS_STEPS, sep: str = REDIS_SEP) -> list[str]:
    """The lists kombu's Redis transport keeps ``queue``'s messages in, one per step."""
    return [f"{queue}{sep}{step}" if step else queue for step in steps]


def count_files(names: Iterable[str], queues: Iterable[str]) -> dict[str, int]:
    """Ready messages per queue out of an embedded broker's data folder listing
    (kombu's own rule: everything after the first dot is ``<queue>.msg``)."""
    wanted = {f"{q}.msg": q for q in queues}
    counts = dict.fromkeys(wanted.values(), 0)
    for name in names:
        queue = wanted.get(name.partition(".")[2])
        if queue is not None:
            counts[queue] += 1
    return counts


def _tasks(reply: Any) -> list[Mapping[str, Any]]:
    items = reply.get("ok", reply) if isinstance(reply, dict) and set(reply) == {"ok"} else reply
    if not isinstance(items, list):
        return []
    return [t for t in items if isinstance(t, dict)]


def in_flight(
    active: Any, reserved: Any, consumed: Sequence[str], routing: Mapping[str, str]
) -> tuple[dict[str, int], dict[str, int]]:
    """What a worker holds per queue it consumes: (running + reserved, running).

    ``active`` and ``reserved``: its answers (lists of requests). A request
    says its routing key, not its queue: with one queue consumed it is that
    queue's; else the queue whose routing key (``routing``, default its name)
    matches; else the first queue consumed.
    """
    by_key = {routing.get(q, q): q for q in reversed(consumed)}

    def queue_of(task: Mapping[str, Any]) -> str | None:
        if len(consumed) == 1:
            return consumed[0]
        info = task.get("delivery_info")
        key = info.get("routing_key") if isinstance(info, dict) else None
        return by_key.get(str(key), consumed[0] if consumed else None)

    running = Counter(q for t in _tasks(active) if (q := queue_of(t)) is not None)
    held = running + Counter(q for t in _tasks(reserved) if (q := queue_of(t)) is not None)
    return dict(held), dict(running)


# the real reader -----------------------------------------------------------------


class _Link:
    """One broker's connection, reused across reads, used from one thread at a time."""

    def __init__(self, spec: BrokerSpec, timeout: float, factory: ConnectionFactory) -> None:
        self.spec = spec
        self._timeout = timeout
        self._factory = factory
        self._lock = threading.Lock()
        self._conn: Any = None
        self._channel: Any = None
        #: queue -> when it was found missing (RabbitMQ)
        self._missing: dict[str, float] = {}

    def read(self, queues: Sequence[str]) -> BrokerReading:
        with self._lock:
            try:
                return self._read(queues)
            except BrokerUnavailable:
                raise
            except Exception as exc:
                self._drop()
                raise failure_error(self.spec, exc, "cannot read queue depth") from None

    def _connection(self) -> Any:
        if self._conn is None:
            conn = self._factory(self.spec, self._timeout)
            conn.ensure_connection(max_retries=1, timeout=self._timeout)
            self._conn = conn
        return self._conn

    def _read(self, queues: Sequence[str]) -> BrokerReading:
        conn = self._connection()
        if self.spec.transport.startswith("redis") or self.spec.transport == "rediss":
            return _read_redis(conn.default_channel, queues)
        return self._read_amqp(conn, queues)

    def _read_amqp(self, conn: Any, queues: Sequence[str]) -> BrokerReading:
        out: dict[str, BrokerDepth] = {}
        now = time.monotonic()
        for queue in queues:
            seen = self._missing.get(queue)
            if seen is not None and now - seen < MISSING_RECHECK:
                out[queue] = BrokerDepth(0, 0)
                continue
            if self._channel is None:
                self._channel = conn.channel()
            try:
                _, ready, consumers = self._channel.queue_declare(queue=queue, passive=True)
            except conn.channel_errors:
                # no such queue: the broker closed the channel (404)
                self._channel = None
                self._missing[queue] = now
                ready = consumers = 0
            else:
                self._missing.pop(queue, None)
            out[queue] = BrokerDepth(int(ready), int(consumers))
        return BrokerReading(out)

    def _drop(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    def close(self) -> None:
        with self._lock:
            self._drop()


def _read_redis(channel: Any, queues: Sequence[str]) -> BrokerReading:
    # the channel's own key names: its priority steps, separator and key prefix
    steps = list(channel.priority_steps)
    pipe = channel.client.pipeline(transaction=False)
    for queue in queues:
        for step in steps:
            pipe.llen(channel._q_for_pri(queue, step))
    pipe.hlen(channel.unacked_key)
    sizes = pipe.execute()
    out = {
        q: BrokerDepth(sum(int(n) for n in sizes[i * len(steps) : (i + 1) * len(steps)]))
        for i, q in enumerate(queues)
    }
    return BrokerReading(out, unacked=int(sizes[-1]))


def _read_files(spec: BrokerSpec, queues: Sequence[str]) -> BrokerReading:
    folder = spec.transport_options.get("data_folder_in")
    try:
        names = os.listdir(folder) if isinstance(folder, str) else []
    except FileNotFoundError:
        names = []
    return BrokerReading({q: BrokerDepth(n) for q, n in count_files(names, queues).items()})


class KombuDepthReader:
    """DepthReader over real brokers: one kombu connection per broker, kept
    between polls, read in a thread (kombu blocks)."""

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        connection_factory: ConnectionFactory = kombu_connection,
    ) -> None:
        self._timeout = connect_timeout
        self._factory = connection_factory
        self._links: dict[BrokerSpec, _Link] = {}

    async def read(self, broker: BrokerSpec, queues: Sequence[str]) -> BrokerReading:
        if broker.is_filesystem:
            return await asyncio.to_thread(_read_files, broker, list(queues))
        link = self._links.get(broker)
        if link is None:
            link = self._links[broker] = _Link(broker, self._timeout, self._factory)
        return await asyncio.to_thread(link.read, list(queues))

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            await asyncio.to_thread(link.close)


# the twin (tests) ----------------------------------------------------------------


class MemoryDepthReader:
    """DepthReader over counts a test sets: ``set(queue, ready, consumers)``."""

    def __init__(self) -> None:
        self.depths: dict[str, BrokerDepth] = {}
        self.reads = 0
        self.down = False

    def set(self, queue: str, ready: int, consumers: int | None = None) -> None:
        self.depths[queue] = BrokerDepth(ready, consumers)

    async def read(self, broker: BrokerSpec, queues: Sequence[str]) -> BrokerReading:
        self.reads += 1
        if self.down:
            raise BrokerUnavailable("cannot read queue depth: the broker is down (twin)")
        return BrokerReading({q: self.depths.get(q, BrokerDepth(0)) for q in queues})

    async def close(self) -> None:
        pass
