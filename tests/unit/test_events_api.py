"""The event journal, ids and filters of GET /v1/events, and the metrics'
histograms (issue 17): pure parts, no daemon."""

from __future__ import annotations

import pytest
from branchctl.cli.events import event_text

from branchd import events as ev
from branchd.api.events import Filter, Journal, format_cursor, parse_cursor, parse_filter, wire
from branchd.api.meters import Histogram
from branchd.config import load
from branchd.errors import BadRequest, ConfigError
from branchd.model import State


def _journal(size: int = 3) -> Journal:
    j = Journal("b1", 77, lambda: 1.0, size=size)
    for n in range(5):
        j.append(ev.InstanceAdded("web", f"w{n}"))
    return j  # seqs 1..5, 3..5 kept


@pytest.mark.parametrize(
    ("position", "seq", "gap"),
    [
        (None, 5, None),  # a new stream: from now on
        ("77-5", 5, None),
        ("77-3", 3, None),
        ("77-1", 1, None),  # too old: after() tells how many are lost
        ("76-4", 2, "the daemon restarted"),  # another run: the whole backlog, told
        ("77-9", 2, "an id this run never sent"),
    ],
)
def test_resume(position: str | None, seq: int, gap: str | None) -> None:
    got, told = _journal().resume(position)
    assert got == seq
    assert (told["reason"].split(":")[0] if told else None) == gap


@pytest.mark.parametrize(
    ("seq", "names", "lost"), [(5, [], 0), (3, ["w3", "w4"], 0), (0, ["w2", "w3", "w4"], 2)]
)
def test_after(seq: int, names: list[str], lost: int) -> None:
    entries, missed = _journal().after(seq)
    assert [e.data["name"] for e in entries] == names and missed == lost


def test_cursors_and_filters() -> None:
    assert parse_cursor(None) == {} and parse_cursor("5-2") == {"": "5-2"}
    vector = {"a": "1-2", "b": "3-4"}
    assert parse_cursor(format_cursor(vector)) == vector
    for bad in ("x", "a=1", "=1-2", "1-2,3"):
        with pytest.raises(BadRequest, match="Last-Event-ID"):
            parse_cursor(bad)
    assert parse_filter({"types": "member,instance"}).types == {"member", "instance"}
    with pytest.raises(BadRequest, match="types is a comma-separated list"):
        parse_filter({"types": "instance,nope"})
    member = wire(ev.MemberChanged("b2", "h:1", "alive", 3), "b1", 2.0)
    inst = wire(ev.InstanceChanged("web", "w1", State.BACKOFF, None, "exited 1"), "b1", 2.0)
    assert Filter(app="web").accepts(inst) and not Filter(app="web").accepts(member)
    assert not Filter(types=frozenset({"member"})).accepts(inst)
    assert Filter(app="x", types=frozenset({"member"})).accepts({"type": "gap"})
    assert inst["state"] == "backoff" and inst["branch"] == "b1"
    assert "web/w1 backoff (exited 1)" in event_text(inst)
    assert "2 events missed" in event_text({"type": "gap", "missed": 2, "reason": "old"})


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram()
    for s in (0.0005, 0.003, 0.003, 20.0):
        h.observe(s)
    buckets = dict(h.cumulative())
    assert buckets["0.001"] == 1 and buckets["0.005"] == 3 and buckets["10.0"] == 3
    assert buckets["+Inf"] == 4 and h.total == pytest.approx(20.0065)


@pytest.mark.parametrize(
    ("flags", "env", "public"),
    [
        ({}, {}, False),
        ({}, {"BRANCHD_METRICS_PUBLIC": "1"}, True),
        ({}, {"BRANCHD_METRICS_PUBLIC": "no"}, False),
        ({"metrics_public": True}, {}, True),
    ],
)
def test_metrics_public_setting(flags: dict[str, bool], env: dict[str, str], public: bool) -> None:
    assert load(flags, env).api.metrics_public is public


def test_metrics_public_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="metrics_public must be true or false"):
        load({}, {"BRANCHD_METRICS_PUBLIC": "maybe"})


def test_a_daemon_never_scraped_does_not_load_prometheus_client() -> None:
    import subprocess
    import sys

    code = "import sys, branchd.daemon; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


async def test_keep_alive_and_a_reader_a_backlog_behind() -> None:
    from typing import cast

    from aiohttp.test_utils import TestClient, TestServer

    from branchd.api.app import make_app
    from branchd.api.backend import Local
    from branchd.api.events import KEEPALIVE_KEY

    journal = Journal("b1", 9, lambda: 1.0, size=4)
    app = make_app(
        cast(Local, object()),
        token=None,
        max_body=1024,
        branch=lambda: None,  # type: ignore[arg-type, return-value]
        journal=journal,
    )
    app[KEEPALIVE_KEY] = 0.05
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/v1/events", headers={"Last-Event-ID": "9-0"})
        assert resp.status == 200
        for n in range(10):  # before the stream reads: 6 fall out of the backlog
            journal.append(ev.InstanceAdded("web", f"w{n}"))
        text = ""
        while "keep-alive" not in text:
            text += (await resp.content.readany()).decode()
        resp.close()
    assert '"missed": 6' in text and "id: 9-7\n" in text and "id: 9-10\n" in text
    assert "w5" not in text and "w6" in text


@pytest.mark.parametrize(
    ("stats", "figures"),
    [
        ({}, {"active": None, "processed": None, "pool_size": None}),
        (
            {"active": [{"id": "t"}], "pool_size": 4, "stats": {"total": {"a": 3, "b": 2}}},
            {"active": 1, "processed": 5, "pool_size": 4},
        ),
        ({"active": [], "stats": None}, {"active": 0, "processed": None, "pool_size": None}),
    ],
)
def test_worker_figures_of_its_stats(stats: dict[str, object], figures: dict[str, object]) -> None:
    from branchd.celery.workers import figures_of

    assert figures_of(stats) == figures
