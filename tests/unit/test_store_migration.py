"""A database made by the schema-2 release, opened by today's Store.

tests/data/store_v2.sql was dumped by tests/data/make_store_v2.py running the
code of that release; its records are the script's APPS, QUEUES, INSTANCES.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from branchd import store as store_mod
from branchd.clock import FakeClock
from branchd.hlc import Version
from branchd.model import App, Desired, InstanceSpec, Queue, Runtime
from branchd.store import Store
from tests.data.make_store_v2 import APPS, BRANCH, INSTANCES, MARKS, QUEUES, RUNTIMES

DUMP = Path(__file__).parent.parent / "data" / "store_v2.sql"


@pytest.fixture
def v2_db(tmp_path: Path) -> Path:
    path = tmp_path / "branchd.db"
    with closing(sqlite3.connect(path)) as db:
        db.executescript(DUMP.read_text())
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    return path


def dump(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as db:
        return [f"user_version {db.execute('PRAGMA user_version').fetchone()[0]}", *db.iterdump()]


def test_every_record_survives_with_a_version_and_origin(v2_db: Path) -> None:
    with Store(v2_db) as s:
        assert s.branch_id() == BRANCH
        apps = s.list_apps()
        assert [replace(a, version=None, origin=None) for a in apps] == sorted(
            APPS, key=lambda a: a.name
        )
        queues = s.list_queues("shop")
        assert [replace(q, version=None, origin=None) for q in queues] == QUEUES
        specs = s.list_instances()
        assert [replace(i, version=None, origin=None) for i in specs] == sorted(
            INSTANCES, key=lambda i: (i.app, i.name)
        )
        g1 = s.get_instance("g1")
        assert g1 is not None and g1.desired == Desired.REMOVED  # a delete under way
        records: list[App | Queue | InstanceSpec] = [*apps, *queues, *specs]
        for record in records:
            assert record.origin == BRANCH
            assert record.version is not None and record.version.branch == BRANCH
        assert s.runtimes() == {i.name: RUNTIMES.get(i.name, Runtime()) for i in specs}
        assert s.marks("removing_app:") == [m.removeprefix("removing_app:") for m in MARKS]
        with closing(sqlite3.connect(v2_db)) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == len(store_mod.MIGRATIONS)
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_second_open_changes_nothing(v2_db: Path) -> None:
    Store(v2_db).close()
    migrated = dump(v2_db)
    Store(v2_db).close()
    assert dump(v2_db) == migrated


def test_a_write_after_the_migration_is_newer_even_with_a_clock_behind(v2_db: Path) -> None:
    with Store(v2_db) as s:
        shop = s.get_app("shop")
        assert shop is not None and shop.version is not None
        migrated = shop.version
    behind = FakeClock(start=0.0, wall_offset=1.0)  # 1970: far behind the migration
    with Store(v2_db, behind) as s:
        s.put_app(App("shop", env={"X": "1"}))
        s.delete_instance("w2")
        shop = s.get_app("shop")
        assert shop is not None and shop.version is not None and shop.version > migrated
        assert shop.origin == BRANCH and shop.created_at == 2000.25
        tomb = s.tombstone("instance", "w2")
        assert tomb is not None and tomb > shop.version
        assert isinstance(tomb, Version)
