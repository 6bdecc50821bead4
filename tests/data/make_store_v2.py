"""Makes store_v2.sql: a populated state database of the schema-2 release.

Run once, with the code of that release (main at e69917a, where
``store.MIGRATIONS`` has 2 entries), from the repository root:

    python tests/data/make_store_v2.py tests/data/store_v2.sql

The dump is committed and never remade: tests/unit/test_store_migration.py
opens it with today's Store to prove that every record of a database made by
that release survives the migrations. Every value is fixed (no clock, no
random id) so that the dump says exactly what the test checks.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
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


def populate(store: Store) -> None:
    with store._write() as db:  # the branch id a daemon of that release made
        db.execute("INSERT INTO meta (key, value) VALUES ('branch_id', ?)", (BRANCH,))
    store.put_app(App("plain", env={"A": "1"}, defaults={"startsecs": 2}, created_at=1000.5))
    store.put_app(
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
        )
    )
    store.put_app(App("gone", created_at=3000.0))  # being removed: a mark below
    store.put_queue(Queue("shop", "default"))
    store.put_queue(Queue("shop", "images", "media", "topic", "image.#", {"durable": True}))
    store.add_instance(
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
        )
    )
    store.add_instance(
        InstanceSpec(app="plain", name="p2", command=("true",), branch=BRANCH, created_at=1002.0)
    )
    store.add_instance(
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
        )
    )
    store.add_instance(
        InstanceSpec(
            app="shop",
            name="w2",
            command=(),
            branch=BRANCH,
            kind=Kind.CELERY,
            created_at=2002.0,
            queues=("default",),
            concurrency=3,
        )
    )
    store.add_instance(
        InstanceSpec(
            app="gone", name="g1", command=("sleep", "1"), branch=BRANCH, created_at=3001.0
        )
    )
    store.set_desired("g1", Desired.REMOVED)
    store.save_runtime(
        "p2",
        Runtime(
            state=State.EXITED,
            pid=4242,
            create_time=1700000001.5,
            started_at=1700000002.0,
            restarts=3,
            exit_code=-9,
            stop_step=StopStep.KILL,
            reason="stopwaitsecs ran out",
        ),
    )
    store.save_runtime(
        "w1", Runtime(state=State.RUNNING, pid=777, create_time=1.25, started_at=2.5)
    )
    store.set_mark("removing_app:gone", True)


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
