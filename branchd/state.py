"""The state dir's own files and who may read them.

The state dir holds what other local users must not read: app env values and
broker passwords (the database), the API token, instance output. So the dir
is 0700 and the database (SQLite gives its WAL and SHM the database's mode)
and the token are 0600; the launcher makes log files 0640.

The token is generated at the first start into ``<state dir>/token`` and
kept: root's ``branchctl`` (and the Python client) read it when no token is
given, so a local user who can read the state dir needs no flag.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
#: Files SQLite keeps beside the database.
DB_COMPANIONS = ("-wal", "-shm", "-journal")


def secure_dir(path: Path) -> None:
    """Make ``path`` (and missing parents) and leave it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)


def secure_database(db: Path) -> None:
    """Create the database file 0600 before SQLite does (SQLite creates it with
    the umask, 0644 as a rule); tighten the files of an older daemon."""
    fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    for suffix in DB_COMPANIONS:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(db.with_name(db.name + suffix), FILE_MODE)


def read_token(path: Path) -> str | None:
    """The token held in ``path``; None when there is none (missing or empty)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None
    return text or None


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` at once by a 0600 file holding ``text``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_token(path: Path, given: str | None) -> str:
    """The token the daemon requires, kept in ``path`` (0600).

    ``given`` (``--token``, ``--token-file``, ``BRANCHD_TOKEN``) is written
    there when it differs, so that local clients find the token in use;
    without one, the token already there is kept, or a new one is generated.
    """
    current = read_token(path)
    token = given or current or secrets.token_urlsafe(32)
    if token != current:
        write_private(path, token + "\n")
    else:
        os.chmod(path, FILE_MODE)
    return token
