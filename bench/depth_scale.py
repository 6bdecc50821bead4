#!/usr/bin/env python3
"""Scaling on queue depth (issue 16, parts 4 and 5), on this machine.

1. Depth read cost: ``KombuDepthReader.read`` of 100 queues, one connection
   reused, on RabbitMQ (a passive declare each; queues that exist, and
   queues that do not, which cost a channel reopen each) and Redis (LLEN of
   the four priority lists of each, one pipeline). Median over --polls reads,
   median of --runs runs. Target: <= 50 ms a poll.
2. A burst of --tasks tasks of 50-500 ms (uniform, seeded) on Redis to one
   branchd-supervised prefork worker, three ways:
   - ``depth``: the app's scale policy (on the queue, --per-worker, min 1,
     max --max, down_after --window), the worker started with autoscale 1,1;
   - ``fixed``: a fixed pool of --max processes (``--concurrency``);
   - ``celery``: Celery's own ``--autoscale=<max>,1``, no policy.
   Each task touches a file of its own (the side channel): tasks killed or
   lost = sent - files (and the worker's log searched for WorkerLostError).
   The pool size (the worker's prefork children) is sampled every 0.25 s
   from the burst until it is back at 1 (or --tail seconds after the drain).
   Median of --runs runs per mode; one run of each drawn in the PNG.

Run: ``python bench/depth_scale.py --json /tmp/depth.json`` (needs
``pip install -e '.[bench]'`` for the plot). Every queue and key it makes is
deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "clients")]

from bench.common import auth_headers, log, machine, med, wait_for, write_section  # noqa: E402
from branchd.celery.broker import BrokerSpec  # noqa: E402
from branchd.celery.depth import KombuDepthReader, redis_keys  # noqa: E402

AMQP = os.environ.get("BRANCHD_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
#: db 12: not the test suite's 13, which a test session flushes when it ends
REDIS = os.environ.get("BRANCHD_BENCH_REDIS", "redis://127.0.0.1:6379/12")
APP_MODULE = "tests.celery_app.tasks"
MODES = ("depth", "fixed", "celery")


# 1. depth read cost ----------------------------------------------------------------


def read_cost(url: str, queues: list[str], polls: int, first: bool = False) -> float:
    """Median ms of one read of ``queues`` (after one warm-up read), or
    (``first``) the ms of the first read of a reader already connected."""

    async def go() -> float:
        reader = KombuDepthReader()
        try:
            spec = BrokerSpec(url)
            await reader.read(spec, [])  # the connection
            t0 = time.perf_counter()
            await reader.read(spec, queues)
            if first:
                return (time.perf_counter() - t0) * 1000
            times = []
            for _ in range(polls):
                t0 = time.perf_counter()
                await reader.read(spec, queues)
                times.append((time.perf_counter() - t0) * 1000)
            return med(times)
        finally:
            await reader.close()

    return asyncio.run(go())


def measure_reads(runs: int, polls: int) -> dict[str, list[float]]:
    from kombu import Connection, Exchange, Producer, Queue

    tok = uuid.uuid4().hex[:6]
    names = [f"bdepth-{tok}-{i}" for i in range(100)]
    out: dict[str, list[float]] = {
        "amqp": [], "amqp_missing_first": [], "amqp_missing": [], "redis": []
    }  # fmt: skip
    try:
        for url in (AMQP, REDIS):
            with Connection(url) as conn:
                channel = conn.channel()
                for name in names:  # a few messages in each, over the priorities on Redis
                    q = Queue(name, Exchange(name), name, queue_arguments={"x-max-priority": 9})
                    producer = Producer(channel, exchange=q.exchange, routing_key=name)
                    for i in range(3):
                        producer.publish({"i": i}, declare=[q] if i == 0 else [], priority=i * 4)
        for _ in range(runs):
            out["amqp"].append(read_cost(AMQP, names, polls))
            # (a fresh reader each run: the first poll of missing queues pays the
            # channel reopens, later ones within MISSING_RECHECK do not)
            out["amqp_missing_first"].append(
                read_cost(AMQP, [n + "-none" for n in names], 0, first=True)
            )
            out["amqp_missing"].append(read_cost(AMQP, [n + "-none" for n in names], polls))
            out["redis"].append(read_cost(REDIS, names, polls))
    finally:
        with Connection(AMQP) as conn:
            channel = conn.channel()
            for name in names:
                with contextlib.suppress(Exception):
                    channel.queue_delete(name)
                with contextlib.suppress(Exception):
                    channel.exchange_delete(name)
        import redis

        client: Any = redis.Redis.from_url(REDIS)
        for name in names:
            client.delete(
                *redis_keys(name), f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}"
            )
        client.close()
    return out


# 2. the burst ----------------------------------------------------------------------


class Daemon:
    def __init__(self, poll: float) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-depth-"))
        (self.dir / "branchd.toml").write_text(f"depth_poll_interval = {poll}\n")
        state = self.dir / "state"
        self.out = open(self.dir / "daemon.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "branchd", "--state-dir", str(state), "--bind", "127.0.0.1:0",
             "--config", str(self.dir / "branchd.toml")],
            stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        url_file = state / "branchd.url"
        url = wait_for(lambda: url_file.exists() and url_file.read_text().strip(), 30, "url")
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname and parts.port
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        self.auth = auth_headers(state)

    def call(
        self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200,),
        text: bool = False,
    ) -> Any:  # fmt: skip
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, body=data, headers={**self.auth, **headers})
        resp = self.conn.getresponse()
        raw = resp.read()
        if resp.status not in ok:
            raise RuntimeError(f"{method} {path}: {resp.status} {raw[:300]!r}")
        if text:
            return raw.decode(errors="replace")
        return json.loads(raw) if raw else None

    def stop(self) -> None:
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def pool_of(pid: int) -> int:
    with contextlib.suppress(psutil.Error):
        return len(psutil.Process(pid).children())
    return 0


def burst(mode: str, opts: argparse.Namespace, seed: int) -> dict[str, Any]:
    from celery import Celery

    d = Daemon(opts.poll)
    tok = uuid.uuid4().hex[:6]
    app, queue = f"bench-{tok}", f"bburst-{tok}"
    done = d.dir / "done"
    done.mkdir()
    try:
        body: dict[str, Any] = {
            "celery_app": APP_MODULE,
            "env": {"PYTHONPATH": str(ROOT)},
            "broker": REDIS,
        }
        if mode == "depth":
            body["scale"] = {"on": queue, "per_worker": opts.per_worker, "min": 1,
                             "max": opts.max, "down_after": opts.window}  # fmt: skip
        d.call("PUT", f"/v1/apps/{app}", body, ok=(201,))
        inst: dict[str, Any] = {"name": "w1", "kind": "celery", "queues": [queue]}
        if mode == "fixed":
            inst["concurrency"] = opts.max
        else:
            inst["autoscale"] = {"min": 1, "max": 1 if mode == "depth" else opts.max}
        d.call("POST", f"/v1/apps/{app}/instances", inst, ok=(201,))
        path = f"/v1/apps/{app}/instances/w1"
        view = wait_for(
            lambda: (v := d.call("GET", path))["state"] == "running" and v, 60, "running"
        )
        pid = int(view["pid"])
        rng = random.Random(seed)
        sender = Celery("sender", broker=REDIS, task_serializer="json")
        t0 = time.monotonic()
        with sender:
            for i in range(opts.tasks):
                sender.send_task(
                    "testapp.work",
                    args=[str(done), f"t{i}", round(rng.uniform(0.05, 0.5), 3)],
                    queue=queue,
                    priority=i % 10,
                )
        sent = time.monotonic() - t0
        samples: list[tuple[float, int]] = []
        drained: float | None = None
        last_file, last_count = 0.0, 0
        deadline = t0 + opts.tasks * 0.5 + 300
        while time.monotonic() < deadline:
            now = time.monotonic() - t0
            samples.append((round(now, 2), pool_of(pid)))
            count = len(os.listdir(done))
            if count != last_count:
                last_file, last_count = now, count
            # drained: every file made, or (a task lost) none new for 15 s
            if drained is None and (count >= opts.tasks or now - last_file > 15):
                drained = now if count >= opts.tasks else last_file
            if drained is not None and (
                mode == "fixed"  # never comes down
                or now > drained + opts.tail
                or (mode == "depth" and samples[-1][1] <= 1)
            ):
                break
            time.sleep(0.25)
        finished = len(os.listdir(done))
        logs = d.call("GET", f"{path}/logs?stream=stderr&tail=10000", text=True)
        return {
            "mode": mode,
            "send_s": sent,
            "drain_s": drained,
            "peak": max(n for _, n in samples),
            "lost": opts.tasks - finished,
            "worker_lost": str(logs).count("WorkerLostError"),
            "down_at_s": next(
                (t for t, n in samples if drained is not None and t > drained and n <= 1), None
            ),
            "samples": samples,
        }
    finally:
        d.stop()
        import redis

        client: Any = redis.Redis.from_url(REDIS)
        client.delete(
            *redis_keys(queue), f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
        )
        client.delete("_kombu.binding_deadlines")  # kombu's, in the bench's own db
        client.close()


def plot(runs: dict[str, dict[str, Any]], path: Path, opts: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    labels = {
        "depth": f"branchd depth policy (per_worker {opts.per_worker}, window {opts.window:g} s)",
        "fixed": f"fixed pool of {opts.max}",
        "celery": f"Celery --autoscale={opts.max},1",
    }
    for mode, run in runs.items():
        xs, ys = zip(*run["samples"], strict=True)
        ax.step(xs, ys, where="post", label=labels[mode])
        if run["drain_s"] is not None:
            ax.axvline(run["drain_s"], linestyle=":", linewidth=0.8, color=ax.lines[-1].get_color())
    ax.set_xlabel("seconds since the first task was sent (dotted: burst drained)")
    ax.set_ylabel("pool processes")
    ax.set_title(f"Burst of {opts.tasks} tasks of 50-500 ms, one prefork worker on Redis")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_ylim(0, opts.max + 1)
    fig.tight_layout()
    fig.savefig(path)


def report(reads: dict[str, list[float]], bursts: dict[str, list[dict[str, Any]]],
           opts: argparse.Namespace, took: float) -> str:  # fmt: skip
    m = machine()
    lines = [
        "## Scaling on queue depth (issue 16, parts 4 and 5)",
        "",
        f"Measured {m['date']} with `python bench/depth_scale.py --runs {opts.runs} "
        f"--tasks {opts.tasks}` (took {took / 60:.1f} min). Machine: {m['nproc']} CPUs "
        f"({m['cpu']}), Linux {m['kernel']}, Python {m['python']}; RabbitMQ and Redis on "
        "the same machine, which other test runs shared at the time. Medians of the runs, "
        "[min, max] after them.",
        "",
        "Depth read cost, 100 queues, one connection reused (target <= 50 ms a poll):",
        "",
        "| broker | how | ms per poll |",
        "|---|---|---:|",
    ]
    how = {
        "amqp": ("RabbitMQ", "passive declare of each (queues that exist)"),
        "amqp_missing_first": (
            "RabbitMQ", "queues that do not exist, first poll (a channel reopen each)"
        ),
        "amqp_missing": (
            "RabbitMQ", "queues that do not exist, later polls (re-asked every 10 s)"
        ),
        "redis": ("Redis", "LLEN of 4 priority lists each + HLEN unacked, one pipeline"),
    }
    for key, values in reads.items():
        broker, text = how[key]
        lines.append(
            f"| {broker} | {text} | {med(values):.1f} [{min(values):.1f}, {max(values):.1f}] |"
        )
    lines += [
        "",
        f"Burst of {opts.tasks} tasks of 50-500 ms (uniform, seeded) to one prefork worker "
        f"on Redis, pool at most {opts.max}; the depth policy polls every {opts.poll:g} s "
        f"with per_worker {opts.per_worker}, min 1, max {opts.max}, down_after "
        f"{opts.window:g} s. Drain: from the first send until every task's file exists. "
        "Lost or killed: tasks sent minus files made (and WorkerLostError in the worker's log).",
        "",
        "| mode | time to drain (s) | peak pool | back to 1 process (s) | lost or killed |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"depth": "branchd depth policy", "fixed": f"fixed pool of {opts.max}",
             "celery": f"Celery `--autoscale={opts.max},1`"}  # fmt: skip
    for mode, runs in bursts.items():
        drain = [r["drain_s"] for r in runs if r["drain_s"] is not None]
        down = [r["down_at_s"] for r in runs if r["down_at_s"] is not None]
        lost = sum(r["lost"] + r["worker_lost"] for r in runs)
        down_text = (
            f"{med(down):.1f}"
            if down
            else "never (fixed)"
            if mode == "fixed"
            else f"not within {opts.tail:g} s of the drain"
        )
        lines.append(
            f"| {names[mode]} | {med(drain):.1f} [{min(drain):.1f}, {max(drain):.1f}] | "
            f"{med([r['peak'] for r in runs]):.0f} | {down_text} | {lost} |"
        )
    lines += ["", "![pool size over time](depth_scale.png)", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--polls", type=int, default=30)
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--max", type=int, default=12)
    p.add_argument("--per-worker", type=int, default=20)
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--poll", type=float, default=2.0)
    p.add_argument("--tail", type=float, default=45.0, help="seconds sampled after the drain")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", type=Path)
    p.add_argument("--write", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "depth_scale.png")
    p.add_argument("--no-write", action="store_true")
    opts = p.parse_args()
    began = time.monotonic()
    log("depth read cost")
    reads = measure_reads(opts.runs, opts.polls)
    log(f"reads: { {k: round(med(v), 1) for k, v in reads.items()} }")
    bursts: dict[str, list[dict[str, Any]]] = {m: [] for m in opts.modes.split(",")}
    for run in range(opts.runs):
        for mode in bursts:
            r = burst(mode, opts, seed=run)
            log(f"{mode} run {run}: drain {r['drain_s']}, peak {r['peak']}, lost {r['lost']}, "
                f"down at {r['down_at_s']}")  # fmt: skip
            bursts[mode].append(r)
    took = time.monotonic() - began
    if opts.json:
        opts.json.write_text(json.dumps({"reads": reads, "bursts": bursts}, indent=1))
    text = report(reads, bursts, opts, took)
    print(text)
    if not opts.no_write:
        plot({m: runs[0] for m, runs in bursts.items()}, opts.png, opts)
        write_section(opts.write, text.splitlines()[0], text)


if __name__ == "__main__":
    main()
