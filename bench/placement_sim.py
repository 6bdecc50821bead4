"""Placement on stale data: the supermarket model (issue 14, part 1).

n servers (branches), each a FIFO queue with exponential service times of
mean 1; Poisson arrivals at rate lam * n; every arrival is sent to one
server by a rule that sees the queue lengths only through a snapshot (the
gossiped records) refreshed every T mean service times ("periodic update",
Mitzenmacher, "How useful is old information?", 2000; T = 0 is fresh data).
Rules, all on the same snapshot:

- ours: ``branchd.placement.choices`` (the better of two random servers),
  the first choice;
- random: one server at random (ignores the snapshot);
- least: the least loaded on the snapshot (ties at random): what herds.

Anchors (n -> infinity, lam = 0.9): random 1 / (1 - lam) = 10.0 (Mitzenmacher
gives 10.1 by simulation at n = 100), fresh better-of-two 2.66, least loaded
at T = 5 worse than random. Targets: ours within 1.15x of fresh better-of-two
at T = 1, never worse than random at any T.

    .venv/bin/python bench/placement_sim.py                 # ~1-2 min
    .venv/bin/python bench/placement_sim.py --jobs 20000 --runs 1 --no-out
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from branchd.placement import choices

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, machine, med, ok, write_section

ROOT = Path(__file__).resolve().parent.parent

RULES = ("ours", "random", "least")
#: How a rule picks a server from a snapshot of queue lengths.
Rule = Callable[[Sequence[int], random.Random], int]


def _ours(view: Sequence[int], rng: random.Random) -> int:
    return next(choices(range(len(view)), lambda s: -view[s], rng))


def _random(view: Sequence[int], rng: random.Random) -> int:
    return rng.randrange(len(view))


def _least(view: Sequence[int], rng: random.Random) -> int:
    low = min(view)
    return rng.choice([s for s, q in enumerate(view) if q == low])


RULE_OF: dict[str, Rule] = {"ours": _ours, "random": _random, "least": _least}


@dataclass(frozen=True)
class Result:
    mean: float
    p99: float


def simulate(rule: str, period: float, *, n: int, lam: float, jobs: int, seed: int) -> Result:
    """Response times (waiting + service) of ``jobs`` arrivals, the first
    tenth dropped as warm-up."""
    choose = RULE_OF[rule]
    arrivals = random.Random(seed)  # the same arrivals and service times for every rule
    decide = random.Random(seed + 1)
    queued = [0] * n  # jobs at each server (waiting or served)
    last_out = [0.0] * n  # when each server's last job leaves
    leaving: list[tuple[float, int]] = []  # (departure, server)
    view: list[int] = queued if period == 0 else queued[:]
    next_refresh = period
    now = 0.0
    times: list[float] = []
    warm = jobs // 10

    def depart(until: float) -> None:
        while leaving and leaving[0][0] <= until:
            queued[heapq.heappop(leaving)[1]] -= 1

    for k in range(jobs):
        now += arrivals.expovariate(lam * n)
        service = arrivals.expovariate(1.0)
        if period:
            while next_refresh <= now:
                depart(next_refresh)
                view = queued[:]
                next_refresh += period
        depart(now)
        s = choose(view, decide)
        out = max(now, last_out[s]) + service
        last_out[s] = out
        queued[s] += 1
        heapq.heappush(leaving, (out, s))
        if k >= warm:
            times.append(out - now)
    times.sort()
    return Result(statistics.fmean(times), times[int(0.99 * len(times))])


def _one(args: tuple[str, float, int, float, int, int]) -> tuple[str, float, int, Result]:
    rule, period, n, lam, jobs, seed = args
    return rule, period, seed, simulate(rule, period, n=n, lam=lam, jobs=jobs, seed=seed)


def run_all(
    periods: Sequence[float], *, n: int, lam: float, jobs: int, runs: int, seed: int, workers: int
) -> dict[tuple[str, float], list[Result]]:
    """Every rule at every period, ``runs`` seeds each (the same seeds for all)."""
    tasks = [
        (rule, period, n, lam, jobs, seed + 1000 * r)
        for r in range(runs)
        for period in periods
        for rule in RULES
        if not (rule == "random" and period != periods[0])  # (random ignores the snapshot)
    ]
    out: dict[tuple[str, float], list[Result]] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for rule, period, _seed, res in pool.map(_one, tasks):
            out.setdefault((rule, period), []).append(res)
    for period in periods[1:]:
        out[("random", period)] = out[("random", periods[0])]
    return out


def _anchors(cell: dict[tuple[str, float], Result], periods: Sequence[float]) -> str:
    """Measured against the published figures, as rows (those measured)."""
    rows = [
        ("random, mean", ("random", periods[0]), "about 10.1 (1 / (1 - lam) = 10 as n grows)"),
        ("better of two, fresh (T = 0), mean", ("ours", 0.0), "2.66 (n -> infinity)"),
        ("least loaded, T = 5, mean", ("least", 5.0), "worse than random"),
    ]
    lines = [
        f"| {what} | {cell[key].mean:.2f} | {anchor} |" for what, key, anchor in rows if key in cell
    ]
    return (
        'Anchors (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", '
        '1996, and "How Useful Is Old Information?", 2000; lam = 0.9):\n\n'
        "| figure | measured | anchor |\n|---|---|---|\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", type=int, default=100)
    ap.add_argument("--load", type=float, default=0.9)
    ap.add_argument("--jobs", type=int, default=200_000, help="arrivals per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--periods", default="0,1,5,10", help="snapshot ages T, comma-separated")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-out", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()
    periods = [float(p) for p in args.periods.split(",")]
    log(f"{args.runs} runs x {len(periods)} periods, {args.jobs} arrivals each")
    res = run_all(
        periods,
        n=args.servers,
        lam=args.load,
        jobs=args.jobs,
        runs=args.runs,
        seed=args.seed,
        workers=args.workers,
    )
    cell = {k: Result(med([r.mean for r in v]), med([r.p99 for r in v])) for k, v in res.items()}
    fresh = cell.get(("ours", 0.0))
    rows = []
    for period in periods:
        row = [f"| {period:g} |"]
        for rule in RULES:
            c = cell[(rule, period)]
            row.append(f" {c.mean:.2f} | {c.p99:.1f} |")
        ours, rnd = cell[("ours", period)], cell[("random", period)]
        row.append(f" {ok(ours.mean <= rnd.mean and ours.p99 <= rnd.p99)} |")
        rows.append("".join(row))
    m = machine()
    verdict = ""
    if fresh is not None and ("ours", 1.0) in cell:
        ratio = cell[("ours", 1.0)].mean / fresh.mean
        verdict = (
            f"Ours at T = 1 is {ratio:.3f}x fresh better-of-two "
            f"(target <= 1.15: {ok(ratio <= 1.15)})."
        )
    text = (
        "## Placement (issue 14, part 1)\n\n"
        f"`bench/placement_sim.py`: the supermarket model, {args.servers} servers at "
        f"{args.load:.0%} load, Poisson arrivals, exponential service times of mean 1, "
        "FIFO; the rule sees queue lengths through a snapshot refreshed every T mean "
        f"service times (T = 0: fresh). {args.jobs} arrivals a run (the first tenth dropped), "
        f"median of {args.runs} runs (seeds {args.seed} + 1000 k, the same arrivals for every "
        f"rule). Response time = waiting + service, in mean service times. Machine: "
        f"{m['nproc']} cores ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, "
        f"{m['date']}.\n\n"
        "| T | ours mean | ours p99 | random mean | random p99 | least loaded mean "
        "| least loaded p99 | ours <= random |\n"
        "|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n"
        + _anchors(cell, periods)
        + "\n"
        + verdict
        + " The rule sees only queue lengths here; `pick` keys on free slots the same way "
        "(then free memory and CPU headroom), and the receiving branch's re-check "
        "(answer `Full`, try the next choice) is not modelled: every queue is unbounded."
        " Random reads a little under the anchor: each run starts with empty queues, and an "
        "M/M/1 queue at 90 % load takes hundreds of service times to settle, longer than the "
        "dropped tenth.\n"
    )
    print(text)
    if not args.no_out:
        write_section(ROOT / "docs" / "benchmarks.md", text.splitlines()[0], text)


if __name__ == "__main__":
    main()
