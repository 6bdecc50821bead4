#!/usr/bin/env python3
"""branchd's Celery instances against hand-run workers, on this machine (issue 3).

One branchd daemon (fresh temp state dir) supervises Celery workers of the
small test app ``tests.celery_app.tasks`` on a real broker (RabbitMQ by
default). Measured, in the same run:

1. create -> running: ``POST /v1/apps/{app}/instances`` (kind celery, prefork
   ``-c 2``, or ``--autoscale`` 2,2), then ``GET`` polled until the state is
   ``running`` (branchd's readiness: the worker answered a remote-control
   ping); against spawning the very argv branchd runs (the instance's
   ``command``, with another node name) by hand and polling
   ``app.control.ping(destination=[node], timeout=0.1)`` until it answers.
   A fresh node name every time; the two alternate which goes first. Median of
   --runs; branchd's overhead in %.
   Diagnosis (--probe-runs, kept out of the medians): the same branchd create
   while this script also pings the node every 0.02 s, which shows when the
   worker could first have answered, and so how long branchd took to notice.
2. consumer add: ``PUT /v1/apps/{app}/instances/{name}/queues/{q}`` (answers
   once the worker confirms through ``active_queues``), a fresh queue name
   each time, then ``DELETE`` of it; p50/p99 of --adds of each, after a few
   warm-up pairs. Diagnosis (--trace-adds): the remote-control steps of an
   add/remove spoken from this script with branchd's own client
   (KombuRemoteControl), each timed, ``active_queues`` polled back to back.
   The durable queues ``add_consumer`` declares are deleted from the broker
   at the end (only ours, by name).
3. memory: PSS (psutil ``memory_full_info().pss``) summed over an idle
   worker's process tree, pool solo vs prefork ``-c 2``, each instance alone,
   measured --settle-secs after it is running; median of --runs.

Run it with the project venv (celery, psutil), from anywhere:

    .venv/bin/python bench/celery_compare.py [--runs 5] [--broker amqp://...]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import auth_headers, log, machine, med, ok, wait_for, write_section

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Celery instances (issue 3)"
APP = "cbench"
CELERY_APP = "tests.celery_app.tasks"
MiB = 1024 * 1024

#: Steps of the consumer trace (ms, except the poll counts).
TRACE_STEPS = (
    "ping",
    "active_queues",
    "add_consumer reply",
    "add reply -> queue in active_queues",
    "add: active_queues polls until it shows",
    "cancel_consumer reply",
    "cancel reply -> queue gone from active_queues",
    "cancel: active_queues polls until it is gone",
)  # then "broker alone: ..." (declare_times)

#: Targets of issue 3 (branchd's side).
TARGET_OVERHEAD_PCT = 10.0
TARGET_ADD_P50_MS = 20.0


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# The daemon -------------------------------------------------------------------


class Daemon:
    """One branchd, its temp state dir, and a keep-alive HTTP client."""

    def __init__(self, python: str, keep: bool) -> None:
        self.python = python
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="bench-celery-"))
        self.log_path = self.dir / "daemon.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: http.client.HTTPConnection | None = None
        self.auth: dict[str, str] = {}  # the daemon's token, once it listens

    def launch(self) -> None:
        state = self.dir / "state"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [self.python, "-m", "branchd", "--state-dir", str(state), "--bind", "127.0.0.1:0"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        url_file = state / "branchd.url"

        def ready() -> str | None:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"branchd exited early:\n{self.tail()}")
            return url_file.read_text().strip() if url_file.exists() else None

        url = wait_for(ready, 30, "branchd.url")
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname and parts.port
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        self.auth = auth_headers(state)

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def call(
        self, method: str, path: str, body: Any = None, expect: tuple[int, ...] = (200,)
    ) -> Any:
        """One request over the keep-alive connection; the JSON answer."""
        assert self.conn is not None
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, body=data, headers={**self.auth, **headers})
        resp = self.conn.getresponse()
        raw = resp.read()
        if resp.status not in expect:
            raise RuntimeError(f"{method} {path}: {resp.status} {raw[:400]!r}")
        return json.loads(raw) if raw else None

    def instance(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/apps/{APP}/instances/{name}")  # type: ignore[no-any-return]

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", f"/v1/apps/{APP}/instances", body, expect=(201,))  # type: ignore[no-any-return]

    def remove(self, name: str) -> None:
        self.call("DELETE", f"/v1/apps/{APP}/instances/{name}", expect=(204, 404))

    def stop(self) -> list[str]:
        """SIGTERM the daemon, wait, check every child it had is gone."""
        problems: list[str] = []
        if self.conn is not None:
            self.conn.close()
        if self.proc is None:
            return problems
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                problems.append("branchd ignored SIGTERM for 60 s; SIGKILL")
                self.proc.kill()
                self.proc.wait()
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                kid.wait(10)
            with contextlib.suppress(psutil.Error):
                if kid.is_running() and kid.status() != psutil.STATUS_ZOMBIE:
                    problems.append(f"branchd left pid {kid.pid} running; SIGKILL")
                    kid.kill()
        return problems

    def cleanup(self, failed: bool) -> None:
        if self.keep or failed:
            log(f"state dir kept: {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


# Remote control from this script (celery's own client) ---------------------------


class Control:
    """celery's control client on the same broker (this script imports celery)."""

    def __init__(self, broker: str) -> None:
        from celery import Celery

        self.app = Celery("celery_compare", broker=broker, set_as_current=False)
        self.app.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)

    def ping(self, node: str, timeout: float = 0.1) -> bool:
        replies = self.app.control.ping(destination=[node], timeout=timeout)
        return any(node in r for r in replies or [])

    def cast_ping(self, node: str) -> None:
        self.app.control.broadcast("ping", destination=[node], reply=False)

    def call(self, node: str, command: str, timeout: float = 1.0, **arguments: Any) -> Any:
        replies = self.app.control.broadcast(
            command, arguments=arguments, destination=[node], reply=True, timeout=timeout
        )
        for r in replies or []:
            if node in r:
                return r[node]
        return None

    def active_queues(self, node: str) -> list[str] | None:
        reply = self.call(node, "active_queues")
        if not isinstance(reply, list):
            return None
        return [q["name"] for q in reply if isinstance(q, dict) and "name" in q]

    def delete_queues(self, names: list[str]) -> int:
        """Delete our own queues from the broker (add_consumer declares durable ones)."""
        deleted = 0
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            for name in names:
                with contextlib.suppress(Exception):
                    channel.queue_delete(name)
                    deleted += 1
        return deleted


# By hand ------------------------------------------------------------------------


class HandWorker:
    """The same argv, spawned like branchd does (own session, no stdin, logs to files)."""

    def __init__(self, argv: list[str], node: str, logdir: Path) -> None:
        self.argv = argv
        self.node = node
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        name = self.node.split("@", 1)[0]
        with (
            open(self.logdir / f"{name}.out", "wb") as out,
            open(self.logdir / f"{name}.err", "wb") as err,
        ):
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
                close_fds=True,
            )

    def stop(self, control: Control) -> None:
        """Warm stop as branchd does it: TERM, a ping to wake it; KILL the group at 15 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(Exception):
                control.cast_ping(self.node)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                log(f"  {self.node} ignored SIGTERM for 15 s; SIGKILL to its group")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # its own session, so its pgid is its pid: only its leftovers
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


# Measures ---------------------------------------------------------------------


@dataclass
class Results:
    start_branchd_s: list[float] = field(default_factory=list)
    start_hand_s: list[float] = field(default_factory=list)
    post_ms: list[float] = field(default_factory=list)
    # diagnosis runs: branchd running vs the first answer to this script's pings
    probe_branchd_s: list[float] = field(default_factory=list)
    probe_first_pong_s: list[float] = field(default_factory=list)
    add_ms: list[float] = field(default_factory=list)
    remove_ms: list[float] = field(default_factory=list)
    trace: dict[str, list[float]] = field(default_factory=dict)
    initial_consumers: list[dict[str, Any]] | None = None
    pss_solo_mib: list[float] = field(default_factory=list)
    pss_prefork_mib: list[float] = field(default_factory=list)
    procs_solo: list[int] = field(default_factory=list)
    procs_prefork: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Options:
    runs: int
    probe_runs: int
    adds: int
    warmup_adds: int
    trace_adds: int
    settle_secs: float
    poll: float
    broker: str
    autoscale: bool
    keep: bool
    out: Path | None
    json_out: Path | None
    python: str


def pool_body(opts: Options) -> dict[str, Any]:
    if opts.autoscale:
        return {"pool": "prefork", "autoscale": {"min": 2, "max": 2}}
    return {"pool": "prefork", "concurrency": 2}


def pool_label(opts: Options) -> str:
    return "prefork --autoscale=2,2" if opts.autoscale else "prefork -c 2"


def branchd_start(d: Daemon, name: str, body: dict[str, Any], poll: float) -> tuple[float, float]:
    """(seconds from POST to GET showing running, POST latency in seconds)."""
    t0 = time.perf_counter()
    inst = d.create({"name": name, "kind": "celery", "cwd": str(ROOT), **body})
    post = time.perf_counter() - t0
    while inst["state"] != "running":
        if inst["state"] in ("fatal", "backoff", "exited"):
            raise RuntimeError(f"{name} went {inst['state']}: {inst.get('reason')}")
        if time.perf_counter() - t0 > 60:
            raise RuntimeError(f"{name} not running after 60 s")
        time.sleep(poll)
        inst = d.instance(name)
    return time.perf_counter() - t0, post


def hand_start(
    template: list[str], node: str, control: Control, logdir: Path
) -> tuple[float, HandWorker]:
    argv = list(template)
    argv[argv.index("-n") + 1] = node
    w = HandWorker(argv, node, logdir)
    t0 = time.perf_counter()
    w.spawn()
    assert w.proc is not None
    while not control.ping(node, timeout=0.1):
        if w.proc.poll() is not None:
            raise RuntimeError(f"hand worker {node} exited {w.proc.returncode}")
        if time.perf_counter() - t0 > 60:
            raise RuntimeError(f"hand worker {node} silent after 60 s")
    return time.perf_counter() - t0, w


def measure_start(d: Daemon, control: Control, opts: Options, host: str, r: Results) -> None:
    body = pool_body(opts)
    # branchd's exact argv for such an instance: the `command` of an unstarted one
    tmpl_name = fresh("tmpl")
    tmpl = d.create(
        {"name": tmpl_name, "kind": "celery", "cwd": str(ROOT), "autostart": False, **body}
    )
    template = list(tmpl["command"])
    d.remove(tmpl_name)
    log(f"worker argv: {shlex.join(template)}")
    logdir = d.dir / "hand"
    logdir.mkdir(exist_ok=True)
    # warm both paths once (broker connections, page cache), not counted
    name = fresh("warm")
    branchd_start(d, name, body, opts.poll)
    d.remove(name)
    _, w = hand_start(template, f"{fresh('hwarm')}@{host}", control, logdir)
    w.stop(control)
    for run in range(opts.runs):
        order = ("branchd", "hand") if run % 2 == 0 else ("hand", "branchd")
        for who in order:
            if who == "branchd":
                name = fresh(f"b{run}")
                total, post = branchd_start(d, name, body, opts.poll)
                d.remove(name)
                r.start_branchd_s.append(total)
                r.post_ms.append(post * 1000)
                log(f"  run {run + 1}: branchd {total:.3f} s (POST {post * 1000:.1f} ms)")
            else:
                total, w = hand_start(template, f"{fresh(f'h{run}')}@{host}", control, logdir)
                w.stop(control)
                r.start_hand_s.append(total)
                log(f"  run {run + 1}: by hand {total:.3f} s")


def measure_probe(d: Daemon, control: Control, opts: Options, host: str, r: Results) -> None:
    """branchd create while this script pings too: when could it have said running?"""
    body = pool_body(opts)
    for run in range(opts.probe_runs):
        name = fresh(f"p{run}")
        node = f"{name}@{host}"
        first: list[float] = []
        done = threading.Event()
        t0 = time.perf_counter()

        def prober(
            node: str = node,
            first: list[float] = first,
            t0: float = t0,
            done: threading.Event = done,
        ) -> None:
            while not done.is_set():
                with contextlib.suppress(Exception):
                    if control.ping(node, timeout=0.02):
                        first.append(time.perf_counter() - t0)
                        return

        th = threading.Thread(target=prober, daemon=True)
        th.start()
        try:
            total, _ = branchd_start(d, name, body, opts.poll)
        finally:
            th.join(10)
            done.set()
        d.remove(name)
        if first:
            r.probe_branchd_s.append(total)
            r.probe_first_pong_s.append(first[0])
            log(
                f"  probe {run + 1}: branchd running at {total:.3f} s, "
                f"first pong to our 0.02 s pings at {first[0]:.3f} s"
            )


def measure_consumers(
    d: Daemon, control: Control, opts: Options, host: str, r: Results, used: list[str]
) -> None:
    """``used`` collects the queue names (to delete them from the broker afterwards)."""
    body = pool_body(opts)
    name = fresh("cons")
    branchd_start(d, name, body, opts.poll)
    node = f"{name}@{host}"
    time.sleep(1.0)  # let the post-start reconcile finish
    r.initial_consumers = d.call("GET", f"/v1/apps/{APP}/instances/{name}/queues")["items"]
    log(f"  consumers of a fresh instance created without queues: {r.initial_consumers}")
    try:
        for i in range(opts.warmup_adds + opts.adds):
            q = fresh("cbq")
            used.append(q)
            path = f"/v1/apps/{APP}/instances/{name}/queues/{q}"
            t0 = time.perf_counter()
            items = d.call("PUT", path)["items"]
            t1 = time.perf_counter()
            if not any(c["name"] == q and c["live"] for c in items):
                raise RuntimeError(f"PUT {q} answered without it live: {items}")
            items = d.call("DELETE", path)["items"]
            t2 = time.perf_counter()
            if any(c["name"] == q and c["live"] for c in items):
                raise RuntimeError(f"DELETE {q} answered with it still live: {items}")
            if i >= opts.warmup_adds:
                r.add_ms.append((t1 - t0) * 1000)
                r.remove_ms.append((t2 - t1) * 1000)
        log(
            f"  PUT consumer p50 {statistics.median(r.add_ms):.1f} ms, "
            f"p99 {percentile(r.add_ms, 99):.1f} ms; DELETE p50 "
            f"{statistics.median(r.remove_ms):.1f} ms"
        )
        trace_consumers(node, opts, r, used)
    finally:
        d.remove(name)


def trace_consumers(node: str, opts: Options, r: Results, used: list[str]) -> None:
    """The remote-control steps of a consumer add/remove, timed one by one.

    Spoken with branchd's own client (``branchd.celery.remote.KombuRemoteControl``,
    imported, not changed), so the round trips are the daemon's. branchd's
    ``CeleryOps.add_consumer`` sends ``add_consumer``, then polls ``active_queues``
    with a 50 ms sleep between polls until the queue shows, and
    ``Manager.consumers`` asks ``active_queues`` once more. Here the polls go back
    to back (no sleep), to see when the worker has really applied the change:
    ``polls > 1`` means branchd's first confirm poll comes too early and costs
    it a 50 ms sleep.
    """
    import asyncio

    from branchd.celery.broker import BrokerSpec
    from branchd.celery.remote import KombuRemoteControl

    spec = BrokerSpec(opts.broker)

    def names(reply: Any) -> list[str] | None:
        items = reply.get("ok", reply) if isinstance(reply, dict) else None
        if not isinstance(items, list):
            return None
        return [q["name"] for q in items if isinstance(q, dict) and "name" in q]

    async def run() -> dict[str, list[float]]:
        rc = KombuRemoteControl()
        steps: dict[str, list[float]] = {k: [] for k in TRACE_STEPS}
        try:
            await rc.call(spec, node, "ping", None, 1.0)  # reply queue up, connections warm
            for _ in range(opts.trace_adds):
                q = fresh("cbq")
                used.append(q)
                t = time.perf_counter()
                await rc.call(spec, node, "ping", None, 1.0)
                steps["ping"].append(time.perf_counter() - t)
                t = time.perf_counter()
                await rc.call(spec, node, "active_queues", None, 1.0)
                steps["active_queues"].append(time.perf_counter() - t)
                t0 = time.perf_counter()
                reply = await rc.call(spec, node, "add_consumer", {"queue": q}, 1.0)
                t1 = time.perf_counter()
                if not isinstance(reply, dict) or "ok" not in reply:
                    raise RuntimeError(f"add_consumer {q}: {reply!r}")
                polls = 0
                while True:
                    polls += 1
                    got = names(await rc.call(spec, node, "active_queues", None, 1.0))
                    if got is not None and q in got:
                        break
                    if time.perf_counter() - t1 > 10:
                        raise RuntimeError(f"{q} never showed in active_queues")
                t2 = time.perf_counter()
                steps["add_consumer reply"].append(t1 - t0)
                steps["add reply -> queue in active_queues"].append(t2 - t1)
                steps["add: active_queues polls until it shows"].append(float(polls))
                t0 = time.perf_counter()
                await rc.call(spec, node, "cancel_consumer", {"queue": q}, 1.0)
                t1 = time.perf_counter()
                polls = 0
                while True:
                    polls += 1
                    got = names(await rc.call(spec, node, "active_queues", None, 1.0))
                    if got is not None and q not in got:
                        break
                    if time.perf_counter() - t1 > 10:
                        raise RuntimeError(f"{q} never left active_queues")
                t2 = time.perf_counter()
                steps["cancel_consumer reply"].append(t1 - t0)
                steps["cancel reply -> queue gone from active_queues"].append(t2 - t1)
                steps["cancel: active_queues polls until it is gone"].append(float(polls))
        finally:
            await rc.close()
        return steps

    steps = asyncio.run(run())
    steps["broker alone: durable queue+exchange declare, bind, consume, cancel"] = declare_times(
        opts.broker, opts.trace_adds, used
    )
    r.trace = {k: v if "polls" in k else [x * 1000 for x in v] for k, v in steps.items()}
    log(
        "  trace (p50): " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in r.trace.items())
    )


def declare_times(broker: str, n: int, used: list[str]) -> list[float]:
    """Seconds of what the worker's ``add_task_queue`` asks of the broker, from here.

    A durable queue and its direct exchange declared, bound, consumed, then the
    consumer cancelled (kombu, one warm connection): the broker's share of the
    time between the ``add_consumer`` reply and the queue in ``active_queues``.
    """
    from kombu import Connection
    from kombu import Consumer as KConsumer
    from kombu import Exchange as KExchange
    from kombu import Queue as KQueue

    out: list[float] = []
    with Connection(broker, connect_timeout=2) as conn:
        channel = conn.channel()
        for _ in range(n):
            q = fresh("cbq")
            used.append(q)
            queue = KQueue(q, KExchange(q, type="direct"), routing_key=q, durable=True)
            t = time.perf_counter()
            consumer = KConsumer(channel, [queue], accept=["json"])
            consumer.consume()
            consumer.cancel()
            out.append(time.perf_counter() - t)
        channel.close()
    return out


def tree_pss(pid: int) -> tuple[float, int]:
    """(PSS summed over pid and its descendants, in bytes; number of processes)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_full_info().pss
    return float(total), len(procs)


def measure_memory(d: Daemon, opts: Options, r: Results) -> None:
    pools: list[tuple[str, dict[str, Any]]] = [
        ("solo", {"pool": "solo"}),
        ("prefork", {"pool": "prefork", "concurrency": 2}),
    ]
    for run in range(opts.runs):
        for label, body in pools if run % 2 == 0 else reversed(pools):
            name = fresh(f"m{label}")
            branchd_start(d, name, body, opts.poll)
            time.sleep(opts.settle_secs)
            pid = d.instance(name)["pid"]
            pss, n = tree_pss(pid)
            d.remove(name)
            getattr(r, f"pss_{label}_mib").append(pss / MiB)
            getattr(r, f"procs_{label}").append(n)
            log(f"  run {run + 1}: {label} PSS {pss / MiB:.1f} MiB over {n} process(es)")


# Report -----------------------------------------------------------------------


def source_state() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "branchd"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "source: unknown (not a git checkout)"
    return f"commit {head}" + (" + uncommitted changes under branchd/" if dirty else "")


def versions(python: str) -> str:
    out = subprocess.run(
        [
            python,
            "-c",
            "import branchd, celery, kombu; "
            "print(branchd.__version__, celery.__version__, kombu.__version__)",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.split()
    return f"branchd {out[0]} ({source_state()}), celery {out[1]}, kombu {out[2]}"


def broker_version(broker: str) -> str:
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(broker, connect_timeout=2) as conn:
        conn.connect()
        props = getattr(conn.connection, "server_properties", {}) or {}
        name, ver = props.get("product"), props.get("version")
        if name and ver:
            return f"{name.decode() if isinstance(name, bytes) else name} " + (
                ver.decode() if isinstance(ver, bytes) else str(ver)
            )
    return urllib.parse.urlsplit(broker).scheme


def redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:**@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()
    return url


def cell(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    text = format(med(values), fmt)
    if len(values) > 1:
        text += f" [{format(min(values), fmt)}, {format(max(values), fmt)}]"
    return text


def table(r: Results, opts: Options) -> str:
    rows = [
        "| measure | branchd | by hand | branchd vs by hand | target (branchd) | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    b, h = med(r.start_branchd_s), med(r.start_hand_s)
    over = 100.0 * (b - h) / h if h else float("nan")
    rows.append(
        f"| create → running, {pool_label(opts)} (s) | {cell(r.start_branchd_s, '.3f')} | "
        f"{cell(r.start_hand_s, '.3f')} | {over:+.1f} % ({(b - h) * 1000:+.0f} ms) | "
        f"≤ +{TARGET_OVERHEAD_PCT:.0f} % | {ok(over <= TARGET_OVERHEAD_PCT)} |"
    )
    bm, hm = statistics.fmean(r.start_branchd_s), statistics.fmean(r.start_hand_s)
    rows.append(
        f"| create → running, mean of the same runs (s) | {bm:.3f} | {hm:.3f} | "
        f"{100.0 * (bm - hm) / hm:+.1f} % ({(bm - hm) * 1000:+.0f} ms) | (informative) | — |"
    )
    rows.append(f"| … of which the `POST` answer (ms) | {cell(r.post_ms, '.1f')} | — | — | — | — |")
    if r.probe_branchd_s:
        lag = [(a - p) * 1000 for a, p in zip(r.probe_branchd_s, r.probe_first_pong_s, strict=True)]
        rows.append(
            f"| diagnosis: first pong to this script's 0.02 s pings, during a branchd create (s)¹ "
            f"| {cell(r.probe_first_pong_s, '.3f')} | — | — | — | — |"
        )
        rows.append(
            f"| diagnosis: branchd `running` after that first pong (ms)¹ "
            f"| {cell(lag, '.0f')} | — | — | — | — |"
        )
    p50 = med(r.add_ms)
    rows.append(
        f"| consumer add `PUT …/queues/{{q}}`, p50 (ms), n={len(r.add_ms)} | {p50:.1f} | — | — "
        f"| ≤ {TARGET_ADD_P50_MS:.0f} ms | {ok(p50 <= TARGET_ADD_P50_MS)} |"
    )
    rows.append(
        f"| consumer add `PUT …/queues/{{q}}`, p99 (ms) | {percentile(r.add_ms, 99):.1f} | — | — "
        "| — | — |"
    )
    rows.append(
        f"| consumer remove `DELETE …/queues/{{q}}`, p50 / p99 (ms) | "
        f"{med(r.remove_ms):.1f} / {percentile(r.remove_ms, 99):.1f} | — | — | — | — |"
    )
    for label, key in (("solo", "solo"), ("prefork -c 2", "prefork")):
        procs = getattr(r, f"procs_{key}")
        rows.append(
            f"| idle worker PSS, pool {label}, {int(med(procs)) if procs else '?'} processes (MiB) "
            f"| {cell(getattr(r, f'pss_{key}_mib'), '.1f')} | — | — | — | — |"
        )
    return "\n".join(rows)


def trace_lines(r: Results, opts: Options) -> list[str]:
    if not r.trace:
        return []
    lines = [
        "",
        f"Remote-control steps of a consumer add/remove, {opts.trace_adds} times, spoken with "
        "branchd's own client (`KombuRemoteControl`) from this script, `active_queues` polled "
        "back to back (no sleep) after each reply; median [min, max]:",
        "",
        "| step | median [min, max] |",
        "|---|---:|",
    ]
    for k, v in r.trace.items():
        unit = "" if "polls" in k else " (ms)"
        fmt = "g" if "polls" in k else ".2f"
        lines.append(f"| {k}{unit} | {cell(v, fmt)} |")
    return lines


def analysis(r: Results) -> list[str]:
    """Where the time goes, from this run's own figures."""
    out = ["", "Where the time goes (from this run's figures):", ""]
    if r.start_branchd_s and r.start_hand_s:
        text = (
            "- create → running: while a worker starts, branchd sends a new ping every "
            "50 ms, each waiting up to 1 s for its answer (`Workers._await_ready` in "
            "branchd/celery/workers.py); pings published before the worker has bound "
            "its `<node>.celery.pidbox` queue are dropped by the broker, so what counts "
            "is how soon after the binding the next ping goes out. "
        )
        if r.probe_first_pong_s:
            lag = [
                (a - p) * 1000 for a, p in zip(r.probe_branchd_s, r.probe_first_pong_s, strict=True)
            ]
            text += (
                "In the diagnosis runs the worker first answered at "
                f"{min(r.probe_first_pong_s):.3f} to {max(r.probe_first_pong_s):.3f} s and "
                f"branchd said `running` {med(lag):.0f} ms later (median; max "
                f"{max(lag):.0f} ms). "
            )
        text += (
            "The by-hand loop pings back to back with a 0.1 s timeout; the rest of the "
            "spread is the worker's own start-up on a shared 2-core machine."
        )
        out.append(text)
    if r.trace and r.add_ms:
        t = {k: med(v) for k, v in r.trace.items()}
        rtt = t["active_queues"]
        apply = t["add reply -> queue in active_queues"]
        broker = t.get(
            "broker alone: durable queue+exchange declare, bind, consume, cancel", float("nan")
        )
        out.append(
            "- consumer add: `PUT` = `add_consumer` round trip "
            f"({t['add_consumer reply']:.1f} ms) + the worker applying it "
            f"{apply:.1f} ms (median) after it replied (it schedules `add_task_queue` "
            "with `call_soon`; on RabbitMQ that declares a durable queue and its "
            f"exchange, binds and consumes: {broker:.1f} ms of broker work timed alone) "
            f"+ `active_queues` polls ({rtt:.1f} ms each, 2 ms apart at first, "
            "`CeleryOps._confirm` in branchd/celery/ops.py) until the queue "
            "shows; the confirming reply is the answer's body. The floor is thus "
            f"~{t['add_consumer reply'] + apply + rtt:.0f} ms plus HTTP and one SQLite "
            f"write; measured p50 {med(r.add_ms):.1f} ms. The worker's own apply time "
            "dominates, so the 20 ms target sits at the floor on this machine."
        )
        out.append(
            "- consumer remove: `cancel_consumer` takes effect before the first "
            "`active_queues` (median polls "
            f"{t['cancel: active_queues polls until it is gone']:g}), so `DELETE` is "
            f"one poll (p50 {med(r.remove_ms):.1f} ms, p99 "
            f"{percentile(r.remove_ms, 99):.1f} ms)."
        )
    if r.initial_consumers is not None:
        live = [c["name"] for c in r.initial_consumers if c.get("live")]
        out.append(
            "- an instance created without `queues` runs with no `-Q` (Celery's default "
            f"queue); its consumers 1 s after `running` were {live or 'none'}."
        )
    return out


def section(
    r: Results,
    opts: Options,
    info: dict[str, str],
    vers: str,
    broker: str,
    elapsed: float,
    argv: list[str],
) -> str:
    cmd = f"python bench/celery_compare.py {shlex.join(argv)}".rstrip()
    lines = [
        HEADING,
        "",
        f"Measured {info['date']} with `{cmd}` (took {elapsed / 60:.1f} min).",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"Python {info['python']}; {vers}; broker {broker} on 127.0.0.1. "
        "Client, daemon, workers and broker share the machine.",
        "",
        f"Start and memory cells: median of {opts.runs} run(s) with the [min, max] after it.",
        "",
        table(r, opts),
        *trace_lines(r, opts),
        "",
        *analysis(r),
        "",
        "How each figure is taken (see bench/README.md):",
        "",
        f"- One branchd (fresh temp state dir) and one app `{APP}` with `broker` "
        f"`{redacted(opts.broker)}`, "
        f"`celery_app` `{CELERY_APP}`, workers run by the project venv's python with cwd "
        "the repo; no `-Q` (the default `celery` queue).",
        f"- create → running: `POST /v1/apps/{APP}/instances` (kind celery, "
        f"{pool_label(opts)}) then `GET` of the instance every {opts.poll * 1000:g} ms over "
        "one keep-alive connection until `state` is `running` (branchd says so once the "
        "worker answered a remote-control ping). By hand: the instance's own `command` argv "
        "(with `--without-mingle --without-gossip`, the node renamed), spawned with "
        "`subprocess.Popen` like branchd (own session, stdin /dev/null, output to files), "
        "then `app.control.ping(destination=[node], timeout=0.1)` back to back until it "
        "answers. A fresh node name every time; branchd and by-hand alternate which goes "
        "first; one warm-up of each is not counted. Each worker is stopped (branchd: "
        "`DELETE`; by hand: SIGTERM plus a ping) before the next starts.",
        "- ¹ diagnosis runs, not in the medians above: a branchd create while this script "
        "also pings the new node (celery client, timeout 0.02 s, back to back) from another "
        "thread; the first answer shows "
        "when branchd could have declared it running.",
        f"- consumer add: one running prefork worker; {opts.adds} x (`PUT "
        f"/v1/apps/{APP}/instances/{{name}}/queues/{{q}}` with a fresh `q`, then `DELETE` of "
        f"it), sequential, after {opts.warmup_adds} warm-up pairs; PUT answers after the "
        "worker lists the queue in `active_queues`; the answer is checked (`live` true, then "
        "false). p99 is the nearest-rank percentile. The durable queues `add_consumer` "
        "declared are deleted from the broker afterwards.",
        f"- memory: PSS (`psutil` `memory_full_info().pss`) summed over the worker's "
        f"process tree, {opts.settle_secs:g} s after it is running, idle, one instance at a "
        "time; prefork with `--concurrency=2` (main process + 2 pool children).",
    ]
    if r.problems:
        lines += ["", "Problems during the run:", "", *[f"- {p}" for p in r.problems]]
    return "\n".join(lines) + "\n"


# Main -------------------------------------------------------------------------


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs of start and memory (default 5)")
    p.add_argument(
        "--probe-runs", type=int, default=5, help="diagnosis runs of the start (default 5)"
    )
    p.add_argument("--adds", type=int, default=50, help="consumer add/remove pairs (default 50)")
    p.add_argument("--warmup-adds", type=int, default=3, help="uncounted pairs first (default 3)")
    p.add_argument(
        "--trace-adds", type=int, default=20, help="adds replayed step by step (default 20)"
    )
    p.add_argument(
        "--settle-secs", type=float, default=3.0, help="idle time before PSS (default 3)"
    )
    p.add_argument("--poll", type=float, default=0.005, help="GET poll pause, s (default 0.005)")
    p.add_argument(
        "--broker", default="amqp://guest:guest@127.0.0.1:5672//", help="broker URL (RabbitMQ)"
    )
    p.add_argument(
        "--autoscale", action="store_true", help="start with --autoscale=2,2 instead of -c 2"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp state dir")
    p.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown to update"
    )
    p.add_argument("--no-out", action="store_true", help="only print the section")
    p.add_argument("--json", type=Path, default=None, help="also dump every sample as JSON")
    default_py = ROOT / ".venv" / "bin" / "python"
    p.add_argument(
        "--python",
        default=str(default_py) if default_py.exists() else sys.executable,
        help="python of branchd and the workers (default: the project .venv)",
    )
    a = p.parse_args(argv)
    if a.runs < 1 or a.adds < 1 or a.probe_runs < 0 or a.trace_adds < 0:
        p.error("runs and adds must be positive")
    return Options(
        runs=a.runs,
        probe_runs=a.probe_runs,
        adds=a.adds,
        warmup_adds=a.warmup_adds,
        trace_adds=a.trace_adds,
        settle_secs=a.settle_secs,
        poll=a.poll,
        broker=a.broker,
        autoscale=a.autoscale,
        keep=a.keep,
        out=None if a.no_out else a.out,
        json_out=a.json,
        python=a.python,
    )


@contextlib.contextmanager
def daemon(opts: Options, r: Results) -> Iterator[Daemon]:
    d = Daemon(opts.python, opts.keep)
    failed = True
    try:
        d.launch()
        d.call(
            "PUT",
            f"/v1/apps/{APP}",
            {"broker": opts.broker, "celery_app": CELERY_APP, "python": opts.python},
            expect=(200, 201),
        )
        yield d
        failed = False
    except Exception:
        log("daemon output (tail):\n" + d.tail())
        raise
    finally:
        r.problems += d.stop()
        for p in r.problems:
            log(f"WARNING: {p}")
        d.cleanup(failed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    # SIGTERM (e.g. from `timeout`) must still stop the daemon and its workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.perf_counter()
    info = machine()
    vers = versions(opts.python)
    broker = broker_version(opts.broker)
    host = socket.gethostname()
    log(f"{vers}; broker {broker}; {opts.runs} run(s)")
    control = Control(opts.broker)
    control.ping(f"nobody-{uuid.uuid4().hex[:6]}@{host}", timeout=0.1)  # connect once
    r = Results()
    used: list[str] = []
    try:
        with daemon(opts, r) as d:
            log("create -> running")
            measure_start(d, control, opts, host, r)
            if opts.probe_runs:
                log("create -> running, diagnosis")
                measure_probe(d, control, opts, host, r)
            log("consumer add/remove")
            measure_consumers(d, control, opts, host, r, used)
            log("memory")
            measure_memory(d, opts, r)
    finally:
        if used:
            log(f"deleted {control.delete_queues(used)} bench queues from the broker")
    elapsed = time.perf_counter() - began
    text = section(r, opts, info, vers, broker, elapsed, argv)
    print(text)
    if opts.json_out is not None:
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        opts.json_out.write_text(
            json.dumps({"machine": info, "versions": vers, **asdict(r)}, indent=1)
        )
    if opts.out is not None:
        write_section(opts.out, HEADING, text)
        log(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
