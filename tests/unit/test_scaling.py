"""Scaling on queue depth: the pure core (branchd/scaling.py) and the depth
helpers (branchd/celery/depth.py) as tables."""

from __future__ import annotations

import pytest

from branchd import scaling
from branchd.celery.depth import count_files, in_flight, redis_keys
from branchd.errors import Invalid
from branchd.model import ScalePolicy
from branchd.process.specs import scale_from

# desired = clamp(ceil((ready + in_flight) / per_worker), min, max) ----------------


@pytest.mark.parametrize(
    ("ready", "in_flight", "per_worker", "low", "high", "want"),
    [
        (0, 0, 20, 1, 12, 1),  # idle: the floor
        (0, 0, 20, 0, 12, 0),  # a floor of 0 is allowed
        (1, 0, 20, 0, 12, 1),  # one message needs one
        (20, 0, 20, 1, 12, 1),
        (21, 0, 20, 1, 12, 2),  # ceil
        (10, 11, 20, 1, 12, 2),  # in flight counts as much as ready
        (2000, 0, 20, 1, 12, 12),  # the ceiling
        (0, 240, 20, 1, 12, 12),
        (100, 0, 1, 1, 12, 12),
        (5, 0, 1, 3, 12, 5),
        (0, 0, 20, 3, 3, 3),  # min == max: fixed
    ],
)
def test_desired(
    ready: int, in_flight: int, per_worker: int, low: int, high: int, want: int
) -> None:
    assert scaling.desired(ready, in_flight, per_worker, low, high) == want


# step: up at once, down after the window, never below the tasks running ---------

#: (seconds from start, ready, in flight, running) -> target
Series = list[tuple[float, int, int, int, int]]


@pytest.mark.parametrize(
    ("per_worker", "low", "high", "window", "series"),
    [
        # a burst: up within the first poll, held for the window, then down
        (20, 1, 12, 60, [(0, 0, 0, 0, 1), (2, 2000, 0, 0, 12), (4, 0, 0, 0, 12),
                         (61, 0, 0, 0, 12), (62, 0, 0, 0, 1)]),
        # down_after 0: down at the next poll
        (20, 1, 12, 0, [(0, 500, 0, 0, 12), (2, 0, 0, 0, 1)]),
        # the window restarts with every high reading
        (20, 1, 12, 10, [(0, 200, 0, 0, 10), (8, 200, 0, 0, 10), (12, 0, 0, 0, 10),
                         (17.9, 0, 0, 0, 10), (18, 0, 0, 0, 1)]),
        # down in steps: the highest reading of the last window wins
        (10, 1, 12, 10, [(0, 100, 0, 0, 10), (5, 50, 0, 0, 10), (10, 0, 0, 0, 5),
                         (15, 0, 0, 0, 1)]),
        # up again during the window: at once
        (10, 1, 12, 10, [(0, 30, 0, 0, 3), (2, 0, 0, 0, 3), (4, 90, 0, 0, 9)]),
        # never below the tasks running now (each holds a process)
        (20, 1, 12, 0, [(0, 200, 0, 0, 10), (2, 0, 7, 7, 7), (4, 0, 3, 3, 3),
                        (6, 0, 0, 0, 1)]),
        # ... nor above max for them
        (20, 1, 4, 0, [(0, 0, 9, 9, 4)]),
        # in flight alone drives it up
        (5, 1, 12, 30, [(0, 0, 40, 8, 8), (1, 0, 0, 0, 8)]),
    ],
)
def test_step(per_worker: int, low: int, high: int, window: float, series: Series) -> None:
    policy = ScalePolicy("default", per_worker, low, high, window)
    state = scaling.ScaleState()
    for at, ready, flight, running, want in series:
        state = scaling.step(state, scaling.Reading(ready, flight, running), policy, 1000 + at)
        assert state.target == want, (at, ready, flight, state)


def test_window_stays_small() -> None:
    """Only readings that can still hold the target up are kept."""
    policy = ScalePolicy("q", 1, 0, 100, 60)
    state = scaling.ScaleState()
    for i in range(1000):
        state = scaling.step(state, scaling.Reading(i % 50, 0), policy, float(i))
    assert len(state.window) <= 60


@pytest.mark.parametrize(
    ("total", "parts", "want"),
    [(12, 1, [12]), (12, 5, [3, 3, 2, 2, 2]), (1, 3, [1, 1, 1]), (0, 2, [1, 1]), (5, 0, [])],
)
def test_split(total: int, parts: int, want: list[int]) -> None:
    assert scaling.split(total, parts) == want


@pytest.mark.parametrize(
    ("target", "low", "parts", "want"),
    [
        (12, 1, 1, [(1, 12)]),
        (5, 1, 2, [(1, 3), (0, 2)]),
        (5, 4, 2, [(2, 3), (2, 2)]),
        (2, 2, 3, [(1, 1), (1, 1), (0, 1)]),
        (1, 1, 1, [(1, 1)]),
    ],
)
def test_ranges(target: int, low: int, parts: int, want: list[tuple[int, int]]) -> None:
    assert scaling.ranges(target, low, parts) == want


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ({"on": "q", "per_worker": 20, "min": 5, "max": 2}, "greater than max"),
        ({"on": "q", "per_worker": 0, "min": 1, "max": 2}, "at least 1"),
        ({"on": "q", "per_worker": 1, "min": 0, "max": 0}, "at least 1"),
        ({"on": "q", "per_worker": 1, "min": 0, "max": 2, "down_after": -1}, "negative"),
    ],
)
def test_bad_policies_name_the_rule(body: dict[str, object], rule: str) -> None:
    with pytest.raises(Invalid, match=rule):
        scale_from(body)


def test_policy_round_trips() -> None:
    p = scale_from({"on": "default", "per_worker": 20, "min": 1, "max": 12})
    assert p == ScalePolicy("default", 20, 1, 12, 60.0)
    assert ScalePolicy.from_wire(p.to_wire()) == p


# reading helpers --------------------------------------------------------------------


def test_redis_keys_are_kombus() -> None:
    assert redis_keys("default") == [
        "default",
        "default\x06\x163",
        "default\x06\x166",
        "default\x06\x169",
    ]
    assert redis_keys("q", steps=(0, 5)) == ["q", "q\x06\x165"]


def test_redis_keys_match_the_transport() -> None:
    """The same names as kombu's own Channel (the reader asks the channel; this
    pins what it answers)."""
    from kombu.transport import redis as kr

    channel = kr.Channel.__new__(kr.Channel)
    channel.priority_steps = kr.PRIORITY_STEPS
    assert [channel._q_for_pri("default", p) for p in kr.PRIORITY_STEPS] == redis_keys("default")


def test_count_files() -> None:
    names = [
        "1_a.default.msg",
        "2_b.default.msg",
        "3_c.high.msg",
        "4_d.w1@h.celery.pidbox.msg",  # a control queue, not ours
        "5_e.default.msg.tmp",
        "stray",
    ]
    assert count_files(names, ["default", "high", "low"]) == {"default": 2, "high": 1, "low": 0}


def _req(key: str) -> dict[str, object]:
    return {"id": key, "delivery_info": {"routing_key": key, "exchange": ""}}


@pytest.mark.parametrize(
    ("active", "reserved", "consumed", "want_held", "want_running"),
    [
        # one queue consumed: every task is its, whatever its routing key
        ([_req("x")], [_req("y"), _req("z")], ["default"], {"default": 3}, {"default": 1}),
        # several: by routing key (queue "fast" routes on "f")
        ([_req("f"), _req("slow")], [_req("slow")], ["fast", "slow"], {"fast": 1, "slow": 2},
         {"fast": 1, "slow": 1}),
        # an unknown key goes to the first queue
        ([], [_req("other")], ["fast", "slow"], {"fast": 1}, {}),
        # wrapped replies, and no reply at all
        ({"ok": [_req("a")]}, None, ["q"], {"q": 1}, {"q": 1}),
        (None, None, ["q"], {}, {}),
        ({"error": "boom"}, [], ["q"], {}, {}),
    ],
)
def test_in_flight(
    active: object,
    reserved: object,
    consumed: list[str],
    want_held: dict[str, int],
    want_running: dict[str, int],
) -> None:
    held, running = in_flight(active, reserved, consumed, {"fast": "f"})
    assert (held, running) == (want_held, want_running)


# the RabbitMQ reader's memory of missing queues ----------------------------------


class _NotFound(Exception):
    pass


class _Channel:
    def __init__(self, conn: _Conn) -> None:
        self.conn = conn

    def queue_declare(self, queue: str, passive: bool) -> tuple[str, int, int]:
        assert passive
        self.conn.declares += 1
        if queue not in self.conn.queues:
            raise _NotFound(queue)  # the broker closes the channel
        return queue, self.conn.queues[queue], 1


class _Conn:
    channel_errors = (_NotFound,)

    def __init__(self) -> None:
        self.queues = {"a": 3}
        self.channels = 0
        self.declares = 0

    def ensure_connection(self, **_: object) -> None:
        pass

    def channel(self) -> _Channel:
        self.channels += 1
        return _Channel(self)

    def release(self) -> None:
        pass


def test_a_missing_rabbitmq_queue_is_asked_again_only_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from branchd.celery import depth
    from branchd.celery.broker import BrokerSpec

    conn = _Conn()
    now = [100.0]
    monkeypatch.setattr(depth.time, "monotonic", lambda: now[0])
    link = depth._Link(BrokerSpec("amqp://x//"), 1.0, lambda spec, timeout: conn)
    first = link.read(["a", "gone"])
    assert (first.queues["a"].ready, first.queues["gone"].ready) == (3, 0)
    assert (conn.declares, conn.channels) == (2, 1)
    link.read(["a", "gone"])  # "gone" not asked: no channel lost
    assert (conn.declares, conn.channels) == (3, 2)
    conn.queues["gone"] = 5
    now[0] += depth.MISSING_RECHECK
    assert link.read(["gone"]).queues["gone"].ready == 5
