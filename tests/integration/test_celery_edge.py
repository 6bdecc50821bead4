"""The Celery edge against real ``celery worker`` processes on three brokers.

RabbitMQ and Redis are the machine's own (skipped locally when unreachable,
a failure in CI); the embedded filesystem broker lives in the test's tmp dir.
Every worker runs in its own process group and is SIGKILLed in teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import connection as kombu_connection

from branchd.celery import fs_transport
from branchd.celery import remote as remote_module
from branchd.celery.argv import worker_argv
from branchd.celery.broker import (
    BrokerSpec,
    clear_node_leftovers,
    control_queue,
    embedded,
    prune_dead_fanout,
    worker_env,
)
from branchd.celery.remote import KombuRemoteControl, RemoteControl
from branchd.celery.stub import StubRemoteControl
from branchd.errors import BrokerMisconfigured, BrokerUnavailable
from tests.brokers import AMQP_URL, REDIS_URL, free_port, reachable, start_redis, unreachable

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.celery_app.tasks"
START_DEADLINE = 30.0
Connection: Any = kombu_connection.Connection  # kombu is only partly annotated


@pytest.fixture(params=["amqp", "redis", "filesystem"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> BrokerSpec:
    kind = request.param
    if kind == "filesystem":
        return embedded(tmp_path / "state")
    url = AMQP_URL if kind == "amqp" else REDIS_URL
    if not reachable(url):
        unreachable(url)
    return BrokerSpec(url)


@pytest.fixture
async def remote() -> AsyncIterator[KombuRemoteControl]:
    rc = KombuRemoteControl()
    yield rc
    await asyncio.wait_for(rc.close(), 10)


@dataclass
class Worker:
    node: str
    proc: subprocess.Popen[bytes]
    log: Path
    queues: list[str]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


WorkerFactory = Callable[..., Worker]


def unique(prefix: str) -> str:
    return f"branchd-test-{prefix}-{uuid.uuid4().hex[:10]}"


def start_worker(
    spec: BrokerSpec,
    logdir: Path,
    *,
    queues: list[str] | None = None,
    autoscale: tuple[int, int] | None = None,
    pool: str = "solo",
    node: str | None = None,
) -> Worker:
    node = node or f"{unique('w')}@branchd-test"
    queues = queues or [unique("q")]
    clear_node_leftovers(spec, node)
    argv = worker_argv(
        sys.executable,
        APP,
        node,
        spec.url,
        queues,
        autoscale,
        None if autoscale else 1,
        pool,
        "INFO",
        ["--without-heartbeat"],
    )
    env = {**os.environ, **worker_env(spec, os.environ.get("PYTHONPATH"))}
    log = logdir / f"{node}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Worker(node, proc, log, queues)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


@pytest.fixture
def workers(broker: BrokerSpec, tmp_path: Path) -> Iterator[WorkerFactory]:
    started: list[Worker] = []

    def create(**kw: Any) -> Worker:
        w = start_worker(kw.pop("spec", broker), tmp_path, **kw)
        started.append(w)
        return w

    yield create
    for w in started:
        kill_group(w.proc)
    delete_queues(broker, [q for w in started for q in w.queues])
    if broker.is_filesystem:
        prune_dead_fanout(broker, ())


async def wait_ping(
    rc: KombuRemoteControl, spec: BrokerSpec, worker: Worker, deadline: float = START_DEADLINE
) -> float:
    """Re-send ping until the worker answers (a ping before its queue exists is lost)."""
    start = time.monotonic()
    while True:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited {worker.proc.returncode}:\n{worker.output()}")
        with contextlib.suppress(BrokerUnavailable):
            if await rc.call(spec, worker.node, "ping", timeout=0.5) == {"ok": "pong"}:
                return time.monotonic() - start
        if time.monotonic() - start > deadline:
            raise AssertionError(f"no pong within {deadline}s:\n{worker.output()}")


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def sender(spec: BrokerSpec) -> Celery:
    """A Celery client app on the same broker, to send tasks the way users do."""
    return Celery(
        "sender",
        broker=spec.url,
        broker_transport_options=dict(spec.transport_options),
        task_serializer="json",
    )


def queue_names(reply: dict[str, Any] | None) -> set[str]:
    assert reply is not None and "ok" in reply, reply
    return {q["name"] for q in reply["ok"]}


def delete_queues(spec: BrokerSpec, names: list[str]) -> None:
    """Workers declare durable queues (and exchanges): leave no litter on shared brokers."""
    if spec.is_filesystem:
        return
    conn: Any = Connection(spec.url)
    try:
        channel = conn.channel()
        for name in names:
            with contextlib.suppress(Exception):
                channel.queue_delete(name)
            with contextlib.suppress(Exception):
                channel.exchange_delete(name)
    finally:
        conn.release()


async def test_ping_by_node_name(
    broker: BrokerSpec, remote: KombuRemoteControl, workers: WorkerFactory
) -> None:
    worker = workers()
    startup = await wait_ping(remote, broker, worker)
    rtts = []
    for _ in range(20):
        t0 = time.perf_counter()
        assert await remote.call(broker, worker.node, "ping") == {"ok": "pong"}
        rtts.append(time.perf_counter() - t0)
    print(
        f"\n{broker.url.split(':')[0]}: first pong {startup:.2f}s after spawn, "
        f"ping median {statistics.median(rtts) * 1000:.2f} ms, max {max(rtts) * 1000:.2f} ms"
    )


async def test_unknown_node_gets_none_at_the_timeout(
    broker: BrokerSpec, remote: KombuRemoteControl, workers: WorkerFactory
) -> None:
    worker = workers()
    await wait_ping(remote, broker, worker)  # the link is up; a prefix of a live name
    t0 = time.monotonic()
    assert await remote.call(broker, worker.node[:-3], "ping", timeout=0.3) is None
    elapsed = time.monotonic() - t0
    assert 0.29 <= elapsed < 0.6, elapsed


async def test_consumers_added_confirmed_used_and_cancelled(
    broker: BrokerSpec,
    remote: KombuRemoteControl,
    workers: WorkerFactory,
    tmp_path: Path,
) -> None:
    first, extra = unique("q1"), unique("q2")
    worker = workers(queues=[first])
    await wait_ping(remote, broker, worker)
    try:
        reply = await remote.call(broker, worker.node, "active_queues")
        assert queue_names(reply) == {first}

        reply = await remote.call(
            broker,
            worker.node,
            "add_consumer",
            {"queue": extra, "exchange": extra, "exchange_type": "direct", "routing_key": extra},
        )
        assert reply == {"ok": f"add consumer {extra}"}

        async def has_extra() -> bool:
            return extra in queue_names(await remote.call(broker, worker.node, "active_queues"))

        await eventually(has_extra)

        proof = tmp_path / "touched"
        with sender(broker) as app:
            app.send_task("testapp.touch", args=[str(proof)], queue=extra)
        await eventually(lambda: asyncio.sleep(0, proof.exists()), timeout=15)

        reply = await remote.call(broker, worker.node, "cancel_consumer", {"queue": extra})
        assert reply == {"ok": f"no longer consuming from {extra}"}

        async def extra_gone() -> bool:
            return extra not in queue_names(await remote.call(broker, worker.node, "active_queues"))

        await eventually(extra_gone)
        # errors arrive as replies: autoscale on a worker started without --autoscale
        reply = await remote.call(broker, worker.node, "autoscale", {"max": 2, "min": 1})
        assert reply is not None and "error" in reply, reply
    finally:
        delete_queues(broker, [first, extra])


async def test_autoscale_changes_the_range_shown_by_stats(
    broker: BrokerSpec, remote: KombuRemoteControl, workers: WorkerFactory
) -> None:
    worker = workers(autoscale=(2, 1), pool="prefork")
    await wait_ping(remote, broker, worker)
    stats = await remote.call(broker, worker.node, "stats", timeout=3)
    assert stats is not None and stats["autoscaler"]["max"] == 2, stats
    reply = await remote.call(broker, worker.node, "autoscale", {"max": 3, "min": 2})
    assert reply == {"ok": "autoscale now max=3 min=2"}
    stats = await remote.call(broker, worker.node, "stats", timeout=3)
    assert stats is not None
    assert (stats["autoscaler"]["max"], stats["autoscaler"]["min"]) == (3, 2), stats
    assert stats["pid"] == worker.proc.pid
    if broker.is_filesystem:  # the loader handed the spec's folders to the worker
        options = stats["broker"]["transport_options"]
        assert options["data_folder_in"] == broker.transport_options["data_folder_in"]


async def test_shutdown_cast_makes_the_worker_exit(
    broker: BrokerSpec, remote: KombuRemoteControl, workers: WorkerFactory
) -> None:
    worker = workers()
    await wait_ping(remote, broker, worker)
    await remote.cast(broker, worker.node, "shutdown")
    assert await asyncio.to_thread(worker.proc.wait, 20) == 0


async def test_concurrent_calls_to_two_nodes_keep_their_replies(
    broker: BrokerSpec, remote: KombuRemoteControl, workers: WorkerFactory
) -> None:
    a, b = workers(), workers()
    await asyncio.gather(wait_ping(remote, broker, a), wait_ping(remote, broker, b))
    calls = [remote.call(broker, w.node, "stats", timeout=5) for w in (a, b) * 10]
    replies = await asyncio.gather(*calls)
    pids = [r["pid"] if r else None for r in replies]
    assert pids == [a.proc.pid, b.proc.pid] * 10


async def test_a_late_reply_does_not_leak_into_the_next_call(
    broker: BrokerSpec, remote: KombuRemoteControl, workers: WorkerFactory
) -> None:
    queue = unique("busy")
    worker = workers(queues=[queue])  # solo pool: answers only between tasks
    await wait_ping(remote, broker, worker)
    try:
        with sender(broker) as app:
            app.send_task("testapp.sleep", args=[2.0], queue=queue)
        await asyncio.sleep(0.6)  # the task has started
        assert await remote.call(broker, worker.node, "active_queues", timeout=0.3) is None
        # the worker answers the old request first, then this one
        reply = await remote.call(broker, worker.node, "ping", timeout=10)
        assert reply == {"ok": "pong"}
    finally:
        delete_queues(broker, [queue])


async def test_filesystem_leftovers_and_dead_fanout(tmp_path: Path) -> None:
    spec = embedded(tmp_path / "state")
    async with contextlib.AsyncExitStack() as stack:
        rc = KombuRemoteControl()
        stack.push_async_callback(rc.close)
        worker = start_worker(spec, tmp_path)
        stack.callback(kill_group, worker.proc)
        await wait_ping(rc, spec, worker)
        kill_group(worker.proc)  # SIGKILL: no unbind
        # while it is down, a broadcast is copied into its queue: a stale shutdown
        await rc.cast(spec, worker.node, "shutdown")
        data = Path(spec.transport_options["data_folder_in"])
        stale = [p for p in data.iterdir() if p.name.endswith(f".{control_queue(worker.node)}.msg")]
        assert stale
        assert prune_dead_fanout(spec, live_nodes=()) == [control_queue(worker.node)]
        assert clear_node_leftovers(spec, worker.node) == 0  # already dropped by the prune

        # the same node starts again and is not shut down by the old message
        again = start_worker(spec, tmp_path, node=worker.node)
        stack.callback(kill_group, again.proc)
        await wait_ping(rc, spec, again)
        await asyncio.sleep(0.5)
        assert again.proc.poll() is None


def _remote_records(caplog: pytest.LogCaptureFixture, level: int, where: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "branchd.celery.remote" and r.levelno == level and where in r.getMessage()
    ]


@pytest.mark.slow
async def test_calls_work_again_after_a_redis_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if shutil.which("redis-server") is None:
        unreachable("redis-server (binary)")
    caplog.set_level(logging.DEBUG, logger="branchd.celery.remote")
    port = free_port()
    spec = BrokerSpec(f"redis://127.0.0.1:{port}/0")
    where = f"127.0.0.1:{port}"
    redis = start_redis(port, tmp_path)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(lambda: kill_group(redis))
        # reconnect attempts every 0.1 s: many of them while the broker is down
        rc = KombuRemoteControl(backoff_max=0.1, connect_timeout=0.5)
        stack.push_async_callback(rc.close)
        worker = start_worker(spec, tmp_path)
        stack.callback(kill_group, worker.proc)
        await wait_ping(rc, spec, worker)

        redis.terminate()
        redis.wait(10)
        with contextlib.suppress(BrokerUnavailable):
            assert await rc.call(spec, worker.node, "ping", timeout=0.5) is None

        def attempts() -> int:
            health = rc.health(spec)
            return health.attempts if health else 0

        await eventually(lambda: _true(attempts() >= 15), timeout=30, interval=0.05)
        link = rc._links[spec]  # the thread itself: it must live through the outage
        assert link._consumer.is_alive()
        warned = _remote_records(caplog, logging.WARNING, where)
        # said once (plus a reminder or two at 2 s, 4 s), not once per attempt
        assert 1 <= len(warned) <= 3, warned
        assert any("Connection refused" in w for w in warned), warned

        redis = start_redis(port, tmp_path)
        # both the worker and our reply queue reconnect on their own
        await wait_ping(rc, spec, worker, deadline=45)
        assert await rc.call(spec, worker.node, "ping") == {"ok": "pong"}
        assert link._consumer.is_alive() and worker.proc.poll() is None
        recovered = [m for m in _remote_records(caplog, logging.INFO, where) if "again" in m]
        assert recovered == [f"pidbox reply queue on {spec.redacted()} works again"]
        assert rc.health(spec) == type(rc.health(spec))()  # healthy again


async def _true(value: bool) -> bool:
    return value


async def test_reply_queue_survives_a_transport_that_does_not_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Building the connection fails (ImportError, as with a missing ``packaging``):
    the link says so as a configuration error, retries, and works once it can."""
    caplog.set_level(logging.DEBUG, logger="branchd.celery.remote")
    spec = embedded(tmp_path / "state")
    broken = threading.Event()
    broken.set()
    built = 0

    def factory(s: BrokerSpec, timeout: float) -> Any:
        nonlocal built
        built += 1
        if broken.is_set():
            raise ModuleNotFoundError("No module named 'packaging'")
        return remote_module.kombu_connection(s, timeout)

    rc = KombuRemoteControl(connection_factory=factory, backoff_max=0.05)
    try:
        cause = "the filesystem transport cannot be loaded: No module named 'packaging'"
        with pytest.raises(BrokerMisconfigured, match=cause):
            await rc.call(spec, "nobody@branchd-test", "ping", timeout=0.3)
        with pytest.raises(BrokerMisconfigured, match=cause):  # the publisher side too
            await rc.cast(spec, "nobody@branchd-test", "ping")
        await eventually(lambda: _true(built >= 10), interval=0.02)
        link = rc._links[spec]
        assert link._consumer.is_alive()
        warned = _remote_records(caplog, logging.WARNING, "filesystem")
        assert len(warned) == 1 and cause in warned[0], warned

        broken.clear()

        # an unknown node: no reply (None) instead of an error means the link works
        async def works() -> bool:
            try:
                return await rc.call(spec, "nobody@branchd-test", "ping", timeout=0.2) is None
            except BrokerUnavailable:
                return False

        await eventually(works)
        await rc.cast(spec, "nobody@branchd-test", "ping")
        assert link._consumer.is_alive()
        assert len(_remote_records(caplog, logging.INFO, "works again")) == 1
    finally:
        await asyncio.wait_for(rc.close(), 10)


async def worker_scenario(rc: RemoteControl, spec: BrokerSpec, node: str) -> None:
    """What branchd relies on, in the order it uses it; shared by the worker and the stub."""
    extra = unique("extra")
    assert await rc.call(spec, node, "ping") == {"ok": "pong"}
    reply = await rc.call(spec, node, "add_consumer", {"queue": extra})
    assert reply == {"ok": f"add consumer {extra}"}

    async def has_extra() -> bool:
        return extra in queue_names(await rc.call(spec, node, "active_queues"))

    await eventually(has_extra)
    reply = await rc.call(spec, node, "autoscale", {"max": 2, "min": 1})
    assert reply == {"error": "ValueError('Autoscale not enabled')"}
    reply = await rc.call(spec, node, "no_such_command")
    assert reply == {"error": "KeyError('no_such_command')"}
    assert await rc.call(spec, node + "x", "ping", timeout=0.2) is None
    await rc.cast(spec, node, "shutdown")
    await eventually(lambda: _no_pong(rc, spec, node), timeout=15)


async def _no_pong(rc: RemoteControl, spec: BrokerSpec, node: str) -> bool:
    return await rc.call(spec, node, "ping", timeout=0.3) is None


@pytest.mark.parametrize("kind", ["worker", "stub"])
async def test_the_stub_answers_like_a_worker(kind: str, tmp_path: Path) -> None:
    spec = embedded(tmp_path / "state")
    if kind == "stub":
        stub = StubRemoteControl()
        node = stub.add_node("w1@stub", queues=["q"]).name
        await worker_scenario(stub, spec, node)
        assert stub.commands(node)[:2] == ["ping", "add_consumer"]
        return
    rc = KombuRemoteControl()
    worker = start_worker(spec, tmp_path)
    try:
        await wait_ping(rc, spec, worker)
        await worker_scenario(rc, spec, worker.node)
        assert await asyncio.to_thread(worker.proc.wait, 15) == 0
    finally:
        await rc.close()
        kill_group(worker.proc)


def test_filesystem_reader_waits_for_a_half_written_message(tmp_path: Path) -> None:
    """kombu's stock _put creates the file before writing it; our _get must not read it empty."""
    spec = embedded(tmp_path / "state")
    data = Path(spec.transport_options["data_folder_in"])
    conn: Any = Connection(
        spec.url, transport=fs_transport.Transport, transport_options=dict(spec.transport_options)
    )
    try:
        channel = conn.channel()
        with open(data / f"1_{uuid.uuid4()}.q1.msg", "wb", buffering=0) as fh:  # created, empty

            def finish() -> None:
                time.sleep(0.1)
                fh.write(b'{"body": "hello"}')

            writer = threading.Thread(target=finish)
            writer.start()
            assert channel._get("q1") == {"body": "hello"}
            writer.join()
        channel._put("q1", {"body": "again"})
        assert [p.name.partition(".")[2] for p in data.iterdir()] == ["q1.msg"]
        assert channel._get("q1") == {"body": "again"}
    finally:
        conn.release()
