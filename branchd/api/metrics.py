"""``GET /metrics``: this branch in Prometheus' text format.

Request and forward latencies are counted from the start in plain
histograms of our own (a dict of bucket counts per route); prometheus-client
is imported at the first scrape only, so a branch that is never scraped keeps
its resident memory (issue 10). Each scrape reads what the daemon already
holds: the instances' states and restarts, their process trees' cpu and rss
(the launcher's figures, as ``/stats`` gives them), each Celery worker's last
figures (cached where the daemon asked them; a scrape never calls a worker),
the membership and the gossip's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from branchd.api.forward import Forwarder
from branchd.errors import BranchdError, BranchUnreachable

if TYPE_CHECKING:
    from prometheus_client.core import Metric

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


async def families(
    local: Local, sources: Sources, recorder: Recorder, trees: Trees
) -> list[Metric]:
    """Every metric family of one scrape."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    out: list[Metric] = []
    instances = await local.instances.list_instances()
    by_state = GaugeMetricFamily(
        "branchd_instances", "Instances on this branch by app and state", labels=["app", "state"]
    )
    for (app, state), n in sorted(
        Counter((v.spec.app, v.runtime.state.value) for v in instances).items()
    ):
        by_state.add_metric([app, state], n)
    restarts = CounterMetricFamily(
        "branchd_instance_restarts", "Restarts of each instance", labels=["app", "name"]
    )
    for v in instances:
        restarts.add_metric([v.spec.app, v.spec.name], v.runtime.restarts)
    cpu = GaugeMetricFamily(
        "branchd_instance_cpu_percent",
        "CPU of each instance's process tree (100 is one core)",
        labels=["app", "name"],
    )
    rss = GaugeMetricFamily(
        "branchd_instance_rss_bytes",
        "Resident memory of each instance's tree",
        labels=["app", "name"],
    )
    apps = sorted({v.spec.app for v in instances})
    age = trees.age()
    if age is None or age > MAX_AGE:
        await trees.collect(local, apps)
    else:
        trees.collect_soon(local, apps)  # (for the next scrape)
    for v in instances:
        key = (v.spec.app, v.spec.name)
        known = trees.figures.get(key)
        if known is not None and known[0] == v.runtime.pid:  # (the same process)
            cpu.add_metric(list(key), known[1])
            rss.add_metric(list(key), known[2])
    figures_age = GaugeMetricFamily(
        "branchd_instance_figures_age_seconds", "How old the cpu and rss figures are"
    )
    figures_age.add_metric([], round(trees.age() or 0.0, 3))
    out.append(figures_age)
    out += [by_state, restarts, cpu, rss]
    if sources.celery is not None:
        out += _celery(sources.celery(), GaugeMetricFamily, CounterMetricFamily)
    if sources.members is not None:
        members = GaugeMetricFamily(
            "branchd_cluster_members", "Cluster members known here by state", labels=["state"]
        )
        for state, n in sorted(Counter(str(m.get("state")) for m in sources.members()).items()):
            members.add_metric([state], n)
        out.append(members)
    if sources.gossip is not None:
        out += _gossip(sources.gossip(), CounterMetricFamily)
    if sources.depths is not None:
        out += _depths(sources.depths(), GaugeMetricFamily)
    if sources.streams is not None:
        streams = GaugeMetricFamily("branchd_event_streams", "Event streams connected")
        streams.add_metric([], sources.streams())
        out.append(streams)
    latency = HistogramMetricFamily(
        "branchd_http_request_duration_seconds",
        "API answers by method, route template and status",
        labels=["method", "route", "code"],
    )
    for (method, route, code), h in sorted(recorder.requests.items()):
        latency.add_metric([method, route, code], h.cumulative(), h.total)
    forwards = HistogramMetricFamily(
        "branchd_forward_duration_seconds",
        "Requests forwarded to the branch that answers them, by route and outcome",
        labels=["route", "outcome"],
    )
    for (route, outcome), h in sorted(recorder.forwards.items()):
        forwards.add_metric([route, outcome], h.cumulative(), h.total)
    return [*out, latency, forwards]


def _celery(
    figures: Mapping[tuple[str, str], Mapping[str, Any]], gauge: Any, counter: Any
) -> Iterator[Metric]:
    active = gauge(
        "branchd_celery_active_tasks",
        "Tasks a worker runs now (its last figures)",
        labels=["app", "name"],
    )
    processed = counter(
        "branchd_celery_processed",
        "Tasks a worker has received (its last figures)",
        labels=["app", "name"],
    )
    pool = gauge("branchd_celery_pool_size", "A worker's pool processes", labels=["app", "name"])
    for (app, name), f in sorted(figures.items()):
        for family, key in ((active, "active"), (processed, "processed"), (pool, "pool_size")):
            if isinstance(f.get(key), int | float):
                family.add_metric([app, name], f[key])
    yield from (active, processed, pool)


def _depths(
    depths: Mapping[tuple[str, str], Mapping[str, Any]], gauge: Any
) -> Iterator[Metric]:
    """Queue depth where known: read by the depth scaler, never by a scrape
    (a broker read per scrape would make a scrape as slow as the broker)."""
    families = {
        key: gauge(f"branchd_queue_{key}", text, labels=["app", "queue"])
        for key, text in (
            ("ready", "Ready messages in a queue (the depth scaler's last read)"),
            ("in_flight", "Tasks of a queue held by this branch's workers (last read)"),
            ("consumers", "Consumers of a queue, where the broker says (last read)"),
        )
    }
    for (app, queue), d in sorted(depths.items()):
        for key, family in families.items():
            if isinstance(d.get(key), int | float):
                family.add_metric([app, queue], d[key])
    yield from families.values()


def _gossip(c: Mapping[str, Any], counter: Any) -> Iterator[Metric]:
    for key, what in (
        ("datagrams_sent", "Gossip datagrams sent"),
        ("datagrams_received", "Gossip datagrams received"),
        ("bytes_sent", "Gossip bytes sent"),
        ("bytes_received", "Gossip bytes received"),
        ("peer_calls_dropped", "Peer calls refused: not sealed with a key held here"),
    ):
        if isinstance(c.get(key), int):
            family = counter(f"branchd_gossip_{key}", what)
            family.add_metric([], c[key])
            yield family
    dropped = counter(
        "branchd_gossip_dropped",
        "Gossip frames dropped unopened (unauthenticated, stale, replayed) by reason",
        labels=["reason"],
    )
    for reason, n in sorted(dict(c.get("dropped") or {}).items()):
        dropped.add_metric([reason], n)
    yield dropped


class _Frozen:
    """A collector of families already built (a scrape builds them awaiting)."""

    def __init__(self, built: list[Metric]) -> None:
        self._built = built

    def collect(self) -> Iterator[Metric]:
        yield from self._built


async def scrape(request: web.Request, local: Local) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    app = request.app
    built = await families(local, app[SOURCES], app[RECORDER], app[TREES])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Frozen(built))
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
