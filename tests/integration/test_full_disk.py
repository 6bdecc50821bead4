"""A full disk under the state dir (a small tmpfs the test mounts; root only):
storage errors are 507 with whether the change was applied, stops and a
SIGTERM shutdown complete, a crashing instance is still restarted, and
everything works again without a restart once space is freed (issue 11,
item 4)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import Branchd, marked_pids, wait_for

SLEEP = ["sleep", "infinity"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: the full-disk test must run")
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk: Path) -> Path:
    """Fill the disk to the last byte; the filler file."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f:
        for size in (65536, 4096, 1):  # the last blocks too
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def _desired(state: Path, name: str) -> str | None:
    with contextlib.closing(sqlite3.connect(state / "branchd.db")) as db:
        row = db.execute(
            "SELECT json_extract(record, '$.desired') FROM instances WHERE name = ?", (name,)
        ).fetchone()
    return None if row is None else str(row[0])


def test_a_full_disk_loses_no_control(
    small_disk: Path, branchd_factory: Callable[..., Branchd], tmp_path: Path
) -> None:
    state = small_disk / "state"
    b = branchd_factory(state_dir=state, log_dir=tmp_path)
    b.ok("PUT", "/v1/apps/web", {"env": {}, "defaults": {}}, status=201)
    for name in ("a", "c", "d"):
        b.ok("POST", "/v1/apps/web/instances", {"name": name, "command": SLEEP}, status=201)
    for name in ("a", "c", "d"):
        b.wait_state("web", name, "running")

    filler = _fill(small_disk)
    # Writes are refused with 507 once the database cannot grow (its WAL may
    # take a few first), never a 500, and nothing refused is half made.
    refused = None
    made: list[str] = []
    for i in range(200):
        reply = b.call("POST", "/v1/apps/web/instances", {"name": f"n{i}", "command": SLEEP})
        assert reply.status in (201, 507), (reply.status, reply.text)
        if reply.status == 507:
            refused = (f"n{i}", reply.body)
            break
        made.append(f"n{i}")
    assert refused is not None, "the database never filled up"
    name, body = refused
    assert body["error"]["code"] == "storage_full" and body["error"]["applied"] is False
    assert b.call("GET", f"/v1/apps/web/instances/{name}").status == 404

    # A stop is carried out all the same: 507, applied.
    pid_a = b.instance("web", "a")["pid"]
    reply = b.call("POST", "/v1/apps/web/instances/a/stop")
    assert reply.status == 507, reply.text
    assert reply.body["error"]["applied"] is True
    assert "was stopped" in reply.body["error"]["message"]
    assert b.instance("web", "a")["state"] == "stopped"
    assert not psutil.pid_exists(pid_a) or psutil.Process(pid_a).status() == "zombie"

    # A process that dies is still restarted (and watched: a new pid, running).
    old = b.instance("web", "c")["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: b.instance("web", "c")["pid"] not in (None, old))
    b.wait_state("web", "c", "running")

    # Space again: everything works without a restart, and what was not
    # recorded is written (the stop of "a").
    filler.unlink()
    wait_for(lambda: _desired(state, "a") == "stopped", timeout=20)
    b.ok("POST", "/v1/apps/web/instances", {"name": "after", "command": SLEEP}, status=201)
    b.wait_state("web", "after", "running")
    c_pid = b.instance("web", "c")["pid"]
    assert marked_pids(state).get(c_pid) == "c"

    # A SIGTERM shutdown on a full disk stops every instance and exits 0.
    _fill(small_disk)
    live = list(marked_pids(state))
    assert live
    b.signal(signal.SIGTERM)
    assert b.wait_exit(60) == 0, b.log()
    assert not marked_pids(state)
    assert not list(state.rglob("*.rotating"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
