"""How many ready messages a queue holds, as the stall check asks it.

A small Protocol (the stall check needs one number) over the broker depth
reader of ``celery/depth.py`` (RabbitMQ: a passive declare; Redis: ``LLEN``
over kombu's priority lists; the embedded broker: the queue's files), which
the depth scaler reads through too: one reader, one connection per broker.
Every failure is an unknown count (None), never an exception: a count that
cannot be read must not restart anybody.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from branchd.celery.broker import BrokerSpec
from branchd.celery.depth import DepthReader
from branchd.model import App

log = logging.getLogger(__name__)


class ReadyCounter(Protocol):
    async def ready(self, app: App, queue: str) -> int | None:
        """Ready messages in ``queue`` of ``app``'s broker; None if unknown."""
        ...

    def close(self) -> None: ...


class DepthReadyCounter:
    """ReadyCounter over a DepthReader (whoever made the reader closes it)."""

    def __init__(self, broker_of: Callable[[App], BrokerSpec], reader: DepthReader) -> None:
        self._broker_of = broker_of
        self._reader = reader

    async def ready(self, app: App, queue: str) -> int | None:
        broker = self._broker_of(app)
        try:
            reading = await self._reader.read(broker, [queue])
        except Exception as exc:  # (BrokerUnavailable, or anything the broker says)
            log.debug("cannot read the depth of %s on %s: %s", queue, broker.redacted(), exc)
            return None
        depth = reading.queues.get(queue)
        return depth.ready if depth is not None else None

    def close(self) -> None:
        pass
