"""The state dir's files: the token generated once and kept, the modes."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from branchd.state import ensure_token, secure_database, secure_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_token_is_generated_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "token"
    first = ensure_token(path, None)
    assert len(first) >= 32 and _mode(path) == 0o600
    assert ensure_token(path, None) == first
    # a given token replaces it (local clients read the one in force)
    assert ensure_token(path, "given") == "given"
    assert path.read_text().strip() == "given" and _mode(path) == 0o600
    # a file loosened by hand is tightened again
    path.chmod(0o644)
    assert ensure_token(path, None) == "given" and _mode(path) == 0o600


def test_the_state_dir_and_the_database_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    secure_dir(state)
    assert _mode(state) == 0o700
    db = state / "branchd.db"
    secure_database(db)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    # SQLite gives its WAL and SHM the database's mode
    for name in ("branchd.db", "branchd.db-wal", "branchd.db-shm"):
        assert _mode(state / name) == 0o600, name
    conn.close()
    os.chmod(db, 0o644)
    secure_database(db)
    assert _mode(db) == 0o600
