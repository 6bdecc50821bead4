"""What the API counts from the start, for ``GET /metrics``: request and
forward latencies in plain histograms of our own (a dict of bucket counts per
route), where a scrape reads the rest (``Sources``) and the instances' cpu and
rss (``Trees``). The scrape itself is ``api/metrics.py``, imported at the
first ``GET /metrics`` (a branch never scraped loads neither it nor
prometheus-client: issue 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from branchd.api.forward import Forwarder
from branchd.errors import BranchdError, BranchUnreachable

if TYPE_CHECKING:
    from branchd.api.backend import Local

#: Upper bounds of the latency buckets (s): a local answer is ~1 ms, a forward ~5.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    """Counts per bucket (not cumulative; the last is +Inf) and the sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


@dataclass
class Recorder:
    """What the API did, by (method, route, status) and forwards by (route, outcome)."""

    requests: dict[tuple[str, str, str], Histogram] = field(default_factory=dict)
    forwards: dict[tuple[str, str], Histogram] = field(default_factory=dict)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        self.requests.setdefault(key, Histogram()).observe(seconds)

    def forward(self, route: str, outcome: str, seconds: float) -> None:
        self.forwards.setdefault((route, outcome), Histogram()).observe(seconds)


RECORDER = web.AppKey("recorder", Recorder)

#: Streams: their "latency" is how long a client stayed, not an answer's.
_LONG = frozenset({"/v1/events"})


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "?"


@web.middleware
async def timing_middleware(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """Outermost: each answer's latency by its route template (a bounded label)."""
    route = _route(request)
    if route in _LONG or request.query.get("follow") in ("1", "true", "yes"):
        return await handler(request)  # type: ignore[no-any-return]
    started = time.perf_counter()
    status = 500
    try:
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        request.app[RECORDER].request(request.method, route, status, time.perf_counter() - started)


class TimedForwarder:
    """A forwarder whose hops are counted and timed, by route and outcome."""

    def __init__(self, inner: Forwarder, recorder: Recorder) -> None:
        self._inner = inner
        self._recorder = recorder

    async def forward(self, request: web.Request, branch: str) -> web.StreamResponse:
        started = time.perf_counter()
        outcome = "error"
        try:
            answer = await self._inner.forward(request, branch)
            outcome = str(answer.status)
            return answer
        except BranchUnreachable:
            outcome = "unreachable"
            raise
        finally:
            self._recorder.forward(_route(request), outcome, time.perf_counter() - started)


@dataclass(frozen=True)
class Sources:
    """Where a scrape reads what is not in the app already (None: not here)."""

    #: ``(app, name) -> {"active", "processed", "pool_size"}`` of running workers
    celery: Callable[[], Mapping[tuple[str, str], Mapping[str, Any]]] | None = None
    #: the gossip's counters (``ClusterService.counters()``)
    gossip: Callable[[], Mapping[str, Any]] | None = None
    #: the membership, as ``GET /v1/branches`` lists it
    members: Callable[[], list[dict[str, Any]]] | None = None
    #: event streams connected now
    streams: Callable[[], int] | None = None
    #: ``(app, queue) -> {"ready", "in_flight", "consumers"}``: the depths the
    #: depth scaler read at its last poll (the queues of apps that scale on one)
    depths: Callable[[], Mapping[tuple[str, str], Mapping[str, Any]]] | None = None


#: How old the instances' cpu and rss in a scrape may be (s) before the
#: scrape itself collects them again.
MAX_AGE = 60.0
#: How long after a scrape's answer the next collection starts (s).
_AFTER = 0.05


class Trees:
    """Each instance's cpu and rss as the last collection found them.

    Reading 200 process trees takes ~40 ms (the launcher's figures, psutil
    and cgroup files); a scrape that waited for them would be that slow. So
    a scrape answers with the figures of the collection that followed the
    previous scrape (one scrape interval old: a cpu figure is an average
    since the sample before anyway) and starts the next one once it has
    answered; figures older than ``MAX_AGE``, or none, are collected first.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.at: float | None = None
        #: (app, name) -> (pid, cpu percent, rss bytes)
        self.figures: dict[tuple[str, str], tuple[int, float, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def age(self) -> float | None:
        return None if self.at is None else self._clock() - self.at

    async def collect(self, local: Local, apps: list[str]) -> None:
        out = {}
        for app in apps:
            try:
                stats = await local.instances.app_stats(app)
            except BranchdError:  # (deleted meanwhile)
                continue
            for s in stats:
                pid = s.view.runtime.pid
                if pid is not None:
                    out[(app, s.view.spec.name)] = (pid, s.tree.cpu_percent, s.tree.memory_rss)
        self.figures, self.at = out, self._clock()

    def collect_soon(self, local: Local, apps: list[str]) -> None:
        if self._timer is not None or (self._task is not None and not self._task.done()):
            return

        def start() -> None:
            self._timer = None
            self._task = asyncio.ensure_future(self.collect(local, apps))

        self._timer = asyncio.get_running_loop().call_later(_AFTER, start)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


TREES = web.AppKey("metric_trees", Trees)
SOURCES = web.AppKey("metric_sources", Sources)
#: ``GET /metrics`` needs no token (``--metrics-public``).
PUBLIC = web.AppKey("metrics_public", bool)
