"""Issue 15, part 5, against one real daemon running as root: each instance in
a cgroup of its own; a double-forking setsid escapee dies with its instance;
a memory hog is killed at memory_max with the reason in its JSON; a daemon
restart adopts an instance's processes through its cgroup; GET /v1/branch
says the mode; the cgroups go with their instances and the daemon.

Skips without root or without a cgroup2 hierarchy the branch can write (as
the netns tests skip); CI runs it as root."""

from __future__ import annotations

import os
import secrets
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from branchd.process.cgroups import CgroupTree, Located, locate
from tests.conftest import (
    Branchd,
    _kill_leftovers,
    branch_cgroups,
    branch_id_of,
    start_branchd,
    wait_for,
)


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "cgroups need root"
    tree = CgroupTree.probe(f"probe-{secrets.token_hex(3)}")
    if tree is None:
        return "no cgroup2 hierarchy this process can write"
    tree.remove_parents()
    return None


pytestmark = pytest.mark.skipif(bool(why := _unavailable()), reason=why or "")

#: Forks a child that leaves the session (setsid) and forks the escapee, which
#: writes its pid to argv[1] and sleeps; the middle one exits at once, so the
#: escapee is no descendant of the main process any more. The main sleeps.
ESCAPE = (
    "import os, sys, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
    "        os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "        time.sleep(1e9)\n"
    "    os._exit(0)\n"
    "time.sleep(1e9)\n"
)
#: Takes memory a MiB at a time, touching every page, until it is killed.
HOG = "import time\nx = []\nwhile True:\n    x.append(b'x' * (1 << 20))\n"


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cgroups") / "state"


class Daemon:
    def __init__(self, state_dir: Path) -> None:
        self.b = start_branchd(state_dir)


@pytest.fixture(scope="module")
def daemon(state_dir: Path) -> Iterator[Daemon]:
    d = Daemon(state_dir)
    try:
        assert d.b.call("PUT", "/v1/apps/web", {}).status == 201
        yield d
    finally:
        if d.b.proc.poll() is None:
            d.b.proc.terminate()
            d.b.proc.wait(30)
        _kill_leftovers(state_dir)  # (and what a failed test left in its cgroups)


def _located() -> Located:
    return locate(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())


def _v2_parent(state_dir: Path) -> Path:
    return Path(_located().unified or "/", f"branchd-{branch_id_of(state_dir)}")


def _escapee(pid_file: Path) -> psutil.Process:
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text()))
    return psutil.Process(pid)


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _add_escaper(b: Branchd, name: str, pid_file: Path) -> tuple[dict[str, object], psutil.Process]:
    argv = [sys.executable, "-c", ESCAPE, str(pid_file)]
    body = {"name": name, "command": argv, "startsecs": 0}
    assert b.call("POST", "/v1/apps/web/instances", body).status == 201
    view = b.wait_state("web", name, "running")
    escapee = _escapee(pid_file)
    main = psutil.Process(int(view["pid"]))
    # (once the middle one has exited, the escapee is no descendant of main)
    assert wait_for(lambda: escapee.pid not in {p.pid for p in main.children(True)})
    assert os.getsid(escapee.pid) != main.pid
    return view, escapee


def test_the_branch_says_its_mode(daemon: Daemon) -> None:
    mode = daemon.b.ok("GET", "/v1/branch")["supervision"]
    controllers = Path(_located().unified or "/", "cgroup.controllers").read_text().split()
    wanted = {"memory", "cpu", "pids"}
    assert mode == ("cgroup-v2" if wanted <= set(controllers) else "cgroup-v1-hybrid")


def test_a_setsid_escapee_dies_with_its_instance_on_stop(
    daemon: Daemon, state_dir: Path, tmp_path: Path
) -> None:
    b = daemon.b
    view, escapee = _add_escaper(b, "esc", tmp_path / "escapee")
    cgroup = _v2_parent(state_dir) / "i-esc"
    pids = {int(p) for p in (cgroup / "cgroup.procs").read_text().split()}
    assert {view["pid"], escapee.pid} <= pids
    stats = b.ok("GET", "/v1/apps/web/instances/esc/stats")
    assert stats["processes"] == 2 and stats["cgroup"]["oom_kills"] == 0, stats
    assert b.call("POST", "/v1/apps/web/instances/esc/stop").status == 200
    assert wait_for(lambda: _gone(escapee))
    assert b.instance("web", "esc")["state"] == "stopped"
    assert b.call("DELETE", "/v1/apps/web/instances/esc").status == 204
    assert not cgroup.exists()  # its cgroup went with it


def test_a_memory_hog_is_killed_at_memory_max_with_the_reason(daemon: Daemon) -> None:
    b = daemon.b
    body = {
        "name": "hog",
        "command": [sys.executable, "-c", HOG],
        "memory_max": 64 * 1024 * 1024,
        "autorestart": "never",
        "startsecs": 0,
    }
    created = b.call("POST", "/v1/apps/web/instances", body)
    assert created.status == 201, created.text
    assert created.body["memory_max"] == 64 * 1024 * 1024
    view = b.wait_state("web", "hog", "exited")
    assert view["reason"] == "killed: memory_max 64MiB reached (oom_kill)", view
    assert view["exit_code"] == -signal.SIGKILL


def test_a_child_of_another_user_joins_its_cgroup_with_its_limits(
    daemon: Daemon, state_dir: Path
) -> None:
    # (it joins after it became that user: through files the daemon opened)
    b = daemon.b
    body = {
        "name": "lim",
        "command": ["sleep", "1000"],
        "user": "nobody",
        "cpu_max": 0.5,
        "pids_max": 16,
        "startsecs": 0,
    }
    assert b.call("POST", "/v1/apps/web/instances", body).status == 201
    pid = b.wait_state("web", "lim", "running")["pid"]
    assert psutil.Process(pid).uids().real != 0
    own = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(",") if names else [""]:
            own[name] = path
    leaf = f"branchd-{branch_id_of(state_dir)}/i-lim"
    assert own[""].endswith(leaf) and own["cpu"].endswith(leaf) and own["pids"].endswith(leaf)
    tree = branch_cgroups(state_dir)
    assert tree is not None
    for controller, name, value in [
        ("cpu", "cpu.cfs_quota_us", "50000"),
        ("cpu", "cpu.max", "50000 100000"),
        ("pids", "pids.max", "16"),
    ]:
        where = tree.layout.limits[controller]
        base = Path(_located().unified or "/") if where == "v2" else Path(where)
        path = base / leaf / name
        if path.exists():  # (cpu.max in v2, cpu.cfs_quota_us in v1)
            assert path.read_text().strip() == value
    assert b.call("DELETE", "/v1/apps/web/instances/lim").status == 204
    assert wait_for(lambda: not psutil.pid_exists(pid) or _gone(psutil.Process(pid)))


def test_adoption_after_a_restart_finds_the_processes_through_the_cgroup(
    daemon: Daemon, state_dir: Path, tmp_path: Path
) -> None:
    b = daemon.b
    view, escapee = _add_escaper(b, "kept", tmp_path / "escapee")
    b.proc.send_signal(signal.SIGUSR2)  # exit, leaving the instances running
    assert b.wait_exit() == 0
    assert not _gone(escapee)
    daemon.b = again = start_branchd(state_dir)
    assert again.wait_state("web", "kept", "running")["pid"] == view["pid"]  # adopted
    # the escapee is no descendant of the adopted pid: only its cgroup knows it
    assert again.ok("GET", "/v1/apps/web/instances/kept/stats")["processes"] == 2
    assert again.call("DELETE", "/v1/apps/web/instances/kept").status == 204
    assert wait_for(lambda: _gone(escapee))
    assert not (_v2_parent(state_dir) / "i-kept").exists()
    again.proc.terminate()
    assert again.wait_exit() == 0
    assert not _v2_parent(state_dir).exists()  # the branch's parent, once empty
