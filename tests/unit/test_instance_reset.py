"""A PATCH null on an instance field (``instances set --reset``): what each
field goes back to, in the pure part (``reset_fields``)."""

from __future__ import annotations

from typing import Any

import pytest

from branchd.errors import Invalid
from branchd.model import InstanceSpec, Kind
from branchd.process.specs import CELERY_DEFAULTS, SETTABLE, apply_fields, reset_fields

CELERY = InstanceSpec(app="shop", name="w1", command=(), branch="b", kind=Kind.CELERY)
PROCESS = InstanceSpec(app="web", name="api", command=("./api",), branch="b")
DEFAULTS = {"loglevel": "DEBUG", "startsecs": 2.0, "live_period": 3.0, "priority": 5}

# fmt: off
CASES: list[tuple[InstanceSpec, str, Any]] = [
    (CELERY, "pool", None),             # the app's pool, read at each start
    (CELERY, "time_limit", None),       # the app's limits
    (CELERY, "task_overrides", None),   # (merged: none of its own)
    (CELERY, "loglevel", "DEBUG"),      # the app's instance default
    (CELERY, "startsecs", 2.0),         # the app's instance default over the kind's
    (CELERY, "stopwaitsecs", 600.0),    # the kind's
    (CELERY, "hung_after", 60.0),       # built in
    (PROCESS, "startsecs", 2.0),
    (PROCESS, "stopwaitsecs", 10.0),
    (PROCESS, "live_period", 3.0),
    (PROCESS, "priority", 5),
    (PROCESS, "umask", None),           # null is a value of its own: none
    (PROCESS, "startretries", 3),
]
# fmt: on


@pytest.mark.parametrize(
    ("spec", "key", "value"), CASES, ids=[f"{c[0].kind}-{c[1]}" for c in CASES]
)
def test_a_null_goes_back_to_the_default(spec: InstanceSpec, key: str, value: Any) -> None:
    assert reset_fields(spec, DEFAULTS, {key: None}) == {key: value}


@pytest.mark.parametrize("spec", [CELERY, PROCESS], ids=["celery", "process"])
def test_every_field_but_command_can_be_reset_and_applies(spec: InstanceSpec) -> None:
    skip = {"command"} | (
        {"ready", "ready_timeout", "live", "live_period", "live_timeout", "live_failures"}
        if spec.kind == Kind.CELERY
        else {"queues", "autoscale", "concurrency", "pool", "args", "loglevel", "hung_after",
              "memory_limit", "time_limit", "soft_time_limit", "max_tasks_per_child",
              "max_memory_per_child", "prefetch_multiplier", "disable_prefetch",
              "task_overrides"}
    )  # fmt: skip
    fields = reset_fields(spec, {}, {k: None for k in SETTABLE if k not in skip})
    kind = CELERY_DEFAULTS if spec.kind == Kind.CELERY else {}
    assert apply_fields(spec, fields).to_wire() == apply_fields(spec, kind).to_wire()
    with pytest.raises(Invalid, match="command cannot be reset"):
        reset_fields(spec, {}, {"command": None})


def test_the_clients_reset_choices_are_the_daemons_fields() -> None:
    """branchctl never imports branchd: its `instances set --reset` choices
    are written there again, and must stay every settable field but command."""
    from branchctl.cli.instances import RESETTABLE

    from branchd.process.specs import SETTABLE

    assert len(set(RESETTABLE)) == len(RESETTABLE)
    assert set(RESETTABLE) == set(SETTABLE) - {"command"}
