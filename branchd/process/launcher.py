"""Starting, watching and signalling real processes: the edge under the manager.

The manager's state machine says *what* to do (Spawn, Signal, Kill, Reap);
a ``Launcher`` does it. ``ProcessLauncher`` is the real one; the in-memory
twin is ``branchd.process.fake.FakeLauncher``.

Each child runs in its own session (so its pid is also its process group id,
and a group signal reaches its grandchildren). Its stdout and stderr go into
pipes held by the branch's log writer (``logpipes``, ``logwriter``), a
process of its own that rotates at write time; no pipe goes to the daemon,
so output keeps landing while the daemon is down. Without a writer (none
given, rotation off, or none to be had) the child writes straight into its
files. Death is noticed through a pidfd in the event loop, not by polling.
Where the machine allows, each child also joins its instance's cgroup before
it execs (``branchd.process.cgroups``): its whole tree is then signalled,
killed, counted and adopted through the cgroup, so a grandchild that left the
session with setsid goes with it too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import secrets
import stat
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from branchd.errors import LogWriterUnavailable, SpawnError
from branchd.process.cgroups import CgroupTree, Limits, Mode, Prepared
from branchd.process.logpipes import LogPipes
from branchd.views import CgroupStats, TreeStats

log = logging.getLogger(__name__)

ExitCallback = Callable[[int | None], None]

#: What an instance inherits of the daemon's own environment; nothing else
#: (above all no BRANCHD_* variable: the daemon's token, its state dir).
INHERITED_ENV = ("PATH", "LANG", "LANGUAGE", "TZ")
#: The PATH of an instance when the daemon has none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Variables the daemon sets itself (the worker loader's): never an app's or an instance's.
RESERVED_PREFIX = "BRANCHD_"
#: Instance log files: the instance's user may read its own output (group too).
LOG_MODE = 0o640

#: The instance field of each cgroup controller's limit, for error messages.
LIMIT_FIELDS = {"memory": "memory_max", "cpu": "cpu_max", "pids": "pids_max"}

#: Two create_time readings of the same process agree within this (seconds).
#: psutil derives it from the boot time in whole seconds, which moves when the
#: clock is stepped (NTP): a tight bound would disown every instance then.
CREATE_TIME_TOLERANCE = 1.0


#: Every process a branch spawns carries ``<branch>/<instance>/<nonce>`` in
#: its environment under this name, so that the next daemon finds it even if
#: this one was killed between the fork and the commit of its pid (it was
#: once started a second time, the first left an orphan). Not ``BRANCHD_*``:
#: no daemon setting ever reaches an instance.
MARK_VAR = "BRANCH_SPAWN_MARK"


def make_mark(branch: str, instance: str) -> str:
    return f"{branch}/{instance}/{secrets.token_hex(4)}"


def marked_instance(mark: str, branch: str) -> str | None:
    """The instance a mark names, if this branch made it."""
    parts = mark.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == branch and parts[1] else None


@dataclass(frozen=True)
class LaunchSpec:
    argv: tuple[str, ...]  # never a shell string
    env: Mapping[str, str]  # the full environment of the child
    cwd: str | None
    user: str | None  # only honoured when we are root; else it must be us
    stdout_path: Path
    stderr_path: Path
    #: The spawn's mark (``make_mark``), added to the child's environment.
    mark: str | None = None
    #: Set in the child before exec (None: the daemon's own).
    umask: int | None = None
    #: Rotation of the log files at write time, by the log writer (0: off,
    #: and the child writes into its files directly).
    log_max_bytes: int = 0
    log_backups: int = 0
    #: The instance whose cgroup the child joins before exec, when the
    #: launcher has cgroups (None: none).
    cgroup: str | None = None
    #: Its cgroup's limits; refused by a launcher without cgroups.
    limits: Limits = field(default_factory=Limits)

    def child_env(self) -> dict[str, str]:
        env = dict(self.env)
        if self.mark is not None:
            env[MARK_VAR] = self.mark
        return env


@dataclass(frozen=True)
class Marked:
    """A live process this branch spawned, found by its mark."""

    pid: int
    create_time: float
    instance: str


@dataclass(frozen=True)
class Launched:
    pid: int
    create_time: float  # psutil create_time, to recognise the pid later


class Launcher(Protocol):
    def spawn(self, spec: LaunchSpec) -> Launched:
        """Start a process; raise SpawnError with a clear message if it cannot.

        Unlike the other methods, it may be called from several threads at
        once (the engine launches held spawns together): it touches no loop."""
        ...

    def watch(self, pid: int, on_exit: ExitCallback) -> None:
        """Call ``on_exit(code)`` once, from the loop, when pid dies.

        ``code`` is the exit status (negative signal number if killed by a
        signal) for our own children, None for any other process.
        """
        ...

    def alive(self, pid: int, create_time: float) -> bool:
        """That very process (pid and create_time) still lives and is no zombie."""
        ...

    def signal(self, pid: int, sig: int, group: bool) -> None:
        """Send sig to pid, or to its process group; a missing process is fine."""
        ...

    def tree_stats(self, pid: int) -> TreeStats:
        """CPU, memory and process count of pid and its descendants."""
        ...

    def marked(self, branch: str) -> list[Marked]:
        """The live main processes (session leaders) that ``branch`` spawned."""
        ...

    def exit_cause(self, pid: int, code: int | None) -> str | None:
        """Why pid, which has just died with ``code``, was ended, when the
        launcher knows more than the code (its cgroup's OOM killer); else None."""
        ...

    def release(self, instance: str) -> None:
        """The instance is removed: what is left of its processes goes, and
        so does what the launcher keeps for it (its cgroup)."""
        ...

    def prune(self, keep: set[str]) -> None:
        """Release what the launcher keeps for instances not in ``keep``
        (a daemon that went before a delete ended)."""
        ...

    def close(self) -> None:
        """Stop watching everything (pending callbacks are never called)."""
        ...


@dataclass
class _Watch:
    fd: int
    callbacks: list[ExitCallback] = field(default_factory=list)


class ProcessLauncher:
    """The real launcher: ``subprocess.Popen`` children watched through pidfds.

    All methods but ``spawn`` must be called from the thread running ``loop``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pipes: LogPipes | None = None,
        *,
        cgroups: CgroupTree | None = None,
    ) -> None:
        self._loop = loop
        self._pipes = pipes
        self._cgroups = cgroups
        #: pid -> the instance whose cgroup it was spawned (or adopted) in;
        #: kept after its death, for the Reap of what it left. (spawn runs on
        #: several threads: its changes hold the lock.)
        self._cgroup_of: dict[int, str] = {}
        self._cgroup_lock = threading.Lock()
        #: cgroup pid -> (cpu usage_usec, monotonic) at the last sample.
        self._cpu_samples: dict[int, tuple[int, float]] = {}
        #: pid -> its log files, when they are written through the log writer
        self._piped: dict[int, tuple[Path, Path]] = {}
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._watches: dict[int, _Watch] = {}
        #: root pid -> {pid: psutil.Process} of its tree at the last sample,
        #: so that cpu_percent compares against the previous call.
        self._stats: dict[int, dict[int, psutil.Process]] = {}
        self._closed = False

    # spawn ---------------------------------------------------------------

    def spawn(self, spec: LaunchSpec) -> Launched:
        if not spec.argv:
            raise SpawnError("empty command")
        if self._closed:
            raise SpawnError("launcher is closed")
        if spec.cwd is not None and not os.path.isdir(spec.cwd):
            raise SpawnError(f"working directory {spec.cwd!r} does not exist")
        uid, gid, groups = _user_ids(spec.user)
        prepared = self._prepare_cgroup(spec)
        try:
            out, err, piped = self._log_fds(spec, uid, gid)
        except BaseException:
            if prepared is not None:
                prepared.close()
            raise
        try:
            popen = subprocess.Popen(
                list(spec.argv),
                env=spec.child_env(),
                cwd=spec.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
                user=uid,
                group=gid,
                extra_groups=groups,
                # (in the forked child, before exec: subprocess's own umask(2))
                umask=-1 if spec.umask is None else spec.umask,
                # Into its cgroup in the child itself, before exec: it cannot
                # fork a process the cgroup misses (see _prepare_cgroup).
                preexec_fn=None if prepared is None else prepared.join,
            )
        except FileNotFoundError as e:
            raise SpawnError(f"executable {spec.argv[0]!r} not found") from e
        except PermissionError as e:
            raise SpawnError(f"cannot execute {spec.argv[0]!r}: permission denied") from e
        except subprocess.SubprocessError as e:
            if prepared is not None:  # (the only preexec_fn is the join)
                raise SpawnError(
                    f"cannot start {spec.argv[0]!r}: it could not join its cgroup"
                ) from e
            raise SpawnError(f"cannot start {spec.argv[0]!r}: {e}") from e
        except (OSError, ValueError) as e:
            raise SpawnError(f"cannot start {spec.argv[0]!r}: {e}") from e
        finally:
            os.close(out)
            os.close(err)
            if prepared is not None:
                prepared.close()
        self._children[popen.pid] = popen
        if prepared is not None and spec.cgroup is not None:
            with self._cgroup_lock:
                for old in [p for p, name in self._cgroup_of.items() if name == spec.cgroup]:
                    del self._cgroup_of[old]
                self._cgroup_of[popen.pid] = spec.cgroup
        if piped:
            self._piped[popen.pid] = (spec.stdout_path, spec.stderr_path)
        try:
            create_time = psutil.Process(popen.pid).create_time()
        except psutil.Error:  # not reaped yet, so this should not happen
            create_time = 0.0
        log.debug("spawned %s as pid %d", spec.argv[0], popen.pid)
        return Launched(pid=popen.pid, create_time=create_time)

    def _log_fds(self, spec: LaunchSpec, uid: int | None, gid: int | None) -> tuple[int, int, bool]:
        """The child's (stdout, stderr) and whether they go through the writer."""
        if self._pipes is not None and spec.log_max_bytes > 0:
            limits = spec.log_max_bytes, spec.log_backups
            try:
                out = self._pipes.open(spec.stdout_path, *limits, uid, gid)
                try:
                    err = self._pipes.open(spec.stderr_path, *limits, uid, gid)
                except BaseException:
                    os.close(out)
                    raise
                return out, err, True
            except LogWriterUnavailable as e:
                log.warning("%s; %s is written directly", e.message, spec.stdout_path.name)
        out = _open_log(spec.stdout_path, uid, gid)
        try:
            err = _open_log(spec.stderr_path, uid, gid)
        except BaseException:
            os.close(out)
            raise
        return out, err, False

    def _prepare_cgroup(self, spec: LaunchSpec) -> Prepared | None:
        """The instance's cgroups, made and limited, with their cgroup.procs
        open: the child writes itself into them after the fork, before exec.

        Why there: the parent writing the child's pid after the fork leaves
        a window in which the child may already have forked; clone3's
        CLONE_INTO_CGROUP has no Python binding, and subprocess takes no
        cgroup. The files are opened here, by the daemon (root), because
        Linux checks a cgroup.procs write against the opener's credentials
        (5.16+), and the child writes after it has become ``spec.user``.
        """
        wanted = spec.limits.controllers()
        if self._cgroups is None or spec.cgroup is None:
            if wanted:
                raise SpawnError(
                    f"{', '.join(LIMIT_FIELDS[c] for c in wanted)} needs cgroups, and this "
                    f"branch runs in {Mode.PROCESS_GROUP.value} mode (it needs root and a "
                    "writable cgroup2 hierarchy; under systemd, Delegate=yes)"
                )
            return None
        missing = self._cgroups.unsupported(spec.limits)
        if missing:
            raise SpawnError(
                f"{', '.join(LIMIT_FIELDS[c] for c in missing)}: this machine has no "
                f"{'/'.join(missing)} controller this branch can use "
                f"(it runs in {self._cgroups.mode.value} mode)"
            )
        try:
            return self._cgroups.prepare(spec.cgroup, spec.limits)
        except OSError as e:
            raise SpawnError(f"cannot make the cgroup of {spec.cgroup!r}: {e.strerror or e}") from e

    @property
    def supervision(self) -> Mode:
        return Mode.PROCESS_GROUP if self._cgroups is None else self._cgroups.mode

    # watch ---------------------------------------------------------------

    def watch(self, pid: int, on_exit: ExitCallback) -> None:
        if self._closed:
            raise RuntimeError("launcher is closed")
        existing = self._watches.get(pid)
        if existing is not None:
            existing.callbacks.append(on_exit)
            return
        if self._cgroups is not None and pid not in self._cgroup_of:
            adopted = self._cgroups.instance_of(pid)  # (a daemon before us spawned it)
            if adopted is not None:
                with self._cgroup_lock:
                    self._cgroup_of[pid] = adopted
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone (and, if ours, already reaped)
            self._loop.call_soon(on_exit, self._reap(pid))
            return
        self._watches[pid] = _Watch(fd, [on_exit])
        self._loop.add_reader(fd, self._on_readable, pid)

    def _on_readable(self, pid: int) -> None:
        popen = self._children.get(pid)
        code: int | None = None
        if popen is not None:
            code = popen.poll()
            if code is None:  # readable before waitable: should not happen; retry
                self._loop.remove_reader(self._watches[pid].fd)
                self._loop.call_later(0.01, self._retry_reap, pid)
                return
        self._finish(pid, code)

    def _retry_reap(self, pid: int) -> None:
        if pid not in self._watches:  # closed meanwhile
            return
        popen = self._children.get(pid)
        code = popen.poll() if popen is not None else None
        if popen is not None and code is None:
            self._loop.call_later(0.01, self._retry_reap, pid)
            return
        self._finish(pid, code)

    def _finish(self, pid: int, code: int | None) -> None:
        watch = self._watches.pop(pid)
        self._loop.remove_reader(watch.fd)
        os.close(watch.fd)
        self._children.pop(pid, None)
        self._stats.pop(pid, None)
        self._drain(pid)
        for callback in watch.callbacks:
            try:
                callback(code)
            except Exception:
                log.exception("exit callback for pid %d failed", pid)

    def _drain(self, pid: int) -> None:
        """What the child wrote is in its files before its exit is told (the
        start-failure line is read from there)."""
        paths = self._piped.pop(pid, None)
        if paths is not None and self._pipes is not None:
            try:
                self._pipes.drain(paths)
            except LogWriterUnavailable as e:
                log.warning("%s", e.message)

    def _reap(self, pid: int) -> int | None:
        self._drain(pid)
        popen = self._children.pop(pid, None)
        return popen.poll() if popen is not None else None

    # queries and signals -------------------------------------------------

    def alive(self, pid: int, create_time: float) -> bool:
        if pid <= 0:
            return False
        try:
            proc = psutil.Process(pid)
            # Our instances lead their own process group: a reused pid rarely does.
            return (
                abs(proc.create_time() - create_time) < CREATE_TIME_TOLERANCE
                and os.getpgid(pid) == pid
                and proc.status() != psutil.STATUS_ZOMBIE
            )
        except (psutil.Error, ProcessLookupError):
            return False

    def signal(self, pid: int, sig: int, group: bool) -> None:
        instance = self._cgroup_of.get(pid) if group else None
        if instance is not None and self._cgroups is not None:
            # every process of its cgroup: those that left its group too
            self._cgroups.signal(instance, sig)
        _signal(pid, sig, group)

    def tree_stats(self, pid: int) -> TreeStats:
        previous = self._stats.get(pid, {})
        instance = self._cgroup_of.get(pid)
        cgroup: CgroupStats | None = None
        try:
            root = psutil.Process(pid)
            if instance is not None and self._cgroups is not None:
                figures = self._cgroups.figures(instance)
                tree = [root, *(psutil.Process(p) for p in figures.pids if p != pid)]
                cgroup = CgroupStats(
                    memory_current=figures.memory_current,
                    cpu_usage_usec=figures.cpu_usage_usec,
                    oom_kills=figures.oom_kills,
                )
            else:
                tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            self._stats.pop(pid, None)
            return TreeStats()
        current: dict[int, psutil.Process] = {}
        cpu, rss, count = 0.0, 0, 0
        for fresh in tree:
            proc = fresh
            known = previous.get(fresh.pid)
            if known is not None and known == fresh:  # same pid and create_time
                proc = known  # keeps the last cpu sample
            try:
                with proc.oneshot():
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        continue
                    cpu += proc.cpu_percent(interval=None)
                    rss += proc.memory_info().rss
            except psutil.Error:
                continue
            current[proc.pid] = proc
            count += 1
        self._stats[pid] = current
        if cgroup is not None and cgroup.cpu_usage_usec is not None:
            cpu = self._cgroup_cpu(pid, cgroup.cpu_usage_usec, cpu)
        return TreeStats(cpu_percent=cpu, memory_rss=rss, processes=count, cgroup=cgroup)

    def _cgroup_cpu(self, pid: int, usage_usec: int, fallback: float) -> float:
        """The cgroup's cpu use since the last sample (processes that came
        and went in between count too), in percent of a core."""
        now = time.monotonic()
        last = self._cpu_samples.get(pid)
        self._cpu_samples[pid] = (usage_usec, now)
        if last is None or now <= last[1]:
            return fallback
        return max(0.0, (usage_usec - last[0]) / 1e4 / (now - last[1]))

    def marked(self, branch: str) -> list[Marked]:
        found: list[Marked] = []
        me = os.getpid()
        for proc in psutil.process_iter():
            try:
                # Only session leaders: an instance's main process leads its own
                # session; its children inherit the mark and go with its group.
                if proc.pid == me or os.getsid(proc.pid) != proc.pid:
                    continue
                with proc.oneshot():
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        continue
                    mark = proc.environ().get(MARK_VAR)
                    create_time = proc.create_time()
            except (psutil.Error, OSError):  # gone, or another user's we cannot read
                continue
            instance = marked_instance(mark, branch) if mark else None
            if instance is not None:
                found.append(Marked(proc.pid, create_time, instance))
        return found + self._in_cgroups({m.pid for m in found})

    def _in_cgroups(self, known: set[int]) -> list[Marked]:
        """The session leaders in this branch's instance cgroups that carry no
        mark (one that cleared its environment is still the instance's)."""
        found: list[Marked] = []
        if self._cgroups is None:
            return found
        for instance in self._cgroups.instances():
            for pid in self._cgroups.pids(instance):
                try:
                    proc = psutil.Process(pid)
                    if pid in known or os.getsid(pid) != pid:
                        continue
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        found.append(Marked(pid, proc.create_time(), instance))
                except (psutil.Error, OSError):
                    continue
        return found

    def exit_cause(self, pid: int, code: int | None) -> str | None:
        instance = self._cgroup_of.get(pid)
        if instance is None or self._cgroups is None:
            return None
        return self._cgroups.exit_cause(instance, code)

    def release(self, instance: str) -> None:
        with self._cgroup_lock:
            for pid in [p for p, name in self._cgroup_of.items() if name == instance]:
                del self._cgroup_of[pid]
                self._cpu_samples.pop(pid, None)
        if self._cgroups is not None:
            self._cgroups.remove(instance)

    def prune(self, keep: set[str]) -> None:
        if self._cgroups is None:
            return
        for instance in self._cgroups.instances():
            if instance not in keep:
                log.info("removing the cgroup of %s, which is no more", instance)
                self.release(instance)

    def close(self) -> None:
        self._closed = True
        watched = {self._cgroup_of.get(pid) for pid in self._watches}
        for watch in self._watches.values():
            self._loop.remove_reader(watch.fd)
            os.close(watch.fd)
        self._watches.clear()
        self._stats.clear()
        self._piped.clear()
        if self._cgroups is not None:
            # The cgroups of instances still running stay for the next daemon;
            # those of the others go, with what dies in them yet (no orphans).
            for instance in self._cgroups.instances():
                if instance not in watched:
                    self._cgroups.remove(instance)
            self._cgroups.remove_parents()
        # Children still running outlive us (they are adopted after a restart).
        # Dropping their Popen hands them to subprocess's own reaping of
        # abandoned children; silence its "still running" warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            self._children.clear()


def _signal(pid: int, sig: int, group: bool) -> None:
    """``killpg(pid)`` or ``kill(pid)``; a missing process is not an error."""
    if pid <= 1:  # 0 and -1 would reach our own group or everything; 1 is init
        raise ValueError(f"refusing to signal pid {pid}")
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _open_log(path: Path, uid: int | None, gid: int | None) -> int:
    """The log file, 0640 and owned by the instance's user when it has one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE)
    except OSError as e:
        raise SpawnError(f"cannot open log file {str(path)!r}: {e.strerror}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return fd  # a device (/dev/null) or a pipe: its mode is not ours to change
        os.fchmod(fd, LOG_MODE)  # (a file of an older daemon was 0644)
        if uid is not None:
            os.fchown(fd, uid, gid if gid is not None else -1)
    except OSError as e:
        os.close(fd)
        raise SpawnError(f"cannot secure log file {str(path)!r}: {e.strerror}") from e
    return fd


def base_env(daemon_env: Mapping[str, str], user: str | None) -> dict[str, str]:
    """The environment every instance starts from (docs/guide.md, "Security").

    ``PATH``, ``LANG``, ``LANGUAGE``, ``TZ`` and ``LC_*`` of the daemon's own,
    then ``HOME``, ``USER``, ``LOGNAME`` and ``SHELL`` of the user the instance
    runs as (``user``, else the daemon's) from the password database. The
    app's and the instance's env go on top; nothing else of the daemon's.
    """
    env = {k: v for k, v in daemon_env.items() if k in INHERITED_ENV or k.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_PATH)
    try:
        if user is None:
            pw = pwd.getpwuid(os.geteuid())
        elif user.isascii() and user.isdigit():
            pw = pwd.getpwuid(int(user))
        else:
            pw = pwd.getpwnam(user)
    except (KeyError, ValueError, OverflowError):
        return env  # an unknown user: the spawn says so
    env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell or "/bin/sh")
    return env


#: An env file larger than this is refused (it is read at every start).
ENV_FILE_MAX = 1024 * 1024


def read_env_files(paths: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """The variables of ``paths`` in order (a later file wins), and a warning
    for each line skipped. A path with a leading "-" is skipped when the file
    does not exist, as systemd does; any other file that cannot be read
    raises SpawnError, which fails this start with the reason."""
    env: dict[str, str] = {}
    warnings_: list[str] = []
    if not paths:
        return env, warnings_
    # the parser, at the first start of an instance that names env files
    from branchd.process.envfile import parse_env_file

    for given in paths:
        optional = given.startswith("-")
        path = given.removeprefix("-")
        try:
            with open(path, "rb") as fh:
                raw = fh.read(ENV_FILE_MAX + 1)
        except FileNotFoundError:
            if optional:
                continue
            raise SpawnError(f"env file {path!r} does not exist") from None
        except OSError as e:
            raise SpawnError(f"cannot read env file {path!r}: {e.strerror or e}") from None
        if len(raw) > ENV_FILE_MAX:
            raise SpawnError(f"env file {path!r} is larger than {ENV_FILE_MAX // 1024} KiB")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpawnError(f"env file {path!r} is not UTF-8 (byte {e.start})") from None
        parsed = parse_env_file(text)
        env.update(parsed.values)
        warnings_ += [f"{path}:{line}: {why}; skipped" for line, why in parsed.ignored]
    return env, warnings_


def user_env(env: Mapping[str, str]) -> dict[str, str]:
    """An app's or an instance's env without the names the daemon reserves."""
    return {k: v for k, v in env.items() if not k.startswith(RESERVED_PREFIX)}


def _user_ids(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """Popen's (user, group, extra_groups) to run as ``user`` (a name or a uid)."""
    if user is None:
        return None, None, None
    try:
        numeric = user.isascii() and user.isdigit()  # "²".isdigit() is True too
        pw = pwd.getpwuid(int(user)) if numeric else pwd.getpwnam(user)
    except (KeyError, ValueError, OverflowError):
        raise SpawnError(f"unknown user {user!r}") from None
    euid = os.geteuid()
    if euid != 0:
        if pw.pw_uid != euid:
            raise SpawnError(f"cannot run as user {user!r}: branchd is not running as root")
        return None, None, None
    return pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid)
