"""The cluster's timers as data, and the pure maths that scales them with N.

``MembershipConfig`` holds what the membership core needs (values in
seconds), with presets shaped like memberlist's ``DefaultLANConfig``,
``DefaultLocalConfig`` and ``DefaultWANConfig``. The functions below are the
formulas of memberlist's ``util.go`` and ``suspicion.go``, checked against
memberlist's own test tables in ``tests/unit/test_membership.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

#: Below this many members the push-pull interval is not scaled (memberlist's
#: ``pushPullScaleThreshold``): the 33rd member doubles it, the 65th triples it.
PUSH_PULL_SCALE_THRESHOLD = 32


def suspicion_timeout(mult: int, n: int, interval: float) -> float:
    """The shortest suspicion timeout: ``mult * max(1, log10(n)) * interval``.

    The node scale is cut to three decimals, as memberlist does (it keeps
    milliseconds of it in an integer), so the values match its table.
    """
    scale = max(1.0, math.log10(max(1.0, float(n))))
    return mult * (math.floor(scale * 1000) / 1000) * interval


def remaining_suspicion_time(n: int, k: int, elapsed: float, lo: float, hi: float) -> float:
    """How much longer to wait before a suspect is dead; negative: it is overdue.

    The timeout starts at ``hi`` and falls towards ``lo`` on a log scale as
    independent confirmations ``n`` reach the ``k`` wanted (memberlist's
    ``remainingSuspicionTime``, cut to milliseconds). With ``k < 1`` no
    confirmation is awaited and the timeout is ``lo`` from the start.
    """
    if k < 1:
        return lo - elapsed
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = hi - frac * (hi - lo)
    timeout = max(lo, math.floor(1000.0 * raw) / 1000.0)
    return timeout - elapsed


def retransmit_limit(mult: int, n: int) -> int:
    """How many times one update is piggybacked: ``mult * ceil(log10(n + 1))``."""
    return mult * math.ceil(math.log10(n + 1))


def push_pull_scale(interval: float, n: int) -> float:
    """The push-pull interval for ``n`` members: longer past 32, on a log2 scale."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    mult = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
    return mult * interval


@dataclass(frozen=True)
class MembershipConfig:
    """The SWIM and Lifeguard settings of one branch (seconds).

    The defaults are memberlist's LAN profile. ``reap_after`` (how long a dead
    or left member is remembered, so that old rumours about it cannot bring
    it back) and ``max_piggyback`` (updates carried per message) are ours.
    """

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    retransmit_mult: int = 4
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    awareness_max_multiplier: int = 8
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    gossip_to_the_dead_time: float = 30.0
    push_pull_interval: float = 30.0
    reap_after: float = 60.0
    max_piggyback: int = 10

    @classmethod
    def lan(cls) -> MembershipConfig:
        return cls()

    @classmethod
    def local(cls) -> MembershipConfig:
        """memberlist's DefaultLocalConfig: one machine or a fast, quiet network."""
        return replace(
            cls(),
            indirect_checks=1,
            retransmit_mult=2,
            suspicion_mult=3,
            push_pull_interval=15.0,
            probe_timeout=0.2,
            probe_interval=1.0,
            gossip_interval=0.1,
            gossip_to_the_dead_time=15.0,
            reap_after=30.0,
        )

    @classmethod
    def wan(cls) -> MembershipConfig:
        """memberlist's DefaultWANConfig: slower, more patient."""
        return replace(
            cls(),
            suspicion_mult=6,
            push_pull_interval=60.0,
            probe_timeout=3.0,
            probe_interval=5.0,
            gossip_nodes=4,
            gossip_interval=0.5,
            gossip_to_the_dead_time=60.0,
            reap_after=120.0,
        )

    @classmethod
    def for_tests(cls) -> MembershipConfig:
        """The LAN profile with a short memory of the dead, for fast tests."""
        return replace(cls(), reap_after=10.0, gossip_to_the_dead_time=5.0)

    @classmethod
    def profile(cls, name: str) -> MembershipConfig:
        """A preset by name: ``lan``, ``local`` or ``wan``."""
        presets = {"lan": cls.lan, "local": cls.local, "wan": cls.wan}
        if name not in presets:
            raise ValueError(f"unknown cluster profile {name!r} (lan, local or wan)")
        return presets[name]()
