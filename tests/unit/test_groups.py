"""The pure part of an app's instances together: count-create names, the
batches of an action, and what each state means for its outcome."""

from __future__ import annotations

import pytest

from branchd.errors import Invalid
from branchd.model import MAX_COUNT, Action, State
from branchd.process.groups import (
    GOOD,
    Outcome,
    Wait,
    batches,
    expand_names,
    failure,
    halts,
    outcome,
)


@pytest.mark.parametrize(
    ("template", "count", "start_at", "names"),
    [
        ("w{n}", 3, 0, ["w0", "w1", "w2"]),
        ("worker_{n:02d}", 3, 0, ["worker_00", "worker_01", "worker_02"]),
        ("worker_{n:02d}", 2, 9, ["worker_09", "worker_10"]),
        ("{n:03d}-api", 2, 99, ["099-api", "100-api"]),
        ("w{n:2d}", 1, 5, ["w05"]),  # (a width is always zero-padded: spaces are no name)
        ("w.{n}.x", 1, 7, ["w.7.x"]),
    ],
)
def test_names_of_a_template(template: str, count: int, start_at: int, names: list[str]) -> None:
    assert expand_names(template, count, start_at) == names


@pytest.mark.parametrize(
    ("template", "count", "start_at", "rule"),
    [
        ("worker", 2, 0, "holds '{n}'"),  # no placeholder: every name the same
        ("w{n}-{n}", 2, 0, "holds '{n}'"),  # twice
        ("w{x}", 2, 0, "holds '{n}'"),
        ("w{n.__class__}", 2, 0, "holds '{n}'"),  # never str.format
        ("w{n:>4}", 2, 0, "holds '{n}'"),
        ("w{n:010d}", 2, 0, "holds '{n}'"),  # widths 1-9
        ("w{n}}", 2, 0, "holds '{n}'"),
        ("w/{n}", 2, 0, "a bad name"),
        ("-{n}", 2, 0, "a bad name"),  # must start with a letter or digit
        ("a" * 62 + "{n}", 11, 0, "a bad name"),  # the last one is 64 long
        ("w{n}", 0, 0, "1 to"),
        ("w{n}", MAX_COUNT + 1, 0, f"1 to {MAX_COUNT}"),
        ("w{n}", 2, -1, "negative"),
    ],
)
def test_bad_templates_name_their_rule(template: str, count: int, start_at: int, rule: str) -> None:
    with pytest.raises(Invalid, match=rule.replace("{", r"\{").replace("}", r"\}")):
        expand_names(template, count, start_at)


@pytest.mark.parametrize(
    ("names", "rolling", "batch", "plan"),
    [
        (["a", "b", "c"], False, 1, [["a", "b", "c"]]),
        (["a", "b", "c"], False, 2, [["a", "b", "c"]]),  # (batch only matters rolling)
        ([], False, 1, []),
        ([], True, 2, []),
        (["a", "b", "c"], True, 1, [["a"], ["b"], ["c"]]),
        (["a", "b", "c", "d", "e"], True, 2, [["a", "b"], ["c", "d"], ["e"]]),
        (["a", "b"], True, 5, [["a", "b"]]),
    ],
)
def test_batches(names: list[str], rolling: bool, batch: int, plan: list[list[str]]) -> None:
    assert batches(names, rolling, batch) == plan


def test_ten_in_batches_of_two_never_put_more_than_two_in_one_step() -> None:
    plan = batches([f"w{i}" for i in range(10)], True, 2)
    assert [len(b) for b in plan] == [2] * 5
    assert sorted(n for b in plan for n in b) == sorted(f"w{i}" for i in range(10))


def test_a_batch_below_one_is_refused() -> None:
    with pytest.raises(Invalid, match="at least 1"):
        batches(["a"], True, 0)


S, P = State, 100
NEW = 200


@pytest.mark.parametrize(
    ("action", "state", "pid", "old", "expected"),
    [
        # start: running is done; on the way; anything else failed
        (Action.START, S.RUNNING, P, None, Outcome.RUNNING),
        (Action.START, S.RUNNING, P, P, Outcome.RUNNING),  # it ran already: still done
        (Action.START, S.STARTING, P, None, None),
        (Action.START, S.WAITING, None, None, None),  # (for the instances it starts after)
        (Action.RESTART, S.WAITING, None, P, None),
        (Action.START, S.BACKOFF, None, None, Outcome.FAILED),
        (Action.START, S.FATAL, None, None, Outcome.FAILED),
        (Action.START, S.EXITED, None, None, Outcome.FAILED),
        (Action.START, S.STOPPED, None, None, Outcome.FAILED),
        # restart: done only once another process runs
        (Action.RESTART, S.RUNNING, P, P, None),
        (Action.RESTART, S.STOPPING, P, P, None),
        (Action.RESTART, S.STARTING, NEW, P, None),
        (Action.RESTART, S.RUNNING, NEW, P, Outcome.RUNNING),
        (Action.RESTART, S.RUNNING, NEW, None, Outcome.RUNNING),  # it was stopped
        (Action.RESTART, S.BACKOFF, None, P, Outcome.FAILED),
        # stop: stopped, exited or fatal is done; anything else on the way
        (Action.STOP, S.STOPPING, P, P, None),
        (Action.STOP, S.STOPPED, None, P, Outcome.STOPPED),
        (Action.STOP, S.EXITED, None, P, Outcome.STOPPED),
        (Action.STOP, S.FATAL, None, None, Outcome.STOPPED),
        (Action.STOP, S.RUNNING, P, P, None),
    ],
)
def test_outcome_of_a_state(
    action: Action, state: State, pid: int | None, old: int | None, expected: Outcome | None
) -> None:
    assert outcome(action, state, pid, old) == expected


@pytest.mark.parametrize(
    ("outcomes", "stop"),
    [
        ({"a": Outcome.RUNNING, "b": Outcome.RUNNING}, False),
        ({}, False),
        ({"a": Outcome.RUNNING, "b": Outcome.FAILED}, True),
        ({"a": Outcome.TIMEOUT}, True),
    ],
)
def test_a_roll_halts_on_a_batch_that_did_not_come_out_right(
    outcomes: dict[str, Outcome], stop: bool
) -> None:
    assert halts(outcomes) is stop


def test_what_counts_as_done_right() -> None:
    assert {Outcome.FAILED, Outcome.TIMEOUT, Outcome.SKIPPED}.isdisjoint(GOOD)


def test_failure_says_the_state_and_the_reason() -> None:
    assert failure(S.BACKOFF, "exited 1") == "backoff: exited 1"
    assert failure(S.FATAL, None) == "fatal"


@pytest.mark.parametrize(
    ("action", "limit"),
    [(Action.START, 2.0 + 10), (Action.STOP, 7.0 + 5 + 10), (Action.RESTART, 7.0 + 5 + 2 + 10)],
)
def test_how_long_one_instance_may_take(action: Action, limit: float) -> None:
    assert Wait(stopwaitsecs=7.0, startsecs=2.0, kill_grace=5.0).limit(action) == limit


def test_the_apis_schema_names_every_outcome_in_order() -> None:
    from branchd.api.schemas import ACTION_ITEM, OUTCOMES

    assert [o.value for o in Outcome] == OUTCOMES
    assert ACTION_ITEM["properties"]["outcome"]["enum"] == OUTCOMES
