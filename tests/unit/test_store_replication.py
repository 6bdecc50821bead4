"""The store's side of replicated declarations: every record with its
version, a digest of them, and another branch's copy written as it is when
it is newer (branchd/replication.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from branchd.clock import FakeClock
from branchd.hlc import Version
from branchd.model import App, Queue
from branchd.replication import Record
from branchd.store import Store

WALL = 1_700_000_000.0


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two branches' stores (their clocks agree unless a test moves one)."""
    a = Store(tmp_path / "a.db", FakeClock(start=0.0, wall_offset=WALL))
    b = Store(tmp_path / "b.db", FakeClock(start=0.0, wall_offset=WALL))
    yield a, b
    a.close()
    b.close()


def sync(src: Store, dst: Store) -> int:
    return sum(dst.apply_remote(r) for r in src.declaration_records())


def test_a_remote_record_keeps_its_version_and_origin(pair: tuple[Store, Store]) -> None:
    a, b = pair
    a.put_app(App("web", env={"A": "1"}))
    a.put_queue(Queue("web", "q", exchange="x"))
    assert sync(a, b) == 2 and sync(a, b) == 0  # the second time: nothing newer
    got, mine = b.get_app("web"), a.get_app("web")
    assert got == mine and got is not None and got.origin == a.branch_id()
    assert b.get_queue("web", "q") == a.get_queue("web", "q")
    assert a.declaration_digest() == b.declaration_digest()
    assert b.hlc.last >= got.version  # type: ignore[operator]
    b.put_app(App("web", env={"B": "2"}))  # a later local write is a later version
    after = b.get_app("web")
    assert after is not None and after.version > got.version  # type: ignore[operator]
    assert after.origin == a.branch_id()  # (an update keeps the origin)


def test_a_stale_remote_record_never_overwrites(pair: tuple[Store, Store]) -> None:
    a, b = pair
    a.put_app(App("web", env={"old": "1"}))
    stale = a.declaration_records()
    sync(a, b)
    b.put_app(App("web", env={"new": "1"}))
    assert [b.apply_remote(r) for r in stale] == [False]
    web = b.get_app("web")
    assert web is not None and web.env == {"new": "1"}
    sync(b, a)
    assert a.declaration_digest() == b.declaration_digest()


def test_the_clock_moves_past_a_remote_version_from_the_future(pair: tuple[Store, Store]) -> None:
    _, b = pair
    ahead = Version(int((WALL + 3600) * 1000), 7, "zz")
    rec = Record("app", {**App("web").to_wire(), "version": ahead.to_wire(), "origin": "zz"})
    assert b.apply_remote(rec)
    b.put_app(App("web", env={"B": "1"}))
    web = b.get_app("web")
    assert web is not None and web.version is not None and web.version > ahead


def test_a_tombstone_beats_an_older_live_record(pair: tuple[Store, Store]) -> None:
    a, b = pair
    a.put_app(App("web"))
    a.put_queue(Queue("web", "q"))
    sync(a, b)
    a.delete_app("web")
    sync(a, b)
    assert b.get_app("web") is None and b.get_queue("web", "q") is None
    assert b.tombstone("app", "web") == a.tombstone("app", "web")
    assert a.declaration_digest() == b.declaration_digest()


def test_a_newer_live_record_beats_an_older_tombstone(pair: tuple[Store, Store]) -> None:
    a, b = pair
    a.put_app(App("web"))
    sync(a, b)
    a.delete_app("web")
    tombs = a.declaration_records()
    b.put_app(App("web", env={"again": "1"}))  # declared again on b, after the delete
    assert [b.apply_remote(r) for r in tombs] == [False]
    sync(b, a)
    web = a.get_app("web")
    assert web is not None and web.env == {"again": "1"}


def test_a_remote_delete_keeps_its_version_and_its_queues_come_on_their_own(
    pair: tuple[Store, Store],
) -> None:
    a, b = pair
    a.put_app(App("web"))
    a.put_queue(Queue("web", "q"))
    sync(a, b)
    a.delete_app("web")
    tomb = a.tombstone("app", "web")
    assert tomb is not None
    assert b.delete_app("web", tomb) is True
    assert b.tombstone("app", "web") == tomb  # not a fresh version: no later write
    assert b.tombstone("queue", "web", "q") is None  # a's tombstone of it is a's write
    assert b.delete_app("web", tomb) is False  # (done)
    sync(a, b)
    assert a.declaration_digest() == b.declaration_digest()
    b.put_app(App("web"))
    assert b.delete_app("web", tomb) is False  # declared again since: it stays


def test_tombstones_are_purged_after_their_time(pair: tuple[Store, Store]) -> None:
    a, _ = pair
    a.put_app(App("web"))
    a.put_app(App("api"))
    a.delete_app("web")
    tomb = a.tombstone("app", "web")
    assert tomb is not None
    assert a.purge_tombstones(tomb.wall_ms) == 0  # not older than the bound
    assert a.purge_tombstones(tomb.wall_ms + 1) == 1
    assert [r.key for r in a.declaration_records()] == [("api",)]
    assert a.declaration_records("web") == []
