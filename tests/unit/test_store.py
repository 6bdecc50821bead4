"""The SQLite store, on real files under tmp_path."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from branchd import store as store_mod
from branchd.clock import FakeClock
from branchd.errors import Conflict, NotFound, StoreError
from branchd.hlc import Version
from branchd.model import (
    App,
    Autorestart,
    Desired,
    InstanceSpec,
    Kind,
    Policy,
    Queue,
    Runtime,
    State,
    StopStep,
)
from branchd.store import Store

OpenStore = Callable[[], Store]
R = TypeVar("R", App, Queue, InstanceSpec)


def bare(record: R | None) -> R | None:
    """``record`` without its version and origin: what was declared."""
    return None if record is None else replace(record, version=None, origin=None)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "sub" / "branchd.db"


@pytest.fixture
def open_store(db_path: Path) -> Iterator[OpenStore]:
    """Factory: open the same file again (as a restarted daemon would)."""
    opened: list[Store] = []

    def create() -> Store:
        s = Store(db_path)
        opened.append(s)
        return s

    yield create
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: OpenStore) -> Store:
    return open_store()


def spec(name: str, app: str = "web", **kw: object) -> InstanceSpec:
    return InstanceSpec(app=app, name=name, command=("sleep", "60"), branch="b1", **kw)  # type: ignore[arg-type]


FULL_SPEC = InstanceSpec(
    app="web",
    name="w1",
    command=("celery", "-A", "proj", "worker"),
    branch="b1",
    kind=Kind.CELERY,
    env={"A": "1", "B": "two"},
    cwd="/srv",
    user="nobody",
    policy=Policy(
        autorestart=Autorestart.ALWAYS,
        exitcodes=(0, 2),
        startsecs=0.5,
        startretries=7,
        stopsignal="INT",
        stopwaitsecs=600.0,
    ),
    autostart=False,
    desired=Desired.STOPPED,
    log_max_bytes=1234,
    log_backups=2,
    created_at=1700000000.25,
)


def test_opens_in_wal_mode_with_parent_dirs_created(store: Store, db_path: Path) -> None:
    assert db_path.exists()
    with closing(sqlite3.connect(db_path)) as db, db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(store_mod.MIGRATIONS)


def test_app_round_trip_and_replace_keeps_created_at(open_store: OpenStore) -> None:
    s = open_store()
    app = App("web", env={"X": "1"}, defaults={"pool": "prefork", "n": 2}, created_at=10.0)
    assert s.put_app(app) is True
    assert bare(s.get_app("web")) == app
    assert s.put_app(App("web", env={"Y": "2"}, created_at=99.0)) is False
    assert bare(s.get_app("web")) == App("web", env={"Y": "2"}, created_at=10.0)
    s.put_app(App("api"))
    assert [a.name for a in s.list_apps()] == ["api", "web"]
    api = s.get_app("api")
    assert api is not None and api.created_at > 0  # stamped on creation
    assert s.get_app("nope") is None
    s.close()
    assert bare(open_store().get_app("web")) == App("web", env={"Y": "2"}, created_at=10.0)


def test_replacing_an_app_keeps_its_instances(store: Store) -> None:
    store.put_app(App("web"))
    store.add_instance(spec("w1"))
    store.put_app(App("web", env={"Z": "1"}))
    assert bare(store.get_instance("w1")) == spec("w1")


def test_instance_round_trip_survives_reopen(open_store: OpenStore) -> None:
    s = open_store()
    s.put_app(App("web"))
    s.add_instance(FULL_SPEC)
    assert bare(s.get_instance("w1")) == FULL_SPEC
    s.close()
    assert bare(open_store().get_instance("w1")) == FULL_SPEC


def test_list_instances_sorted_by_app_then_name(store: Store) -> None:
    store.put_app(App("b"))
    store.put_app(App("a"))
    for app, name in [("b", "x1"), ("a", "z"), ("b", "a1"), ("a", "m")]:
        store.add_instance(spec(name, app=app))
    assert [(i.app, i.name) for i in store.list_instances()] == [
        ("a", "m"),
        ("a", "z"),
        ("b", "a1"),
        ("b", "x1"),
    ]
    assert [i.name for i in store.list_instances("b")] == ["a1", "x1"]
    assert store.list_instances("none") == []


def test_instance_name_is_unique_across_apps(store: Store) -> None:
    store.put_app(App("web"))
    store.put_app(App("api"))
    store.add_instance(spec("w1", app="web"))
    with pytest.raises(Conflict):
        store.add_instance(spec("w1", app="api"))
    with pytest.raises(Conflict):
        store.add_instance(spec("w1", app="web"))
    assert [bare(i) for i in store.list_instances()] == [spec("w1", app="web")]


def test_instance_of_a_missing_app_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.add_instance(spec("w1", app="ghost"))
    assert store.list_instances() == []


def test_update_set_desired_and_delete(store: Store) -> None:
    store.put_app(App("web"))
    store.add_instance(spec("w1"))
    store.update_instance(spec("w1", cwd="/tmp", kind=Kind.CELERY))
    assert bare(store.get_instance("w1")) == spec("w1", cwd="/tmp", kind=Kind.CELERY)
    store.set_desired("w1", Desired.STOPPED)
    got = store.get_instance("w1")
    assert got is not None and got.desired == Desired.STOPPED and got.cwd == "/tmp"
    with pytest.raises(NotFound):
        store.update_instance(spec("ghost"))
    with pytest.raises(NotFound):
        store.set_desired("ghost", Desired.RUNNING)
    assert store.delete_instance("w1") is True
    assert store.delete_instance("w1") is False
    assert store.get_instance("w1") is None


def test_delete_app_cascades_to_its_instances(store: Store) -> None:
    store.put_app(App("web"))
    store.put_app(App("api"))
    store.add_instance(spec("w1", app="web"))
    store.add_instance(spec("w2", app="web"))
    store.add_instance(spec("a1", app="api"))
    store.save_runtime("w1", Runtime(state=State.RUNNING, pid=5))
    assert store.delete_app("web") is True
    assert store.delete_app("web") is False
    assert [i.name for i in store.list_instances()] == ["a1"]
    assert set(store.runtimes()) == {"a1"}
    store.add_instance(spec("w1", app="api"))  # the name is free again


def test_runtime_round_trip(open_store: OpenStore) -> None:
    s = open_store()
    s.put_app(App("web"))
    s.add_instance(spec("w1"))
    s.add_instance(spec("w2"))
    assert s.load_runtime("w1") == Runtime()
    rt = Runtime(
        state=State.EXITED,
        pid=4242,
        create_time=1700000001.5,
        started_at=1700000002.0,
        restarts=3,
        exit_code=-9,
        stop_step=StopStep.KILL,
        reason="stopwaitsecs ran out",
    )
    s.save_runtime("w1", rt)
    s.update_instance(spec("w1", cwd="/x"))  # a spec change leaves the runtime alone
    s.close()
    s = open_store()
    assert s.load_runtime("w1") == rt
    assert s.runtimes() == {"w1": rt, "w2": Runtime()}
    assert s.load_runtime("ghost") == Runtime()
    with pytest.raises(NotFound):
        s.save_runtime("ghost", rt)


def test_branch_id_is_generated_once_and_kept(open_store: OpenStore) -> None:
    s = open_store()
    bid = s.branch_id()
    assert len(bid) == 32 and bid == s.branch_id()
    s.close()
    assert open_store().branch_id() == bid


def test_migrations_bring_a_version_0_file_to_current(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    sqlite3.connect(db_path).close()  # an empty database: user_version 0
    with Store(db_path) as s:
        s.put_app(App("web"))
        s.add_instance(spec("w1"))
    with closing(sqlite3.connect(db_path)) as db, db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(store_mod.MIGRATIONS)


def test_a_failed_migration_rolls_back_alone(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(db_path).close()
    current = len(store_mod.MIGRATIONS)
    bad = "CREATE TABLE extra (x INTEGER); INSERT INTO nowhere VALUES (1);"
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, bad])
    with pytest.raises(StoreError, match="migration"):
        Store(db_path)
    with closing(sqlite3.connect(db_path)) as db, db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == current
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        assert "extra" not in tables


def test_a_newer_database_is_refused(db_path: Path) -> None:
    Store(db_path).close()
    with closing(sqlite3.connect(db_path)) as db, db:
        db.execute(f"PRAGMA user_version = {len(store_mod.MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer"):
        Store(db_path)


def test_a_file_that_is_not_a_database_is_a_store_error(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError):
        Store(db_path)


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from branchd.model import App, InstanceSpec
    from branchd.store import Store

    s = Store(Path(sys.argv[1]))
    s.put_app(App("web"))
    for i in range(int(sys.argv[2])):
        s.add_instance(InstanceSpec(app="web", name=f"w{i}", command=("x",), branch="b"))
        print("done", flush=True)
    """
)


@pytest.mark.parametrize("k", [1, 40])
def test_acknowledged_writes_survive_kill_9(db_path: Path, k: int) -> None:
    n = 10_000  # far more than k: the child is still writing when it is killed
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db_path), str(n)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        for _ in range(k):
            assert child.stdout.readline() == "done\n"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        child.kill()
        if child.stdout is not None:
            child.stdout.close()
        child.wait()
    with Store(db_path) as s:
        names = {i.name for i in s.list_instances()}
    assert {f"w{i}" for i in range(k)} <= names
    assert len(names) < n
    with closing(sqlite3.connect(db_path)) as db, db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_celery_settings_and_queues_round_trip(open_store: OpenStore) -> None:
    from branchd.model import Autoscale, CelerySettings

    s = open_store()
    celery = CelerySettings(
        broker="amqp://guest:guest@127.0.0.1:5672//",
        celery_app="shop.tasks",
        pool="solo",
        args=("--max-tasks-per-child", "10"),
        autoscale=Autoscale(1, 4),
    )
    s.put_app(App(name="shop", celery=celery))
    assert s.put_queue(Queue("shop", "images", "media", "topic", "image.#", {"durable": True}))
    assert not s.put_queue(Queue("shop", "images", "media", "topic", "image.*"))
    s.put_queue(Queue("shop", "default"))
    s.add_instance(spec("w1", app="shop", queues=("default", "images"), autoscale=Autoscale(2, 8)))
    s.close()

    s = open_store()
    app = s.get_app("shop")
    assert app is not None and app.celery == celery
    assert [q.name for q in s.list_queues("shop")] == ["default", "images"]
    images = s.get_queue("shop", "images")
    assert images is not None and images.routing_key == "image.*" and images.options == {}
    w1 = s.get_instance("w1")
    assert w1 is not None and w1.queues == ("default", "images")
    assert w1.autoscale == Autoscale(2, 8)
    assert s.delete_queue("shop", "default") and not s.delete_queue("shop", "default")
    s.delete_app("shop")
    assert s.list_queues("shop") == []
    with pytest.raises(NotFound):
        s.put_queue(Queue("nope", "q"))


def test_every_local_write_stamps_a_newer_version_and_keeps_the_origin(
    open_store: OpenStore,
) -> None:
    s = open_store()
    me = s.branch_id()
    seen: list[Version] = []

    def version(record: App | Queue | InstanceSpec | None) -> Version:
        assert record is not None and record.version is not None
        assert record.origin == me and record.version.branch == me
        assert not seen or record.version > seen[-1]
        seen.append(record.version)
        return record.version

    s.put_app(App("web"))
    version(s.get_app("web"))
    s.put_app(App("web", env={"A": "1"}))
    version(s.get_app("web"))
    s.put_queue(Queue("web", "q"))
    version(s.get_queue("web", "q"))
    added = s.add_instance(spec("w1"))
    assert added == s.get_instance("w1")  # answered as stored
    version(added)
    s.update_instance(spec("w1", cwd="/x"))
    version(s.get_instance("w1"))
    s.set_desired("w1", Desired.STOPPED)
    version(s.get_instance("w1"))
    s.close()
    s = open_store()
    s.put_queue(Queue("web", "q", exchange="x"))
    version(s.get_queue("web", "q"))


def test_a_delete_leaves_a_tombstone_and_a_recreate_is_newer(store: Store) -> None:
    store.put_app(App("web"))
    store.add_instance(spec("w1"))
    store.save_runtime("w1", Runtime(state=State.RUNNING, pid=5))
    live = store.get_instance("w1")
    assert live is not None and live.version is not None
    assert store.tombstone("instance", "w1") is None
    assert store.delete_instance("w1") is True
    tomb = store.tombstone("instance", "w1")
    assert tomb is not None and tomb > live.version
    assert store.get_instance("w1") is None and store.list_instances() == []
    assert store.runtimes() == {} and store.load_runtime("w1") == Runtime()
    with pytest.raises(NotFound):
        store.set_desired("w1", Desired.RUNNING)
    with pytest.raises(NotFound):
        store.save_runtime("w1", Runtime())
    again = store.add_instance(spec("w1"))
    assert again.version is not None and again.version > tomb
    assert store.load_runtime("w1") == Runtime()  # the old runtime went with the tombstone
    assert store.tombstone("instance", "w1") is None


def test_an_app_delete_leaves_tombstones_of_its_instances_and_queues(store: Store) -> None:
    store.put_app(App("web", created_at=5.0))
    store.put_queue(Queue("web", "q"))
    store.add_instance(spec("w1"))
    store.delete_app("web")
    app_tomb = store.tombstone("app", "web")
    queue_tomb = store.tombstone("queue", "web", "q")
    instance_tomb = store.tombstone("instance", "w1")
    assert app_tomb and queue_tomb and instance_tomb
    assert store.get_queue("web", "q") is None and store.list_queues("web") == []
    with pytest.raises(NotFound):
        store.put_queue(Queue("web", "q"))
    assert store.put_app(App("web")) is True  # declared again: a new record
    web = store.get_app("web")
    assert web is not None and web.version is not None and web.version > app_tomb
    assert web.created_at != 5.0
    assert store.list_instances() == [] and store.list_queues("web") == []
    assert store.put_queue(Queue("web", "q")) is True


def test_versions_move_forwards_over_a_restart_with_the_clock_set_back(db_path: Path) -> None:
    ahead = FakeClock(start=0.0, wall_offset=2_000_000_000.0)
    with Store(db_path, ahead) as s:
        s.put_app(App("web"))
        first = s.get_app("web")
    behind = FakeClock(start=0.0, wall_offset=1_000_000_000.0)  # NTP stepped back
    with Store(db_path, behind) as s:
        s.put_app(App("web", env={"A": "1"}))
        second = s.get_app("web")
    assert first is not None and second is not None
    assert first.version is not None and second.version is not None
    assert second.version > first.version
