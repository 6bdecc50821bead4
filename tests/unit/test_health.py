"""The health decision of a running Celery worker, by table."""

from __future__ import annotations

import pytest

from branchd.process.health import Ping, Verdict, Watch, decide, over_memory

NOW = 100.0
HUNG = "no answer to ping for 60s"


@pytest.mark.parametrize(
    ("watch", "ping", "solo", "sweep", "verdict"),
    [
        # answers: healthy; re-applied after silence, or on the slow sweep
        (Watch(90.0), Ping.ANSWERED, False, False, Verdict(Watch(NOW))),
        (Watch(90.0, silent=True), Ping.ANSWERED, False, False, Verdict(Watch(NOW), None, True)),
        (Watch(90.0), Ping.ANSWERED, False, True, Verdict(Watch(NOW), None, True)),
        # silence: the clock runs from the last answer (or from now, never seen)
        (Watch(90.0), Ping.SILENT, False, False, Verdict(Watch(90.0, silent=True))),
        (Watch(), Ping.SILENT, False, False, Verdict(Watch(NOW, silent=True))),
        (Watch(40.0, silent=True), Ping.SILENT, False, False, Verdict(Watch(), HUNG)),
        (Watch(40.0), Ping.SILENT, False, True, Verdict(Watch(), HUNG)),
        (Watch(40.01), Ping.SILENT, False, False, Verdict(Watch(40.01, silent=True))),
        # a solo worker answers only between tasks: silence is a long task
        (Watch(0.0, silent=True), Ping.SILENT, True, False, Verdict(Watch(0.0, silent=True))),
        # a broker outage is not a hang: the clock starts again, re-applied after
        (Watch(0.0, silent=True), Ping.BROKER_DOWN, False, False, Verdict(Watch(NOW, True))),
        (Watch(NOW - 1), Ping.BROKER_DOWN, False, True, Verdict(Watch(NOW, silent=True))),
    ],
)
def test_decide(watch: Watch, ping: Ping, solo: bool, sweep: bool, verdict: Verdict) -> None:
    assert decide(watch, ping, NOW, hung_after=60.0, solo=solo, sweep=sweep) == verdict


def test_over_memory() -> None:
    assert over_memory(10, None) is None
    assert over_memory(10, 10) is None
    assert over_memory(11, 10) == (
        "memory_limit: the worker's process tree uses 11 bytes (RSS), over its memory_limit of 10"
    )
