"""Any branch takes any request (issue 14): what the hop costs, on loopback.

Five branchd on 127.0.0.1 with one cluster key (``cluster_loopback.Cluster``).
Measured, in one run:

- forwarding overhead: ``GET`` of one instance asked of its owner directly,
  and of a branch that does not hold it (one hop, the owner answering), the
  two interleaved, ``--gets`` (300) each: p50 and p99 (target: p50 overhead
  <= 2 ms);
- a cluster-wide listing: ``--per-branch`` (200) instances pinned on each of
  the five branches (autostart off: the listing, not the processes, is
  measured), then ``GET /v1/apps/{app}/instances`` asked of one branch,
  ``--listings`` (30) times: p50 and p99 (target: p50 <= 50 ms);
- declaration spread: an app PUT on one branch until all five answer it,
  ``--puts`` (20) times: median and max (target: <= 2 s).

The section "Requests in a cluster (issue 14)" of docs/benchmarks.md is
replaced (--no-out only prints it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_loopback import Cluster, Daemon
from common import log, machine, med, ok, wait_for, write_section

ROOT = Path(__file__).resolve().parent.parent
BROKER = "amqp://guest:guest@127.0.0.1:5672//"  # an app of its own broker: placed anywhere


def call(d: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(d.url + path, data=data, method=method, headers=d.headers)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def timed(d: Daemon, path: str) -> float:
    began = time.perf_counter()
    status, _ = call(d, "GET", path)
    took = time.perf_counter() - began
    if status != 200:
        raise RuntimeError(f"GET {path} answered {status}")
    return took


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--gets", type=int, default=300)
    ap.add_argument("--per-branch", type=int, default=200)
    ap.add_argument("--listings", type=int, default=30)
    ap.add_argument("--puts", type=int, default=20)
    ap.add_argument("--no-out", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-requests-"))
    c = Cluster(args.python, work, 5)
    c.extra = ["--max-instances", str(args.per_branch + 10)]
    try:
        log(f"starting 5 branches in {work}")
        c.form()
        wait_for(c.all_alive, 60, "all 5 alive on all")
        first = c.nodes[0]
        status, body = call(first, "PUT", "/v1/apps/shop", {"broker": BROKER})
        assert status == 201, body
        wait_for(
            lambda: all(call(d, "GET", "/v1/apps/shop")[0] == 200 for d in c.nodes), 10, "app"
        )
        log(f"pinning {args.per_branch} instances on each branch")
        for i, bid in enumerate(c.ids):
            for k in range(args.per_branch):
                spec = {"name": f"b{i}-{k}", "command": ["sleep", "1"], "autostart": False}
                status, body = call(first, "POST", f"/v1/apps/shop/instances?branch={bid}", spec)
                assert status == 201, body
        owner, other = c.nodes[1], c.nodes[2]
        path = "/v1/apps/shop/instances/b1-0"
        wait_for(lambda: call(other, "GET", path)[0] == 200, 20, "the owner known")
        log(f"{args.gets} GETs direct and through a non-owner, interleaved")
        direct, hop = [], []
        for _ in range(args.gets):
            direct.append(timed(owner, path))
            hop.append(timed(other, path))
        total = 5 * args.per_branch
        log(f"{args.listings} cluster-wide listings of {total} instances")
        listing = "/v1/apps/shop/instances"
        _, body = call(first, "GET", listing)
        assert len(body["items"]) == total and body["unreachable"] == [], len(body["items"])
        lists = [timed(first, listing) for _ in range(args.listings)]
        log(f"{args.puts} app PUTs until all 5 answer them")
        spreads = []
        for k in range(args.puts):
            began = time.monotonic()
            status, _ = call(c.nodes[k % 5], "PUT", f"/v1/apps/spread{k}", {})
            assert status == 201
            wait_for(
                lambda k=k: all(call(d, "GET", f"/v1/apps/spread{k}")[0] == 200 for d in c.nodes),
                10,
                "the app on all five",
            )
            spreads.append(time.monotonic() - began)
    finally:
        c.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ms = 1000.0
    overhead = (med(hop) - med(direct)) * ms
    m = machine()
    text = f"""## Requests in a cluster (issue 14)

`python bench/cluster_requests.py` (defaults: {args.gets} GETs each way, \
{args.per_branch} instances on each of 5 branches, {args.listings} listings, {args.puts} PUTs). \
5 branchd on 127.0.0.1, one cluster key. Machine: {m['nproc']} cores ({m['cpu']}), \
Python {m['python']}, {m['date']}. Client, the five daemons and their gossip share the machine.

| figure | p50 | p99 | target | met |
|---|---:|---:|---|---|
| GET one instance of its owner, direct | {med(direct) * ms:.2f} ms | \
{p(direct, 0.99) * ms:.2f} ms | — | — |
| the same through a branch that does not hold it (one hop) | {med(hop) * ms:.2f} ms | \
{p(hop, 0.99) * ms:.2f} ms | p50 overhead <= 2 ms | {ok(overhead <= 2.0)} ({overhead:.2f} ms) |
| cluster-wide listing of {total} instances (5 x {args.per_branch}) | {med(lists) * ms:.1f} ms | \
{p(lists, 0.99) * ms:.1f} ms | p50 <= 50 ms | {ok(med(lists) * ms <= 50.0)} |
| app PUT on one branch until all 5 answer it | {med(spreads) * ms:.0f} ms | \
{max(spreads) * ms:.0f} ms (max) | <= 2 s | {ok(max(spreads) <= 2.0)} |
"""
    print(text)
    if not args.no_out:
        write_section(ROOT / "docs" / "benchmarks.md", "## Requests in a cluster (issue 14)", text)


if __name__ == "__main__":
    main()
