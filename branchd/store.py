"""SQLite persistence of the declared state (apps, instances) and of runtime facts.

Synchronous ``sqlite3`` on purpose: it is called from the asyncio loop, and the
writes are a few small rows, well under a millisecond in WAL mode. Every write
method commits before it returns, so what the API acknowledged survives a
crash of the daemon.

Declarations are versioned records (issue 10, part 3): a row holds the
record's wire form (``to_wire()`` of the model, the one encoding the API and
the gossip use too), the version of its last write (``hlc.Version``) and the
branch where it was declared. A delete leaves a tombstone (``deleted = 1``,
with the delete's version), so that a branch that still has the record can
be told it is gone rather than give it back; reads skip tombstones.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from branchd.clock import Clock, SystemClock
from branchd.errors import (
    Conflict,
    NotFound,
    StorageFull,
    StorageUnavailable,
    StoreError,
)
from branchd.hlc import HybridClock, Version
from branchd.model import (
    RECORD_KEYS,
    App,
    Desired,
    InstanceSpec,
    Queue,
    Runtime,
    State,
    StopStep,
)
from branchd.replication import KEYS, Outcome, Record, Stamp, decide, digest

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
    # 3: declarations become versioned records with tombstones. Each table is
    # rebuilt (SQLite's way to change columns) around one JSON column holding
    # the record's wire form. No foreign keys any more: a tombstone keeps its
    # row, so nothing cascades, and records from other branches will arrive in
    # any order (a queue before its app); the store checks for a live app on
    # a local write instead. The rows of the older release get the version of
    # this migration and this branch as origin.
    """
    INSERT OR IGNORE INTO meta (key, value) VALUES ('branch_id', lower(hex(randomblob(16))));
    CREATE TEMP TABLE migration_3 AS SELECT
        printf('%012x.%04x.%s', CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
               0, value) AS version,
        value AS origin
        FROM meta WHERE key = 'branch_id';
    CREATE TABLE apps_v3 (
        name TEXT PRIMARY KEY,
        record TEXT NOT NULL,         -- JSON of App.to_wire() without version, origin
        version TEXT NOT NULL,        -- hlc.Version.to_wire() of the last write
        origin TEXT NOT NULL,         -- the branch where it was declared
        deleted INTEGER NOT NULL DEFAULT 0  -- 1: a tombstone
    );
    -- (json_patch leaves out the settings that were null: from_wire reads a
    -- missing key as the field's default, None for each of them.)
    INSERT INTO apps_v3 (name, record, version, origin)
        SELECT name,
            json_patch(json_object('name', name, 'env', json(env), 'defaults', json(defaults),
                                   'created_at', created_at), celery),
            (SELECT version FROM migration_3), (SELECT origin FROM migration_3)
        FROM apps;
    CREATE TABLE queues_v3 (
        app TEXT NOT NULL,
        name TEXT NOT NULL,
        record TEXT NOT NULL,         -- JSON of Queue.to_wire() without version, origin
        version TEXT NOT NULL,
        origin TEXT NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (app, name)
    );
    INSERT INTO queues_v3 (app, name, record, version, origin)
        SELECT app, name,
            json_object('app', app, 'name', name, 'exchange', exchange,
                        'exchange_type', exchange_type, 'routing_key', routing_key,
                        'options', json(options)),
            (SELECT version FROM migration_3), (SELECT origin FROM migration_3)
        FROM queues;
    -- Instance names are unique on the branch, across apps (tombstones included:
    -- a name's one row says what became of it).
    CREATE TABLE instances_v3 (
        name TEXT PRIMARY KEY,
        app TEXT NOT NULL,
        record TEXT NOT NULL,         -- JSON of InstanceSpec.to_wire() without version, origin
        version TEXT NOT NULL,
        origin TEXT NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
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
    -- The old spec JSON nests the policy and keeps "desired" in a column; the
    -- wire form is flat and holds it.
    INSERT INTO instances_v3 (name, app, record, version, origin, state, pid, create_time,
                              started_at, restarts, exit_code, stop_step, reason)
        SELECT name, app,
            json_set(json_remove(json_patch(spec, coalesce(json_extract(spec, '$.policy'), '{}')),
                                 '$.policy'),
                     '$.desired', desired),
            (SELECT version FROM migration_3), (SELECT origin FROM migration_3),
            state, pid, create_time, started_at, restarts, exit_code, stop_step, reason
        FROM instances;
    DROP TABLE migration_3;
    -- Children first: dropping apps deletes its rows, which would cascade.
    DROP TABLE instances;
    DROP TABLE queues;
    DROP TABLE apps;
    ALTER TABLE apps_v3 RENAME TO apps;
    ALTER TABLE queues_v3 RENAME TO queues;
    ALTER TABLE instances_v3 RENAME TO instances;
    CREATE INDEX instances_by_app ON instances(app, name);
    """,
    # 4: the machine's start budget and backoff survive a daemon restart (a
    # restart once reset both, and a crash-looping instance never went fatal).
    """
    ALTER TABLE instances ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE instances ADD COLUMN backoff_until REAL;  -- wall clock
    """,
]

_RUNTIME_COLUMNS = (
    "state, pid, create_time, started_at, restarts, exit_code, stop_step, reason,"
    " retries, backoff_until"
)
_RECORD_COLUMNS = "record, version, origin"
_LIVE = "deleted = 0"


def _record_json(wire: dict[str, Any]) -> str:
    """A record's wire form as stored: version and origin have their own columns."""
    return json.dumps({k: v for k, v in wire.items() if k not in RECORD_KEYS})


def _wire(row: tuple[Any, ...]) -> dict[str, Any]:
    record, version, origin = row
    return {**json.loads(record), "version": version, "origin": origin}


class Store:
    """The state database of one branch (one file, one connection).

    ``clock`` is the wall-time source of the branch's hybrid logical clock,
    which stamps every local write of a declaration; the store builds the HLC
    itself because what it must start past (the greatest stored version, so a
    clock that went back over a restart still moves forwards) and the branch id
    are both in the file.
    """

    def __init__(self, path: Path, clock: Clock | None = None) -> None:
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
            self._clock = clock or SystemClock()
            self.hlc = HybridClock(self._clock, self.branch_id(), self._greatest_version())
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

    def _greatest_version(self) -> Version | None:
        # The wire forms sort as the versions do.
        row = self._db.execute(
            "SELECT max(version) FROM (SELECT version FROM apps UNION ALL"
            " SELECT version FROM queues UNION ALL SELECT version FROM instances)"
        ).fetchone()
        return Version.from_wire(row[0]) if row[0] else None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken at once so that reads inside it are consistent.

        A write the database cannot take (a full disk, an I/O error) raises
        ``StorageFull`` or ``StorageUnavailable``, never sqlite's own error:
        the caller decides what is still done without the record.
        """
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
        except sqlite3.OperationalError as exc:
            raise storage_failure(exc) from exc

    # -- meta --------------------------------------------------------------

    def branch_id(self) -> str:
        """This branch's id: generated once (with the database), then kept forever."""
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

    # -- records -----------------------------------------------------------

    def _stamp(self, row: tuple[Any, ...] | None) -> tuple[str, str]:
        """(version, origin) of a local write over ``row`` (its origin, deleted)
        of the same key: a live record keeps its origin, a new one (or one
        declared again after a delete) is ours."""
        origin = row[0] if row is not None and not row[1] else self.hlc.branch
        return self.hlc.now().to_wire(), origin

    def _live_app(self, db: sqlite3.Connection, name: str) -> None:
        if not db.execute(f"SELECT 1 FROM apps WHERE name = ? AND {_LIVE}", (name,)).fetchone():
            raise NotFound(f"no app named {name!r}")

    def tombstone(self, kind: str, *key: str) -> Version | None:
        """The version of the delete of record ``key`` (``"app", name``;
        ``"queue", app, name``; ``"instance", name``); None if it is not deleted."""
        table, where = {
            "app": ("apps", "name = ?"),
            "queue": ("queues", "app = ? AND name = ?"),
            "instance": ("instances", "name = ?"),
        }[kind]
        row = self._db.execute(
            f"SELECT version FROM {table} WHERE {where} AND deleted = 1", key
        ).fetchone()
        return Version.from_wire(row[0]) if row else None

    # -- apps --------------------------------------------------------------

    def put_app(self, app: App) -> bool:
        """Create or replace ``app``; True if created. A replace keeps created_at
        and the app's instances. A created_at of 0 is stamped with the time now."""
        with self._write() as db:
            row = db.execute(
                "SELECT origin, deleted, record FROM apps WHERE name = ?", (app.name,)
            ).fetchone()
            created = row is None or bool(row[1])
            version, origin = self._stamp(row)
            wire = app.to_wire()
            if not created:
                wire["created_at"] = json.loads(row[2])["created_at"]
            elif not wire["created_at"]:
                wire["created_at"] = self._clock.wall()
            db.execute(
                "INSERT OR REPLACE INTO apps (name, record, version, origin, deleted)"
                " VALUES (?, ?, ?, ?, 0)",
                (app.name, _record_json(wire), version, origin),
            )
        return created

    def get_app(self, name: str) -> App | None:
        row = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM apps WHERE name = ? AND {_LIVE}", (name,)
        ).fetchone()
        return App.from_wire(_wire(row)) if row else None

    def list_apps(self) -> list[App]:
        rows = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM apps WHERE {_LIVE} ORDER BY name"
        ).fetchall()
        return [App.from_wire(_wire(row)) for row in rows]

    def delete_app(self, name: str, version: Version | None = None) -> bool:
        """Delete ``app`` and all its instances and queues (each leaves its
        tombstone); False if there was no such app.

        ``version``: the delete was another branch's, and its tombstone keeps
        that version (a fresh one here would be a later write, and would undo
        a declaration made again in between); nothing is done if ours is as
        new. The queues are then left alone: the deleting branch's tombstones
        of them come as records of their own (tombstoned here too, they
        would be other writes, and the branches would differ on them)."""
        with self._write() as db:
            row = db.execute(
                f"SELECT version FROM apps WHERE name = ? AND {_LIVE}", (name,)
            ).fetchone()
            given = version.to_wire() if version is not None else None
            if row is None or (given is not None and row[0] >= given):
                return False

            def stamp() -> str:
                return given if given is not None else self.hlc.now().to_wire()

            for (instance,) in db.execute(
                f"SELECT name FROM instances WHERE app = ? AND {_LIVE}", (name,)
            ).fetchall():
                db.execute(
                    "UPDATE instances SET deleted = 1, version = ? WHERE name = ?",
                    (stamp(), instance),
                )
            for (queue,) in db.execute(
                f"SELECT name FROM queues WHERE app = ? AND {_LIVE}", (name,)
            ).fetchall():
                if given is None:
                    db.execute(
                        "UPDATE queues SET deleted = 1, version = ? WHERE app = ? AND name = ?",
                        (stamp(), name, queue),
                    )
            db.execute(
                "UPDATE apps SET deleted = 1, version = ? WHERE name = ?", (stamp(), name)
            )
        return True

    # -- replication (branchd/replication.py) --------------------------------

    def declaration_records(self, app: str | None = None) -> list[Record]:
        """Every app and queue declaration, tombstones included (of ``app`` alone
        if given: it and its queues), as the branches exchange them."""
        where, args = ("WHERE name = ?", (app,)) if app is not None else ("", ())
        out = [
            Record("app", _wire(row[:3]), bool(row[3]))
            for row in self._db.execute(
                f"SELECT {_RECORD_COLUMNS}, deleted FROM apps {where} ORDER BY name", args
            ).fetchall()
        ]
        where = "WHERE app = ?" if app is not None else ""
        out += [
            Record("queue", _wire(row[:3]), bool(row[3]))
            for row in self._db.execute(
                f"SELECT {_RECORD_COLUMNS}, deleted FROM queues {where} ORDER BY app, name", args
            ).fetchall()
        ]
        return out

    def declaration_digest(self) -> str:
        """``replication.digest`` of every declaration: equal on two branches
        that hold the same writes."""
        rows = [
            ("app", (name,), version, deleted)
            for name, version, deleted in self._db.execute(
                "SELECT name, version, deleted FROM apps"
            ).fetchall()
        ] + [
            ("queue", (app, name), version, deleted)
            for app, name, version, deleted in self._db.execute(
                "SELECT app, name, version, deleted FROM queues"
            ).fetchall()
        ]
        return digest((k, key, Version.from_wire(v), bool(d)) for k, key, v, d in rows)

    def stamp_of(self, kind: str, key: tuple[str, ...]) -> Stamp | None:
        """The version of our copy of a declaration, and whether it is a delete."""
        table = {"app": "apps", "queue": "queues"}[kind]
        where = " AND ".join(f"{k} = ?" for k in KEYS[kind])
        row = self._db.execute(
            f"SELECT version, deleted FROM {table} WHERE {where}", key
        ).fetchone()
        return Stamp(Version.from_wire(row[0]), bool(row[1])) if row else None

    def apply_remote(self, record: Record) -> bool:
        """Write another branch's copy as it is (its version, its origin: never
        stamped again here) if it is newer than ours; True if written. The
        hybrid clock moves past its version either way, so a later local
        write is a later version. Nothing cascades: a queue may come before
        its app, and an app's queues come as records of their own."""
        self.hlc.observe(record.version)
        table = {"app": "apps", "queue": "queues"}[record.kind]
        cols = ", ".join(KEYS[record.kind])
        marks = ", ".join("?" for _ in KEYS[record.kind])
        body = dict(record.body)
        with self._write() as db:
            if decide(self.stamp_of(record.kind, record.key), record.stamp) is Outcome.KEEP:
                return False
            db.execute(
                f"INSERT OR REPLACE INTO {table} ({cols}, record, version, origin, deleted)"
                f" VALUES ({marks}, ?, ?, ?, ?)",
                (
                    *record.key,
                    _record_json(body),
                    str(body["version"]),
                    str(body["origin"]),
                    int(record.deleted),
                ),
            )
        return True

    def purge_tombstones(self, before_ms: int) -> int:
        """Forget the deletes of declarations older than ``before_ms`` (wall
        milliseconds of their version); how many went."""
        bound = f"{max(before_ms, 0):012x}"
        gone = 0
        with self._write() as db:
            for table in ("apps", "queues"):
                gone += db.execute(
                    f"DELETE FROM {table} WHERE deleted = 1 AND version < ?", (bound,)
                ).rowcount
        return gone

    # -- instances ---------------------------------------------------------

    def add_instance(self, spec: InstanceSpec) -> InstanceSpec:
        """Raises Conflict if the name is taken (in any app), NotFound if the app is not.
        Answers the record as stored (with its version and origin)."""
        with self._write() as db:
            self._live_app(db, spec.app)
            row = db.execute(
                "SELECT origin, deleted, app FROM instances WHERE name = ?", (spec.name,)
            ).fetchone()
            if row is not None and not row[1]:
                raise Conflict(f"instance name {spec.name!r} is taken (app {row[2]!r})")
            version, origin = self._stamp(row)
            # A replace: a tombstone of this name goes, with its runtime.
            db.execute(
                "INSERT OR REPLACE INTO instances (name, app, record, version, origin, deleted)"
                " VALUES (?, ?, ?, ?, ?, 0)",
                (spec.name, spec.app, _record_json(spec.to_wire()), version, origin),
            )
        return replace(spec, version=Version.from_wire(version), origin=origin)

    def update_instance(self, spec: InstanceSpec) -> InstanceSpec:
        """Replace the spec of instance ``spec.name`` (runtime columns untouched)."""
        with self._write() as db:
            self._live_app(db, spec.app)
            return self._update(db, spec)

    def _update(self, db: sqlite3.Connection, spec: InstanceSpec) -> InstanceSpec:
        row = db.execute(
            f"SELECT origin, deleted FROM instances WHERE name = ? AND {_LIVE}", (spec.name,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no instance named {spec.name!r}")
        version, origin = self._stamp(row)
        db.execute(
            "UPDATE instances SET app = ?, record = ?, version = ? WHERE name = ?",
            (spec.app, _record_json(spec.to_wire()), version, spec.name),
        )
        return replace(spec, version=Version.from_wire(version), origin=origin)

    def get_instance(self, name: str) -> InstanceSpec | None:
        row = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM instances WHERE name = ? AND {_LIVE}", (name,)
        ).fetchone()
        return InstanceSpec.from_wire(_wire(row)) if row else None

    def list_instances(self, app: str | None = None) -> list[InstanceSpec]:
        if app is None:
            rows = self._db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM instances WHERE {_LIVE} ORDER BY app, name"
            )
        else:
            rows = self._db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM instances WHERE app = ? AND {_LIVE} ORDER BY name",
                (app,),
            )
        return [InstanceSpec.from_wire(_wire(row)) for row in rows.fetchall()]

    def delete_instance(self, name: str) -> bool:
        """Leaves the instance's tombstone; False if there was no such instance."""
        with self._write() as db:
            cur = db.execute(
                f"UPDATE instances SET deleted = 1, version = ? WHERE name = ? AND {_LIVE}",
                (self.hlc.now().to_wire(), name),
            )
        return cur.rowcount > 0

    def set_desired(self, name: str, desired: Desired) -> None:
        """A start, stop or delete under way is a write of the declaration (a new version)."""
        with self._write() as db:
            row = db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM instances WHERE name = ? AND {_LIVE}", (name,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no instance named {name!r}")
            self._update(db, replace(InstanceSpec.from_wire(_wire(row)), desired=desired))

    # -- queues ------------------------------------------------------------

    def put_queue(self, queue: Queue) -> bool:
        """Create or replace a queue declaration; True if created."""
        with self._write() as db:
            self._live_app(db, queue.app)
            row = db.execute(
                "SELECT origin, deleted FROM queues WHERE app = ? AND name = ?",
                (queue.app, queue.name),
            ).fetchone()
            version, origin = self._stamp(row)
            db.execute(
                "INSERT OR REPLACE INTO queues (app, name, record, version, origin, deleted)"
                " VALUES (?, ?, ?, ?, ?, 0)",
                (queue.app, queue.name, _record_json(queue.to_wire()), version, origin),
            )
        return row is None or bool(row[1])

    def get_queue(self, app: str, name: str) -> Queue | None:
        row = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM queues WHERE app = ? AND name = ? AND {_LIVE}",
            (app, name),
        ).fetchone()
        return Queue.from_wire(_wire(row)) if row else None

    def list_queues(self, app: str) -> list[Queue]:
        rows = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM queues WHERE app = ? AND {_LIVE} ORDER BY name", (app,)
        )
        return [Queue.from_wire(_wire(row)) for row in rows.fetchall()]

    def delete_queue(self, app: str, name: str) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE queues SET deleted = 1, version = ?"
                f" WHERE app = ? AND name = ? AND {_LIVE}",
                (self.hlc.now().to_wire(), app, name),
            )
        return cur.rowcount > 0

    # -- runtime -----------------------------------------------------------

    def save_runtime(self, name: str, rt: Runtime) -> None:
        with self._write() as db:
            cur = db.execute(
                "UPDATE instances SET state = ?, pid = ?, create_time = ?, started_at = ?,"
                " restarts = ?, exit_code = ?, stop_step = ?, reason = ?,"
                " retries = ?, backoff_until = ?"
                f" WHERE name = ? AND {_LIVE}",
                (
                    rt.state.value,
                    rt.pid,
                    rt.create_time,
                    rt.started_at,
                    rt.restarts,
                    rt.exit_code,
                    rt.stop_step.value if rt.stop_step else None,
                    rt.reason,
                    rt.retries,
                    rt.backoff_until,
                    name,
                ),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no instance named {name!r}")

    def load_runtime(self, name: str) -> Runtime:
        """The last saved runtime of ``name``; ``Runtime()`` if never saved or unknown."""
        row = self._db.execute(
            f"SELECT {_RUNTIME_COLUMNS} FROM instances WHERE name = ? AND {_LIVE}", (name,)
        ).fetchone()
        return _runtime(row) if row else Runtime()

    def runtimes(self) -> dict[str, Runtime]:
        rows = self._db.execute(
            f"SELECT name, {_RUNTIME_COLUMNS} FROM instances WHERE {_LIVE} ORDER BY name"
        )
        return {row[0]: _runtime(row[1:]) for row in rows.fetchall()}


def storage_failure(exc: sqlite3.Error) -> StorageFull | StorageUnavailable:
    if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "full" in str(exc):
        return StorageFull(f"the state database cannot be written: the disk is full ({exc})")
    return StorageUnavailable(f"the state database cannot be written: {exc}")


_SQLITE_FULL = 13


def _runtime(row: tuple[Any, ...]) -> Runtime:
    state, pid, create_time, started_at, restarts, exit_code, stop_step, reason = row[:8]
    retries, backoff_until = row[8:]
    return Runtime(
        state=State(state),
        pid=pid,
        create_time=create_time,
        started_at=started_at,
        restarts=restarts,
        exit_code=exit_code,
        stop_step=StopStep(stop_step) if stop_step else None,
        reason=reason,
        retries=retries,
        backoff_until=backoff_until,
    )
