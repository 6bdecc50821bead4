"""The gossip layer in the simulator: rumours, detection and idle cost (issue 13).

N gossip services (the real ``Gossip``, sealing every frame) on the in-memory
network, stepped on the fake scheduler: simulated seconds, no real waiting,
each run a function of its seed. The LAN profile (200 ms gossip interval, 3
nodes a turn, 1 s probes). The cluster is the test suite's ``Sim``
(tests/integration/test_gossip.py), started converged for N > 10 (see
``Sim.start_converged``), else joined through one seed.

    .venv/bin/python bench/gossip_sim.py                        # ~9 min on 2 cores
    .venv/bin/python bench/gossip_sim.py --counts 3,10,100 --runs 1 --no-out

For each N in ``--counts``:

- rumour: a new branch joins through one member; simulated seconds until
  99.9 % of the N others (rounded up) see it alive; then a leave, until 99.9 %
  see it left (median of ``--runs`` seeds);
- detection: a branch ended without a word, either *killed* (its process
  gone, its host up and refusing what comes to its port, as after
  ``kill -9``) or *silent* (its host off or cut off: nothing refuses);
  seconds until each survivor says dead: over ``DETECTION_SEEDS`` seeds,
  the p50 / p99 / max of the time all survivors took, and the p50 / p99 of
  every survivor's own time;
- idle: datagrams and bytes (sealed, as on the wire) each branch sends per
  simulated second, over one push-pull period (30 s, 90 s at 100, 180 s at
  1,000) after a 5 s warm-up (median of ``--runs``).

The section "Gossip simulator (issue 13)" of docs/benchmarks.md is replaced
(``--no-out``: only printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import log, machine, med, ok, write_section  # noqa: E402

from branchd.cluster.timing import push_pull_scale  # noqa: E402
from tests.integration.test_gossip import AL, LAN, LE, Sim, detection, reached  # noqa: E402

#: Seeds of the detection runs by N (a run at 1,000 is about 6 s of CPU).
DETECTION_SEEDS = {3: 30, 10: 30, 100: 10, 1000: 3}
WARM_UP = 5.0


async def start(sim: Sim, n: int) -> None:
    if n > 10:
        await sim.start_converged()
    else:
        await sim.join_all()
        await sim.until(sim.converged, limit=10.0)


async def idle_and_rumour(n: int, seed: int) -> dict[str, float]:
    """One run: the idle cost per branch, then a join's and a leave's spread."""
    sim = Sim(n, seed)
    sent: Counter[str] = Counter()
    size: Counter[str] = Counter()
    real_send = sim.net._send

    def counted(src: str, dst: str, data: bytes) -> None:
        sent[src] += 1
        size[src] += len(data)
        real_send(src, dst, data)

    sim.net._send = counted  # type: ignore[method-assign]
    await start(sim, n)
    await sim.run(WARM_UP)
    sent.clear()
    size.clear()
    window = push_pull_scale(LAN.push_pull_interval, n)
    await sim.run(window)
    per = n * window
    out = {"packets": sum(sent.values()) / per, "bytes": sum(size.values()) / per}
    joiner = sim.add("new")
    await joiner.start((sim.addr(sim.ids[0]),))
    out["join"] = await sim.until(lambda: reached(sim, "new", AL), 30.0, step=0.01)
    await sim.run(5.0)
    leaver = sim.nodes[sim.ids[n // 2]]
    leaving = asyncio.ensure_future(leaver.leave())
    out["leave"] = await sim.until(lambda: reached(sim, leaver.id, LE), 30.0, step=0.01)
    await sim.until(leaving.done, limit=10.0)
    sim.close()
    return out


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method; the max for q = 100)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def measure(counts: list[int], runs: int) -> list[dict[str, float]]:
    rows = []
    for n in counts:
        t0 = time.process_time()
        samples = []
        for seed in range(1, runs + 1):
            samples.append(await idle_and_rumour(n, seed))
            log(f"N={n} seed {seed}: " + " ".join(f"{k} {v:.3g}" for k, v in samples[-1].items()))
        row: dict[str, float] = {"n": n, "runs": runs}
        for k in samples[0]:
            row[k] = med([s[k] for s in samples])
        seeds = DETECTION_SEEDS.get(n, 3)
        for how in ("killed", "silent"):
            alls, each = [], []
            for seed in range(1, seeds + 1):
                times = await detection(n, seed, silent=how == "silent")
                alls.append(max(times))
                each.extend(times)
            log(f"N={n}: detection ({how}) on all, over {seeds} seeds: {sorted(alls)}")
            row.update(
                {
                    f"{how}_all_p50": statistics.median(alls),
                    f"{how}_all_p99": pct(alls, 99),
                    f"{how}_all_max": max(alls),
                    f"{how}_each_p50": statistics.median(each),
                    f"{how}_each_p99": pct(each, 99),
                }
            )
        row.update(seeds=seeds, cpu=time.process_time() - t0)
        rows.append(row)
    return rows


def report(rows: list[dict[str, float]], took: float) -> str:
    m = machine()
    lines = [
        "## Gossip simulator (issue 13)",
        "",
        f"Measured {m['date']} with `python bench/gossip_sim.py` (took {took / 60:.1f} min). "
        f"Machine: {m['nproc']} cores ({m['cpu']}), Python {m['python']}. Times are "
        "simulated seconds: N real `Gossip` services (every frame sealed) on the in-memory "
        "network, stepped on the fake scheduler, LAN profile (probe 1 s, timeout 0.5 s, "
        "gossip every 200 ms to 3, suspicion min `4 x max(1, log10 N)` s, max 6x that), "
        "network delay 0.5-5 ms, no loss. A cluster of N > 10 starts converged (every view "
        "full, the starts spread over one gossip interval: `Sim.start_converged`); "
        "N <= 10 joins through one seed, 20 ms apart.",
        "",
        "| N | rumour: a join at 99.9 % (s) | a leave at 99.9 % (s) "
        "| killed: dead on all, p50 / p99 / max over seeds (s) "
        "| killed: each survivor, p50 / p99 (s) "
        "| silent: dead on all, p50 / p99 / max (s) | silent: each survivor, p50 / p99 (s) "
        "| idle packets / branch / s | idle bytes / branch / s | CPU for the row (s) |",
        "|---:|---:|---:|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:.0f} | {r['join']:.2f} | {r['leave']:.2f} "
            f"| {_all(r, 'killed')} ({r['seeds']:.0f} seeds) | {_each(r, 'killed')} "
            f"| {_all(r, 'silent')} | {_each(r, 'silent')} "
            f"| {r['packets']:.2f} | {r['bytes']:.0f} | {r['cpu']:.0f} |"
        )
    lines += [
        "",
        f"Rumour and idle figures: median of {rows[0]['runs']:.0f} runs (seeds 1..). "
        "memberlist's published LAN figures, for comparison (Serf's convergence "
        "simulator, the same 200 ms gossip interval and fan-out of 3): a rumour at 99.9 % "
        "of 1,000 branches in 2.0 s; failure detection p50 about 10 s at N = 100. "
        "Our targets: a rumour at 99.9 % of 100 within 2.0 s and of "
        "1,000 within 2.5 s; a death on every survivor within 6 s at N <= 10 (the max of "
        "30 seeds) and within 12.5 s at 100 (p99 of the survivors); about 2 idle packets "
        "a branch a second (a probe and the ack of another's; gossip rides on them, "
        "push-pull adds its Sync of the whole view once a period).",
        "",
        *targets(rows),
        "",
        "Why a death takes what it takes. *Killed* (the issue's case: `kill -9`, a "
        "crash; the host lives and its kernel refuses datagrams to the port nobody holds, "
        "an ICMP port unreachable): the first survivor to probe the victim is refused at "
        "once, asks its relays at once, and two refusals (its own and a relay's) make the "
        "victim dead with no suspicion; the time is the wait for that first probe (each "
        "survivor reaches the victim on its own round-robin once in N - 1 periods, so none "
        "has within 1 s in about (8/9)^9 = 35 % of runs at N = 10) plus the rumour's "
        "spread. *Silent* (the host off, a cable cut: nothing refuses): SWIM's timeouts "
        "alone, so a death is seen by all about 5.2 s after that first probe (the probe's "
        "1 s period, the 4 s minimum suspicion once two others confirm, which they do in "
        "time, and 0.1-0.25 s of gossip); with the same wait for the first probe, no "
        "probe order brings that under 6 s at every seed with the LAN profile's timers "
        "(at one probe a second the wait is up to 1 s even when perfectly staggered), so "
        "the silent figures are reported, not held to the 6 s and 12.5 s targets. At "
        "N = 1,000 the idle figure includes one push-pull of the whole view (split in "
        "about 45 datagrams each way) per 180 s.",
        "",
    ]
    return "\n".join(lines)


def _all(r: dict[str, float], how: str) -> str:
    return f"{r[how + '_all_p50']:.2f} / {r[how + '_all_p99']:.2f} / {r[how + '_all_max']:.2f}"


def _each(r: dict[str, float], how: str) -> str:
    return f"{r[how + '_each_p50']:.2f} / {r[how + '_each_p99']:.2f}"


def targets(rows: list[dict[str, float]]) -> list[str]:
    """The targets of issue 13 against the figures measured (those in rows)."""
    by = {int(r["n"]): r for r in rows}
    out = ["| target | measured | met |", "|---|---|---|"]
    for n, bound in ((100, 2.0), (1000, 2.5)):
        if n in by:
            worst = max(by[n]["join"], by[n]["leave"])
            out.append(
                f"| a rumour at 99.9 % of {n} within {bound} s | {worst:.2f} s "
                f"| {ok(worst <= bound)} |"
            )
    small = [by[n]["killed_all_max"] for n in (3, 10) if n in by]
    if small:
        out.append(
            f"| killed: dead on all within 6 s at N <= 10, max over 30 seeds "
            f"| {max(small):.2f} s | {ok(max(small) <= 6.0)} |"
        )
    if 100 in by:
        p99 = by[100]["killed_each_p99"]
        out.append(
            f"| killed: dead within 12.5 s at N = 100, p99 of the survivors | {p99:.2f} s "
            f"| {ok(p99 <= 12.5)} |"
        )
    packets = [r["packets"] for r in rows]
    out.append(
        f"| about 2 idle packets a branch a second | {min(packets):.2f}-{max(packets):.2f} "
        f"| {ok(max(packets) <= 2.5)} |"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="3,10,100,1000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-out", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    began = time.monotonic()
    rows = asyncio.run(measure(counts, args.runs))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    text = report(rows, time.monotonic() - began)
    print(text)
    if not args.no_out:
        write_section(ROOT / "docs" / "benchmarks.md", text.splitlines()[0], text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
