"""Broker URLs are checked when an app is declared (issue 12, item 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from branchd.celery import workers as workers_module
from branchd.celery.broker import BrokerSpec
from branchd.celery.ops import CeleryOps
from branchd.celery.stub import StubRemoteControl
from branchd.celery.urls import broker_url_problem, is_embedded_url, result_backend_problem
from branchd.celery.workers import Workers
from branchd.config import CelerySection
from branchd.errors import Invalid
from branchd.model import App, CelerySettings, InstanceSpec, Kind, Queue, State
from branchd.process.fake import FakeLauncher
from branchd.process.machine import Event, Proc
from branchd.process.specs import celery_settings

GOOD = [
    "amqp://guest:guest@127.0.0.1:5672//",
    "amqps://u:p@rabbit.example.com:5671/vhost",
    "pyamqp://localhost//",
    "redis://127.0.0.1:6379/0",
    "rediss://:secret@redis.example.com:6380/1",
    "redis://",
    "sentinel://h1:26379;sentinel://h2:26379",
    "sqs://",
    "sqla+postgresql://u:p@db/kombu",
    "redis://[::1]:6379/0",
    "filesystem://",
]

BAD = {
    "aqmp://guest:guest@127.0.0.1:5672//": "unknown transport 'aqmp', did you mean 'amqp'?",
    "rediss2://h:6379/0": "unknown transport 'rediss2', did you mean 'rediss'?",
    "zzz://h": "unknown transport 'zzz' (kombu knows ",
    "localhost:5672": "a broker URL looks like transport://",
    "://h": "a broker URL looks like transport://",
    "redis://h:abc/0": "the broker URL's host or port does not parse",
    "redis://127.0.0.1:6379/abc": "ends in a database number",
    "redis://h:99999/0": "the broker URL's host or port does not parse",
    # a '/' in a password splits the URL early: the message quotes no piece of it
    "redis://:s3cr/et@h:6379/0": "the broker URL's host or port does not parse (percent-encode",
    "redis://h:0/0": "bad port 0 in the broker URL (1-65535)",
    "amqp://guest:guest@127.0.0.1:5672//;aqmp://h//": "unknown transport 'aqmp'",
    "redis://[::1/0": "the broker URL's host or port does not parse",
    "amqp://a b:5672//": "must not contain spaces",
    " redis://h/0": "leading or trailing spaces",
    "memory://": "the memory transport lives inside one process",
    "filesystem:///var/lib/broker": "filesystem:// takes no path or options",
    "filesystem://?data_folder_in=/x": "filesystem:// takes no path or options",
}


@pytest.mark.parametrize("url", GOOD)
def test_good_urls_pass(url: str) -> None:
    assert broker_url_problem(url) is None


@pytest.mark.parametrize(("url", "problem"), BAD.items(), ids=list(BAD))
def test_bad_urls_name_the_problem(url: str, problem: str) -> None:
    found = broker_url_problem(url)
    assert found is not None and problem in found, found


def test_the_password_is_never_quoted() -> None:
    found = broker_url_problem("aqmp://guest:hunter2@h:5672//")
    assert found is not None and "hunter2" not in found


def test_declaring_an_app_checks_its_broker() -> None:
    with pytest.raises(Invalid, match="bad broker URL: unknown transport 'aqmp', did you mean"):
        celery_settings({"broker": "aqmp://guest:guest@127.0.0.1:5672//"})
    assert celery_settings({"broker": "filesystem://"}).broker is None  # the embedded one
    assert celery_settings({"broker": ""}).broker is None
    assert celery_settings({"broker": "redis://h/0"}).broker == "redis://h/0"
    assert is_embedded_url(None) and is_embedded_url("filesystem://")
    assert not is_embedded_url("filesystem:///x")


class _Host:
    """Two apps on the embedded broker and two other brokers; one broker fails to prune."""

    def __init__(self, apps: dict[str, App]) -> None:
        self.apps = apps
        self.specs = [
            InstanceSpec(app=a, name=f"w-{a}", command=(), branch="b", kind=Kind.CELERY)
            for a in apps
        ]

    def feed(self, name: str, event: Event) -> None: ...
    def proc(self, name: str) -> Proc | None:
        return Proc(state=State.RUNNING, pid=1)

    def spec(self, name: str) -> InstanceSpec | None:
        return next((s for s in self.specs if s.name == name), None)

    def app(self, name: str) -> App | None:
        return self.apps.get(name)

    def queue_decls(self, app: str) -> dict[str, Queue]:
        return {}

    def celery_instances(self) -> list[InstanceSpec]:
        return self.specs


async def test_one_broker_that_fails_to_prune_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    apps = {
        "a": App("a", celery=CelerySettings(broker="redis://bad:6379/0")),
        "b": App("b", celery=CelerySettings(broker=None)),
        "c": App("c", celery=CelerySettings(broker="amqp://later//")),
    }
    pruned: list[str] = []

    def prune(spec: BrokerSpec, nodes: Any) -> list[str]:
        if spec.url.startswith("redis://bad"):
            raise ValueError("broker spec has no 'control_folder' transport option")
        pruned.append(spec.url)
        return []

    monkeypatch.setattr(workers_module, "prune_dead_fanout", prune)
    w = Workers(
        CeleryOps(StubRemoteControl()),
        FakeLauncher(),
        tmp_path,
        "host",
        settings=CelerySection(health_interval=1.0, reconcile_interval=1.0),
    )
    w.bind(_Host(apps))
    for _ in range(3):  # three sweeps: said once, never raised
        await w._prune_fanout()
    assert pruned == ["filesystem://", "amqp://later//"] * 3
    warned = [r.getMessage() for r in caplog.records if "cannot prune" in r.getMessage()]
    assert warned == [
        "cannot prune dead nodes on redis://bad:6379/0: "
        "ValueError: broker spec has no 'control_folder' transport option"
    ]



@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:6379/1", None),
        ("db+sqlite:///tmp/r.db", None),
        ("file:///srv/results", None),
        ("file://relative/path", "needs an absolute folder"),
        ("nothing", "looks like scheme://"),
        ("redis://h /1", "spaces"),
    ],
)
def test_result_backend_urls(url: str, problem: str | None) -> None:
    found = result_backend_problem(url)
    assert (found is None) if problem is None else (found is not None and problem in found)
