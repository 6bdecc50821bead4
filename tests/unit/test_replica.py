"""The declarations' sync on two branches wired back to back (no sockets):
anti-entropy brings both to the same writes, a push carries one change,
and what is not a record is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from branchd.clock import FakeClock, FakeScheduler
from branchd.cluster.replica import DeclarationSync
from branchd.declarations import Declarations
from branchd.errors import BadRequest
from branchd.events import EventBus
from branchd.store import Store


class Side:
    def __init__(self, path: Path, peers: dict[str, Side]) -> None:
        clock = FakeClock()
        self.store = Store(path, clock)
        self.bus = EventBus()
        self.decls = Declarations(self.store, clock, self.bus)
        self.sync = DeclarationSync(
            self.decls,
            call=self._call,
            peers=lambda: [(n, n) for n, s in peers.items() if s is not self],
            scheduler=FakeScheduler(clock),
            bus=self.bus,
        )
        self._peers = peers

    async def _call(self, url: str, op: str, args: dict[str, Any]) -> Any:
        return self._peers[url].sync.answer(op, args)


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    peers: dict[str, Side] = {}
    peers["a"] = Side(tmp_path / "a.db", peers)
    peers["b"] = Side(tmp_path / "b.db", peers)
    yield peers["a"], peers["b"]
    for s in peers.values():
        s.store.close()


def test_anti_entropy_brings_both_sides_to_the_same_writes(two: tuple[Side, Side]) -> None:
    a, b = two

    async def go() -> None:
        await a.decls.put_app("web", {}, {})
        await b.decls.put_app("api", {"X": "1"}, {})
        await b.decls.put_queue("api", "jobs", {})
        assert a.decls.digest() != b.decls.digest()
        assert await a.sync.step() is True  # one exchange, both ways
        assert a.decls.digest() == b.decls.digest()
        assert await b.sync.step() is False  # nothing left to do
        assert [x.name for x in await a.decls.list_apps()] == ["api", "web"]
        a.decls.forget_app("api")
        await a.sync.push(a.decls.records("api"))
        assert b.decls.find_app("api") is None and b.decls.find_queue("api", "jobs") is None
        assert a.decls.digest() == b.decls.digest()

    asyncio.run(go())


def test_what_is_not_a_record_is_refused(two: tuple[Side, Side]) -> None:
    a, _ = two
    with pytest.raises(BadRequest):
        a.sync.answer("decl.put", {"records": "nope"})
    assert a.sync.answer("decl.put", {"records": [{"kind": "x"}, {}]}) == {"taken": 0}
    bad_name = {
        "kind": "app",
        "record": {"name": "../x", "version": "0" * 12 + ".0000.b", "origin": "b"},
    }
    assert a.sync.answer("decl.put", {"records": [bad_name]}) == {"taken": 0}
    assert a.decls.records() == []
