"""How many ready messages a queue holds, read from the app's broker.

A small Protocol (the stall check needs no more) with one kombu-based
implementation: a passive queue declare, which RabbitMQ answers with its
ready count and kombu's virtual transports with theirs (Redis: ``LLEN``
summed over the priority steps kombu uses; the filesystem: the files of the
queue). Every failure is an unknown count (None), never an exception: a
count that cannot be read must not restart anybody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from branchd.celery.broker import BrokerSpec
from branchd.celery.remote import kombu_connection
from branchd.model import App

log = logging.getLogger(__name__)

#: Connect timeout of a depth read (seconds).
CONNECT_TIMEOUT = 2.0


class ReadyCounter(Protocol):
    async def ready(self, app: App, queue: str) -> int | None:
        """Ready messages in ``queue`` of ``app``'s broker; None if unknown."""
        ...

    def close(self) -> None: ...


class KombuReadyCounter:
    """One kombu connection per broker, kept (reopened after a failure); the
    blocking calls run on a thread, one at a time per broker."""

    def __init__(
        self, broker_of: Callable[[App], BrokerSpec], connect_timeout: float = CONNECT_TIMEOUT
    ) -> None:
        self._broker_of = broker_of
        self._connect_timeout = connect_timeout
        self._conns: dict[BrokerSpec, Any] = {}
        self._locks: dict[BrokerSpec, threading.Lock] = {}

    async def ready(self, app: App, queue: str) -> int | None:
        broker = self._broker_of(app)
        return await asyncio.to_thread(self._read, broker, queue)

    def _read(self, broker: BrokerSpec, queue: str) -> int | None:
        with self._locks.setdefault(broker, threading.Lock()):
            try:
                conn = self._conns.get(broker)
                if conn is None:
                    conn = self._conns[broker] = kombu_connection(broker, self._connect_timeout)
                # one attempt, no kombu retry loop (its default sleeps between tries)
                conn.ensure_connection(
                    max_retries=1,
                    interval_start=0,
                    interval_step=0,
                    interval_max=0,
                    timeout=self._connect_timeout,
                )
                channel = conn.channel()
                try:
                    _, count, _ = channel.queue_declare(queue=queue, passive=True)
                    return int(count)
                except conn.channel_errors:
                    return 0  # no such queue (yet): nothing waits in it
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
            except Exception as exc:
                log.debug("cannot read the depth of %s on %s: %s", queue, broker.redacted(), exc)
                self._drop(broker)
                return None

    def _drop(self, broker: BrokerSpec) -> None:
        conn = self._conns.pop(broker, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()

    def close(self) -> None:
        for broker in list(self._conns):
            self._drop(broker)
