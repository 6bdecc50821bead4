#!/usr/bin/env python3
"""Result backends for a zero-service Celery on the embedded broker (issue 12).

Which default result backend should an app on the embedded broker get:
Celery's ``file://`` store (no dependency) or SQLite through SQLAlchemy
(``db+sqlite://``)? One branchd daemon (fresh temp state dir) runs one prefork
worker (``-c 4``) of a tiny task module on the embedded broker, with each
backend in turn; a producer takes its settings from ``celery-config`` and
measures, per run:

- ``get``: one ``add.delay(...).get()`` round trip, median of --calls; and
  the same with ``get(interval=0.02)`` (Celery polls such a store every 0.5 s
  by default);
- ``group``: a group of 10 ``add`` tasks, ``.get()`` of all;
- ``chord``: a chord of 10 ``add`` into ``total``, ``.get()`` of the body;
- ``chain+chord``: ``chain(add, chord([add] * 4, total))``, the guide's canvas.

Median of --runs. The worker and the producer run in ``bench/.venv-results``
(made on first use: ``pip install celery sqlalchemy``); branchd runs from the
interpreter that runs this script. Only 127.0.0.1 and temp dirs are used.

    .venv/bin/python bench/result_backend.py [--runs 3] [--calls 20] [--no-out]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import auth_headers, log, machine, med, wait_for, write_section

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venv-results"

TASKS = """
from celery import Celery

app = Celery("rb")

@app.task
def add(x, y):
    return x + y

@app.task
def total(numbers):
    return sum(numbers)
"""

PRODUCER = """
import json, statistics, sys, time
from celery import chain, chord, group
from rbtasks import add, app, total

app.conf.update(json.loads(sys.stdin.read()))  # the app's GET /v1/apps/rb/celery-config
calls = int(sys.argv[1])
add.delay(0, 0).get(timeout=30)  # warm up: connections, the worker's pool


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


out = {
    "get": statistics.median(timed(lambda: add.delay(1, 2).get(timeout=30)) for _ in range(calls)),
    "get_fast": statistics.median(
        timed(lambda: add.delay(1, 2).get(timeout=30, interval=0.02)) for _ in range(calls)
    ),
    "group": timed(lambda: group([add.s(i, i) for i in range(10)])().get(timeout=60)),
    "chord": timed(lambda: chord([add.s(i, i) for i in range(10)])(total.s()).get(timeout=60)),
    "chain+chord": timed(
        lambda: chain(add.s(1, 1), chord([add.s(i) for i in range(4)], total.s()))
        .apply_async()
        .get(timeout=60)
    ),
}
print(json.dumps(out))
"""


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        log(f"creating {VENV} (celery, sqlalchemy)")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "celery", "sqlalchemy"], check=True
        )
    return python


#: The running daemon's Authorization header (one daemon at a time).
AUTH: dict[str, str] = {}


def call(url: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers=AUTH)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def one_run(backend: str | None, python: Path, calls: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="branchd-rb-"))
    try:
        (tmp / "rbtasks.py").write_text(TASKS)
        state = tmp / "state"
        proc = subprocess.Popen(
            [sys.executable, "-m", "branchd", "--state-dir", str(state), "--bind", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url_file = state / "branchd.url"
            url = wait_for(
                lambda: url_file.exists() and url_file.read_text().strip(), 30, "branchd.url"
            )
            AUTH.clear()
            AUTH.update(auth_headers(state))
            app: dict[str, Any] = {
                "celery_app": "rbtasks",
                "python": str(python),
                "defaults": {"cwd": str(tmp)},
            }
            if backend:
                app["result_backend"] = backend.replace("{tmp}", str(tmp))
            call(url, "PUT", "/v1/apps/rb", app)
            worker = {"name": "w", "kind": "celery", "concurrency": 4}
            call(url, "POST", "/v1/apps/rb/instances", worker)
            wait_for(
                lambda: call(url, "GET", "/v1/apps/rb/instances/w")["state"] == "running",
                60,
                "the worker",
                0.05,
            )
            config = call(url, "GET", "/v1/apps/rb/celery-config")["config"]
            done = subprocess.run(
                [str(python), "-c", PRODUCER, str(calls)],
                input=json.dumps(config),
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                raise RuntimeError(f"producer failed: {done.stderr[-2000:]}")
            return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--no-out", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    python = ensure_venv()
    backends = {"file:// (default)": None, "db+sqlite:// (SQLAlchemy)": "db+sqlite:///{tmp}/r.db"}
    results: dict[str, dict[str, float]] = {}
    for label, backend in backends.items():
        runs = []
        for i in range(args.runs):
            log(f"{label}: run {i + 1}/{args.runs}")
            runs.append(one_run(backend, python, args.calls))
        results[label] = {k: med([r[k] for r in runs]) for k in runs[0]}
    m = machine()
    rows = "\n".join(
        f"| {label} | {r['get'] * 1000:.0f} ms | {r['get_fast'] * 1000:.0f} ms | "
        f"{r['group'] * 1000:.0f} ms | "
        f"{r['chord'] * 1000:.0f} ms | {r['chain+chord'] * 1000:.0f} ms |"
        for label, r in results.items()
    )
    text = f"""## Result backends on the embedded broker (issue 12)

`bench/result_backend.py`: one prefork worker (`-c 4`) on the embedded broker;
a producer configured from `celery-config`; median of {args.runs} runs
({args.calls} calls for `get`). {m["nproc"]} cores, {m["cpu"]}, Python {m["python"]},
{m["date"]}.

| backend | get (one task) | get, interval 0.02 s | group of 10 | chord of 10 | chain + chord |
|---|---|---|---|---|---|
{rows}

Both carry chords the same way (Celery's `chord_unlock` task, retried every
second until the header is done: neither store has atomic counters), so a
chord costs about a second on either. A plain `.get()` polls such a store
every 0.5 s (Celery's default `interval`), which is most of a round trip on
both; with `get(interval=0.02)` what is left is the filesystem transport's
own polling (0.1 s a hop). The default stays `file://`: no dependency (SQLite
needs SQLAlchemy in every worker's and producer's interpreter), nothing to
lock between the worker's processes, and no slower on chords. An app names
another store with `--result-backend`.
"""
    print(text)
    if not args.no_out:
        write_section(ROOT / "docs" / "benchmarks.md", text.splitlines()[0], text)


if __name__ == "__main__":
    main()
