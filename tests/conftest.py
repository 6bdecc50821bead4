"""Shared fixtures: real branchd daemons on port 0, each with its own state dir."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from branchd.process.cgroups import CgroupTree, decide, locate
from branchd.process.launcher import MARK_VAR
from tests import netns
from tests.brokers import OwnRedis, redis_db_session


@pytest.fixture(scope="session", autouse=True)
def _redis_test_db() -> Iterator[None]:
    """The suite's Redis database is emptied when the last test session ends."""
    with redis_db_session():
        yield


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll until predicate() is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]
    text: str


@dataclass
class Branchd:
    """A real branchd process and a tiny HTTP client for it."""

    state_dir: Path
    proc: subprocess.Popen[bytes]
    url: str
    token: str | None = None
    log_path: Path = field(default_factory=Path)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> Reply:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        tok = token if token is not None else self.token
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return _reply(resp.status, resp.read(), dict(resp.headers))
        except urllib.error.HTTPError as err:
            return _reply(err.code, err.read(), dict(err.headers))

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        reply = self.call(method, path, body)
        assert reply.status == status, (reply.status, reply.text)
        return reply.body

    def instance(self, app: str, name: str) -> dict[str, Any]:
        return self.ok("GET", f"/v1/apps/{app}/instances/{name}")  # type: ignore[no-any-return]

    def wait_state(self, app: str, name: str, state: str, timeout: float = 15.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            inst = self.instance(app, name)
            return inst if inst["state"] == state else None

        return wait_for(check, timeout)  # type: ignore[no-any-return]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _reply(status: int, raw: bytes, headers: dict[str, str]) -> Reply:
    text = raw.decode(errors="replace")
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    return Reply(status, body, headers, text)


def start_branchd(
    state_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    token: str | None = None,
    python: str | None = None,
    log_dir: Path | None = None,
) -> Branchd:
    """A daemon on port 0; ``python`` is the interpreter to run it (another venv's);
    its output goes to a file in ``log_dir`` (default: the state dir)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    url_file = state_dir / "branchd.url"
    url_file.unlink(missing_ok=True)
    log_path = (log_dir or state_dir) / f"daemon-{time.monotonic_ns()}.log"
    full_env = {**os.environ, **(env or {})}
    cmd = [
        python or sys.executable,
        "-m",
        "branchd",
        "--state-dir",
        str(state_dir),
        "--bind",
        "127.0.0.1:0",
        "--log-level",
        "DEBUG",
        *args,
    ]
    if token:
        # A file, as the guide says: --token would be on the command line.
        token_file = state_dir.parent / f"token-{time.monotonic_ns()}"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        cmd += ["--token-file", str(token_file)]
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=full_env)

    def ready() -> str | None:
        if proc.poll() is not None:
            raise AssertionError(f"branchd exited {proc.returncode}: {log_path.read_text()}")
        return url_file.read_text().strip() if url_file.exists() else None

    url = wait_for(ready, 20.0)
    # Secure by default: the daemon requires the token it keeps in its state
    # dir (none with --no-auth); the tests' client sends it, as branchctl does.
    return Branchd(state_dir, proc, url, token or daemon_token(state_dir), log_path)


def daemon_token(state_dir: Path) -> str | None:
    """The token a daemon keeps in its state dir (None: it has none)."""
    path = state_dir / "token"
    return path.read_text().strip() if path.exists() else None


def _kill_leftovers(state_dir: Path) -> None:
    """End instance processes a test left behind (only ours: pid + create time)."""
    db = state_dir / "branchd.db"
    if not db.exists():
        return
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            rows = conn.execute("SELECT pid, create_time FROM instances WHERE pid IS NOT NULL")
            found = list(rows)
        except sqlite3.Error:
            return
    for pid, create_time in found:
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if abs(psutil.Process(pid).create_time() - create_time) < 0.05:
                os.killpg(pid, signal.SIGKILL)
    # and what a daemon killed before it recorded a pid left (marked as this branch's)
    for pid in marked_pids(state_dir):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    remove_branch_cgroups(state_dir)


def branch_cgroups(state_dir: Path) -> CgroupTree | None:
    """The cgroups of this state dir's branch, as its daemon made them (None:
    it has no id yet, or this machine no cgroup2 mount)."""
    branch = branch_id_of(state_dir)
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        located = locate(mountinfo, Path("/proc/self/cgroup").read_text())
        if branch is None or located.unified is None:
            return None
        controllers = Path(located.unified, "cgroup.controllers").read_text()
    except OSError:
        return None
    return CgroupTree(decide(located, controllers), branch)


def remove_branch_cgroups(state_dir: Path) -> None:
    """What a killed daemon of this state dir left in its cgroups, and them (as root)."""
    tree = branch_cgroups(state_dir)
    if tree is None or os.geteuid() != 0:
        return
    for instance in tree.instances():
        tree.remove(instance)
    tree.remove_parents()


def branch_id_of(state_dir: Path) -> str | None:
    db = state_dir / "branchd.db"
    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'branch_id'").fetchone()
        except sqlite3.Error:
            return None
    return str(row[0]) if row else None


def marked_pids(state_dir: Path) -> dict[int, str]:
    """Live processes this state dir's branch spawned (by their mark): pid -> instance."""
    branch = branch_id_of(state_dir)
    found: dict[int, str] = {}
    if branch is None:
        return found
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(proc.pid) != proc.pid or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            mark = proc.environ().get(MARK_VAR, "")
            parts = mark.split("/")
            if len(parts) == 3 and parts[0] == branch:
                found[proc.pid] = parts[1]
    return found


@pytest.fixture
def branchd_factory(tmp_path: Path) -> Iterator[Callable[..., Branchd]]:
    started: list[Branchd] = []

    def create(*args: str, state_dir: Path | None = None, **kw: Any) -> Branchd:
        b = start_branchd(state_dir or tmp_path / "state", *args, **kw)
        started.append(b)
        return b

    yield create
    for b in started:
        stop_branchd(b, leftovers=False)
    for b in started:
        _kill_leftovers(b.state_dir)


def stop_branchd(b: Branchd, *, leftovers: bool = True) -> None:
    """SIGTERM a daemon a test started, SIGKILL it after 30 s; then (``leftovers``)
    end what it left running."""
    if b.proc.poll() is None:
        b.proc.send_signal(signal.SIGTERM)
        try:
            b.proc.wait(30)
        except subprocess.TimeoutExpired:
            b.proc.kill()
            b.proc.wait()
    if leftovers:
        _kill_leftovers(b.state_dir)


@pytest.fixture
def branchd(branchd_factory: Callable[..., Branchd]) -> Branchd:
    return branchd_factory()


@pytest.fixture(scope="session")
def _netns_unavailable() -> str | None:
    return netns.unavailable()


@pytest.fixture
def lan(_netns_unavailable: str | None) -> Iterator[Callable[..., netns.Lan]]:
    """Makes ``netns.Lan(size, subnet=0)``s, all removed at the end; skips
    without root or ``ip``."""
    if _netns_unavailable:
        pytest.skip(_netns_unavailable)
    made: list[netns.Lan] = []

    def create(size: int, subnet: int = 0) -> netns.Lan:
        made.append(netns.Lan(size, subnet))
        return made[-1]

    yield create
    for each in made:
        each.close()


SLEEPER = [sys.executable, "-c", "import time; time.sleep(1e9)"]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A redis-server of the test's own (tests/brokers.py, ``OwnRedis``)."""
    server = OwnRedis(tmp_path)
    try:
        yield server
    finally:
        server.close()

