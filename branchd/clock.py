"""Clocks and schedulers: the pure cores take ``now`` as an argument; services
read it here, and wait on a ``Scheduler`` (never on ``loop.call_later`` or
``asyncio.sleep`` directly), so that tests can move time by hand.

``SystemClock`` and ``LoopScheduler`` are the real ones; ``FakeClock`` and
``FakeScheduler`` are their twins, for tests only (production code never
imports them: the daemon hands the real ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class Timer(Protocol):
    """A scheduled callback; ``cancel()`` makes it a no-op (twice is fine)."""

    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """Timers and sleeps on the monotonic clock of ``clock``."""

    @property
    def clock(self) -> Clock: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` once the clock reads ``when`` (at once if it has)."""
        ...

    async def sleep_until(self, when: float) -> None: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class LoopScheduler:
    """The real scheduler: the running asyncio loop's timers, on ``clock``."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    @property
    def clock(self) -> Clock:
        return self._clock

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - self._clock.monotonic())
        return loop.call_later(delay, callback)

    async def sleep_until(self, when: float) -> None:
        await asyncio.sleep(max(0.0, when - self._clock.monotonic()))

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


@contextlib.asynccontextmanager
async def deadline(scheduler: Scheduler, when: float) -> AsyncIterator[None]:
    """``asyncio.timeout_at`` on a scheduler's clock: the body is cancelled
    at ``when`` and ``TimeoutError`` raised in its place."""
    task = asyncio.current_task()
    assert task is not None, "deadline() needs a task"
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    timer = scheduler.call_at(when, expire)
    try:
        yield
    except asyncio.CancelledError:
        if fired and task.uncancel() == 0:
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()


async def wait_first(
    scheduler: Scheduler, tasks: set[asyncio.Task[_T]], until: float
) -> set[asyncio.Task[_T]]:
    """The tasks done by ``until`` (waking at the first one done), on the scheduler."""
    if not tasks:
        await scheduler.sleep_until(until)
        return set()
    finished = {t for t in tasks if t.done()}
    if finished:
        return finished
    try:
        async with deadline(scheduler, until):
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return done
    except TimeoutError:
        return {t for t in tasks if t.done()}


# Twins (tests only) ---------------------------------------------------------------


class FakeClock:
    """A clock the tests move by hand."""

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = start
        self._offset = wall_offset

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._offset

    def advance(self, seconds: float) -> None:
        self._now += seconds


@dataclass(order=True)
class _FakeTimer:
    when: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class FakeScheduler:
    """A scheduler over a ``FakeClock``: nothing fires until the test moves time.

    Timers wait in a heap; ``advance(seconds)`` / ``run_until(t)`` moves the
    clock from one due timer to the next, in time order (ties in the order
    they were set), firing each and then letting the event loop run every
    task woken by it before the next, so a callback or a woken task that sets
    another timer due by ``t`` sees it fire in the same run. Sleeps are timers
    that wake a future. A timer set for a time already reached fires at the
    next step (``advance(0)`` is one).
    """

    #: Loop turns at most spent letting woken tasks run after each timer.
    settle_rounds = 10_000

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock
        # (when, seq, timer): tuples compare in C, where the dataclass's own
        # ordering ran in Python and was the simulator's top cost at N = 1000
        self._heap: list[tuple[float, int, _FakeTimer]] = []
        self._seq = itertools.count()

    @property
    def clock(self) -> FakeClock:
        return self._clock

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = _FakeTimer(when, next(self._seq), callback)
        heapq.heappush(self._heap, (timer.when, timer.seq, timer))
        return timer

    async def sleep_until(self, when: float) -> None:
        if when <= self._clock.monotonic():
            await asyncio.sleep(0)
            return
        woken = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        timer = self.call_at(when, wake)
        try:
            await woken
        finally:
            timer.cancel()

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._clock.monotonic() + seconds)

    # the test's side -----------------------------------------------------------

    def pending(self) -> list[float]:
        """When the timers still to fire are due, earliest first."""
        return sorted(t.when for _, _, t in self._heap if not t.cancelled)

    def next_due(self) -> float | None:
        self._drop_cancelled()
        return self._heap[0][0] if self._heap else None

    async def advance(self, seconds: float) -> None:
        await self.run_until(self._clock.monotonic() + seconds)

    async def run_until(self, when: float) -> None:
        """Move the clock to ``when``, firing every timer due by then in order."""
        await self.settle()
        while True:
            self._drop_cancelled()
            if not self._heap or self._heap[0][0] > when:
                break
            _, _, timer = heapq.heappop(self._heap)
            now = self._clock.monotonic()
            if timer.when > now:
                self._clock.advance(timer.when - now)
            try:
                timer.callback()
            except Exception:  # as the loop's own handler would: said, and go on
                log.exception("fake timer callback failed")
            await self.settle()
        now = self._clock.monotonic()
        if when > now:
            self._clock.advance(when - now)
        await self.settle()

    async def settle(self) -> None:
        """Let the event loop run until no callback is ready (tasks woken by a
        timer, and those they wake in turn), without moving the clock."""
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)  # asyncio's queue of ready callbacks
        for _ in range(self.settle_rounds):
            await asyncio.sleep(0)
            if ready is not None and not ready:
                return

    def _drop_cancelled(self) -> None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
