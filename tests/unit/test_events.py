"""The event bus: subscribers get what they asked for; a slow one never blocks."""

from __future__ import annotations

from branchd.events import DeclarationChanged, EventBus, InstanceChanged, InstanceRemoved
from branchd.model import State


async def test_subscribers_get_what_they_ask_for_in_order() -> None:
    bus = EventBus()
    first = InstanceChanged("web", "a", State.STARTING, None, None)
    with bus.subscribe() as everything, bus.subscribe(lambda e: e.name == "b") as only_b:
        bus.publish(first)
        bus.publish(InstanceRemoved("web", "b"))
        bus.publish(DeclarationChanged("app", "web", "web"))
        got = [await everything.get() for _ in range(3)]
        assert got == [first, InstanceRemoved("web", "b"), DeclarationChanged("app", "web", "web")]
        assert await only_b.get() == InstanceRemoved("web", "b")
        assert only_b.queue.empty()
    assert bus.subscribers == 0  # leaving the block unsubscribes
    bus.publish(first)  # with nobody listening: nothing happens, nothing fails


async def test_a_reader_that_falls_behind_loses_its_oldest_events() -> None:
    bus = EventBus()
    with bus.subscribe() as slow:
        for i in range(1030):
            bus.publish(InstanceRemoved("web", f"i{i}"))
        assert slow.dropped == 6 and slow.queue.qsize() == 1024
        assert await slow.get() == InstanceRemoved("web", "i6")
