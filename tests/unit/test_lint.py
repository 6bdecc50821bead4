"""apps lint as a table: which Celery settings (as ``conf`` answers them) flag
which rule, at which severity."""

from __future__ import annotations

from typing import Any

import pytest

from branchd.celery.lint import (
    Context,
    Severity,
    TaskTimeLimit,
    lint,
    task_time_limits,
    transport_of,
    with_flags,
)
from branchd.model import Limits, TaskLimits

#: A config that trips nothing (soft shutdown set, prefetch 1, a short limit).
CLEAN: dict[str, Any] = {
    "task_acks_late": False,
    "task_reject_on_worker_lost": None,
    "task_time_limit": 300,
    "worker_prefetch_multiplier": 1,
    "worker_max_memory_per_child": None,
    "worker_soft_shutdown_timeout": 30.0,
    "broker_transport_options": {},
}
E, W, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO
REDIS, AMQP = Context(transport="redis"), Context(transport="amqp")

CASES: list[tuple[str, dict[str, Any], Context, list[tuple[str, Severity]]]] = [
    ("clean on redis", {}, REDIS, []),
    ("clean on amqp", {}, AMQP, []),
    ("clean on the embedded broker", {"task_time_limit": 99999}, Context(transport="fs"), []),
    ("acks_late alone", {"task_acks_late": True}, AMQP,
     [("acks_late_without_reject_on_worker_lost", E)]),
    ("acks_late with reject", {"task_acks_late": True, "task_reject_on_worker_lost": True},
     AMQP, []),
    ("limit past visibility", {"task_time_limit": 7200}, REDIS,
     [("time_limit_beyond_visibility_timeout", W)]),
    ("limit past a raised visibility", {"task_time_limit": 7200,
     "broker_transport_options": {"visibility_timeout": 43200}}, REDIS, []),
    ("limit past a lowered visibility, acks_late",
     {"task_time_limit": 900, "task_acks_late": True, "task_reject_on_worker_lost": True,
      "broker_transport_options": {"visibility_timeout": 600}}, REDIS,
     [("time_limit_beyond_visibility_timeout", E)]),
    ("limit past consumer_timeout", {"task_time_limit": 3600}, AMQP,
     [("time_limit_beyond_consumer_timeout", W)]),
    ("limit past consumer_timeout, prefetch disabled", {"task_time_limit": 3600,
     "worker_disable_prefetch": True}, AMQP, []),  # (acked as it starts, nothing waits)
    ("a task's limit past consumer_timeout", {}, Context(transport="amqp",
     task_time_limits=(TaskTimeLimit("shop.tasks.encode", 3600, "the app's"),)),
     [("time_limit_beyond_consumer_timeout", W)]),
    ("a task's limit within consumer_timeout", {}, Context(transport="amqp",
     task_time_limits=(TaskTimeLimit("shop.tasks.encode", 900, "the app's"),)), []),
    ("a task's limit past visibility, acks_late", {"task_acks_late": True,
     "task_reject_on_worker_lost": True}, Context(transport="redis",
     task_time_limits=(TaskTimeLimit("a", 7200, "the app's"), TaskTimeLimit("b", 9000,
     "instance w1's"))),
     [("time_limit_beyond_visibility_timeout", E), ("time_limit_beyond_visibility_timeout", E)]),
    ("no limit, acks_late, redis",
     {"task_time_limit": None, "task_acks_late": True, "task_reject_on_worker_lost": True},
     REDIS, [("time_limit_beyond_visibility_timeout", W)]),
    ("no limit, no acks_late", {"task_time_limit": None}, AMQP, []),
    ("prefetch default", {"worker_prefetch_multiplier": 4}, AMQP, [("prefetch_too_high", INFO)]),
    ("prefetch with depth scaling", {"worker_prefetch_multiplier": 4},
     Context(transport="amqp", depth_scaling=True), [("prefetch_too_high", W)]),
    ("prefetch disabled", {"worker_prefetch_multiplier": 4, "worker_disable_prefetch": True},
     AMQP, []),
    ("per-child memory on prefork", {"worker_max_memory_per_child": 512000}, AMQP, []),
    ("per-child memory on gevent", {"worker_max_memory_per_child": 512000},
     Context(pool="gevent"), [("max_memory_per_child_without_prefork", W)]),
    ("per-child memory on threads", {"worker_max_memory_per_child": 1},
     Context(pool="threads"), [("max_memory_per_child_without_prefork", W)]),
    ("soft shutdown unset", {"worker_soft_shutdown_timeout": 0.0}, AMQP,
     [("soft_shutdown_unset", INFO)]),
    ("soft shutdown unset, stops do not drain", {"worker_soft_shutdown_timeout": 0.0},
     Context(stops_drain=False), []),
    ("a bool is no number", {"task_time_limit": True}, AMQP, []),
    ("several at once", {"task_acks_late": True, "worker_prefetch_multiplier": 4,
     "worker_soft_shutdown_timeout": None}, REDIS,
     [("acks_late_without_reject_on_worker_lost", E), ("prefetch_too_high", INFO),
      ("soft_shutdown_unset", INFO)]),
]


@pytest.mark.parametrize(("conf", "ctx", "found"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_lint(conf: dict[str, Any], ctx: Context, found: list[tuple[str, Severity]]) -> None:
    findings = lint({**CLEAN, **conf}, ctx)
    assert [(f.rule, f.severity) for f in findings] == found
    for f in findings:
        assert "\n" not in f.message and f.message  # one line each
        assert f.to_json() == {"rule": f.rule, "message": f.message, "severity": f.severity.value}


@pytest.mark.parametrize(("url", "kind"), [
    ("redis://h:6379/0", "redis"),
    ("rediss://h/0", "redis"),
    ("sentinel://h:26379", "redis"),
    ("amqp://guest@h//", "amqp"),
    ("pyamqp://h//", "amqp"),
    ("", "filesystem"),
    ("filesystem://", "filesystem"),
    ("sqs://", "sqs"),
])
def test_transport_of(url: str, kind: str) -> None:
    assert transport_of(url) == kind


def test_the_flags_branchd_passes_win_over_the_config() -> None:
    conf = {**CLEAN, "worker_prefetch_multiplier": 4, "task_time_limit": 7200}
    flags = Limits(prefetch_multiplier=1, time_limit=600.0)
    effective = with_flags(conf, flags)
    assert (effective["worker_prefetch_multiplier"], effective["task_time_limit"]) == (1, 600.0)
    assert lint(effective, REDIS) == []
    assert with_flags(conf, Limits()) == conf  # nothing set: the config as it is


def test_a_tasks_finding_names_it_and_says_what_is_unacked() -> None:
    """Without acks_late a task is acked as it starts: what waits unacked is
    what the worker reserved; with acks_late, the running task itself."""
    ctx = Context(
        transport="amqp",
        task_time_limits=(TaskTimeLimit("shop.tasks.encode", 3600, "instance w1's"),),
    )
    (plain,) = lint(CLEAN, ctx)
    assert plain.message.startswith(
        "task shop.tasks.encode: time_limit 3600s (instance w1's task_overrides) is beyond "
        "RabbitMQ's default consumer_timeout (1800s): a task is acknowledged as it starts, "
        "but a message its worker reserved (prefetch) stays unacknowledged"
    ), plain.message
    late = {**CLEAN, "task_acks_late": True, "task_reject_on_worker_lost": True}
    (acked_late,) = lint(late, ctx)
    assert "with task_acks_late a task still running then is unacknowledged" in (
        acked_late.message
    )
    assert "runs twice" in acked_late.message and acked_late.severity == Severity.ERROR


def test_task_time_limits_of_the_app_and_of_its_instances_own() -> None:
    app = Limits(task_overrides={"encode": TaskLimits(time_limit=3600.0),
                                 "resize": TaskLimits(rate_limit="10/s")})  # fmt: skip
    instances = {
        "w2": Limits(task_overrides={"encode": TaskLimits(time_limit=3600.0)}),  # the app's
        "w1": Limits(
            task_overrides={
                "encode": TaskLimits(time_limit=7200.0),
                "thumb": TaskLimits(time_limit=60.0),
            }
        ),
        "w3": Limits(task_overrides={"resize": TaskLimits(rate_limit="1/s")}),
    }
    assert task_time_limits(app, instances) == (
        TaskTimeLimit("encode", 3600.0, "the app's"),
        TaskTimeLimit("encode", 7200.0, "instance w1's"),
        TaskTimeLimit("thumb", 60.0, "instance w1's"),
    )


def test_the_apis_schema_names_every_severity_in_order() -> None:
    from branchd.api.schemas import LINT_ITEM, SEVERITIES

    assert [s.value for s in Severity] == SEVERITIES
    assert LINT_ITEM["properties"]["severity"]["enum"] == SEVERITIES
