"""Worker limits: their flags per pool, their rules (a table), the split of an
app's rate limit between its workers, and the drift the reconcile re-applies."""

from __future__ import annotations

import re
from typing import Any

import pytest

from branchd.celery import limits as L
from branchd.celery.argv import limit_flags, worker_argv
from branchd.declarations import prefetch_clash
from branchd.errors import Invalid
from branchd.model import POOLS, App, CelerySettings, InstanceSpec, Kind, Limits, TaskLimits
from branchd.process.specs import apply_fields, celery_settings, merge_task_overrides

FULL = Limits(
    time_limit=300,
    soft_time_limit=270,
    max_tasks_per_child=1000,
    max_memory_per_child=512 * 1024 * 1024,
    prefetch_multiplier=1,
)


def test_flags_of_every_limit() -> None:
    assert limit_flags(FULL) == [
        "--time-limit=300",
        "--soft-time-limit=270",
        "--max-tasks-per-child=1000",
        "--max-memory-per-child=524288",  # KiB, Celery's unit
        "--prefetch-multiplier=1",
    ]
    assert limit_flags(Limits(disable_prefetch=True, time_limit=2.5)) == [
        "--time-limit=2.5",
        "--disable-prefetch",
    ]
    assert limit_flags(Limits(max_memory_per_child=1500)) == ["--max-memory-per-child=2"]
    assert limit_flags(Limits(disable_prefetch=False)) == []
    assert limit_flags(Limits()) == []


@pytest.mark.parametrize("pool", POOLS)
def test_argv_of_each_pool_carries_what_it_allows(pool: str) -> None:
    """Every pool gets the flags its rules allow, before the user's own args."""
    allowed = Limits(
        time_limit=60 if pool in L.HARD_LIMIT_POOLS else None,
        soft_time_limit=50 if pool in L.SOFT_LIMIT_POOLS else None,
        max_tasks_per_child=10 if pool in L.CHILD_POOLS else None,
        max_memory_per_child=2048 if pool in L.CHILD_POOLS else None,
        prefetch_multiplier=2,
    )
    L.check(allowed, pool, celery_version=(5, 7, 0))
    argv = worker_argv(
        "py", "m", "w@h", None, [], None, None, pool, "INFO", ["--x"], limits=allowed
    )
    flags = limit_flags(allowed)
    assert argv[-len(flags) - 1 : -1] == flags and argv[-1] == "--x"
    assert ("--time-limit=60" in argv) == (pool in ("prefork", "gevent"))
    assert ("--soft-time-limit=50" in argv) == (pool == "prefork")


def test_celery_parses_the_flags() -> None:
    celery_bin = pytest.importorskip("celery.bin.celery")
    args = worker_argv(
        "py", "proj", "w@h", None, [], None, None, "prefork", "INFO", [], limits=FULL
    )[3:]
    group = celery_bin.celery
    ctx = group.make_context("celery", list(args), resilient_parsing=True)
    _name, sub, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    params = sub.make_context("worker", rest, parent=ctx, resilient_parsing=True).params
    assert params["time_limit"] == 300 and params["soft_time_limit"] == 270
    assert params["max_tasks_per_child"] == 1000
    assert params["max_memory_per_child"] == 524288
    assert params["prefetch_multiplier"] == 1
    args = worker_argv(
        "py", "proj", "w@h", None, [], None, None, "prefork", "INFO", [],
        limits=Limits(disable_prefetch=True),
    )[3:]
    ctx = group.make_context("celery", list(args), resilient_parsing=True)
    _name, sub, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    assert sub.make_context("worker", rest, parent=ctx, resilient_parsing=True).params[
        "disable_prefetch"
    ]


def _tasks(**kw: Any) -> Limits:
    return Limits(task_overrides={"t.x": TaskLimits(**kw)})


# (limits, pool, celery version, the rule named, or None: allowed)
RULES: list[tuple[Limits, str, tuple[int, ...] | None, str | None]] = [
    (FULL, "prefork", (5, 7, 0), None),
    (Limits(soft_time_limit=10), "solo", None, "soft_time_limit: the solo pool"),
    (Limits(soft_time_limit=10), "gevent", None, "soft_time_limit: the gevent pool"),
    (Limits(soft_time_limit=10), "threads", None, "soft_time_limit: the threads pool"),
    (Limits(soft_time_limit=10), "eventlet", None, "soft_time_limit: the eventlet pool"),
    (_tasks(soft_time_limit=10), "gevent", None, "[t.x].soft_time_limit: the gevent pool"),
    (Limits(time_limit=10), "gevent", None, None),
    (Limits(time_limit=10), "solo", None, "time_limit: the solo pool"),
    (Limits(time_limit=10), "threads", None, "time_limit: the threads pool"),
    (_tasks(time_limit=10), "threads", None, "task_overrides[t.x].time_limit: the threads pool"),
    (Limits(max_tasks_per_child=5), "threads", None, "max_tasks_per_child: recycles"),
    (Limits(max_memory_per_child=4096), "gevent", None, "max_memory_per_child: recycles"),
    (
        Limits(time_limit=10, soft_time_limit=10),
        "prefork",
        None,
        "soft_time_limit 10 must be below time_limit 10",
    ),
    (
        _tasks(time_limit=10, soft_time_limit=12.5),
        "prefork",
        None,
        "task_overrides[t.x].soft_time_limit 12.5 must be below task_overrides[t.x].time_limit 10",
    ),
    (Limits(disable_prefetch=True), "prefork", (5, 5, 3), "disable_prefetch: needs Celery 5.6"),
    (Limits(disable_prefetch=True), "prefork", (5, 6, 0), None),
    (Limits(disable_prefetch=True), "prefork", None, None),  # unknown version: not refused
    (Limits(disable_prefetch=False), "prefork", (5, 4, 0), None),
    (
        Limits(disable_prefetch=True, prefetch_multiplier=1),
        "prefork",
        (5, 7, 0),
        "disable_prefetch and prefetch_multiplier",
    ),
    (_tasks(rate_limit="600/m"), "solo", None, None),  # rates hold on every pool
    (_tasks(rate_limit="fast"), "prefork", None, "rate_limit 'fast'"),
    (_tasks(rate_limit="0/s"), "prefork", None, "rate_limit '0/s'"),
    (_tasks(time_limit=-1), "prefork", None, "time_limit must be more than 0"),
    (Limits(task_overrides={"a b": TaskLimits(rate_limit="1")}), "prefork", None, "task name"),
]


@pytest.mark.parametrize(("limits", "pool", "version", "rule"), RULES)
def test_rules(
    limits: Limits, pool: str, version: tuple[int, ...] | None, rule: str | None
) -> None:
    found = L.problems(limits, pool, celery_version=version)
    if rule is None:
        assert found == []
    else:
        assert found and rule in found[0], found
        with pytest.raises(Invalid, match=re.escape(rule)):
            L.check(limits, pool, celery_version=version)


@pytest.mark.parametrize(
    ("total", "workers", "share"),
    [
        ("600/m", 1, "600/m"),
        ("600/m", 3, "200/m"),
        ("600/m", 7, "85.7143/m"),
        ("10", 4, "2.5/s"),
        ("1/h", 2, "0.5/h"),
        ("5/s", 0, "5/s"),  # (no running worker: nobody to give it to)
    ],
)
def test_split_rate(total: str, workers: int, share: str) -> None:
    assert L.split_rate(total, workers) == share


def test_worker_tasks_split_the_apps_total_but_not_an_instances_own() -> None:
    app = Limits(
        task_overrides={
            "shop.resize": TaskLimits(rate_limit="600/m"),
            "shop.encode": TaskLimits(time_limit=3600, soft_time_limit=3500),
        }
    )
    own = Limits(task_overrides={"shop.encode": TaskLimits(rate_limit="5/s", time_limit=60)})
    got = L.worker_tasks(app, own, 3)
    assert got == {
        "shop.resize": TaskLimits(rate_limit="200/m"),
        "shop.encode": TaskLimits(rate_limit="5/s", time_limit=60, soft_time_limit=3500),
    }
    assert L.worker_tasks(app, Limits(), 2)["shop.resize"].rate_limit == "300/m"


def test_merged_takes_the_instances_over_the_apps() -> None:
    app = Limits(time_limit=300, prefetch_multiplier=4, task_overrides={"t": TaskLimits("1/s")})
    own = Limits(time_limit=60, task_overrides={"t": TaskLimits(time_limit=5)})
    assert L.merged(app, own) == Limits(
        time_limit=60, prefetch_multiplier=4, task_overrides={"t": TaskLimits("1/s", 5)}
    )


def test_an_instances_prefetch_form_replaces_the_apps() -> None:
    """disable_prefetch and prefetch_multiplier are one setting in two forms:
    an instance that gives either does not inherit the app's other one."""
    app = Limits(prefetch_multiplier=1)
    off = L.merged(app, Limits(disable_prefetch=True))
    assert (off.disable_prefetch, off.prefetch_multiplier) == (True, None)
    assert L.problems(off, "prefork") == []
    four = L.merged(Limits(disable_prefetch=True), Limits(prefetch_multiplier=4))
    assert (four.disable_prefetch, four.prefetch_multiplier) == (None, 4)
    assert L.merged(app, Limits(time_limit=5)).prefetch_multiplier == 1  # (others: the app's)


APP_LIMITS = Limits(
    time_limit=300,
    soft_time_limit=270,
    task_overrides={"shop.tasks.encode": TaskLimits(time_limit=3600, soft_time_limit=3500)},
)


@pytest.mark.parametrize(
    ("own", "pool", "message"),
    [
        (
            Limits(time_limit=60),
            "prefork",
            "soft_time_limit 270 (the app's) must be below time_limit 60 (this instance's) "
            "(the soft one warns the task first)",
        ),
        (
            Limits(time_limit=60, soft_time_limit=50),
            "prefork",
            None,
        ),
        (
            Limits(task_overrides={"shop.tasks.encode": TaskLimits(time_limit=600)}),
            "prefork",
            "task_overrides[shop.tasks.encode].soft_time_limit 3500 (the app's) must be below "
            "task_overrides[shop.tasks.encode].time_limit 600 (this instance's)",
        ),
        (
            Limits(),
            "threads",
            "time_limit (the app's), task_overrides[shop.tasks.encode].time_limit (the app's): "
            "the threads pool enforces no time limit (only prefork, gevent do)",
        ),
        (
            Limits(max_tasks_per_child=5),
            "gevent",
            "task_overrides[shop.tasks.encode].soft_time_limit (the app's): the gevent pool",
        ),
    ],
)
def test_a_workers_rules_name_where_each_limit_comes_from(
    own: Limits, pool: str, message: str | None
) -> None:
    if message is None:
        L.check_worker(APP_LIMITS, own, pool)
        return
    with pytest.raises(Invalid) as caught:
        L.check_worker(APP_LIMITS, own, pool)
    assert message in caught.value.message, caught.value.message


def test_a_threads_worker_under_an_apps_task_time_limit_names_that_field() -> None:
    app = Limits(task_overrides={"shop.tasks.encode": TaskLimits(time_limit=3600)})
    with pytest.raises(Invalid) as caught:
        L.check_worker(app, Limits(), "threads")
    assert caught.value.message == (
        "task_overrides[shop.tasks.encode].time_limit (the app's): the threads pool enforces "
        "no time limit (only prefork, gevent do)"
    )


@pytest.mark.parametrize(
    ("stored", "patch", "message"),
    [
        (
            Limits(prefetch_multiplier=1),
            {"disable_prefetch": True},
            "disable_prefetch: the app has prefetch_multiplier 1; give one of them "
            "(branchctl apps set shop --reset prefetch_multiplier --disable-prefetch)",
        ),
        (
            Limits(disable_prefetch=True),
            {"prefetch_multiplier": 4},
            "prefetch_multiplier: the app has disable_prefetch; give one of them "
            "(branchctl apps set shop --reset disable_prefetch --prefetch-multiplier 4)",
        ),
        (
            Limits(prefetch_multiplier=1),
            {"disable_prefetch": True, "prefetch_multiplier": None},
            None,
        ),
        (Limits(prefetch_multiplier=1), {"disable_prefetch": False}, None),
        (Limits(prefetch_multiplier=1), {"prefetch_multiplier": 2}, None),
        (Limits(), {"disable_prefetch": True}, None),
    ],
)
def test_a_patch_that_clashes_with_the_stored_prefetch_says_how_to_drop_it(
    stored: Limits, patch: dict[str, Any], message: str | None
) -> None:
    got = prefetch_clash(stored, patch, "the app", "branchctl apps set shop")
    assert got == message


def test_parse_registered() -> None:
    reply = {
        "ok": [
            "shop.encode [rate_limit=200/m time_limit=3600 soft_time_limit=3500.0]",
            "shop.plain",
        ]
    }
    assert L.parse_registered(reply) == {
        "shop.encode": {"rate_limit": "200/m", "time_limit": "3600", "soft_time_limit": "3500.0"},
        "shop.plain": {},
    }
    assert L.parse_registered(["a [rate_limit=1/s]"]) == {"a": {"rate_limit": "1/s"}}
    assert L.parse_registered({"error": "x"}) is None
    assert L.parse_registered(None) is None


def test_drift_sends_only_what_differs() -> None:
    wanted = {
        "a": TaskLimits(rate_limit="200/m", time_limit=60),
        "b": TaskLimits(soft_time_limit=5),
        "gone": TaskLimits(rate_limit="1/s"),  # a task this worker does not have
    }
    live = {"a": {"rate_limit": "200.0/m", "time_limit": "60.0"}, "b": {"time_limit": "9"}}
    assert [c.describe() for c in L.drift(wanted, live)] == ["time_limit b hard=9 soft=5"]
    restarted = {"a": {}, "b": {}}
    assert [c.describe() for c in L.drift(wanted, restarted)] == [
        "rate_limit a rate_limit=200/m",
        "time_limit a hard=60 soft=None",
        "time_limit b hard=None soft=5",
    ]
    assert L.drift(wanted, {"a": {"rate_limit": "300/m", "time_limit": "60"}})[0].arguments == {
        "task_name": "a",
        "rate_limit": "200/m",
    }


def test_parse_version() -> None:
    assert L.parse_version("5.7.0\n") == (5, 7, 0)
    assert L.parse_version("5.6.0rc1") == (5, 6, 0)
    assert L.parse_version("nope") is None


def test_limits_on_the_wire_of_an_app_and_an_instance() -> None:
    app = App(
        "shop",
        celery=celery_settings(
            {
                "celery_app": "shop",
                "time_limit": 300,
                "max_memory_per_child": 2**29,
                "task_overrides": {"shop.resize": {"rate_limit": "600/m"}},
            }
        ),
    )
    wire = app.to_wire()
    assert wire["time_limit"] == 300 and wire["max_memory_per_child"] == 2**29
    assert wire["task_overrides"] == {"shop.resize": {"rate_limit": "600/m"}}
    assert App.from_wire(wire) == app
    spec = InstanceSpec("shop", "w1", (), "b", kind=Kind.CELERY)
    spec = apply_fields(spec, {"soft_time_limit": 10, "task_overrides": {"t": {"time_limit": 3}}})
    assert spec.limits == Limits(soft_time_limit=10, task_overrides={"t": TaskLimits(time_limit=3)})
    assert InstanceSpec.from_wire(spec.to_wire()) == spec
    assert apply_fields(spec, {"soft_time_limit": None}).limits.soft_time_limit is None
    assert CelerySettings.from_wire({}).limits == Limits()


def test_task_overrides_merge_as_a_json_merge_patch() -> None:
    old = {"a": {"rate_limit": "1/s", "time_limit": 5.0}, "b": {"rate_limit": "2/s"}}
    patch = {"a": {"rate_limit": None}, "b": None, "c": {"time_limit": 3}}
    assert merge_task_overrides(old, patch) == {"a": {"time_limit": 5.0}, "c": {"time_limit": 3}}
    assert merge_task_overrides(old, None) == {}
    assert merge_task_overrides(old, {"b": {"rate_limit": None}}) == {"a": old["a"]}
