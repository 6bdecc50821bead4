"""kill -9 of the daemon in the middle of concurrent creates: every
acknowledged create survives, no instance ever has two processes, and no
process is left that belongs to no instance (issue 11, item 3)."""

from __future__ import annotations

import collections
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import Branchd, marked_pids, wait_for

SLEEP = ["sleep", "infinity"]


def _create(b: Branchd, name: str, acknowledged: set[str], lock: threading.Lock) -> None:
    try:
        reply = b.call(
            "POST",
            "/v1/apps/web/instances",
            {"name": name, "command": SLEEP, "startsecs": 0},
            timeout=10,
        )
    except OSError:  # the daemon died under it: not acknowledged
        return
    if reply.status == 201:
        with lock:
            acknowledged.add(name)


def _killed_during_creates(b: Branchd, run: int, acknowledged: set[str]) -> None:
    """60 creates from 16 clients; the daemon is killed -9 once some were answered."""
    lock = threading.Lock()
    before = len(acknowledged)
    with ThreadPoolExecutor(16) as pool:
        for i in range(60):
            pool.submit(_create, b, f"r{run}-{i}", acknowledged, lock)
        wait_for(lambda: len(acknowledged) >= before + 10, timeout=30)
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(10)


def _one_process_each(state: Path, b: Branchd, acknowledged: set[str]) -> None:
    listed = {i["name"] for i in b.ok("GET", "/v1/apps/web/instances")["items"]}
    assert acknowledged <= listed, acknowledged - listed
    for name in listed:
        b.wait_state("web", name, "running")
    # Exactly one live process per instance, and none for anything else.
    wait_for(lambda: sorted(marked_pids(state).values()) == sorted(listed), timeout=15)
    per_instance = collections.Counter(marked_pids(state).values())
    assert all(n == 1 for n in per_instance.values()), per_instance
    pids = {b.instance("web", n)["pid"] for n in listed}
    assert pids == set(marked_pids(state))


def test_kill_9_during_creates_never_doubles_nor_orphans(
    branchd_factory: Callable[..., Branchd], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    b = branchd_factory(state_dir=state)
    b.ok("PUT", "/v1/apps/web", {"env": {}, "defaults": {}}, status=201)
    acknowledged: set[str] = set()
    for run in range(4):
        _killed_during_creates(b, run, acknowledged)
        b = branchd_factory(state_dir=state)
        _one_process_each(state, b, acknowledged)
