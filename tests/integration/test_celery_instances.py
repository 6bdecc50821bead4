"""Celery instances through branchd's HTTP API, on three brokers.

A real daemon supervises real ``celery worker`` processes; Celery's own tools
are the oracle: ``celery inspect`` (a subprocess) for what a worker consumes
and its autoscaler, a Celery client app for sending tasks, and side effects
(a file the task writes, the worker's own log line) for what ran.

RabbitMQ and Redis are the machine's own (skipped locally when unreachable, a
failure under ``CI=true``); the embedded broker (an app without ``broker``)
lives in the daemon's state dir. Names carry a random token: the shared
brokers may see other test runs. The broker-restart test runs its own
``redis-server`` on a free port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery import Celery
from kombu import Exchange
from kombu import connection as kombu_connection

from branchd.celery.broker import BrokerSpec, embedded, worker_env
from tests.brokers import AMQP_URL, REDIS_URL, OwnRedis, reachable, unreachable
from tests.conftest import Branchd, wait_for

ROOT = Path(__file__).resolve().parents[2]
APP_MODULE = "tests.celery_app.tasks"
START = 30.0  # deadline for a worker to answer its first ping
Connection: Any = kombu_connection.Connection  # kombu is only partly annotated

#: Fast health checks and backoff; a sweep every 3 s re-applies declarations.
CONFIG = "health_interval = 0.5\nreconcile_interval = 3.0\nbackoff_base = 0.2\nbackoff_max = 1.0\n"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Celeryd:
    """One daemon, one app on one broker, and Celery's tools pointed at that broker."""

    b: Branchd
    kind: str  # amqp | redis | filesystem
    spec: BrokerSpec  # what the CLI and the sender use
    tmp: Path
    tok: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    app: str = ""

    def __post_init__(self) -> None:
        self.app = f"media-{self.tok}"

    def q(self, base: str) -> str:
        """A queue (or exchange) name unique to this test."""
        return f"{base}-{self.tok}"

    @property
    def cli_env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        # for the embedded broker: the loader hands the folders to any celery command
        return {**os.environ, "PYTHONPATH": path, **worker_env(self.spec, path)}

    def put_app(self, **celery: Any) -> dict[str, Any]:
        body = {
            "celery_app": APP_MODULE,
            "env": {"PYTHONPATH": str(ROOT)},  # the workers import the test app
            "pool": "prefork",
            **celery,
        }
        if self.kind != "filesystem":
            body.setdefault("broker", self.spec.url)
        reply = self.b.call("PUT", f"/v1/apps/{self.app}", body)
        assert reply.status in (200, 201), reply.text
        return reply.body  # type: ignore[no-any-return]

    def path(self, name: str, rest: str = "") -> str:
        return f"/v1/apps/{self.app}/instances/{name}{rest}"

    def create(self, name: str, **fields: Any) -> tuple[dict[str, Any], float]:
        """Create a celery instance and wait until it answered a ping: (view, seconds)."""
        t0 = time.monotonic()
        self.b.ok(
            "POST",
            f"/v1/apps/{self.app}/instances",
            {"name": name, "kind": "celery", **fields},
            201,
        )
        inst = self.wait_running(name)
        return inst, time.monotonic() - t0

    def wait_running(self, name: str, other_than: int | None = None) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            inst = self.b.instance(self.app, name)
            if inst["state"] in ("fatal", "exited"):
                raise AssertionError(
                    f"{name} is {inst['state']}: {inst['reason']}\n{self.logs(name)}"
                )
            ok = inst["state"] == "running" and inst["pid"] not in (None, other_than)
            return inst if ok else None

        return wait_for(check, START, 0.05)  # type: ignore[no-any-return]

    def logs(self, name: str) -> str:
        return self.b.call("GET", self.path(name, "/logs?stream=stderr&tail=200")).text

    # Celery's own tools --------------------------------------------------------

    def inspect(self, node: str, command: str) -> Any:
        """``celery inspect <command> -d <node> --json``: the node's reply, None if none."""
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            APP_MODULE,
            "-b",
            self.spec.url,
            "inspect",
            command,
            "-d",
            node,
            "--json",
            "-t",
            "3",
        ]
        run = subprocess.run(
            argv, cwd=ROOT, env=self.cli_env, capture_output=True, text=True, timeout=60
        )
        if run.returncode != 0:
            return None
        try:
            return json.loads(run.stdout).get(node)
        except ValueError:
            return None

    def active_queues(self, node: str) -> dict[str, Any]:
        """Queue name -> Celery's description of it, as the worker reports (retried)."""
        reply = wait_for(lambda: self.inspect(node, "active_queues"), 20, 0.1)
        return {q["name"]: q for q in reply}

    def autoscaler(self, node: str) -> tuple[int, int]:
        stats = wait_for(lambda: self.inspect(node, "stats"), 20, 0.1)
        return stats["autoscaler"]["min"], stats["autoscaler"]["max"]

    def send(self, task: str, args: list[Any], **options: Any) -> str:
        client = Celery(
            "sender",
            broker=self.spec.url,
            broker_transport_options=dict(self.spec.transport_options),
            task_serializer="json",
        )
        with client:
            return str(client.send_task(task, args=args, **options).id)

    def cleanup_broker(self) -> None:
        """Workers declare durable queues and exchanges: leave no litter on shared brokers."""
        if self.spec.is_filesystem:
            return
        names = [self.q(n) for n in ("default", "images", "thumbnails", "extra", "media")]
        with contextlib.suppress(Exception):
            conn: Any = Connection(self.spec.url, connect_timeout=2)
            try:
                channel = conn.channel()
                for name in names:
                    with contextlib.suppress(Exception):
                        channel.queue_delete(name)
                    with contextlib.suppress(Exception):
                        channel.exchange_delete(name)
            finally:
                conn.release()


@pytest.fixture
def stopped_pids() -> Iterator[list[psutil.Process]]:
    """Processes a test SIGSTOPped: SIGCONT in teardown (if still the same process)."""
    procs: list[psutil.Process] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGCONT)


def _daemon(factory: Callable[..., Branchd], tmp_path: Path) -> Branchd:
    config = tmp_path / "branchd.toml"
    config.write_text(CONFIG)
    return factory("--config", str(config))


@pytest.fixture(params=["amqp", "redis", "filesystem"])
def celeryd(
    request: pytest.FixtureRequest, branchd_factory: Callable[..., Branchd], tmp_path: Path
) -> Iterator[Celeryd]:
    kind = request.param
    if kind != "filesystem":
        url = AMQP_URL if kind == "amqp" else REDIS_URL
        if not reachable(url):
            unreachable(url)
    b = _daemon(branchd_factory, tmp_path)
    c = Celeryd(b, kind, BrokerSpec(url if kind != "filesystem" else ""), tmp_path)
    if kind == "filesystem":  # the app's own embedded broker
        c.spec = embedded(b.state_dir, c.app)
    yield c
    c.cleanup_broker()


def _declare_images(c: Celeryd) -> None:
    c.b.ok(
        "PUT",
        f"/v1/apps/{c.app}/queues/{c.q('images')}",
        {"exchange": c.q("media"), "exchange_type": "topic", "routing_key": "image.#"},
        201,
    )


# 1-4: a worker starts with its declarations, takes runtime changes, keeps them over a crash


@pytest.mark.slow
def _celery_metrics(c: Celeryd, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = c.b.call("GET", "/metrics").text
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("branchd_celery_") and s.labels == {"app": c.app, "name": name}
    }


def test_runtime_changes_are_live_and_survive_a_crash(celeryd: Celeryd) -> None:
    c = celeryd
    # Celery users put ":" in queue names (the embedded broker wants a declared
    # exchange for those: see test_the_embedded_broker_needs_plain_exchange_names)
    thumb = "thumb.nails" if c.kind == "filesystem" else "thumb:nails"
    default, images, thumbs = c.q("default"), c.q("images"), c.q(thumb)
    c.put_app()
    _declare_images(c)
    inst, took = c.create("w1-" + c.tok, queues=[default, images], autoscale={"min": 1, "max": 4})
    print(f"\n{c.kind}: create -> running in {took:.2f}s")
    name, node = inst["name"], inst["node"]
    assert node == f"{name}@{socket.gethostname()}"
    assert "--autoscale=4,1" in inst["command"]
    # No password on the worker's command line (`ps` shows it to every user),
    # nor in any answer: the broker rides in the worker's environment.
    password = urllib.parse.urlsplit(c.spec.url).password
    if password:
        cmdline = " ".join(psutil.Process(inst["pid"]).cmdline())
        assert password not in cmdline and password not in " ".join(inst["command"])
        assert f":{password}@" not in c.b.call("GET", f"/v1/apps/{c.app}").text

    # The declared topic binding replaces -Q's default one shortly after the start.
    def images_bound() -> dict[str, Any] | None:
        queues = c.active_queues(node)
        ex = queues.get(images, {}).get("exchange", {})
        bound = ex.get("name") == c.q("media") and ex.get("type") == "topic"
        return queues if bound and queues[images]["routing_key"] == "image.#" else None

    assert set(wait_for(images_bound, 20, 0.2)) == {default, images}
    proof = c.tmp / "by-topic"
    media = Exchange(c.q("media"), type="topic")  # declared: the sender knows its type
    c.send("testapp.touch", [str(proof)], exchange=media, routing_key="image.png", declare=[media])
    wait_for(proof.exists, 20, 0.05)

    # 2. a consumer added at runtime, confirmed before the answer, and used
    items = c.b.ok("PUT", c.path(name, f"/queues/{thumbs}"))["items"]
    assert {"name": thumbs, "wanted": True, "declared": False, "live": True} in items
    assert thumbs in c.active_queues(node)
    proof = c.tmp / "thumbnail"
    c.send("testapp.touch", [str(proof)], queue=thumbs)
    wait_for(proof.exists, 20, 0.05)

    items = c.b.ok("DELETE", c.path(name, f"/queues/{images}"))["items"]
    assert images not in {i["name"] for i in items}
    assert set(c.active_queues(node)) == {default, thumbs}

    # 3. autoscale at runtime; min > max refused
    auto = c.b.ok("PUT", c.path(name, "/autoscale"), {"min": 2, "max": 8})
    assert auto == {"min": 2, "max": 8, "live": {"min": 2, "max": 8}}
    assert c.autoscaler(node) == (2, 8)
    bad = c.b.call("PUT", c.path(name, "/autoscale"), {"min": 9, "max": 8})
    assert bad.status == 422 and bad.body["error"]["code"] == "invalid", bad.text
    assert c.b.ok("GET", c.path(name, "/autoscale"))["max"] == 8

    # stats give the live pool size (the autoscaler grows it to min 2), not
    # Celery's max-concurrency, which stays what it was at start
    def grown() -> dict[str, Any] | None:
        celery = c.b.ok("GET", c.path(name, "/stats"))["celery"]
        return celery if celery["pool_size"] >= 2 else None

    celery = wait_for(grown, 20, 0.2)
    assert celery["pool_size"] == len(celery["stats"]["pool"]["processes"])
    # the metrics show what the stats last said (a scrape asks no worker)
    figures = _celery_metrics(c, name)
    assert figures["branchd_celery_pool_size"] == celery["pool_size"]

    # 4. a crash: the new worker comes back with the declared queues and range
    old = inst["pid"]
    os.kill(old, signal.SIGKILL)
    again = c.wait_running(name, other_than=old)
    assert again["restarts"] == inst["restarts"] + 1
    assert again["queues"] == [default, thumbs]
    assert "--autoscale=8,2" in again["command"]
    assert set(c.active_queues(node)) == {default, thumbs}
    assert c.autoscaler(node) == (2, 8)
    assert not _alive(old)


# 5, 8, 9: a hung worker is replaced; a stop is warm; deleting the app leaves nothing


@pytest.mark.slow
def test_hung_worker_warm_stop_and_app_delete(
    celeryd: Celeryd, stopped_pids: list[psutil.Process]
) -> None:
    c = celeryd
    default = c.q("default")
    c.put_app()
    _declare_images(c)
    inst, took = c.create("w1-" + c.tok, queues=[default], hung_after=2, stopwaitsecs=60)
    print(f"\n{c.kind}: create -> running in {took:.2f}s")
    name, node = inst["name"], inst["node"]

    # 5. SIGSTOP: no pong for hung_after seconds -> killed and started again
    old = inst["pid"]
    stopped_pids.append(psutil.Process(old))
    os.kill(old, signal.SIGSTOP)
    t0 = time.monotonic()
    replaced = wait_for(
        lambda: (i := c.b.instance(c.app, name))["pid"] not in (None, old) and i, 20, 0.02
    )
    silence = time.monotonic() - t0
    assert "no answer to ping for 2s" in (replaced["reason"] or ""), replaced
    assert 2.0 <= silence < 8.0, silence
    assert not _alive(old)
    again = c.wait_running(name, other_than=old)
    assert again["restarts"] == inst["restarts"] + 1

    # 8. warm stop: the task running at the stop finishes first (the drain), then
    # the worker exits 0 on TERM
    task = c.send("testapp.sleep", [2.5], queue=default)

    def running_task() -> bool:
        active = c.b.ok("GET", c.path(name, "/stats"))["celery"]["active"] or []
        return any(t.get("id") == task for t in active)

    wait_for(running_task, 20, 0.05)
    assert _celery_metrics(c, name)["branchd_celery_active_tasks"] == 1
    t0 = time.monotonic()
    # A generous client timeout: on a loaded machine a warm shutdown can be slow;
    # a stuck one still fails below, with the worker's and the daemon's logs.
    reply = c.b.call("POST", c.path(name, "/stop"), timeout=120)
    took = time.monotonic() - t0
    assert reply.status == 200, reply.text
    stopped = reply.body
    if stopped["stop_step"] != "drain":
        print("worker log:\n", c.logs(name)[-4000:], "\ndaemon log:\n", c.b.log()[-4000:])
    assert (stopped["state"], stopped["stop_step"], stopped["exit_code"]) == (
        "stopped",
        "drain",
        0,
    ), stopped
    assert took >= 1.0, took  # it waited for the task (2.5 s, started a moment ago)
    assert f"Task testapp.sleep[{task}] succeeded" in c.logs(name)
    assert not _alive(again["pid"])

    # 9. deleting the app stops its running worker and forgets its queues
    c.b.ok("POST", c.path(name, "/start"))
    running = c.wait_running(name)
    family = [psutil.Process(running["pid"]), *psutil.Process(running["pid"]).children(True)]
    assert len(family) >= 2  # prefork: the main process and its pool
    assert c.b.call("DELETE", f"/v1/apps/{c.app}").status == 204
    assert [p.pid for p in family if _alive(p.pid)] == []
    assert c.b.call("GET", f"/v1/apps/{c.app}").status == 404
    assert c.b.call("GET", c.path(name)).status == 404
    assert c.b.ok("GET", "/v1/branch")["capacity"]["instances"] == 0
    c.put_app()  # the same name again starts empty: no queue declarations left
    assert c.b.ok("GET", f"/v1/apps/{c.app}/queues")["items"] == []
    assert c.b.ok("GET", f"/v1/apps/{c.app}/instances")["items"] == []
    assert c.inspect(node, "ping") is None  # nobody answers for the node any more


# 6: a broker that cannot be reached


@pytest.mark.slow
@pytest.mark.parametrize(
    "url", ["amqp://guest:guest@127.0.0.1:1//", "redis://127.0.0.1:1/0"], ids=["amqp", "redis"]
)
def test_unreachable_broker_is_reported_and_the_api_stays_responsive(
    url: str, branchd_factory: Callable[..., Branchd], tmp_path: Path
) -> None:
    b = _daemon(branchd_factory, tmp_path)
    c = Celeryd(b, "unreachable", BrokerSpec(url), tmp_path)
    c.put_app(broker=url)
    name = "w1-" + c.tok
    # startsecs 4: the broker is given up on after 2 s, before the start deadline
    body = {"name": name, "kind": "celery", "startsecs": 4}
    b.ok("POST", f"/v1/apps/{c.app}/instances", body, 201)
    slowest = 0.0

    def failed() -> dict[str, Any] | None:
        nonlocal slowest
        t0 = time.perf_counter()
        inst = b.instance(c.app, name)
        b.ok("GET", c.path(name, "/queues"))
        b.ok("GET", "/v1/apps")
        slowest = max(slowest, time.perf_counter() - t0)
        return inst if inst["state"] in ("backoff", "fatal") else None

    t0 = time.monotonic()
    inst = wait_for(failed, 20, 0.1)
    print(f"\n{url}: {inst['state']} after {time.monotonic() - t0:.1f}s: {inst['reason']}")
    reason = inst["reason"] or ""
    assert "cannot reach the broker" in reason and "127.0.0.1:1" in reason, reason
    assert "refused" in reason.lower(), reason  # the cause, not just a timeout
    assert "guest:guest" not in reason  # the password is not shown
    assert slowest < 0.5, slowest


# 7: the broker restarts under a running worker


@pytest.mark.slow
def test_worker_and_declarations_survive_a_broker_restart(
    branchd_factory: Callable[..., Branchd], tmp_path: Path, own_redis: OwnRedis
) -> None:
    url = own_redis.url
    b = _daemon(branchd_factory, tmp_path)
    c = Celeryd(b, "redis", BrokerSpec(url), tmp_path)
    default, extra = c.q("default"), c.q("extra")
    c.put_app()
    inst, _ = c.create("w1-" + c.tok, queues=[default])
    name, node = inst["name"], inst["node"]
    c.b.ok("PUT", c.path(name, f"/queues/{extra}"))  # added before the outage
    assert set(c.active_queues(node)) == {default, extra}

    own_redis.stop(kill=False)
    t0 = time.perf_counter()
    assert c.b.instance(c.app, name)["state"] == "running"  # not taken for hung
    assert time.perf_counter() - t0 < 0.5
    own_redis.start()

    # the worker reconnects; its consumers (the one added at runtime too) are back
    def consuming() -> bool:
        if c.b.instance(c.app, name)["state"] != "running":
            return False
        reply = c.inspect(node, "active_queues")  # None while the broker is away
        return reply is not None and {q["name"] for q in reply} == {default, extra}

    wait_for(consuming, 60, 0.2)
    proof = c.tmp / "after-restart"
    c.send("testapp.touch", [str(proof)], queue=extra)
    wait_for(proof.exists, 30, 0.05)
    now = c.b.instance(c.app, name)
    print(f"\nredis restart: pid kept {now['pid'] == inst['pid']}, restarts {now['restarts']}")
    # stop while the broker is there (a stop without it is not what this tests)
    assert c.b.call("DELETE", f"/v1/apps/{c.app}").status == 204
    assert not _alive(now["pid"])
