"""The membership core (``branchd.cluster.membership``) and its timing maths.

First the timing functions against memberlist's own tables (``util_test.go``,
``suspicion_test.go``); then the core: a table of member state x message x
timer; then a small deterministic simulator (cores in a dict, a queue of
messages with seeded loss and delay, a fake time) at N = 3 and 10.
"""

from __future__ import annotations

import pytest

from branchd.cluster.timing import (
    MembershipConfig,
    push_pull_scale,
    remaining_suspicion_time,
    retransmit_limit,
    suspicion_timeout,
)

# Timing maths ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    # memberlist TestSuspicionTimeout: suspicionTimeout(3, n, 1s) / 3
    [(5, 1.0), (10, 1.0), (50, 1.698), (100, 2.0), (500, 2.698), (1000, 3.0)],
)
def test_suspicion_timeout_matches_memberlist(n: int, expected: float) -> None:
    assert suspicion_timeout(3, n, 1.0) / 3 == pytest.approx(expected)


def test_suspicion_timeout_small_clusters_use_scale_one() -> None:
    assert suspicion_timeout(4, 0, 1.0) == 4.0
    assert suspicion_timeout(4, 1, 0.5) == 2.0


@pytest.mark.parametrize(
    ("n", "k", "elapsed", "expected"),
    # memberlist TestSuspicion_remainingSuspicionTime (min 2 s, max 30 s)
    [
        (0, 3, 0.0, 30.0),
        (1, 3, 2.0, 14.0),
        (2, 3, 3.0, 4.81),
        (3, 3, 4.0, -2.0),
        (4, 3, 5.0, -3.0),
        (5, 3, 10.0, -8.0),
    ],
)
def test_remaining_suspicion_time_matches_memberlist(
    n: int, k: int, elapsed: float, expected: float
) -> None:
    assert remaining_suspicion_time(n, k, elapsed, 2.0, 30.0) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("confirmations", "expected"),
    # memberlist TestSuspicion_Timer: k 3, min 0.5 s, max 2 s; it expects 810 ms
    # within a 25 ms fudge for two confirmations, the formula gives 811 ms
    [(0, 2.0), (1, 1.25), (2, 0.811), (3, 0.5)],
)
def test_suspicion_timer_values_match_memberlist(confirmations: int, expected: float) -> None:
    assert remaining_suspicion_time(confirmations, 3, 0.0, 0.5, 2.0) == pytest.approx(expected)


def test_no_confirmations_awaited_means_min_from_the_start() -> None:
    assert remaining_suspicion_time(0, 0, 1.0, 4.0, 24.0) == 3.0


@pytest.mark.parametrize(
    ("n", "expected"),
    # memberlist TestRetransmitLimit (mult 3), and a few more of the same formula
    [(0, 0), (1, 3), (99, 6), (9, 3), (10, 6), (999, 9), (1000, 12)],
)
def test_retransmit_limit(n: int, expected: int) -> None:
    assert retransmit_limit(3, n) == expected


def test_push_pull_scale_matches_memberlist() -> None:
    # memberlist TestPushPullScale: 1x up to 32, 2x to 64, 3x to 128
    for n in range(33):
        assert push_pull_scale(1.0, n) == 1.0
    for n in range(33, 65):
        assert push_pull_scale(1.0, n) == 2.0
    for n in range(65, 129):
        assert push_pull_scale(1.0, n) == 3.0
    assert push_pull_scale(30.0, 1000) == 30.0 * 6


def test_presets_follow_memberlist() -> None:
    lan, local, wan = MembershipConfig.lan(), MembershipConfig.local(), MembershipConfig.wan()
    assert (lan.probe_interval, lan.probe_timeout, lan.indirect_checks) == (1.0, 0.5, 3)
    assert (lan.gossip_interval, lan.gossip_nodes, lan.push_pull_interval) == (0.2, 3, 30.0)
    assert (lan.retransmit_mult, lan.suspicion_mult, lan.suspicion_max_timeout_mult) == (4, 4, 6)
    assert lan.awareness_max_multiplier == 8
    assert (local.probe_timeout, local.indirect_checks, local.suspicion_mult) == (0.2, 1, 3)
    assert (local.retransmit_mult, local.gossip_interval, local.push_pull_interval) == (
        2,
        0.1,
        15.0,
    )
    assert (wan.probe_interval, wan.probe_timeout, wan.suspicion_mult) == (5.0, 3.0, 6)
    assert (wan.gossip_nodes, wan.gossip_interval, wan.push_pull_interval) == (4, 0.5, 60.0)
    assert MembershipConfig.profile("wan") == wan
    with pytest.raises(ValueError, match="unknown cluster profile"):
        MembershipConfig.profile("moon")
