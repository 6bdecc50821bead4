"""An in-memory ``Launcher``: no processes, fully scripted by the test.

``FakeLauncher`` keeps a table of fake processes. Tests make them die with
``exit(pid, code)``; by default a signal that would terminate a real process
(TERM, INT, KILL...) makes the fake one exit with ``-sig``, unless its pid was
marked ``stubborn`` (then only SIGKILL works), as with a worker that ignores
its stop signal. Exit callbacks run through ``loop.call_soon`` like the real
launcher's, never re-entrantly.
"""

from __future__ import annotations

import asyncio
import signal as _signal_mod
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from branchd.errors import SpawnError
from branchd.process.launcher import (
    ExitCallback,
    Launched,
    LaunchSpec,
    Marked,
    make_mark,
    marked_instance,
)
from branchd.views import TreeStats

#: Signals whose default action does not end a process (0 only checks).
_HARMLESS = frozenset(
    {
        0,
        _signal_mod.SIGCHLD,
        _signal_mod.SIGCONT,
        _signal_mod.SIGSTOP,
        _signal_mod.SIGTSTP,
        _signal_mod.SIGTTIN,
        _signal_mod.SIGTTOU,
        _signal_mod.SIGURG,
        _signal_mod.SIGWINCH,
    }
)


@dataclass
class FakeProcess:
    pid: int
    create_time: float
    spec: LaunchSpec | None  # None for a foreign (adopted) process
    child: bool = True  # our child: its exit code is known
    running: bool = True
    code: int | None = None
    stats: TreeStats | None = None  # None: one process, no cpu or memory
    watchers: list[ExitCallback] = field(default_factory=list)


class FakeLauncher:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        first_pid: int = 1000,
        start_time: float = 1_700_000_000.0,
    ) -> None:
        self._loop = loop
        self._next_pid = first_pid
        self._next_time = start_time
        self.procs: dict[int, FakeProcess] = {}
        self.spawned: list[LaunchSpec] = []
        self.signals: list[tuple[int, int, bool]] = []
        #: pids that ignore every signal but SIGKILL.
        self.stubborn: set[int] = set()
        self._failures: deque[str] = deque()
        self._spawning = threading.Lock()
        self.closed = False
        #: pid -> the cause its next exit reports (exit_cause), as a cgroup's OOM kill.
        self.causes: dict[int, str] = {}
        #: Instances released (removed), in order; the names the last prune kept.
        self.released: list[str] = []
        self.kept: set[str] | None = None

    # scripting (test side) ----------------------------------------------

    def fail_next_spawn(self, message: str = "executable not found") -> None:
        """The next spawn raises SpawnError(message); calls queue up."""
        self._failures.append(message)

    def exit(self, pid: int, code: int | None = 0) -> None:
        """The process dies with ``code`` (a foreign one reports None)."""
        proc = self.procs[pid]
        if not proc.running:
            return
        proc.running = False
        proc.code = code if proc.child else None
        watchers, proc.watchers = proc.watchers, []
        for callback in watchers:
            self._deliver(callback, proc.code)

    def add_foreign(self, pid: int | None = None) -> Launched:
        """A live process we did not start (as found after a daemon restart)."""
        pid = self._new_pid() if pid is None else pid
        proc = FakeProcess(pid, self._new_time(), spec=None, child=False)
        self.procs[pid] = proc
        return Launched(pid, proc.create_time)

    def add_marked(self, branch: str, instance: str) -> Launched:
        """A live process ``branch`` spawned for ``instance`` whose pid it never
        recorded (the daemon was killed between the fork and the commit)."""
        spec = LaunchSpec(("orphan",), {}, None, None, Path(), Path(), make_mark(branch, instance))
        proc = FakeProcess(self._new_pid(), self._new_time(), spec=spec, child=False)
        self.procs[proc.pid] = proc
        return Launched(proc.pid, proc.create_time)

    def forget_children(self) -> None:
        """Simulate a daemon restart: live processes stay, but are no longer
        our children, and nobody watches them any more."""
        for proc in self.procs.values():
            proc.child = False
            proc.watchers = []

    def set_stats(self, pid: int, stats: TreeStats) -> None:
        self.procs[pid].stats = stats

    def running(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.running]

    # Launcher ------------------------------------------------------------

    def spawn(self, spec: LaunchSpec) -> Launched:
        if not spec.argv:
            raise SpawnError("empty command")
        with self._spawning:  # (spawns may come from several threads at once)
            if self._failures:
                raise SpawnError(self._failures.popleft())
            pid = self._new_pid()
            proc = FakeProcess(pid, self._new_time(), spec=spec)
            self.procs[pid] = proc
            self.spawned.append(spec)
        return Launched(pid, proc.create_time)

    def watch(self, pid: int, on_exit: ExitCallback) -> None:
        if self.closed:
            raise RuntimeError("launcher is closed")
        proc = self.procs.get(pid)
        if proc is None or not proc.running:
            self._deliver(on_exit, proc.code if proc is not None else None)
            return
        proc.watchers.append(on_exit)

    def alive(self, pid: int, create_time: float) -> bool:
        proc = self.procs.get(pid)
        return proc is not None and proc.running and abs(proc.create_time - create_time) < 0.01

    def signal(self, pid: int, sig: int, group: bool) -> None:
        if pid <= 1:
            raise ValueError(f"refusing to signal pid {pid}")
        self.signals.append((pid, sig, group))
        proc = self.procs.get(pid)
        if proc is None or not proc.running or sig in _HARMLESS:
            return
        if sig == _signal_mod.SIGKILL or pid not in self.stubborn:
            self.exit(pid, -sig)

    def tree_stats(self, pid: int) -> TreeStats:
        proc = self.procs.get(pid)
        if proc is None or not proc.running:
            return TreeStats()
        return proc.stats if proc.stats is not None else TreeStats(processes=1)

    def marked(self, branch: str) -> list[Marked]:
        return [
            Marked(p.pid, p.create_time, instance)
            for p in self.procs.values()
            if p.running
            and p.spec is not None
            and p.spec.mark is not None
            and (instance := marked_instance(p.spec.mark, branch)) is not None
        ]

    def exit_cause(self, pid: int, code: int | None) -> str | None:
        return self.causes.pop(pid, None)

    def release(self, instance: str) -> None:
        self.released.append(instance)

    def prune(self, keep: set[str]) -> None:
        self.kept = set(keep)

    def close(self) -> None:
        self.closed = True
        for proc in self.procs.values():
            proc.watchers = []

    # internals -----------------------------------------------------------

    def _deliver(self, callback: ExitCallback, code: int | None) -> None:
        loop = self._loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # plain synchronous test: call at once
                callback(code)
                return
        loop.call_soon(callback, code)

    def _new_pid(self) -> int:
        pid = self._next_pid
        while pid in self.procs:
            pid += 1
        self._next_pid = pid + 1
        return pid

    def _new_time(self) -> float:
        self._next_time += 1.0
        return self._next_time
