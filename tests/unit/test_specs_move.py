"""``specs.creation_fields``: the create body that makes an instance again on
another branch (``drain --move``) gives the very same declaration there."""

from __future__ import annotations

from dataclasses import replace

import pytest

from branchd.model import App, Autoscale, CelerySettings, Desired, Kind
from branchd.process.specs import build_spec, creation_fields

APP = App(
    "shop",
    env={"A": "1"},
    defaults={"startsecs": 3.0, "env": {"D": "d"}},
    celery=CelerySettings(celery_app="shop.tasks"),
)


@pytest.mark.parametrize(
    "fields",
    [
        {"command": ["python", "-m", "http.server"]},
        {"command": ["x"], "env": {"K": "v"}, "cwd": "/tmp", "autorestart": "always",
         "exitcodes": [0, 2], "stopsignal": "INT", "stopwaitsecs": 3, "startretries": 7,
         "log_max_bytes": 1024, "log_backups": 2},
        {"kind": "celery"},
        {"kind": "celery", "queues": ["a", "b"], "autoscale": {"min": 1, "max": 4},
         "pool": "threads", "args": ["--prefetch-multiplier=1"], "memory_limit": 1 << 30},
        {"kind": "celery", "concurrency": 3, "loglevel": "DEBUG", "hung_after": 90},
    ],
)  # fmt: skip
def test_the_body_makes_the_same_instance_again(fields: dict[str, object]) -> None:
    spec = build_spec(APP, "w1", fields, "branch-a", 100.0)
    body = creation_fields(spec)
    assert body["name"] == "w1" and body["autostart"] is True
    name = body.pop("name")
    again = build_spec(APP, str(name), body, "branch-b", 200.0)
    assert again == replace(spec, branch="branch-b", created_at=200.0)


def test_a_stopped_instance_is_made_stopped() -> None:
    spec = replace(build_spec(APP, "w1", {"kind": "celery"}, "a", 1.0), desired=Desired.STOPPED)
    assert creation_fields(spec)["autostart"] is False


def test_the_app_defaults_it_took_travel_with_it() -> None:
    spec = build_spec(APP, "w1", {"command": ["x"]}, "a", 1.0)
    body = creation_fields(spec)
    assert body["startsecs"] == 3.0 and body["env"] == {"D": "d"}
    assert "queues" not in body and "autoscale" not in body  # (a process has none)
    worker = build_spec(APP, "w2", {"kind": "celery", "autoscale": {"min": 2, "max": 5}}, "a", 1.0)
    assert worker.autoscale == Autoscale(2, 5) and worker.kind == Kind.CELERY
    assert "command" not in creation_fields(worker) and "concurrency" not in creation_fields(worker)
