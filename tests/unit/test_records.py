"""Declarations as records: one wire form each, and the API answers made from it.

The expected answers were printed by the release before the wire forms (its
``to_json`` methods), so a change to what the API shows fails here first.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from branchd.hlc import Version
from branchd.model import (
    LIMIT_FIELDS,
    App,
    Autorestart,
    Autoscale,
    CelerySettings,
    Desired,
    InstanceSpec,
    Kind,
    Policy,
    Queue,
    Runtime,
    State,
    StopStep,
)
from branchd.views import InstanceView, app_answer, queue_answer

V = Version(1_700_000_000_123, 4, "b2")

SPEC = InstanceSpec(
    app="web",
    name="w1",
    command=(),
    branch="b1",
    kind=Kind.CELERY,
    env={"A": "1"},
    cwd="/srv",
    user="nobody",
    policy=Policy(Autorestart.ALWAYS, (0, 2), 0.5, 7, "INT", 600.0),
    autostart=False,
    desired=Desired.STOPPED,
    log_max_bytes=1234,
    log_backups=2,
    created_at=1700000000.25,
    queues=("default", "images"),
    autoscale=Autoscale(2, 8),
    pool="threads",
    args=("-E",),
    loglevel="WARNING",
    hung_after=90.0,
    memory_limit=1 << 29,
    version=V,
    origin="b1",
)
APP = App(
    "shop",
    env={"X": "1"},
    defaults={"pool": "solo", "n": [1]},
    created_at=7.0,
    celery=CelerySettings(
        "amqp://h//",
        "shop.tasks",
        "/venv/bin/python",
        "solo",
        ("-E",),
        Autoscale(1, 2),
        True,
        "redis://h/1",
    ),
    version=V,
    origin="b3",
)
QUEUE = Queue("shop", "images", "media", "topic", "image.#", {"durable": True}, V, "b1")

RECORDS: list[App | Queue | InstanceSpec] = [
    SPEC,
    InstanceSpec(app="a", name="n", command=("x",), branch="b"),
    # issue 15, part 4: env files, a umask, retries forever
    InstanceSpec(
        app="a",
        name="n",
        command=("x",),
        branch="b",
        env_file=("/etc/a.env", "-/etc/b.env"),
        umask=0o027,
        policy=Policy(startretries=None),
    ),
    APP,
    App("bare"),
    QUEUE,
    Queue("shop", "q"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: f"{type(r).__name__}-{r.name}")
def test_the_wire_form_round_trips_through_json(record: App | Queue | InstanceSpec) -> None:
    wire = record.to_wire()
    assert json.loads(json.dumps(wire)) == wire  # JSON-ready: no tuples, enums or versions
    assert type(record).from_wire(json.loads(json.dumps(wire))) == record


def test_an_instance_wire_form_is_flat_with_the_users_names() -> None:
    wire = SPEC.to_wire()
    assert wire["autorestart"] == "always" and wire["exitcodes"] == [0, 2]
    assert "policy" not in wire
    assert wire["version"] == "018bcfe5687b.0004.b2" and wire["origin"] == "b1"


def test_the_new_instance_fields_on_the_wire() -> None:
    spec = InstanceSpec(
        app="a", name="n", command=("x",), branch="b", umask=0o22, policy=Policy(startretries=None)
    )
    wire = spec.to_wire()
    assert (wire["umask"], wire["startretries"], wire["env_file"]) == ("022", "forever", [])
    # a row of the release before has none of them: the defaults
    old = {k: v for k, v in wire.items() if k not in ("umask", "env_file", "startretries")}
    assert InstanceSpec.from_wire(old) == replace(spec, umask=None, policy=Policy())


def test_missing_keys_take_the_defaults() -> None:
    assert InstanceSpec.from_wire({"app": "a", "name": "n", "branch": "b"}) == InstanceSpec(
        app="a", name="n", command=(), branch="b"
    )
    assert App.from_wire({"name": "a"}) == App("a")
    assert Queue.from_wire({"app": "a", "name": "q"}) == Queue("a", "q")


@pytest.mark.parametrize("cls", [App, Queue, InstanceSpec])
def test_an_unknown_key_is_refused_not_dropped(cls: Any) -> None:
    with pytest.raises(ValueError, match="surprise"):
        cls.from_wire({"app": "a", "name": "n", "branch": "b", "surprise": 1})


def test_instance_answers_are_those_of_the_release_before() -> None:
    process = InstanceSpec(
        app="web",
        name="p1",
        command=("sleep", "60"),
        branch="b1",
        env={"A": "1"},
        cwd="/srv",
        created_at=5.0,
        version=V,
        origin="b1",
    )
    rt = Runtime(
        state=State.EXITED,
        restarts=2,
        exit_code=1,
        stop_step=StopStep.KILL,
        reason="boom",
        started_at=3.0,
    )
    got = InstanceView(process, rt, uptime=None).to_json()
    assert list(got.items()) == list(
        {
            "name": "p1",
            "app": "web",
            "kind": "process",
            "state": "exited",
            "desired": "running",
            "pid": None,
            "command": ["sleep", "60"],
            "env": {"A": "1"},
            "cwd": "/srv",
            "user": None,
            "env_file": [],  # (new in issue 15: keys are added, none changed)
            "umask": None,
            "memory_max": None,  # (issue 15, part 5: cgroup limits)
            "cpu_max": None,
            "pids_max": None,
            "autorestart": "on-failure",
            "exitcodes": [0],
            "startsecs": 1.0,
            "startretries": 3,
            "stopsignal": "TERM",
            "stopwaitsecs": 10.0,
            "autostart": True,
            "log_max_bytes": 10485760,
            "log_backups": 5,
            "restarts": 2,
            "exit_code": 1,
            "started_at": 3.0,
            "uptime": None,
            "stop_step": "kill",
            "reason": "boom",
            "branch": "b1",
            "created_at": 5.0,
            # (new in issue 15, part 3)
            "after": [],
            "after_timeout": 60.0,
            "priority": 999,
            "ready": None,
            "ready_timeout": 60.0,
            "live": None,
            "live_period": 10.0,
            "live_timeout": 5.0,
            "live_failures": 3,
        }.items()
    )
    worker = InstanceSpec(
        app="shop",
        name="w1",
        command=(),
        branch="b1",
        kind=Kind.CELERY,
        queues=("default",),
        autoscale=Autoscale(1, 4),
        memory_limit=100,
        desired=Desired.STOPPED,
        version=V,
    )
    got = InstanceView(worker, Runtime(), 1.5, ("celery", "worker"), "w1@h").to_json()
    assert list(got.items()) == list(
        {
            "name": "w1",
            "app": "shop",
            "kind": "celery",
            "state": "stopped",
            "desired": "stopped",
            "pid": None,
            "command": ["celery", "worker"],
            "env": {},
            "cwd": None,
            "user": None,
            "env_file": [],
            "umask": None,
            "memory_max": None,  # (issue 15, part 5: cgroup limits)
            "cpu_max": None,
            "pids_max": None,
            "autorestart": "on-failure",
            "exitcodes": [0],
            "startsecs": 1.0,
            "startretries": 3,
            "stopsignal": "TERM",
            "stopwaitsecs": 10.0,
            "autostart": True,
            "log_max_bytes": 10485760,
            "log_backups": 5,
            "restarts": 0,
            "exit_code": None,
            "started_at": None,
            "uptime": 1.5,
            "stop_step": None,
            "reason": None,
            "branch": "b1",
            "created_at": 0.0,
            "after": [],  # (a worker has no probes: its ping says it is ready)
            "after_timeout": 60.0,
            "priority": 999,
            "node": "w1@h",
            "queues": ["default"],
            "autoscale": {"min": 1, "max": 4},
            "concurrency": None,
            "pool": None,
            "args": [],
            "loglevel": "INFO",
            "hung_after": 60.0,
            "memory_limit": 100,
            # new: the worker limits (none set)
            "time_limit": None,
            "soft_time_limit": None,
            "max_tasks_per_child": None,
            "max_memory_per_child": None,
            "prefetch_multiplier": None,
            "disable_prefetch": None,
            "task_overrides": {},
        }.items()
    )


def test_app_and_queue_answers_are_those_of_the_release_before() -> None:
    app = App(
        "shop",
        env={"X": "1"},
        defaults={"pool": "solo"},
        created_at=7.0,
        version=V,
        celery=CelerySettings(celery_app="shop.tasks", args=("-E",), autoscale=Autoscale(1, 2)),
    )
    assert list(app_answer(app, "filesystem://", None).items()) == list(
        {
            "name": "shop",
            "env": {"X": "1"},
            "defaults": {"pool": "solo"},
            "created_at": 7.0,
            "broker": "filesystem://",
            "embedded_broker": True,
            "result_backend": None,
            "celery_app": "shop.tasks",
            "python": None,
            "pool": "prefork",
            "args": ["-E"],
            "autoscale": {"min": 1, "max": 2},
            "mingle_gossip": False,
            # new: where its instances run (the embedded broker: where declared)
            "scope": "branch",
            "branch": None,
            # new: the worker limits (none set)
            "time_limit": None,
            "soft_time_limit": None,
            "max_tasks_per_child": None,
            "max_memory_per_child": None,
            "prefetch_multiplier": None,
            "disable_prefetch": None,
            "task_overrides": {},
        }.items()
    )
    remote = App("p", celery=CelerySettings(broker="redis://h/0", result_backend="redis://h/1"))
    assert app_answer(remote) == {
        "name": "p",
        "env": {},
        "defaults": {},
        "created_at": 0.0,
        "broker": "redis://h/0",
        "embedded_broker": False,
        "result_backend": "redis://h/1",
        "celery_app": None,
        "python": None,
        "pool": "prefork",
        "args": [],
        "autoscale": None,
        "mingle_gossip": False,
        "scope": "cluster",
        "branch": None,
        **dict.fromkeys(LIMIT_FIELDS[:-1]),
        "task_overrides": {},
    }
    assert queue_answer(Queue("shop", "q", version=V)) == {
        "app": "shop",
        "name": "q",
        "exchange": "q",
        "exchange_type": "direct",
        "routing_key": "q",
        "options": {},
    }
    assert queue_answer(QUEUE) == {
        "app": "shop",
        "name": "images",
        "exchange": "media",
        "exchange_type": "topic",
        "routing_key": "image.#",
        "options": {"durable": True},
    }


def test_passwords_are_never_in_an_answer() -> None:
    from branchd.views import redact_urls

    assert redact_urls("amqp://guest:guest@127.0.0.1:5672//") == "amqp://guest:**@127.0.0.1:5672//"
    assert redact_urls("redis://:s3cret@h:6379/1") == "redis://:**@h:6379/1"
    assert redact_urls("amqp://u:p@a//;amqp://u:q@b//") == "amqp://u:**@a//;amqp://u:**@b//"
    assert redact_urls("--x=db+postgresql://scott:tiger@db/x") == "--x=db+postgresql://scott:**@db/x"
    for plain in ("redis://h/2", "filesystem://", "amqp://guest@h//", "no url"):
        assert redact_urls(plain) == plain
    assert redact_urls(None) is None
