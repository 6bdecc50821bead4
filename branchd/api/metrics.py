"""``GET /metrics``: this branch in Prometheus' text format.

Request and forward latencies are counted from the start in plain
histograms of our own (``api/meters.py``); this module and prometheus-client
are imported at the first scrape only (``routes.metrics``), so a branch that
is never scraped keeps its resident memory (issue 10). Each scrape reads what the daemon already
holds: the instances' states and restarts, their process trees' cpu and rss
(the launcher's figures, as ``/stats`` gives them), each Celery worker's last
figures (cached where the daemon asked them; a scrape never calls a worker),
the membership and the gossip's counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from branchd.api.meters import MAX_AGE, RECORDER, SOURCES, TREES, Recorder, Sources, Trees

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from branchd.api.backend import Local


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
        ("datagrams_refused", "Gossip datagrams refused by the peer's host (nothing listens)"),
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
