"""This branch's record: read from the host by a timer step, its instance
count fed by the event bus (no psutil call in a request)."""

from __future__ import annotations

import asyncio

from branchd.branch import BranchService
from branchd.clock import FakeClock, FakeScheduler, LoopScheduler, SystemClock
from branchd.events import EventBus, InstanceAdded, InstanceChanged, InstanceRemoved
from branchd.model import Kind, State
from branchd.views import BranchRecord, Capacity

BASE = BranchRecord("b1", "host", "0.1.0", 1.0, "127.0.0.1:8400", Capacity(1, (0, 0, 0), 0, 0, 0))


class Probe:
    def __init__(self) -> None:
        self.free = 4096
        self.reads = 0

    def cpus(self) -> int:
        return 8

    def load(self) -> tuple[float, float, float]:
        return (0.5, 0.25, 0.125)

    def memory(self) -> tuple[int, int]:
        self.reads += 1
        return 8192, self.free


def test_the_record_is_read_once_per_step_not_per_request() -> None:
    probe = Probe()
    sched = FakeScheduler(FakeClock())
    service = BranchService(BASE, probe, EventBus(), ["a/w1", "a/w2"], scheduler=sched)
    first = service.record()
    assert first.capacity == Capacity(8, (0.5, 0.25, 0.125), 8192, 4096, 2)
    assert first.to_json()["capacity"]["instances"] == 2
    probe.free = 1024
    service.record()
    assert probe.reads == 1 and service.record().capacity.memory_free == 4096
    service.refresh()  # the timer's step
    assert service.record().capacity.memory_free == 1024 and probe.reads == 2


async def test_instances_come_and_go_with_the_bus() -> None:
    bus = EventBus()
    real = LoopScheduler(SystemClock())
    service = BranchService(BASE, Probe(), bus, ["web/w1"], scheduler=real, interval=3600.0)
    service.start()
    try:
        await asyncio.sleep(0)  # let the loop subscribe
        bus.publish(InstanceAdded("web", "w2"))
        bus.publish(InstanceRemoved("web", "w1"))
        bus.publish(InstanceAdded("web", "w3"))
        for _ in range(100):
            if service.record().capacity.instances == 2:
                break
            await asyncio.sleep(0)
        assert service.record().capacity.instances == 2
        assert service.record().instances == ("web/w2", "web/w3")
    finally:
        await service.close()
    assert bus.subscribers == 0


def test_the_record_says_which_celery_workers_run() -> None:
    sched = FakeScheduler(FakeClock())
    service = BranchService(
        BASE, Probe(), EventBus(), ["shop/w1", "shop/w2", "web/p"], scheduler=sched,
        running=["shop/w1"],  # (adopted running)
    )  # fmt: skip
    told: list[tuple[str, ...]] = []
    service.on_change = lambda: told.append(service.record().running)
    assert service.record().running == ("shop/w1",)

    def changed(name: str, state: State, kind: Kind = Kind.CELERY) -> None:
        app, _, inst = name.partition("/")
        service.seen(InstanceChanged(app, inst, state, 1, None, kind))

    changed("shop/w2", State.STARTING)
    assert told == []  # (not running yet: the record is as it was)
    changed("shop/w2", State.RUNNING)
    changed("web/p", State.RUNNING, Kind.PROCESS)  # a plain process is no worker
    assert service.record().running == ("shop/w1", "shop/w2")
    changed("shop/w1", State.STOPPING)  # a stopping worker's share goes to the others
    service.seen(InstanceRemoved("shop", "w2"))
    assert told == [("shop/w1", "shop/w2"), ("shop/w2",), ()]
    assert service.record().to_json()["running"] == []


async def test_a_worker_ready_as_soon_as_the_service_starts_is_seen() -> None:
    bus = EventBus()
    real = LoopScheduler(SystemClock())
    service = BranchService(BASE, Probe(), bus, ["shop/w1"], scheduler=real, interval=3600.0)
    service.start()
    try:
        # published before the service's loop first ran: still in its queue
        bus.publish(InstanceChanged("shop", "w1", State.RUNNING, 1, None, Kind.CELERY))
        for _ in range(100):
            if service.record().running:
                break
            await asyncio.sleep(0)
        assert service.record().running == ("shop/w1",)
    finally:
        await service.close()
    assert bus.subscribers == 0
