"""The stall check's ready counts on real brokers: a passive declare through
kombu, on the machine's RabbitMQ and Redis (priority steps summed), and on an
embedded broker; a queue that does not exist holds nothing, a broker that
cannot be reached gives no count (None), never an exception."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from kombu import connection as kombu_connection

from branchd.celery.broker import BrokerSpec, embedded
from branchd.celery.depth import KombuDepthReader
from branchd.celery.ready import DepthReadyCounter
from branchd.model import App
from tests.brokers import AMQP_URL, REDIS_URL, reachable, unreachable

Connection: Any = kombu_connection.Connection
APP = App(name="depth")


@pytest.mark.parametrize("kind", ["amqp", "redis", "filesystem"])
def test_ready_counts_on_each_broker(kind: str, tmp_path: Path) -> None:
    if kind == "filesystem":
        spec = embedded(tmp_path, "depth")
    else:
        spec = BrokerSpec(AMQP_URL if kind == "amqp" else REDIS_URL)
        if not reachable(spec.url):
            unreachable(spec.url)
    queue = f"depth-{uuid.uuid4().hex[:8]}"
    conn: Any = Connection(
        spec.url or "filesystem://", transport_options=dict(spec.transport_options)
    )
    reader = KombuDepthReader()
    counter = DepthReadyCounter(lambda app: spec, reader)
    try:
        with conn:
            sq = conn.SimpleQueue(queue)
            for n in range(3):
                sq.put({"n": n}, priority=n * 3)  # (on Redis: three priority lists)
            sq.close()

        async def read() -> tuple[int | None, int | None]:
            return await counter.ready(APP, queue), await counter.ready(APP, queue + "-none")

        assert asyncio.run(read()) == (3, 0)
    finally:
        counter.close()
        asyncio.run(reader.close())  # (the reader's maker closes it)
        if kind != "filesystem":
            with Connection(spec.url) as c:
                c.default_channel.queue_delete(queue)


def test_a_broker_that_cannot_be_reached_gives_no_count() -> None:
    reader = KombuDepthReader(connect_timeout=0.2)
    counter = DepthReadyCounter(lambda app: BrokerSpec("amqp://guest:guest@127.0.0.1:1//"), reader)
    try:
        assert asyncio.run(counter.ready(APP, "default")) is None
    finally:
        counter.close()
        asyncio.run(reader.close())
