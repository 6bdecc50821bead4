"""A short run of ``bench/placement_sim.py``: the targets hold, loosely.

The benchmark itself (more arrivals, several seeds) writes the figures to
docs/benchmarks.md; this keeps the rule from drifting between its runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "placement_sim.py"


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("placement_sim", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["placement_sim"] = module  # (dataclasses look their module up)
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["placement_sim"]
    return module


def test_better_of_two_on_stale_data_stays_near_fresh_and_beats_random(sim: ModuleType) -> None:
    def mean(rule: str, period: float) -> float:
        r = sim.simulate(rule, period, n=100, lam=0.9, jobs=30_000, seed=14)
        return float(r.mean)

    fresh, rnd = mean("ours", 0), mean("random", 0)
    assert 2.3 < fresh < 3.0  # the anchor: 2.66
    assert rnd > 2.5 * fresh  # the anchor: about 10 (a short run stays below)
    assert mean("ours", 1) < 1.25 * fresh  # the target: 1.15x, on longer runs
    for period in (5, 10):
        ours = mean("ours", period)
        assert ours < rnd
        assert mean("least", period) > ours  # least loaded herds on old data
