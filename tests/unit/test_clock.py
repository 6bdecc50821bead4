"""The fake scheduler (timers in time order, cancel, sleepers) and the real one."""

from __future__ import annotations

import asyncio

import pytest

from branchd.clock import (
    FakeClock,
    FakeScheduler,
    LoopScheduler,
    SystemClock,
    deadline,
    wait_first,
)


@pytest.fixture
def sched() -> FakeScheduler:
    return FakeScheduler(FakeClock(start=100.0))


async def test_timers_fire_in_time_order_at_their_time(sched: FakeScheduler) -> None:
    fired: list[tuple[str, float]] = []

    def note(what: str) -> None:
        fired.append((what, sched.clock.monotonic()))

    sched.call_at(103.0, lambda: note("c"))
    sched.call_at(101.0, lambda: note("a"))
    sched.call_at(102.0, lambda: note("b1"))
    sched.call_at(102.0, lambda: note("b2"))  # a tie keeps the order they were set in
    assert sched.pending() == [101.0, 102.0, 102.0, 103.0]

    await sched.advance(1.5)
    assert fired == [("a", 101.0)]
    assert sched.clock.monotonic() == 101.5
    await sched.run_until(110.0)
    assert fired == [("a", 101.0), ("b1", 102.0), ("b2", 102.0), ("c", 103.0)]
    assert sched.clock.monotonic() == 110.0 and sched.pending() == []


async def test_nothing_fires_until_time_is_moved(sched: FakeScheduler) -> None:
    fired: list[str] = []
    sched.call_at(100.0, lambda: fired.append("now"))  # already due
    await asyncio.sleep(0)
    assert fired == []
    await sched.advance(0)
    assert fired == ["now"]


async def test_a_cancelled_timer_never_fires(sched: FakeScheduler) -> None:
    fired: list[str] = []
    timer = sched.call_at(101.0, lambda: fired.append("cancelled"))
    sched.call_at(102.0, lambda: fired.append("kept"))
    timer.cancel()
    timer.cancel()  # twice is fine
    assert sched.pending() == [102.0]
    await sched.advance(5)
    assert fired == ["kept"]


async def test_a_callback_that_schedules_another_sees_it_fire_in_the_same_run(
    sched: FakeScheduler,
) -> None:
    fired: list[float] = []

    def tick() -> None:
        fired.append(sched.clock.monotonic())
        if len(fired) < 4:
            sched.call_at(sched.clock.monotonic() + 1.0, tick)

    sched.call_at(101.0, tick)
    await sched.advance(10)
    assert fired == [101.0, 102.0, 103.0, 104.0]


async def test_sleepers_wake_in_order_and_their_follow_ups_run_between(
    sched: FakeScheduler,
) -> None:
    seen: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float, then: float | None = None) -> None:
        await sched.sleep(seconds)
        seen.append((name, sched.clock.monotonic()))
        if then is not None:  # a task woken mid-run sets a timer due within it
            await sched.sleep(then)
            seen.append((f"{name} again", sched.clock.monotonic()))

    tasks = [
        asyncio.create_task(sleeper("late", 3.0)),
        asyncio.create_task(sleeper("early", 1.0, then=1.0)),
    ]
    await sched.settle()  # both are asleep now
    assert sched.pending() == [101.0, 103.0]
    await sched.advance(5)
    assert seen == [("early", 101.0), ("early again", 102.0), ("late", 103.0)]
    assert all(t.done() for t in tasks)


async def test_a_sleeper_cancelled_leaves_no_timer(sched: FakeScheduler) -> None:
    task = asyncio.create_task(sched.sleep(10))
    await sched.settle()
    assert sched.pending() == [110.0]
    task.cancel()
    await sched.settle()
    assert task.cancelled() and sched.pending() == []


async def test_deadline_raises_timeout_at_its_time_only(sched: FakeScheduler) -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def bounded() -> str:
        try:
            async with deadline(sched, 102.0):
                await never
        except TimeoutError:
            return f"timed out at {sched.clock.monotonic()}"
        return "finished"

    task = asyncio.create_task(bounded())
    await sched.advance(1.9)
    assert not task.done()
    await sched.advance(0.1)
    assert task.result() == "timed out at 102.0"

    async def quick() -> None:
        async with deadline(sched, 200.0):
            await asyncio.sleep(0)

    await quick()
    assert sched.pending() == []  # its timer went with it


async def test_deadline_does_not_swallow_a_cancel_from_outside(sched: FakeScheduler) -> None:
    async def bounded() -> None:
        async with deadline(sched, 200.0):
            await asyncio.get_running_loop().create_future()

    task = asyncio.create_task(bounded())
    await sched.settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_wait_first_wakes_on_the_first_done_or_at_the_deadline(
    sched: FakeScheduler,
) -> None:
    gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def answer() -> bool:
        return await gate

    pending = {asyncio.create_task(answer())}
    waiting = asyncio.create_task(wait_first(sched, pending, 101.0))
    await sched.advance(1.0)
    assert waiting.result() == set()  # nothing by the deadline

    waiting = asyncio.create_task(wait_first(sched, pending, 105.0))
    await sched.settle()
    gate.set_result(True)
    await sched.settle()
    assert waiting.result() == pending and sched.clock.monotonic() == 101.0
    assert await wait_first(sched, set(), 101.0) == set()  # no tasks: a sleep (due already)


async def test_the_loop_scheduler_fires_on_the_real_clock() -> None:
    clock = SystemClock()
    real = LoopScheduler(clock)
    fired = asyncio.Event()
    began = clock.monotonic()
    real.call_at(began + 0.02, fired.set)
    cancelled = real.call_at(began + 0.01, lambda: pytest.fail("cancelled timer fired"))
    cancelled.cancel()
    await asyncio.wait_for(fired.wait(), 5.0)
    assert clock.monotonic() - began >= 0.015
    await real.sleep_until(clock.monotonic() - 1.0)  # in the past: at once
    with pytest.raises(TimeoutError):
        async with deadline(real, clock.monotonic() + 0.01):
            await asyncio.sleep(5.0)
