"""Scaling on queue depth (issue 16, part 5): a pure core, no I/O, no clock.

Each poll gives a reading of the policy's queue; :func:`step` turns it into
the pool size to ask for:

- ``desired = clamp(ceil((ready + in_flight) / per_worker), min, max)``;
- up at once: a reading above the current target is the new target;
- down only after the stabilization window (``down_after``): the target is
  the highest desired of the readings of the last ``down_after`` seconds
  (Kubernetes' HPA rule), so it falls below a value only once no reading
  asked for that much for a whole window;
- never below the tasks running now (each holds a pool process; Celery's
  shrink never takes a busy one either, so this only saves a refused shrink).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from branchd.model import ScalePolicy


@dataclass(frozen=True)
class Reading:
    """One poll of a queue: ``in_flight`` held by workers (running + reserved),
    ``running`` of those executing now."""

    ready: int
    in_flight: int
    running: int = 0


@dataclass(frozen=True)
class ScaleState:
    """The readings that can still hold the target up: (time, desired), each
    higher than every later one (a later, higher reading outlives them)."""

    window: tuple[tuple[float, int], ...] = ()
    target: int | None = None


def desired(ready: int, in_flight: int, per_worker: int, low: int, high: int) -> int:
    need = math.ceil(max(0, ready + in_flight) / max(1, per_worker))
    return max(low, min(high, need))


def step(state: ScaleState, reading: Reading, policy: ScalePolicy, now: float) -> ScaleState:
    want = desired(reading.ready, reading.in_flight, policy.per_worker, policy.min, policy.max)
    since = now - policy.down_after
    kept = tuple((t, d) for t, d in state.window if t > since and d > want)
    window = (*kept, (now, want))
    target = max(d for _, d in window)
    target = max(target, min(reading.running, policy.max))
    target = max(policy.min, min(policy.max, target))
    return ScaleState(window=window, target=target)


def split(total: int, parts: int, floor: int = 1) -> list[int]:
    """``total`` pool processes over ``parts`` workers, the first ones taking
    the remainder, each at least ``floor`` (for a range's max, 1: a worker
    with no process consumes nothing)."""
    if parts <= 0:
        return []
    base, extra = divmod(total, parts)
    return [max(floor, base + (1 if i < extra else 0)) for i in range(parts)]


def ranges(target: int, low: int, parts: int) -> list[tuple[int, int]]:
    """The autoscale range (min, max) of each of ``parts`` workers: the
    target split as the max, the policy's min split as the min (never above
    that max)."""
    highs = split(target, parts)
    lows = split(low, parts, floor=0)
    return [(min(lo, hi), hi) for lo, hi in zip(lows, highs, strict=True)]
