"""Worker limits on real Celery workers (Redis): two workers, one daemon;
then one worker on a redis-server of the test's own, restarted under it.

Celery is the oracle: ``inspect registered`` (a Celery client app) for the
per-task limits each worker has, the worker's log and a file a task writes
for what ran. The split of the app's rate is checked by the value each
worker got, not by a timed throughput.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.brokers import REDIS_URL, OwnRedis, reachable, unreachable
from tests.conftest import Branchd, wait_for

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "health_interval = 0.5\nreconcile_interval = 2.0\nbackoff_base = 0.2\nbackoff_max = 1.0\n"
START = 30.0
#: The slow sweep out of the way: what a broker restart needs re-applied must
#: be re-applied on the reconnect, not at the next sweep.
NO_SWEEP = CONFIG.replace("reconcile_interval = 2.0", "reconcile_interval = 600.0")


@pytest.fixture
def daemon(branchd_factory: Callable[..., Branchd], tmp_path: Path) -> Iterator[Branchd]:
    if not reachable(REDIS_URL):
        unreachable(REDIS_URL)
    config = tmp_path / "branchd.toml"
    config.write_text(CONFIG)
    yield branchd_factory("--config", str(config))


def _registered(client: Any, node: str) -> dict[str, str]:
    """task name -> its limits as the worker reports them ("rate_limit=300/m ...")."""
    reply = client.control.inspect(destination=[node], timeout=1.0).registered(
        "rate_limit", "time_limit", "soft_time_limit"
    )
    out = {}
    for item in (reply or {}).get(node, []):
        name, _, rest = item.partition(" [")
        out[name] = rest.rstrip("]")
    return out


@pytest.mark.slow
def test_limits_on_real_workers(daemon: Branchd, tmp_path: Path) -> None:
    b, tok = daemon, uuid.uuid4().hex[:8]
    app, q1, q2 = f"lim-{tok}", f"q1-{tok}", f"q2-{tok}"
    body = {
        "celery_app": "tests.celery_app.tasks",
        "broker": REDIS_URL,
        "env": {"PYTHONPATH": str(ROOT)},
        "time_limit": 30,
        "task_overrides": {
            "testapp.add": {"rate_limit": "600/m"},
            "testapp.sleep": {"time_limit": 1},
            "testapp.touch": {"time_limit": 50, "soft_time_limit": 40},
        },
    }
    assert b.call("PUT", f"/v1/apps/{app}", body).status == 201
    # a rule of the pool: a clear 422 naming it, nothing stored
    bad = b.call("PATCH", f"/v1/apps/{app}", {"pool": "gevent", "soft_time_limit": 1})
    assert bad.status == 422 and "the gevent pool has no soft time limit" in bad.text, bad.text
    assert b.ok("GET", f"/v1/apps/{app}")["pool"] == "prefork"

    def running(name: str, other_than: int | None = None) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            inst = b.instance(app, name)
            ok = inst["state"] == "running" and inst["pid"] not in (None, other_than)
            return inst if ok else None

        return wait_for(check, START, 0.05)  # type: ignore[no-any-return]

    def add(name: str, queue: str) -> dict[str, Any]:
        fields = {"name": name, "kind": "celery", "queues": [queue], "concurrency": 1}
        b.ok("POST", f"/v1/apps/{app}/instances", fields, 201)
        return running(name)

    client = Celery("probe", broker=REDIS_URL, set_as_current=False)
    try:
        w1 = add(f"w1-{tok}", q1)
        assert "--time-limit=30" in w1["command"]
        w2 = add(f"w2-{tok}", q2)
        n1, n2 = w1["node"], w2["node"]

        # 2. the app's 600/m is a total: each of its two running workers has half
        def split(want: str) -> bool:
            return all(
                _registered(client, n).get("testapp.add") == f"rate_limit={want}" for n in (n1, n2)
            )

        wait_for(lambda: split("300/m"), 20, 0.2)
        touch = _registered(client, n1)["testapp.touch"]
        assert "time_limit=50" in touch and "soft_time_limit=40" in touch, touch

        # 1. the task's time limit (1 s, not the worker's 30) kills a runaway
        # task; the worker lives on
        log = f"/v1/apps/{app}/instances/{w1['name']}/logs?stream=stderr&tail=400"

        def kills() -> int:
            return b.call("GET", log).text.count("Hard time limit (1")

        client.send_task("testapp.sleep", args=[60], queue=q1)
        wait_for(lambda: kills() == 1, 20, 0.2)
        proof = tmp_path / "after-the-kill"
        client.send_task("testapp.touch", args=[str(proof)], queue=q1)
        wait_for(proof.exists, 20, 0.05)
        after = b.instance(app, w1["name"])
        assert (after["pid"], after["restarts"], after["state"]) == (w1["pid"], 0, "running")

        # 1. kill -9: the restarted worker has its per-task limits again (the
        # same answers, and the same kill)
        os.kill(w1["pid"], signal.SIGKILL)
        running(w1["name"], other_than=w1["pid"])
        wait_for(lambda: split("300/m"), 20, 0.2)
        assert "time_limit=50" in _registered(client, n1)["testapp.touch"]
        client.send_task("testapp.sleep", args=[60], queue=q1)
        wait_for(lambda: kills() == 2, 20, 0.2)

        # 2. one stops: the other has the whole total
        b.ok("POST", f"/v1/apps/{app}/instances/{w2['name']}/stop")
        wait_for(lambda: _registered(client, n1).get("testapp.add") == "rate_limit=600/m", 20, 0.2)
    finally:
        client.close()
        b.call("DELETE", f"/v1/apps/{app}")


def _probe(url: str, node: str) -> tuple[dict[str, str], set[str]] | None:
    """The worker's per-task limits and the queues it consumes, asked through
    a new client (None while the broker is away or the worker does not answer)."""
    try:
        with Celery("probe", broker=url, set_as_current=False) as client:
            limits = _registered(client, node)
            reply = client.control.inspect([node], timeout=1.0).active_queues() or {}
    except Exception:  # the broker is away: no answer
        return None
    if not limits or node not in reply:
        return None
    return limits, {q["name"] for q in reply[node]}


@pytest.mark.slow
@pytest.mark.broker
def test_per_task_limits_and_runtime_consumers_survive_a_broker_restart(
    branchd_factory: Callable[..., Branchd], tmp_path: Path, own_redis: OwnRedis
) -> None:
    url = own_redis.url
    config = tmp_path / "branchd.toml"
    config.write_text(NO_SWEEP)
    b, tok = branchd_factory("--config", str(config)), uuid.uuid4().hex[:8]
    app, name, q1, extra = f"bro-{tok}", f"w1-{tok}", f"q1-{tok}", f"extra-{tok}"
    body = {
        "celery_app": "tests.celery_app.tasks",
        "broker": url,
        "env": {"PYTHONPATH": str(ROOT)},
        "task_overrides": {
            "testapp.add": {"rate_limit": "600/m"},
            "testapp.sleep": {"time_limit": 1},
        },
    }
    log = f"/v1/apps/{app}/instances/{name}/logs?stream=stderr&tail=400"

    def kills() -> int:
        return b.call("GET", log).text.count("Hard time limit (1")

    try:
        assert b.call("PUT", f"/v1/apps/{app}", body).status == 201
        fields = {"name": name, "kind": "celery", "queues": [q1], "concurrency": 1}
        b.ok("POST", f"/v1/apps/{app}/instances", fields, 201)
        inst = wait_for(lambda: (v := b.instance(app, name))["state"] == "running" and v, START)
        node = inst["node"]
        b.ok("PUT", f"/v1/apps/{app}/instances/{name}/queues/{extra}")  # a consumer at runtime

        def seen(add: str) -> tuple[dict[str, str], set[str]] | None:
            got = _probe(url, node)
            ok = got is not None and got[0].get("testapp.add") == add and got[1] == {q1, extra}
            return got if ok else None

        limits, _ = wait_for(lambda: seen("rate_limit=600/m"), 20, 0.2)
        assert "time_limit=1" in limits["testapp.sleep"], limits

        # the broker goes (killed, by its pid); meanwhile the app's rate changes
        own_redis.stop()
        patched = b.call(
            "PATCH", f"/v1/apps/{app}", {"task_overrides": {"testapp.add": {"rate_limit": "300/m"}}}
        )
        assert patched.status == 200, patched.text
        own_redis.start()

        # back on the same port: the worker reconnects, its consumers (the
        # runtime one too) are there and it has the new rate and the old time
        # limit. The new rate is branchd's doing (the reconnect's reconcile:
        # no sweep runs). The runtime consumer Celery 5.7 keeps on its own
        # across a Redis reconnect; one lost anyway is re-added, proven in
        # test_worker_health (a consumer lost across a broker restart).
        limits, _ = wait_for(lambda: seen("rate_limit=300/m"), 20, 0.2)
        assert "time_limit=1" in limits["testapp.sleep"], limits
        now = b.instance(app, name)
        assert (now["pid"], now["state"]) == (inst["pid"], "running"), now  # the same worker
        with Celery("probe", broker=url, set_as_current=False) as client:
            proof = tmp_path / "after-the-broker-restart"
            client.send_task("testapp.touch", args=[str(proof)], queue=extra)
            wait_for(proof.exists, 10, 0.05)
            # the time limit is in force, not only reported: a runaway is killed
            client.send_task("testapp.sleep", args=[60], queue=q1)
            wait_for(lambda: kills() == 1, 10, 0.2)
        assert b.instance(app, name)["pid"] == inst["pid"]  # the worker lives on
        # a stop while the broker is there (a stop without it is not what this tests)
        assert b.call("DELETE", f"/v1/apps/{app}").status == 204
    finally:
        b.call("DELETE", f"/v1/apps/{app}")
