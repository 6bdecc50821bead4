"""SQLite persistence of the declared state (apps, instances) and of runtime facts.

Synchronous ``sqlite3`` on purpose: it is called from the asyncio loop, and the
writes are a few small rows, well under a millisecond in WAL mode. Every write
method commits before it returns, so what the API acknowledged survives a
crash of the daemon.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from branchd.errors import Conflict, NotFound, StoreError
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

#: Schema scripts; ``PRAGMA user_version`` is how many have been applied.
#: Append only: never edit a released entry.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE apps (
        name TEXT PRIMARY KEY,
        env TEXT NOT NULL,            -- JSON object
        defaults TEXT NOT NULL,       -- JSON object
        created_at REAL NOT NULL
    );
    -- Instance names are unique on the branch, across apps.
    CREATE TABLE instances (
        name TEXT PRIMARY KEY,
        app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
        spec TEXT NOT NULL,           -- JSON of spec_to_dict() without "desired"
        desired TEXT NOT NULL,
        -- Runtime; the defaults are those of model.Runtime().
        state TEXT NOT NULL DEFAULT 'stopped',
        pid INTEGER,
        create_time REAL,
        started_at REAL,
        restarts INTEGER NOT NULL DEFAULT 0,
        exit_code INTEGER,
        stop_step TEXT,
        reason TEXT
    );
    CREATE INDEX instances_by_app ON instances(app, name);
    """,
    # 2: Celery apps and their queue declarations.
    """
    ALTER TABLE apps ADD COLUMN celery TEXT NOT NULL DEFAULT '{}';  -- JSON of CelerySettings
    CREATE TABLE queues (
        app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        exchange TEXT,
        exchange_type TEXT NOT NULL,
        routing_key TEXT,
        options TEXT NOT NULL,        -- JSON object
        PRIMARY KEY (app, name)
    );
    """,
]

_QUEUE_COLUMNS = "app, name, exchange, exchange_type, routing_key, options"
_RUNTIME_COLUMNS = "state, pid, create_time, started_at, restarts, exit_code, stop_step, reason"


def spec_to_dict(spec: InstanceSpec) -> dict[str, Any]:
    """Every field of ``spec`` as JSON-ready data (enums as str, tuples as lists)."""
    p = spec.policy
    return {
        "app": spec.app,
        "name": spec.name,
        "command": list(spec.command),
        "branch": spec.branch,
        "kind": spec.kind.value,
        "env": dict(spec.env),
        "cwd": spec.cwd,
        "user": spec.user,
        "policy": {
            "autorestart": p.autorestart.value,
            "exitcodes": list(p.exitcodes),
            "startsecs": p.startsecs,
            "startretries": p.startretries,
            "stopsignal": p.stopsignal,
            "stopwaitsecs": p.stopwaitsecs,
        },
        "autostart": spec.autostart,
        "desired": spec.desired.value,
        "log_max_bytes": spec.log_max_bytes,
        "log_backups": spec.log_backups,
        "created_at": spec.created_at,
        "queues": list(spec.queues),
        "autoscale": spec.autoscale.to_json() if spec.autoscale else None,
        "concurrency": spec.concurrency,
        "pool": spec.pool,
        "args": list(spec.args),
        "loglevel": spec.loglevel,
        "hung_after": spec.hung_after,
        "memory_limit": spec.memory_limit,
    }


def celery_to_dict(c: CelerySettings) -> dict[str, Any]:
    return {
        "broker": c.broker,
        "celery_app": c.celery_app,
        "python": c.python,
        "pool": c.pool,
        "args": list(c.args),
        "autoscale": c.autoscale.to_json() if c.autoscale else None,
        "mingle_gossip": c.mingle_gossip,
        "result_backend": c.result_backend,
    }


def celery_from_dict(d: dict[str, Any]) -> CelerySettings:
    kw = dict(d)
    if "args" in kw:
        kw["args"] = tuple(kw["args"])
    if kw.get("autoscale"):
        kw["autoscale"] = Autoscale(**kw["autoscale"])
    return CelerySettings(**kw)


def spec_from_dict(d: dict[str, Any]) -> InstanceSpec:
    """Inverse of :func:`spec_to_dict`; missing optional keys take the defaults.

    An unknown key raises ``TypeError`` (from the dataclass constructor).
    """
    kw = dict(d)
    kw["command"] = tuple(kw["command"])
    if "kind" in kw:
        kw["kind"] = Kind(kw["kind"])
    if "desired" in kw:
        kw["desired"] = Desired(kw["desired"])
    if "env" in kw:
        kw["env"] = dict(kw["env"])
    for key in ("queues", "args"):
        if key in kw:
            kw[key] = tuple(kw[key])
    if kw.get("autoscale"):
        kw["autoscale"] = Autoscale(**kw["autoscale"])
    if "policy" in kw:
        pol = dict(kw["policy"])
        if "autorestart" in pol:
            pol["autorestart"] = Autorestart(pol["autorestart"])
        if "exitcodes" in pol:
            pol["exitcodes"] = tuple(pol["exitcodes"])
        kw["policy"] = Policy(**pol)
    return InstanceSpec(**kw)


class Store:
    """The state database of one branch (one file, one connection)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        try:
            self._db.execute("PRAGMA busy_timeout = 5000")
            self._db.execute("PRAGMA journal_mode = WAL")
            # WAL + synchronous=NORMAL: a commit is in the WAL file (in the OS
            # page cache) when it returns, so a kill -9 of the process loses no
            # committed write; only a power loss or OS crash may drop the last
            # few commits (never corrupting the file). FULL would fsync on
            # every commit for that last case only.
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"cannot open state database {path}: {exc}") from exc
        except StoreError:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ------------------------------------------------------------

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self._version()
        if version > len(MIGRATIONS):
            raise StoreError(
                f"state database {self.path} has schema version {version}, newer than"
                f" this branchd knows ({len(MIGRATIONS)}); upgrade branchd"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # One transaction per migration: user_version lives in the file
            # header, so it commits (or rolls back) with the schema change.
            try:
                self._db.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
                )
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.rollback()
                raise StoreError(f"migration {number} of {self.path} failed: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken at once so that reads inside it are consistent."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db

    # -- meta --------------------------------------------------------------

    def branch_id(self) -> str:
        """This branch's id: generated on first use, then kept forever."""
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('branch_id', ?)",
                (uuid.uuid4().hex,),
            )
            row = db.execute("SELECT value FROM meta WHERE key = 'branch_id'").fetchone()
        return str(row[0])

    def set_mark(self, key: str, on: bool) -> None:
        """A durable note of work under way (``removing_app:<name>``), kept in meta."""
        with self._write() as db:
            if on:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, '1')", (key,))
            else:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def marks(self, prefix: str) -> list[str]:
        """The notes whose key starts with ``prefix``, without it."""
        rows = self._db.execute("SELECT key FROM meta ORDER BY key").fetchall()
        return [str(k)[len(prefix) :] for (k,) in rows if str(k).startswith(prefix)]

    # -- apps --------------------------------------------------------------

    def put_app(self, app: App) -> bool:
        """Create or replace ``app``; True if created. A replace keeps created_at
        and the app's instances. A created_at of 0 is stamped with the time now."""
        with self._write() as db:
            exists = db.execute("SELECT 1 FROM apps WHERE name = ?", (app.name,)).fetchone()
            if exists:
                db.execute(
                    "UPDATE apps SET env = ?, defaults = ?, celery = ? WHERE name = ?",
                    (
                        json.dumps(dict(app.env)),
                        json.dumps(dict(app.defaults)),
                        json.dumps(celery_to_dict(app.celery)),
                        app.name,
                    ),
                )
            else:
                db.execute(
                    "INSERT INTO apps (name, env, defaults, created_at, celery)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        app.name,
                        json.dumps(dict(app.env)),
                        json.dumps(dict(app.defaults)),
                        app.created_at or time.time(),
                        json.dumps(celery_to_dict(app.celery)),
                    ),
                )
        return not exists

    def get_app(self, name: str) -> App | None:
        row = self._db.execute(
            "SELECT name, env, defaults, created_at, celery FROM apps WHERE name = ?", (name,)
        ).fetchone()
        return _app(row) if row else None

    def list_apps(self) -> list[App]:
        rows = self._db.execute(
            "SELECT name, env, defaults, created_at, celery FROM apps ORDER BY name"
        ).fetchall()
        return [_app(row) for row in rows]

    def delete_app(self, name: str) -> bool:
        """Delete ``app`` and all its instances; False if there was no such app."""
        with self._write() as db:
            cur = db.execute("DELETE FROM apps WHERE name = ?", (name,))
        return cur.rowcount > 0

    # -- instances ---------------------------------------------------------

    def add_instance(self, spec: InstanceSpec) -> None:
        """Raises Conflict if the name is taken (in any app), NotFound if the app is not."""
        data = spec_to_dict(spec)
        del data["desired"]  # kept in its own column, changed by set_desired()
        with self._write() as db:
            if not db.execute("SELECT 1 FROM apps WHERE name = ?", (spec.app,)).fetchone():
                raise NotFound(f"no app named {spec.app!r}")
            taken = db.execute("SELECT app FROM instances WHERE name = ?", (spec.name,)).fetchone()
            if taken:
                raise Conflict(f"instance name {spec.name!r} is taken (app {taken[0]!r})")
            db.execute(
                "INSERT INTO instances (name, app, spec, desired) VALUES (?, ?, ?, ?)",
                (spec.name, spec.app, json.dumps(data), spec.desired.value),
            )

    def update_instance(self, spec: InstanceSpec) -> None:
        """Replace the spec of instance ``spec.name`` (runtime columns untouched)."""
        data = spec_to_dict(spec)
        del data["desired"]
        with self._write() as db:
            if not db.execute("SELECT 1 FROM apps WHERE name = ?", (spec.app,)).fetchone():
                raise NotFound(f"no app named {spec.app!r}")
            cur = db.execute(
                "UPDATE instances SET app = ?, spec = ?, desired = ? WHERE name = ?",
                (spec.app, json.dumps(data), spec.desired.value, spec.name),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no instance named {spec.name!r}")

    def get_instance(self, name: str) -> InstanceSpec | None:
        row = self._db.execute(
            "SELECT spec, desired FROM instances WHERE name = ?", (name,)
        ).fetchone()
        return _spec(row) if row else None

    def list_instances(self, app: str | None = None) -> list[InstanceSpec]:
        if app is None:
            rows = self._db.execute("SELECT spec, desired FROM instances ORDER BY app, name")
        else:
            rows = self._db.execute(
                "SELECT spec, desired FROM instances WHERE app = ? ORDER BY name", (app,)
            )
        return [_spec(row) for row in rows.fetchall()]

    def delete_instance(self, name: str) -> bool:
        with self._write() as db:
            cur = db.execute("DELETE FROM instances WHERE name = ?", (name,))
        return cur.rowcount > 0

    def set_desired(self, name: str, desired: Desired) -> None:
        with self._write() as db:
            cur = db.execute(
                "UPDATE instances SET desired = ? WHERE name = ?", (desired.value, name)
            )
            if cur.rowcount == 0:
                raise NotFound(f"no instance named {name!r}")

    # -- queues ------------------------------------------------------------

    def put_queue(self, queue: Queue) -> bool:
        """Create or replace a queue declaration; True if created."""
        with self._write() as db:
            if not db.execute("SELECT 1 FROM apps WHERE name = ?", (queue.app,)).fetchone():
                raise NotFound(f"no app named {queue.app!r}")
            exists = db.execute(
                "SELECT 1 FROM queues WHERE app = ? AND name = ?", (queue.app, queue.name)
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO queues"
                " (app, name, exchange, exchange_type, routing_key, options)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    queue.app,
                    queue.name,
                    queue.exchange,
                    queue.exchange_type,
                    queue.routing_key,
                    json.dumps(dict(queue.options)),
                ),
            )
        return not exists

    def get_queue(self, app: str, name: str) -> Queue | None:
        row = self._db.execute(
            f"SELECT {_QUEUE_COLUMNS} FROM queues WHERE app = ? AND name = ?", (app, name)
        ).fetchone()
        return _queue(row) if row else None

    def list_queues(self, app: str) -> list[Queue]:
        rows = self._db.execute(
            f"SELECT {_QUEUE_COLUMNS} FROM queues WHERE app = ? ORDER BY name", (app,)
        )
        return [_queue(row) for row in rows.fetchall()]

    def delete_queue(self, app: str, name: str) -> bool:
        with self._write() as db:
            cur = db.execute("DELETE FROM queues WHERE app = ? AND name = ?", (app, name))
        return cur.rowcount > 0

    # -- runtime -----------------------------------------------------------

    def save_runtime(self, name: str, rt: Runtime) -> None:
        with self._write() as db:
            cur = db.execute(
                "UPDATE instances SET state = ?, pid = ?, create_time = ?, started_at = ?,"
                " restarts = ?, exit_code = ?, stop_step = ?, reason = ? WHERE name = ?",
                (
                    rt.state.value,
                    rt.pid,
                    rt.create_time,
                    rt.started_at,
                    rt.restarts,
                    rt.exit_code,
                    rt.stop_step.value if rt.stop_step else None,
                    rt.reason,
                    name,
                ),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no instance named {name!r}")

    def load_runtime(self, name: str) -> Runtime:
        """The last saved runtime of ``name``; ``Runtime()`` if never saved or unknown."""
        row = self._db.execute(
            f"SELECT {_RUNTIME_COLUMNS} FROM instances WHERE name = ?", (name,)
        ).fetchone()
        return _runtime(row) if row else Runtime()

    def runtimes(self) -> dict[str, Runtime]:
        rows = self._db.execute(f"SELECT name, {_RUNTIME_COLUMNS} FROM instances ORDER BY name")
        return {row[0]: _runtime(row[1:]) for row in rows.fetchall()}


def _app(row: tuple[Any, ...]) -> App:
    name, env, defaults, created_at, celery = row
    return App(
        name=name,
        env=json.loads(env),
        defaults=json.loads(defaults),
        created_at=created_at,
        celery=celery_from_dict(json.loads(celery)),
    )


def _queue(row: tuple[Any, ...]) -> Queue:
    app, name, exchange, exchange_type, routing_key, options = row
    return Queue(app, name, exchange, exchange_type, routing_key, json.loads(options))


def _spec(row: tuple[Any, ...]) -> InstanceSpec:
    data, desired = row
    return spec_from_dict({**json.loads(data), "desired": desired})


def _runtime(row: tuple[Any, ...]) -> Runtime:
    state, pid, create_time, started_at, restarts, exit_code, stop_step, reason = row
    return Runtime(
        state=State(state),
        pid=pid,
        create_time=create_time,
        started_at=started_at,
        restarts=restarts,
        exit_code=exit_code,
        stop_step=StopStep(stop_step) if stop_step else None,
        reason=reason,
    )
