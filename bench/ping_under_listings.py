"""Is the API still prompt while many clients list instances? (issue 11, item 10)

A branch supervises N `sleep` instances (default 200); C clients (default
100, in a separate process, one keep-alive connection each) list them back to
back while this process sends one `GET /v1/ping` every 10 ms and times it.
Run once with `listings_at_once = 0` (no limit: how branchd was, the anchor)
and once with the default (1), in the same run, each --runs times.

    .venv/bin/python bench/ping_under_listings.py            # ~2 min
    .venv/bin/python bench/ping_under_listings.py --runs 1 --secs 5 --no-out

Target: ping p99 <= 20 ms under 100 listing clients.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import auth_headers, log, machine, med, wait_for, write_section

ROOT = Path(__file__).resolve().parent.parent

#: The listing clients: C connections, each listing back to back for SECS.
LOAD = r"""
import asyncio, sys, time
import aiohttp

async def client(session, url, headers, until, counts):
    while time.monotonic() < until:
        async with session.get(url, headers=headers) as r:
            await r.read()
            counts[r.status] = counts.get(r.status, 0) + 1

async def main():
    url, token, n, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    counts = {}
    conn = aiohttp.TCPConnector(limit=n)
    async with aiohttp.ClientSession(connector=conn) as session:
        until = time.monotonic() + secs
        await asyncio.gather(*(client(session, url, headers, until, counts) for _ in range(n)))
    print(counts.get(200, 0), sum(counts.values()))

asyncio.run(main())
"""


def respawn(call: Any, name: str) -> float:
    """SIGKILL an instance's process; ms until the branch shows a new one running."""
    old = call("GET", f"/v1/apps/bench/instances/{name}")["pid"]
    began = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    while True:
        now = call("GET", f"/v1/apps/bench/instances/{name}")
        if now["pid"] not in (None, old) and now["state"] == "running":
            return (time.perf_counter() - began) * 1000
        time.sleep(0.001)


def one_run(python: str, limit: int, n: int, clients: int, secs: float) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench-ping-"))
    state = work / "state"
    config = work / "branchd.toml"
    config.write_text(f"listings_at_once = {limit}\n")
    out = open(work / "daemon.log", "wb")  # noqa: SIM115 (closed in finally)
    daemon = subprocess.Popen(
        [python, "-m", "branchd", "--state-dir", str(state), "--bind", "127.0.0.1:0",
         "--config", str(config), "--log-level", "WARNING"],
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url_file = state / "branchd.url"
        url = wait_for(lambda: url_file.exists() and url_file.read_text().strip(), 30, "url")
        parts = urllib.parse.urlsplit(url)
        assert parts.hostname and parts.port
        auth = auth_headers(state)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

        def call(method: str, path: str, body: Any = None) -> Any:
            data = json.dumps(body).encode() if body is not None else None
            headers = {**auth, **({"Content-Type": "application/json"} if data else {})}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {raw[:200]!r}")
            return json.loads(raw) if raw else None

        call("PUT", "/v1/apps/bench", {})
        sleep = [shutil.which("sleep") or "/bin/sleep", "100000"]
        for i in range(n):
            body = {"name": f"s{i:04d}", "command": sleep, "startsecs": 0}
            call("POST", "/v1/apps/bench/instances", body)
        def all_running() -> bool:
            items = call("GET", "/v1/apps/bench/instances")["items"]
            return all(i["state"] == "running" for i in items)

        wait_for(all_running, 60, "all running")
        token = auth.get("Authorization", "").removeprefix("Bearer ")
        load = subprocess.Popen(
            [python, "-c", LOAD, f"{url}/v1/apps/bench/instances", token, str(clients), str(secs)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)  # let every client connect and start listing
        pings: list[float] = []
        respawns: list[float] = []
        end = time.monotonic() + secs - 2.0
        next_kill = time.monotonic() + 0.5
        while time.monotonic() < end:
            began = time.perf_counter()
            call("GET", "/v1/ping")
            pings.append((time.perf_counter() - began) * 1000)
            if time.monotonic() >= next_kill:
                respawns.append(respawn(call, f"s{len(respawns) % n:04d}"))
                next_kill = time.monotonic() + 0.5
            time.sleep(0.01)
        ok, total = (int(x) for x in load.communicate(timeout=secs + 60)[0].split())
        pings.sort()
        respawns.sort()
        return {
            "p50": statistics.median(pings),
            "p90": pings[int(len(pings) * 0.9)],
            "p99": pings[min(len(pings) - 1, int(len(pings) * 0.99))],
            "respawn_p90": respawns[int(len(respawns) * 0.9)] if respawns else float("nan"),
            "listings_per_s": ok / secs,
            "failed": float(total - ok),
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        out.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--secs", type=float, default=12.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--no-out", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()
    results: dict[int, list[dict[str, float]]] = {0: [], 1: []}
    for run in range(args.runs):
        for limit in results:  # the anchor and the default, in the same run
            log(f"run {run + 1}/{args.runs}: listings_at_once = {limit}")
            r = one_run(args.python, limit, args.instances, args.clients, args.secs)
            log("  " + "  ".join(f"{k} {v:.1f}" for k, v in r.items()))
            results[limit].append(r)
    m = machine()
    rows = []
    for limit, runs in results.items():
        cell = {k: med([r[k] for r in runs]) for k in runs[0]}
        name = "no limit (as before, the anchor)" if limit == 0 else f"listings_at_once = {limit}"
        rows.append(
            f"| {name} | {cell['p50']:.1f} | {cell['p90']:.1f} | {cell['p99']:.1f} "
            f"| {cell['respawn_p90']:.1f} | {cell['listings_per_s']:.0f} | {cell['failed']:.0f} |"
        )
    text = (
        "## Ping under listing load (`ping_under_listings.py`, issue 11, item 10)\n\n"
        f"{args.instances} instances, {args.clients} clients listing them back to back "
        f"(one keep-alive connection each, in another process), one `GET /v1/ping` every "
        f"10 ms for {args.secs - 3:.0f} s, and every 0.5 s one instance SIGKILLed and "
        "timed until a new process runs (respawn, seen through the API); "
        f"median of {args.runs} runs, both settings in "
        f"each run. Machine: {m['nproc']} cores ({m['cpu']}), Python {m['python']}, "
        f"{m['date']}. Target: ping p99 <= 20 ms.\n\n"
        "| setting | ping p50 ms | p90 ms | p99 ms | respawn p90 ms | listings/s | failed |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(text)
    if not args.no_out:
        write_section(ROOT / "docs" / "benchmarks.md", text.splitlines()[0], text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
