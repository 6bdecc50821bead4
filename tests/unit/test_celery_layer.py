"""The Celery layer is built at its first need (branchd/local.py's
``CeleryLayer``, issue 10 part 9), over the twins: what a branch of plain
processes does never builds it; a Celery app, here, replicated or in the store
at the start, does; what was asked of it before reaches it once built.

(Which modules a branch without Celery apps imports is
tests/integration/test_lazy_imports.py's, in a fresh interpreter.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from branchd.celery.stub import StubRemoteControl
from branchd.clock import FakeClock, FakeScheduler
from branchd.config import Config
from branchd.events import EventBus
from branchd.local import LocalBranch, build
from branchd.model import State
from branchd.process.fake import FakeLauncher
from branchd.store import Store

SLEEP = {"name": "s1", "command": ["sleep", "60"]}


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.config = Config.for_tests(tmp_path)
        self.store = Store(self.config.db_path)
        self.clock = FakeClock()
        self.sched = FakeScheduler(self.clock)
        self.branches: list[LocalBranch] = []

    async def branch(self) -> LocalBranch:
        m = build(
            self.store,
            FakeLauncher(),
            self.clock,
            self.config,
            self.store.branch_id(),
            scheduler=self.sched,
            remote=StubRemoteControl(),
            bus=EventBus(),
        )
        await m.start()
        self.branches.append(m)
        return m

    async def restart(self, m: LocalBranch) -> LocalBranch:
        await m.shutdown(keep=True)
        self.branches.remove(m)
        return await self.branch()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    yield r
    for m in r.branches:
        await m.shutdown(keep=False)
    r.store.close()


async def test_plain_processes_never_build_it(rig: Rig) -> None:
    m = await rig.branch()
    await m.apps.put_app("web", {}, {})
    view = await m.instances.create_instance("web", SLEEP)
    await rig.sched.settle()
    await rig.sched.advance(2.0)
    assert (await m.instances.get_instance("web", "s1")).runtime.state == State.RUNNING
    # an app's view: its broker and result store, as before, without the layer
    app = await m.apps.get_app("web")
    assert m.celery.effective_broker(app) == "filesystem://"
    backend = m.celery.effective_backend(app)
    assert backend is not None and backend.startswith("file://")
    assert backend.endswith("/web")
    # the metrics' reads, a restart of it, its delete, the branch's restart
    assert m.layer.worker_figures() == {} and m.layer.known_depths() == {}
    await m.instances.restart_instance("web", "s1")
    m.layer.resplit("web")
    m = await rig.restart(m)
    await m.instances.delete_instance("web", view.spec.name)
    await m.instances.delete_app("web")
    assert not m.layer.loaded


async def test_a_celery_app_declared_builds_it_with_what_was_asked_before(rig: Rig) -> None:
    m = await rig.branch()
    await m.apps.put_app("web", {}, {})
    assert m.layer.worker_figures() == {}  # (the metrics asked for figures already)
    assert not m.layer.loaded
    await m.apps.put_app("jobs", {}, {}, {"celery_app": "tasks"})
    assert m.layer.loaded
    assert m.workers.figures_wanted  # the wish reached it
    # its checks run: an app whose limits its pool cannot keep is refused
    with pytest.raises(Exception, match="pool"):
        await m.apps.put_app("solo", {}, {}, {"pool": "solo", "time_limit": 5})


async def test_a_celery_app_in_the_store_builds_it_at_the_start(rig: Rig) -> None:
    m = await rig.branch()
    await m.apps.put_app("jobs", {}, {}, {"celery_app": "tasks"})
    m = await rig.restart(m)
    assert m.layer.loaded


async def test_a_queue_declared_or_a_celery_route_builds_it(rig: Rig) -> None:
    m = await rig.branch()
    await m.apps.put_app("web", {}, {})
    await m.apps.put_queue("web", "q1", {})
    assert m.layer.loaded
    n = await rig.restart(m)  # (a queue in the store: not a Celery app by itself)
    assert not n.layer.loaded
    config = await n.celery.celery_config("web")  # a Celery route
    assert config["config"]["broker_url"] == "filesystem://"
    assert n.layer.loaded
