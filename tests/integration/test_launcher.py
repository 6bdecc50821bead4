"""The launcher with real processes, and the shared scenario against the fake."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from branchd.errors import SpawnError
from branchd.process.fake import FakeLauncher
from branchd.process.launcher import Launched, Launcher, LaunchSpec, ProcessLauncher
from branchd.process.logpipes import LogPipes
from branchd.process.logs import last_line

PY = sys.executable
DEADLINE = 5.0


async def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of process group ``pgid`` (zombies left to init excluded)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


class Exits:
    """Collects on_exit calls: ``exits.callback(pid)`` to pass to watch()."""

    def __init__(self) -> None:
        self.codes: dict[int, list[int | None]] = {}
        self.at: dict[int, float] = {}

    def callback(self, pid: int) -> Callable[[int | None], None]:
        def on_exit(code: int | None) -> None:
            self.codes.setdefault(pid, []).append(code)
            self.at[pid] = time.time()

        return on_exit

    async def wait(self, pid: int) -> int | None:
        await wait_until(lambda: pid in self.codes)
        return self.codes[pid][0]


@pytest.fixture
def spec(tmp_path: Path) -> Callable[..., LaunchSpec]:
    def make(
        *argv: str,
        cwd: str | None = None,
        user: str | None = None,
        env: dict[str, str] | None = None,
    ) -> LaunchSpec:
        return LaunchSpec(
            argv=argv,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            user=user,
            stdout_path=tmp_path / "logs" / "app" / "x.stdout.log",
            stderr_path=tmp_path / "logs" / "app" / "x.stderr.log",
        )

    return make


class Spawner:
    """A launcher plus the pids it started, killed (whole group) at teardown."""

    def __init__(self, launcher: ProcessLauncher) -> None:
        self.launcher = launcher
        self.launched: list[Launched] = []

    def spawn(self, spec: LaunchSpec) -> Launched:
        launched = self.launcher.spawn(spec)
        self.launched.append(launched)
        return launched

    def cleanup(self) -> None:
        for launched in self.launched:
            for proc in group_members(launched.pid):
                proc.kill()
        self.launcher.close()


@pytest.fixture
async def real() -> AsyncIterator[Spawner]:
    spawner = Spawner(ProcessLauncher(asyncio.get_running_loop()))
    yield spawner
    spawner.cleanup()


# Shared scenario: the real launcher and its in-memory twin behave alike ---


@pytest.fixture(params=["real", "fake"])
async def any_launcher(request: pytest.FixtureRequest) -> AsyncIterator[Launcher]:
    if request.param == "fake":
        yield FakeLauncher()
        return
    launcher = ProcessLauncher(asyncio.get_running_loop())
    yield launcher
    launcher.close()


async def test_spawn_signal_exit_scenario(
    any_launcher: Launcher, spec: Callable[..., LaunchSpec]
) -> None:
    launched = any_launcher.spawn(spec(PY, "-c", "import time; time.sleep(60)"))
    try:
        assert any_launcher.alive(launched.pid, launched.create_time)
        assert not any_launcher.alive(launched.pid, launched.create_time + 5.0)
        exits = Exits()
        any_launcher.watch(launched.pid, exits.callback(launched.pid))
        await wait_until(lambda: any_launcher.tree_stats(launched.pid).processes == 1)
        any_launcher.signal(launched.pid, signal.SIGTERM, group=True)
        assert await exits.wait(launched.pid) == -signal.SIGTERM
        assert not any_launcher.alive(launched.pid, launched.create_time)
        assert any_launcher.tree_stats(launched.pid).processes == 0
        any_launcher.signal(launched.pid, signal.SIGKILL, group=True)  # gone: no error
        await asyncio.sleep(0.05)  # let any stray extra callback run
        assert exits.codes[launched.pid] == [-signal.SIGTERM]  # exactly once
    finally:
        if isinstance(any_launcher, ProcessLauncher):
            for proc in group_members(launched.pid):
                proc.kill()
        any_launcher.close()


async def test_watch_of_a_gone_pid_fires_soon(any_launcher: Launcher) -> None:
    pid = _gone_pid()
    exits = Exits()
    any_launcher.watch(pid, exits.callback(pid))
    assert await exits.wait(pid) is None
    any_launcher.close()


def _gone_pid() -> int:
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    return proc.pid


# Real processes ---------------------------------------------------------


async def test_exit_code_is_noticed_promptly(
    real: Spawner, spec: Callable[..., LaunchSpec], tmp_path: Path
) -> None:
    script = "import sys, time; time.sleep(0.2); print(time.time(), flush=True); sys.exit(3)"
    launched = real.spawn(spec(PY, "-c", script))
    exits = Exits()
    real.launcher.watch(launched.pid, exits.callback(launched.pid))
    assert await exits.wait(launched.pid) == 3
    exited_at = float((tmp_path / "logs/app/x.stdout.log").read_text().split()[-1])
    assert exits.at[launched.pid] - exited_at < 0.5  # a pidfd, not a slow poll
    assert not psutil.pid_exists(launched.pid)  # reaped: no zombie left


async def test_group_signal_reaches_grandchildren(
    real: Spawner, spec: Callable[..., LaunchSpec]
) -> None:
    script = (
        "import os, time\n"
        "for _ in range(2):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "time.sleep(60)\n"
    )
    launched = real.spawn(spec(PY, "-c", script))
    exits = Exits()
    real.launcher.watch(launched.pid, exits.callback(launched.pid))
    await wait_until(lambda: real.launcher.tree_stats(launched.pid).processes == 3)
    assert len(group_members(launched.pid)) == 3  # own session: pgid == pid
    real.launcher.signal(launched.pid, signal.SIGTERM, group=True)
    assert await exits.wait(launched.pid) == -signal.SIGTERM
    await wait_until(lambda: not group_members(launched.pid))


async def test_signal_without_group_spares_the_children(
    real: Spawner, spec: Callable[..., LaunchSpec]
) -> None:
    script = (
        "import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\ntime.sleep(60)\n"
    )
    launched = real.spawn(spec(PY, "-c", script))
    exits = Exits()
    real.launcher.watch(launched.pid, exits.callback(launched.pid))
    await wait_until(lambda: real.launcher.tree_stats(launched.pid).processes == 2)
    real.launcher.signal(launched.pid, signal.SIGTERM, group=False)
    assert await exits.wait(launched.pid) == -signal.SIGTERM
    assert len(group_members(launched.pid)) == 1  # the orphan: what Reap is for
    real.launcher.signal(launched.pid, signal.SIGKILL, group=True)
    await wait_until(lambda: not group_members(launched.pid))


async def test_output_env_and_cwd(
    real: Spawner, spec: Callable[..., LaunchSpec], tmp_path: Path
) -> None:
    script = (
        "import os, sys\n"
        "print('out', os.environ['BRANCHD_T'], os.getcwd())\n"
        "print('err line', file=sys.stderr)\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    for _ in range(2):  # the second run appends
        launched = real.spawn(spec(PY, "-c", script, cwd=str(work), env={"BRANCHD_T": "v1"}))
        exits = Exits()
        real.launcher.watch(launched.pid, exits.callback(launched.pid))
        assert await exits.wait(launched.pid) == 0
    out = (tmp_path / "logs/app/x.stdout.log").read_text().splitlines()
    assert out == [f"out v1 {work}"] * 2
    assert (tmp_path / "logs/app/x.stderr.log").read_text() == "err line\n" * 2


async def test_output_keeps_landing_after_the_launcher_is_gone(
    real: Spawner, spec: Callable[..., LaunchSpec], tmp_path: Path
) -> None:
    script = "import time\nfor i in range(100):\n    print(i, flush=True)\n    time.sleep(0.02)\n"
    launched = real.spawn(spec(PY, "-c", script))
    real.launcher.close()  # the daemon goes away; no pipe breaks
    out = tmp_path / "logs/app/x.stdout.log"
    await wait_until(lambda: out.read_text().endswith("99\n"))
    other = ProcessLauncher(asyncio.get_running_loop())  # the daemon is back: adopt
    exits = Exits()
    other.watch(launched.pid, exits.callback(launched.pid))
    assert await exits.wait(launched.pid) in (None, 0)  # may have ended before the watch
    other.close()


async def test_through_the_log_writer_output_lands_rotated_after_the_launcher_is_gone(
    spec: Callable[..., LaunchSpec], tmp_path: Path
) -> None:
    pipes = LogPipes(tmp_path / "logs")
    launcher = ProcessLauncher(asyncio.get_running_loop(), pipes)
    script = "import time\nfor i in range(100):\n    print(i, flush=True)\n    time.sleep(0.01)\n"
    launched = launcher.spawn(replace(spec(PY, "-c", script), log_max_bytes=100, log_backups=1))
    pipes.close()
    launcher.close()  # the daemon goes away; the writer holds the pipes
    out = tmp_path / "logs/app/x.stdout.log"
    await wait_until(lambda: out.exists() and out.read_text().endswith("99\n"))
    kept = (tmp_path / "logs/app/x.stdout.log.1").read_text() + out.read_text()
    numbers = [int(line) for line in kept.splitlines()]
    assert numbers == list(range(numbers[0], 100)) and out.stat().st_size <= 100
    assert launched.pid  # (exited; subprocess reaps the abandoned child)


async def test_a_child_s_last_words_are_in_its_file_when_its_exit_is_told(
    spec: Callable[..., LaunchSpec], tmp_path: Path
) -> None:
    pipes = LogPipes(tmp_path / "logs")
    launcher = ProcessLauncher(asyncio.get_running_loop(), pipes)
    try:
        # (a grandchild keeps the pipe open: no end of pipe tells the writer)
        script = (
            "import subprocess, sys\nsubprocess.Popen(['sleep', '5'])\n"
            "sys.stderr.write('x' * 300000 + '\\nError: the last line')\nsys.exit(3)"
        )
        launched = launcher.spawn(replace(spec(PY, "-c", script), log_max_bytes=10**6))
        exits = Exits()
        launcher.watch(launched.pid, exits.callback(launched.pid))
        assert await exits.wait(launched.pid) == 3
        # drained before the exit was told, the part line too (held back otherwise)
        assert last_line(tmp_path / "logs/app/x.stderr.log") == "Error: the last line"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launched.pid, signal.SIGKILL)
    finally:
        launcher.close()
        pipes.close()


async def test_spawn_errors(real: Spawner, spec: Callable[..., LaunchSpec], tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match="not found"):
        real.spawn(spec("/nonexistent/branchd-no-such-program"))
    with pytest.raises(SpawnError, match="not found"):
        real.spawn(spec("branchd-no-such-program-on-path"))
    with pytest.raises(SpawnError, match="working directory"):
        real.spawn(spec(PY, "-c", "pass", cwd=str(tmp_path / "missing")))
    with pytest.raises(SpawnError, match="unknown user"):
        real.spawn(spec(PY, "-c", "pass", user="branchd-no-such-user"))
    with pytest.raises(SpawnError, match="empty"):
        real.spawn(spec())
    not_exec = tmp_path / "script.sh"
    not_exec.write_text("#!/bin/sh\n")
    with pytest.raises(SpawnError, match="permission denied"):
        real.spawn(spec(str(not_exec)))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
async def test_user_is_honoured_as_root(
    real: Spawner, spec: Callable[..., LaunchSpec], tmp_path: Path
) -> None:
    nobody = pwd.getpwnam("nobody")
    # /usr/bin/id, not our venv's python: nobody may not be allowed to read it.
    launched = real.spawn(spec("id", "-u", user="nobody"))
    exits = Exits()
    real.launcher.watch(launched.pid, exits.callback(launched.pid))
    assert await exits.wait(launched.pid) == 0
    out = (tmp_path / "logs/app/x.stdout.log").read_text().split()
    assert out == [str(nobody.pw_uid)]


@pytest.mark.skipif(os.geteuid() == 0, reason="as root any user is allowed")
def test_other_user_refused_when_not_root(real: Spawner, spec: Callable[..., LaunchSpec]) -> None:
    with pytest.raises(SpawnError, match="not running as root"):
        real.spawn(spec(PY, "-c", "pass", user="root"))


async def test_watch_of_a_non_child_reports_none(real: Spawner) -> None:
    script = (
        "import os, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"  # like an instance: it leads its own group
        "    null = os.open(os.devnull, os.O_WRONLY)\n"
        "    os.dup2(null, 1)\n"
        "    os.dup2(null, 2)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid)\n"
    )
    grandchild = int(subprocess.run([PY, "-c", script], check=True, capture_output=True).stdout)
    try:
        create_time = psutil.Process(grandchild).create_time()
        assert real.launcher.alive(grandchild, create_time)
        exits = Exits()
        real.launcher.watch(grandchild, exits.callback(grandchild))
        real.launcher.signal(grandchild, signal.SIGTERM, group=False)
        assert await exits.wait(grandchild) is None
        assert not real.launcher.alive(grandchild, create_time)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


async def test_tree_stats_measure_cpu_and_memory(
    real: Spawner, spec: Callable[..., LaunchSpec]
) -> None:
    launched = real.spawn(spec(PY, "-c", "while True: pass"))
    real.launcher.tree_stats(launched.pid)  # first sample

    def busy() -> bool:
        stats = real.launcher.tree_stats(launched.pid)
        return stats.cpu_percent > 10.0 and stats.memory_rss > 1_000_000

    await wait_until(busy)
    real.launcher.signal(launched.pid, signal.SIGKILL, group=True)
    await wait_until(lambda: real.launcher.tree_stats(launched.pid).processes == 0)


# The fake's own scripting -----------------------------------------------


async def test_fake_scripting(spec: Callable[..., LaunchSpec]) -> None:
    fake = FakeLauncher(first_pid=500)
    fake.fail_next_spawn("no such program")
    with pytest.raises(SpawnError, match="no such program"):
        fake.spawn(spec("x"))
    a = fake.spawn(spec("a"))
    b = fake.spawn(spec("b"))
    assert (a.pid, b.pid) == (500, 501)
    assert [s.argv for s in fake.spawned] == [("a",), ("b",)]
    exits = Exits()
    fake.watch(a.pid, exits.callback(a.pid))
    fake.exit(a.pid, 7)
    assert a.pid not in exits.codes  # delivered through the loop, not re-entrantly
    assert await exits.wait(a.pid) == 7

    fake.stubborn.add(b.pid)
    fake.watch(b.pid, exits.callback(b.pid))
    fake.signal(b.pid, signal.SIGTERM, group=False)
    assert fake.alive(b.pid, b.create_time)
    fake.signal(b.pid, signal.SIGKILL, group=True)
    assert await exits.wait(b.pid) == -signal.SIGKILL
    assert fake.signals == [(b.pid, signal.SIGTERM, False), (b.pid, signal.SIGKILL, True)]


async def test_fake_daemon_restart_adopts_non_children(spec: Callable[..., LaunchSpec]) -> None:
    fake = FakeLauncher()
    launched = fake.spawn(spec("a"))
    fake.forget_children()
    foreign = fake.add_foreign()
    exits = Exits()
    for pid in (launched.pid, foreign.pid):
        assert fake.alive(pid, fake.procs[pid].create_time)
        fake.watch(pid, exits.callback(pid))
        fake.exit(pid, 1)
        assert await exits.wait(pid) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
async def test_a_device_as_log_keeps_its_mode(tmp_path: Path) -> None:
    # A log path that is a device (a null device here: a node of our own, so
    # that a failure cannot break the system's /dev/null) is written to, and
    # its mode is left alone: log files are made 0640, devices never.
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    null.chmod(0o666)
    launcher = ProcessLauncher(asyncio.get_running_loop())
    try:
        launched = launcher.spawn(LaunchSpec(("true",), {}, None, None, null, null))
        assert stat.S_IMODE(null.stat().st_mode) == 0o666
        with contextlib.suppress(psutil.Error):
            psutil.Process(launched.pid).wait(10)
    finally:
        launcher.close()
