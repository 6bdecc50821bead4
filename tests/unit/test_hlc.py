"""The hybrid logical clock: the pure rules by table, the clock by property."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from branchd.clock import FakeClock
from branchd.hlc import COUNTER_MAX, HybridClock, Version, merge, tick

V = Version


@pytest.mark.parametrize(
    ("last", "wall", "want"),
    [
        (V(100, 5, "a"), 200, V(200, 0, "a")),  # time moved: the time, counter 0
        (V(100, 5, "a"), 100, V(100, 6, "a")),  # time stood: next counter
        (V(100, 5, "a"), 40, V(100, 6, "a")),  # time went back: never below last
        (V(100, 5, "b"), 40, V(100, 6, "a")),  # stamped with our branch
        (V(100, COUNTER_MAX, "a"), 100, V(101, 0, "a")),  # a full counter carries
    ],
)
def test_tick(last: Version, wall: int, want: Version) -> None:
    assert tick(last, wall, "a") == want


@pytest.mark.parametrize(
    ("last", "remote", "wall", "want"),
    [
        (V(100, 1, "a"), V(150, 7, "b"), 300, V(300, 0, "a")),  # our wall is ahead
        (V(100, 1, "a"), V(150, 7, "b"), 120, V(150, 8, "a")),  # the remote is ahead
        (V(200, 1, "a"), V(150, 7, "b"), 120, V(200, 2, "a")),  # we are ahead
        (V(150, 9, "a"), V(150, 7, "b"), 150, V(150, 10, "a")),  # all equal: max + 1
        (V(150, 3, "a"), V(150, 7, "b"), 100, V(150, 8, "a")),
        (V(0, 0, "a"), V(150, COUNTER_MAX, "b"), 10, V(151, 0, "a")),
    ],
)
def test_merge(last: Version, remote: Version, wall: int, want: Version) -> None:
    assert merge(last, remote, wall, "a") == want


def test_versions_order_by_time_then_counter_then_branch() -> None:
    assert V(1, 9, "z") < V(2, 0, "a") < V(2, 1, "a") < V(2, 1, "b")


@pytest.mark.parametrize("v", [V(0, 0, "b"), V(1_700_000_000_123, 42, "0123abcd"), V(5, 1, "x.y")])
def test_wire_form_round_trips(v: Version) -> None:
    assert Version.from_wire(v.to_wire()) == v


def test_wire_form_sorts_as_versions_do() -> None:
    vs = [V(2, 1, "b"), V(1, 9, "zz"), V(2, 1, "a"), V(2, 0, "c"), V(0x10, 0, "a")]
    assert sorted(vs) == sorted(vs, key=Version.to_wire)
    assert V(1_700_000_000_123, 42, "b1").to_wire() == "018bcfe5687b.002a.b1"


@pytest.mark.parametrize("text", ["", "1.2.b", "018bcfe56a7b.002a.", "018BCFE56A7B.002a.b"])
def test_a_bad_wire_form_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Version.from_wire(text)


@pytest.mark.parametrize(
    "args", [(-1, 0, "a"), (1 << 48, 0, "a"), (0, -1, "a"), (0, COUNTER_MAX + 1, "a"), (0, 0, "")]
)
def test_a_version_out_of_range_is_refused(args: tuple[int, int, str]) -> None:
    with pytest.raises(ValueError):
        Version(*args)


def test_the_clock_starts_past_a_given_version() -> None:
    clock = FakeClock(start=0.0, wall_offset=1.0)  # wall 1 s: far behind what was stored
    hlc = HybridClock(clock, "a", last=V(9_000, 3, "b"))
    assert hlc.now() == V(9_000, 4, "a")


#: A step: the wall clock moves by dt seconds (backwards too), then a local
#: write, or a version received from another branch (around our wall time).
STEPS = st.lists(
    st.tuples(
        st.floats(min_value=-5.0, max_value=5.0, allow_nan=False),
        st.one_of(
            st.none(),
            st.tuples(
                st.integers(-10_000, 10_000), st.integers(0, COUNTER_MAX), st.sampled_from("bc")
            ),
        ),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps=STEPS)
def test_versions_strictly_increase_and_pass_what_they_observe(
    steps: list[tuple[float, tuple[int, int, str] | None]],
) -> None:
    clock = FakeClock(start=100.0, wall_offset=1_700_000_000.0)
    hlc = HybridClock(clock, "a")
    last = hlc.last
    for dt, received in steps:
        clock.advance(dt)  # NTP may step the wall clock back
        if received is None:
            got = hlc.now()
        else:
            offset, counter, branch = received
            remote = V(int(clock.wall() * 1000) + offset, counter, branch)
            got = hlc.observe(remote)
            assert got > remote
        assert got > last
        assert got.branch == "a"
        # Never far ahead of the wall time or of what was seen (bounded drift).
        assert got.wall_ms <= max(int(clock.wall() * 1000), last.wall_ms) + 10_001
        last = got
