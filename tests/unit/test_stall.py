"""Alive but not consuming, as tables: which looks at a worker make a stall."""

from __future__ import annotations

from typing import Any

import pytest

from branchd.celery.stall import Look, StallWatch, decide, taken_total

AFTER = 300.0
NOW = 1000.0
WAITING = {"default": 5, "high": 0}
SEEN = StallWatch(since=NOW - 100, taken=7)  # it took work (or had none) 100 s ago
LONG_AGO = StallWatch(since=NOW - AFTER, taken=7)


CASES: list[tuple[str, StallWatch, Look, StallWatch, bool]] = [
    # (case, watch, look, watch after, restart)
    ("idle, nothing waits", LONG_AGO, Look({"default": 0}, 7, False), StallWatch(NOW, 7), False),
    ("no queue counted", LONG_AGO, Look({}), StallWatch(NOW, None), False),
    ("counts unknown", LONG_AGO, Look({"default": None}), StallWatch(NOW, None), False),
    ("waits, it runs a task", LONG_AGO, Look(WAITING, 7, True), StallWatch(NOW, 7), False),
    ("waits, it took more", LONG_AGO, Look(WAITING, 8, False), StallWatch(NOW, 8), False),
    ("waits, taken unknown", LONG_AGO, Look(WAITING, None, False), LONG_AGO, False),
    ("waits, busy unknown", LONG_AGO, Look(WAITING, 7, None), LONG_AGO, False),
    ("waits, not long yet", SEEN, Look(WAITING, 7, False), SEEN, False),
    ("waits, first look", StallWatch(), Look(WAITING, 7, False), StallWatch(NOW, 7), False),
    # idle looks ask no count: the first one counted after them starts the span
    ("waits, first count after idle", StallWatch(NOW - AFTER, None), Look(WAITING, 7, False),
     StallWatch(NOW, 7), False),
    # (a worker restarted meanwhile counts from 0: that moved, a new start)
    ("waits, restarted", LONG_AGO, Look(WAITING, 0, False), StallWatch(NOW, 0), False),
    ("stalled", LONG_AGO, Look(WAITING, 7, False), StallWatch(), True),
    ("stalled, long ago", StallWatch(0.0, 7), Look(WAITING, 7, False), StallWatch(), True),
]


@pytest.mark.parametrize(("watch", "look", "after", "restart"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_decide(watch: StallWatch, look: Look, after: StallWatch, restart: bool) -> None:
    got, why = decide(watch, look, NOW, AFTER)
    assert got == after
    assert (why is not None) == restart
    if why:
        assert why == (
            "stalled: no task taken for 300s while its queues hold ready messages: default (5)"
        )


def test_stall_after_zero_never_restarts() -> None:
    assert decide(LONG_AGO, Look(WAITING, 7, False), NOW, 0.0) == (StallWatch(), None)


@pytest.mark.parametrize(("stats", "total"), [
    ({"total": {"a.b": 2, "c.d": 3}}, 5),
    ({"total": {}}, 0),
    ({"pool": {}}, None),
    ({"total": {"a": "x"}}, None),
    ({"error": "no"}, None),
    (None, None),
])
def test_taken_total(stats: dict[str, Any] | None, total: int | None) -> None:
    assert taken_total(stats) == total
