"""Makes store_v2.sql: a populated state database of the schema-2 release.

Run with the code of that release (e69917a, where ``store.MIGRATIONS`` has
2 entries) first on the path, e.g. from an export of it:

    git archive e69917a | tar -x -C /tmp/v2 && cp tests/data/make_store_v2.py /tmp/v2/
    cd /tmp/v2 && python make_store_v2.py store_v2.sql

The dump is committed and never remade: tests/unit/test_store_migration.py
opens it with today's Store to prove that every record of a database made by
that release survives the migrations. Every value is fixed (no clock, no
random id) so that the dump says exactly what the test checks.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from branchd.model import (
    App,
    Autorestart,
    Autoscale,
    CelerySettings,
    Desired,
    InstanceSpec,
    Kind,
    Policy,
    Queue,
    Runtime,
    State,
    StopStep,
)
from branchd.store import MIGRATIONS, Store

BRANCH = "0123456789abcdef0123456789abcdef"


#: What the database holds, as the records the schema-2 release stored (the
#: migration test compares what it reads back with these).
APPS = [
    App("plain", env={"A": "1"}, defaults={"startsecs": 2}, created_at=1000.5),
    App(
        "shop",
        env={"DJANGO_SETTINGS_MODULE": "shop.settings"},
        defaults={"queues": ["default"], "loglevel": "DEBUG"},
        created_at=2000.25,
        celery=CelerySettings(
            broker="amqp://guest:guest@127.0.0.1:5672//",
            celery_app="shop.tasks",
            python="/srv/venv/bin/python",
            pool="solo",
            args=("--max-tasks-per-child", "10"),
            autoscale=Autoscale(1, 4),
            mingle_gossip=True,
            result_backend="redis://127.0.0.1:6379/1",
        ),
    ),
    App("gone", created_at=3000.0),  # being removed: see MARKS
]
QUEUES = [
    Queue("shop", "default"),
    Queue("shop", "images", "media", "topic", "image.#", {"durable": True}),
]
INSTANCES = [
    InstanceSpec(
        app="plain",
        name="p1",
        command=("sleep", "60"),
        branch=BRANCH,
        env={"B": "two"},
        cwd="/tmp",
        user="nobody",
        policy=Policy(
            autorestart=Autorestart.ALWAYS,
            exitcodes=(0, 2),
            startsecs=0.5,
            startretries=7,
            stopsignal="INT",
            stopwaitsecs=20.0,
        ),
        autostart=False,
        desired=Desired.STOPPED,
        log_max_bytes=1234,
        log_backups=2,
        created_at=1001.0,
    ),
    InstanceSpec(app="plain", name="p2", command=("true",), branch=BRANCH, created_at=1002.0),
    InstanceSpec(
        app="shop",
        name="w1",
        command=(),
        branch=BRANCH,
        kind=Kind.CELERY,
        policy=Policy(startsecs=30.0, stopwaitsecs=600.0),
        created_at=2001.0,
        queues=("default", "images"),
        autoscale=Autoscale(2, 8),
        pool="threads",
        args=("-E",),
        loglevel="WARNING",
        hung_after=90.0,
        memory_limit=512 * 1024 * 1024,
    ),
    InstanceSpec(
        app="shop",
        name="w2",
        command=(),
        branch=BRANCH,
        kind=Kind.CELERY,
        created_at=2002.0,
        queues=("default",),
        concurrency=3,
    ),
    # A delete under way (desired "removed", set after the add).
    InstanceSpec(
        app="gone",
        name="g1",
        command=("sleep", "1"),
        branch=BRANCH,
        created_at=3001.0,
        desired=Desired.REMOVED,
    ),
]
RUNTIMES = {
    "p2": Runtime(
        state=State.EXITED,
        pid=4242,
        create_time=1700000001.5,
        started_at=1700000002.0,
        restarts=3,
        exit_code=-9,
        stop_step=StopStep.KILL,
        reason="stopwaitsecs ran out",
    ),
    "w1": Runtime(state=State.RUNNING, pid=777, create_time=1.25, started_at=2.5),
}
MARKS = ["removing_app:gone"]


def populate(store: Store) -> None:
    with store._write() as db:  # the branch id a daemon of that release made
        db.execute("INSERT INTO meta (key, value) VALUES ('branch_id', ?)", (BRANCH,))
    for app in APPS:
        store.put_app(app)
    for queue in QUEUES:
        store.put_queue(queue)
    for spec in INSTANCES:
        store.add_instance(
            replace(spec, desired=Desired.RUNNING) if spec.desired == Desired.REMOVED else spec
        )
        if spec.desired == Desired.REMOVED:
            store.set_desired(spec.name, spec.desired)
    for name, rt in RUNTIMES.items():
        store.save_runtime(name, rt)
    for mark in MARKS:
        store.set_mark(mark, True)


def main(out: Path) -> None:
    assert len(MIGRATIONS) == 2, "run with the code of the schema-2 release"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "branchd.db"
        with Store(path) as store:
            populate(store)
        db = sqlite3.connect(path)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            lines = [f"PRAGMA user_version = {version};", *db.iterdump()]
        finally:
            db.close()
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
