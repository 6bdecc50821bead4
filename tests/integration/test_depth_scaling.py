"""Queue depth and scaling on it (issue 16, parts 4 and 5), on real brokers.

- The reader against RabbitMQ (passive declare) and Redis (LLEN over kombu's
  priority lists): no worker, a few messages, cheap.
- One real daemon and one real prefork worker, on RabbitMQ and on Redis,
  with priorities (on RabbitMQ a queue declared with ``x-max-priority``): a
  burst of short tasks is counted by the depth route while nobody consumes,
  then the policy scales the pool up within one poll (on the daemon's event
  stream and the worker's own log), the burst drains, and the pool comes
  back down after the window. Every task leaves a file (the side channel):
  all of them, none twice, so none was lost or killed mid-run.

Names carry a random token; every queue and key made here is deleted.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
DEPTH_POLL = 0.3
CONFIG = f"health_interval = 0.5\nreconcile_interval = 3.0\ndepth_poll_interval = {DEPTH_POLL}\n"
#: What one poll may take beyond its interval (see the test).
POLL_WORK = 0.5
#: Celery's autoscaler looks at its reserved tasks once a second.
AUTOSCALER_TICK = 1.0


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


@pytest.fixture(params=[AMQP_URL, REDIS_URL], ids=["amqp", "redis"])
def burst_queue(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(broker URL, a queue of the test's own), deleted afterwards."""
    url: str = request.param
    _need(url)
    queue = f"burst-{uuid.uuid4().hex[:8]}"
    yield url, queue
    if url == AMQP_URL:
        delete_amqp(url, [queue], [queue])
    else:
        _redis_clean(queue)


class Events:
    """A client of the daemon's GET /v1/events: (type, data) as it reads them."""

    def __init__(self, b: Branchd, query: str) -> None:
        url = urlsplit(b.url)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        headers = {"Authorization": f"Bearer {b.token}"} if b.token else {}
        self.conn.request("GET", "/v1/events" + query, headers=headers)
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200

    def next(self) -> tuple[str, dict[str, Any]]:
        kind, data = "", ""
        while True:
            line = self.resp.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data:
                return kind, json.loads(data)

    def close(self) -> None:
        self.conn.close()


def _grown_at(log: str, size: int) -> float:
    """When (Unix time) the worker's pool of 1 reached ``size`` processes, by
    the timestamps of Celery's own "Scaling up N processes" lines (local time)."""
    have = 1
    for stamp, n in re.findall(r"\[([0-9-]+ [0-9:,]+): INFO/MainProcess\] Scaling up (\d+) ", log):
        have += int(n)
        if have >= size:
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"the pool never reached {size} in the log:\n{log[-2000:]}")


def _pool(b: Branchd, app: str, name: str) -> int | None:
    """The worker's live pool size, as its stats give it."""
    stats = b.ok("GET", f"/v1/apps/{app}/instances/{name}/stats")
    return (stats.get("celery") or {}).get("pool_size")  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.broker
def test_a_burst_scales_the_pool_up_and_back_down_losing_nothing(
    branchd_factory: Any, tmp_path: Path, burst_queue: tuple[str, str]
) -> None:
    url, queue = burst_queue
    config = tmp_path / "branchd.toml"
    config.write_text(CONFIG)
    b: Branchd = branchd_factory("--config", str(config))
    tok = queue[-8:]
    # unique names: a Celery node is NAME@host, on brokers other runs share
    app, name = f"shop-{tok}", f"w1-{tok}"
    done = tmp_path / "done"
    done.mkdir()
    b.ok(
        "PUT",
        f"/v1/apps/{app}",
        {
            "celery_app": "tests.celery_app.tasks",
            "env": {"PYTHONPATH": str(ROOT)},
            "broker": url,
            "scale": {"on": queue, "per_worker": 10, "min": 1, "max": 4, "down_after": 1.0},
        },
        201,
    )
    # priorities: RabbitMQ needs the queue declared with a max priority (the
    # worker gets the declaration at its start); Redis ignores the argument
    # and splits by priority over kombu's lists
    args = {"x-max-priority": 9}
    b.ok("PUT", f"/v1/apps/{app}/queues/{queue}", {"options": {"queue_arguments": args}}, 201)

    # the burst, before any worker: the depth is the broker's alone
    declared = Queue(queue, Exchange(queue), queue, queue_arguments=args)
    sender = Celery("sender", broker=url, task_serializer="json", task_queues=[declared])
    with sender:
        for i in range(BURST):
            sender.send_task(
                "testapp.work",
                args=[str(done), f"t{i}", 0.02],
                queue=queue,
                priority=i % 10,  # over kombu's four priority lists on Redis
            )

    def depth() -> dict[str, Any]:
        return b.ok("GET", f"/v1/apps/{app}/queues/{queue}/depth")  # type: ignore[no-any-return]

    # (RabbitMQ counts a message once it has routed it: a moment after the send)
    wait_for(lambda: depth()["ready"] == BURST, 10, 0.05)
    assert (depth()["in_flight"], depth()["consumers"]) == (0, 0)
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
    events = Events(b, f"?app={app}&types=instance,runtime")
    try:
        b.ok(
            "POST",
            f"/v1/apps/{app}/instances",
            {"name": name, "kind": "celery", "queues": [queue], "autoscale": {"min": 1, "max": 1}},
            201,
        )
        wait_for(lambda: _pool(b, app, name) == 4, 30, 0.05)
        # up within one poll, on the daemon's own clock: from the worker's
        # "running" to the confirmed range change (its first, to 1..4)
        kind, data = events.next()
        while (kind, data.get("state")) != ("instance", "running"):
            kind, data = events.next()
        up = data["time"]
        while kind != "runtime":
            kind, data = events.next()
        assert data["what"] == "autoscale", data
        took = data["time"] - up
    finally:
        events.close()
    logs = b.call("GET", f"/v1/apps/{app}/instances/{name}/logs?stream=stderr&tail=2000").text
    grown = _grown_at(logs, 4) - up
    print(
        f"\n{queue} on {url.split(':')[0]}: range 1..4 {took:.3f}s, pool of 4 {grown:.3f}s"
        f" after running (poll {DEPTH_POLL}s)"
    )
    # One poll interval, plus the poll's own work (a depth read, the workers'
    # active, reserved and stats, the autoscale control and its confirmation:
    # up to ~0.5 s measured on a loaded 2-core machine). Measured from the
    # state change, which falls anywhere in an interval, so this bounds "the
    # first or the second poll" rather than telling them apart.
    assert took <= DEPTH_POLL + POLL_WORK, took
    # the processes themselves: Celery's autoscaler starts them (at once, or
    # at its next tick, a second later), as its own log line timestamps them
    assert grown <= DEPTH_POLL + POLL_WORK + AUTOSCALER_TICK, grown
    # every task ran, once: none lost, none killed mid-run (each makes its file once)
    wait_for(lambda: len(os.listdir(done)) >= BURST, 60, 0.1)
    # then back to 1, once the window has passed
    wait_for(lambda: _pool(b, app, name) == 1, 30, 0.1)
    auto = b.ok("GET", f"/v1/apps/{app}/instances/{name}/autoscale")
    assert (auto["min"], auto["max"]) == (1, 1)
    assert sorted(os.listdir(done)) == sorted(f"t{i}" for i in range(BURST))
    logs = b.call("GET", f"/v1/apps/{app}/instances/{name}/logs?stream=stderr&tail=4000").text
    assert "WorkerLostError" not in logs and "FileExistsError" not in logs
    final = depth()
    assert (final["ready"], final["in_flight"], final["consumers"]) == (0, 0, 1)
    assert b.call("DELETE", f"/v1/apps/{app}").status == 204
