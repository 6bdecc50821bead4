"""Queue depth and scaling on it (issue 16, parts 4 and 5), on real brokers.

- The reader against RabbitMQ (passive declare) and Redis (LLEN over kombu's
  priority lists): no worker, a few messages, cheap.
- One real daemon and one real prefork worker on Redis with priorities: a
  burst of short tasks is counted by the depth route while nobody consumes,
  then the policy scales the pool up, the burst drains, and the pool comes
  back down after the window. Every task leaves a file (the side channel):
  all of them, none twice, so none was lost or killed mid-run.

Names carry a random token; every queue and key made here is deleted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Exchange, Producer, Queue
from kombu import connection as kombu_connection

from branchd.celery.broker import BrokerSpec
from branchd.celery.depth import KombuDepthReader, redis_keys
from tests.brokers import AMQP_URL, REDIS_URL, delete_amqp, reachable, unreachable
from tests.conftest import Branchd, wait_for

ROOT = Path(__file__).resolve().parents[2]
Connection: Any = kombu_connection.Connection
BURST = 120
#: a poll every 0.3 s, a window of 1 s: the whole scenario stays short
CONFIG = "health_interval = 0.5\nreconcile_interval = 3.0\ndepth_poll_interval = 0.3\n"


def _need(url: str) -> None:
    if not reachable(url):
        unreachable(url)


def _redis_clean(queue: str) -> None:
    client: Any = redis.Redis.from_url(REDIS_URL)
    try:
        client.delete(
            *redis_keys(queue), f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
        )
    finally:
        client.close()


def _publish(url: str, queue: str, n: int) -> None:
    # with publisher confirms: RabbitMQ counts a message once it confirmed it
    with Connection(url, transport_options={"confirm_publish": True}) as conn:
        q = Queue(queue, Exchange(queue), queue, queue_arguments={"x-max-priority": 9})
        producer = Producer(conn.channel(), exchange=q.exchange, routing_key=queue)
        for i in range(n):
            producer.publish({"i": i}, declare=[q] if i == 0 else [], priority=i % 10)


@pytest.mark.broker
@pytest.mark.parametrize("url", [AMQP_URL, REDIS_URL], ids=["amqp", "redis"])
def test_the_reader_counts_ready_messages(url: str) -> None:
    _need(url)
    queue = f"depth-{uuid.uuid4().hex[:8]}"
    try:
        _publish(url, queue, 7)  # priorities 0..6: four lists on Redis

        async def read() -> Any:
            reader = KombuDepthReader()
            try:
                first = await reader.read(BrokerSpec(url), [queue, f"{queue}-missing"])
                again = await reader.read(BrokerSpec(url), [queue])  # the same connection
                return first, again
            finally:
                await reader.close()

        first, again = asyncio.run(read())
        assert first.queues[queue].ready == 7
        assert first.queues[f"{queue}-missing"].ready == 0
        assert again.queues[queue].ready == 7
        if url == AMQP_URL:
            assert first.queues[queue].consumers == 0
        else:
            assert first.queues[queue].consumers is None and first.unacked is not None
    finally:
        if url == AMQP_URL:
            delete_amqp(url, [queue], [queue])
        else:
            _redis_clean(queue)


@pytest.fixture
def redis_queue() -> Iterator[str]:
    _need(REDIS_URL)
    queue = f"burst-{uuid.uuid4().hex[:8]}"
    yield queue
    _redis_clean(queue)


def _pool(b: Branchd, app: str) -> int | None:
    """The worker's live pool size, as its stats give it."""
    stats = b.ok("GET", f"/v1/apps/{app}/instances/w1/stats")
    return (stats.get("celery") or {}).get("pool_size")  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.broker
def test_a_burst_scales_the_pool_up_and_back_down_losing_nothing(
    branchd_factory: Any, tmp_path: Path, redis_queue: str
) -> None:
    config = tmp_path / "branchd.toml"
    config.write_text(CONFIG)
    b: Branchd = branchd_factory("--config", str(config))
    app, queue = f"shop-{redis_queue[-8:]}", redis_queue
    done = tmp_path / "done"
    done.mkdir()
    b.ok(
        "PUT",
        f"/v1/apps/{app}",
        {
            "celery_app": "tests.celery_app.tasks",
            "env": {"PYTHONPATH": str(ROOT)},
            "broker": REDIS_URL,
            "scale": {"on": queue, "per_worker": 10, "min": 1, "max": 4, "down_after": 1.0},
        },
        201,
    )

    # the burst, before any worker: the depth is the broker's alone
    sender = Celery("sender", broker=REDIS_URL, task_serializer="json")
    with sender:
        for i in range(BURST):
            sender.send_task(
                "testapp.work",
                args=[str(done), f"t{i}", 0.02],
                queue=queue,
                priority=i % 10,  # over kombu's four priority lists
            )
    depth = b.ok("GET", f"/v1/apps/{app}/queues/{queue}/depth")
    assert (depth["ready"], depth["in_flight"], depth["consumers"]) == (BURST, 0, 0)
    cli = subprocess.run(
        [sys.executable, "-m", "branchctl", "--url", b.url, "queues", "depth", app, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "BRANCHD_TOKEN": b.token or ""},
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    rows = {d["queue"]: d for d in json.loads(cli.stdout)["items"]}
    assert rows[queue]["ready"] == BURST

    # one worker, a pool of 1: the policy takes it to 4 (120 / 10, at most 4)
    b.ok(
        "POST",
        f"/v1/apps/{app}/instances",
        {"name": "w1", "kind": "celery", "queues": [queue], "autoscale": {"min": 1, "max": 1}},
        201,
    )
    wait_for(lambda: _pool(b, app) == 4, 30, 0.05)
    # every task ran, once: none lost, none killed mid-run (each makes its file once)
    wait_for(lambda: len(os.listdir(done)) >= BURST, 60, 0.1)
    # then back to 1, once the window has passed
    wait_for(lambda: _pool(b, app) == 1, 30, 0.1)
    auto = b.ok("GET", f"/v1/apps/{app}/instances/w1/autoscale")
    assert (auto["min"], auto["max"]) == (1, 1)
    assert sorted(os.listdir(done)) == sorted(f"t{i}" for i in range(BURST))
    logs = b.call("GET", f"/v1/apps/{app}/instances/w1/logs?stream=stderr&tail=2000").text
    assert "WorkerLostError" not in logs and "FileExistsError" not in logs
    depth = b.ok("GET", f"/v1/apps/{app}/queues/{queue}/depth")
    assert (depth["ready"], depth["in_flight"], depth["consumers"]) == (0, 0, 1)
