"""Instance cgroups: whole-tree tracking, kill and resource limits, where the
machine allows (docs/guide.md, "Resource limits and cgroups").

Each instance runs in a cgroup of its own under a parent the branch owns,
``<the daemon's own cgroup>/branchd-<branch id>/i-<instance>``: in the cgroup
v2 hierarchy always (it tracks the whole tree, setsid escapees included, and
``cgroup.kill`` ends it), plus, for a limit whose controller v2 does not
have, in that controller's v1 hierarchy (the hybrid layout: v2 mounted at
/sys/fs/cgroup/unified beside v1 controllers). Without a cgroup2 mount the
branch can write, the launcher keeps the process-group behaviour.

The top half is pure (layout detection from /proc/self/mountinfo and
/proc/self/cgroup texts, limit files, sizes); ``CgroupTree`` below is the
edge that writes cgroupfs. It only ever creates, writes and removes cgroups
under the branch's own parent: never one it did not make.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import re
import signal as _signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

log = logging.getLogger(__name__)


class Mode(StrEnum):
    """How a branch keeps an instance's process tree (``GET /v1/branch``)."""

    CGROUP_V2 = "cgroup-v2"
    CGROUP_V1_HYBRID = "cgroup-v1-hybrid"
    PROCESS_GROUP = "process-group"


#: The controllers behind memory_max, cpu_max and pids_max.
CONTROLLERS = ("memory", "cpu", "pids")
#: The cpu period the quota of cpu_max is a share of (the kernel's default).
CPU_PERIOD_US = 100_000
#: The smallest cpu_max: the kernel refuses a quota under 1 ms.
CPU_MIN_SHARE = 0.01
#: The name of an instance's cgroup (a prefix: no clash with the interface files).
INSTANCE_PREFIX = "i-"
#: systemd's DelegateSubgroup= name for the daemon's own leaf: the branch's
#: parent goes beside it, in the delegated cgroup, where controllers can be on.
SUPERVISOR_LEAF = "supervisor"


# -- pure: layout -------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """A cgroup mount of /proc/self/mountinfo."""

    point: str
    root: str  # the cgroup the mount shows at its point
    fstype: str  # cgroup2 or cgroup
    controllers: frozenset[str] = frozenset()  # v1 only: what the hierarchy holds


def _unescape(text: str) -> str:
    """mountinfo's octal escapes (\\040 for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts of a /proc/self/mountinfo text."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        options = set(tail[2].split(","))
        controllers = frozenset(CONTROLLERS) & options if tail[0] == "cgroup" else frozenset()
        mounts.append(Mount(_unescape(fields[4]), _unescape(fields[3]), tail[0], controllers))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/self/cgroup as {controller: path}; "" is the v2 hierarchy's."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, names, path = parts
        for name in names.split(",") if names else [""]:
            own[name] = path
    return own


def _inside(mount: Mount, path: str) -> str | None:
    """The directory of cgroup ``path`` under ``mount``, if the mount shows it."""
    root = mount.root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return None
    return mount.point.rstrip("/") + path[len(root) :]


@dataclass(frozen=True)
class Located:
    """Where the daemon's own cgroups are: the bases of the branch's parents."""

    #: The v2 directory the branch's parent goes in (None: no cgroup2 mount).
    unified: str | None
    #: v1 controller -> the directory its parent goes in.
    v1: Mapping[str, str] = field(default_factory=dict)


def locate(mountinfo: str, proc_cgroup: str) -> Located:
    """The bases from the texts of /proc/self/mountinfo and /proc/self/cgroup."""
    mounts = parse_mountinfo(mountinfo)
    own = parse_proc_cgroup(proc_cgroup)
    unified: str | None = None
    v2_path = own.get("")
    if v2_path is not None:
        if posixpath.basename(v2_path) == SUPERVISOR_LEAF:
            v2_path = posixpath.dirname(v2_path)
        for mount in mounts:
            if mount.fstype == "cgroup2":
                unified = _inside(mount, v2_path)
                if unified is not None:
                    break
    v1: dict[str, str] = {}
    for mount in mounts:
        for controller in sorted(mount.controllers):
            path = own.get(controller)
            where = _inside(mount, path) if path is not None else None
            if where is not None and controller not in v1:
                v1[controller] = where
    return Located(unified, v1)


@dataclass(frozen=True)
class Layout:
    """What the branch uses: the v2 base, and for each limit's controller
    whether v2 or v1 has it (absent: no limit of that kind here)."""

    unified: str | None
    #: controller -> "v2" or the v1 base directory.
    limits: Mapping[str, str] = field(default_factory=dict)

    @property
    def mode(self) -> Mode:
        if self.unified is None:
            return Mode.PROCESS_GROUP
        if any(where != "v2" for where in self.limits.values()):
            return Mode.CGROUP_V1_HYBRID
        return Mode.CGROUP_V2

    def v1_bases(self) -> dict[str, str]:
        return {c: where for c, where in self.limits.items() if where != "v2"}


def decide(located: Located, v2_controllers: str) -> Layout:
    """The layout from the bases and the text of the v2 base's
    ``cgroup.controllers`` (what its children may have): a controller v2
    offers is taken there, else from its v1 hierarchy if there is one."""
    if located.unified is None:
        return Layout(None)
    offered = set(v2_controllers.split())
    limits: dict[str, str] = {}
    for controller in CONTROLLERS:
        if controller in offered:
            limits[controller] = "v2"
        elif controller in located.v1:
            limits[controller] = located.v1[controller]
    return Layout(located.unified, limits)


# -- pure: limits and figures -------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """An instance's cgroup limits (None: none of that kind)."""

    memory_max: int | None = None  # bytes
    cpu_max: float | None = None  # a share of one core: 0.5, 2.0
    pids_max: int | None = None

    def controllers(self) -> list[str]:
        given = {"memory": self.memory_max, "cpu": self.cpu_max, "pids": self.pids_max}
        return [c for c in CONTROLLERS if given[c] is not None]


def cpu_quota_us(share: float) -> int:
    """The quota of ``share`` of a core per CPU_PERIOD_US."""
    return max(1000, round(share * CPU_PERIOD_US))


def v2_files(limits: Limits) -> list[tuple[str, str]]:
    """The v2 interface files to write for ``limits``, in order."""
    out: list[tuple[str, str]] = []
    if limits.memory_max is not None:
        # swap counts too: else a hog swaps at the limit instead of being killed
        out += [("memory.max", str(limits.memory_max)), ("memory.swap.max", "0")]
    if limits.cpu_max is not None:
        out.append(("cpu.max", f"{cpu_quota_us(limits.cpu_max)} {CPU_PERIOD_US}"))
    if limits.pids_max is not None:
        out.append(("pids.max", str(limits.pids_max)))
    return out


def v1_files(limits: Limits, controller: str) -> list[tuple[str, str]]:
    """The v1 files of one controller's hierarchy to write for ``limits``, in order."""
    if controller == "memory" and limits.memory_max is not None:
        value = str(limits.memory_max)
        # (memsw may only be set at or above the memory limit, so after it)
        return [("memory.limit_in_bytes", value), ("memory.memsw.limit_in_bytes", value)]
    if controller == "cpu" and limits.cpu_max is not None:
        quota = cpu_quota_us(limits.cpu_max)
        return [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", str(quota))]
    if controller == "pids" and limits.pids_max is not None:
        return [("pids.max", str(limits.pids_max))]
    return []


def flat_keyed(text: str) -> dict[str, int]:
    """A flat-keyed cgroup file (memory.events, cpu.stat, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def size_text(n: int) -> str:
    """A byte count as a person gives it: 64MiB, 1.5GiB, 1000B."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"


def oom_reason(memory_max: int | None) -> str:
    """An instance's reason after its cgroup's OOM killer ended it."""
    limit = f"memory_max {size_text(memory_max)}" if memory_max else "the memory limit"
    return f"killed: {limit} reached (oom_kill)"


# -- the edge -----------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """What an instance's cgroup says of it."""

    pids: tuple[int, ...] = ()
    memory_current: int | None = None
    cpu_usage_usec: int | None = None
    oom_kills: int = 0


@dataclass(frozen=True)
class Prepared:
    """An instance's cgroups, ready for a child: the opened ``cgroup.procs``
    files it writes itself into (``join``, in the child before exec)."""

    fds: tuple[int, ...]

    def join(self) -> None:
        # (runs in the forked child: only writes, no allocation worth a lock)
        for fd in self.fds:
            os.write(fd, b"0")

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class CgroupTree:
    """The cgroups of one branch's instances under its own parents."""

    def __init__(self, layout: Layout, branch: str) -> None:
        if layout.unified is None:
            raise ValueError("no cgroup2 base")
        self.layout = layout
        self._name = f"branchd-{branch}"
        self._v2_parent = Path(layout.unified, self._name)
        self._v1_parents = {c: Path(base, self._name) for c, base in layout.v1_bases().items()}
        #: Instance -> OOM kills its cgroup had counted when its child started
        #: (or was adopted): a cgroup outlives the runs of its instance.
        self._oom_base: dict[str, int] = {}

    @property
    def mode(self) -> Mode:
        return self.layout.mode

    @classmethod
    def probe(cls, branch: str, proc: Path = Path("/proc/self")) -> CgroupTree | None:
        """The branch's tree if the machine lets it have one (its parents made,
        the v2 controllers it takes turned on for them), else None."""
        try:
            located = locate((proc / "mountinfo").read_text(), (proc / "cgroup").read_text())
            if located.unified is None:
                return None
            offered = _read(Path(located.unified, "cgroup.controllers")) or ""
            tree = cls(decide(located, offered), branch)
            tree._make_parents()
        except OSError as exc:
            log.info("no cgroups (%s): instances are kept by their process group", exc)
            return None
        return tree

    def _make_parents(self) -> None:
        v2 = [c for c, where in self.layout.limits.items() if where == "v2"]
        self._v2_parent.mkdir(exist_ok=True)
        if v2:
            try:
                # Our parent's children may have them only if our parent has them
                # on: the one write to a cgroup branchd did not make (the daemon's
                # own, delegated to it), refused while that one holds processes
                # (the daemon itself, unless it runs in a "supervisor" leaf).
                _enable(Path(self.layout.unified or "/"), v2)
                _enable(self._v2_parent, v2)
            except OSError as exc:
                log.warning(
                    "cannot turn on the %s controller(s) for instances (%s); "
                    "limits of those kinds are refused",
                    "/".join(v2),
                    exc.strerror or exc,
                )
                limits = {c: w for c, w in self.layout.limits.items() if w != "v2"}
                self.layout = Layout(self.layout.unified, limits)
        for path in self._v1_parents.values():
            path.mkdir(exist_ok=True)

    # instances -------------------------------------------------------------

    def _v2(self, instance: str) -> Path:
        return self._v2_parent / f"{INSTANCE_PREFIX}{instance}"

    def _dirs(self, instance: str) -> list[Path]:
        leaf = f"{INSTANCE_PREFIX}{instance}"
        return [self._v2(instance), *(p / leaf for p in self._v1_parents.values())]

    def unsupported(self, limits: Limits) -> list[str]:
        """The controllers ``limits`` needs that this machine does not give us."""
        return [c for c in limits.controllers() if c not in self.layout.limits]

    def prepare(self, instance: str, limits: Limits) -> Prepared:
        """Make (or reuse) the instance's cgroups with ``limits`` written; the
        answer's files are open for the child to join. Raises OSError."""
        fds: list[int] = []
        try:
            v2 = self._v2(instance)
            v2.mkdir(exist_ok=True)
            for name, value in v2_files(limits):
                controller = name.split(".", 1)[0]
                if self.layout.limits.get(controller) == "v2":
                    _write_optional(v2 / name, value, required=name != "memory.swap.max")
            _reset_v2(v2, limits, self.layout)
            fds.append(os.open(v2 / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
            for controller, parent in self._v1_parents.items():
                leaf = parent / f"{INSTANCE_PREFIX}{instance}"
                leaf.mkdir(exist_ok=True)
                _reset_v1(leaf, controller)
                for name, value in v1_files(limits, controller):
                    _write_optional(leaf / name, value, required="memsw" not in name)
                fds.append(os.open(leaf / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
        except BaseException:
            Prepared(tuple(fds)).close()
            raise
        self._oom_base[instance] = self._oom_kills(instance)
        return Prepared(tuple(fds))

    def pids(self, instance: str) -> list[int]:
        text = _read(self._v2(instance) / "cgroup.procs") or ""
        return [int(p) for p in text.split()]

    def instance_of(self, pid: int) -> str | None:
        """The instance whose cgroup holds pid (it lives), if one of ours."""
        try:
            own = parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text()).get("", "")
        except OSError:
            return None
        parent, _, leaf = own.rpartition("/")
        if posixpath.basename(parent) != self._name or not leaf.startswith(INSTANCE_PREFIX):
            return None
        instance = leaf[len(INSTANCE_PREFIX) :]
        if not self._v2(instance).is_dir():
            return None
        # (adopted: only an OOM kill from now on is its own)
        self._oom_base.setdefault(instance, self._oom_kills(instance))
        return instance

    def instances(self) -> list[str]:
        """The instances that have a cgroup under the branch's parent."""
        try:
            names = [p.name for p in self._v2_parent.iterdir() if p.is_dir()]
        except OSError:
            return []
        return sorted(n[len(INSTANCE_PREFIX) :] for n in names if n.startswith(INSTANCE_PREFIX))

    def signal(self, instance: str, sig: int) -> None:
        """``sig`` to every process of the instance; SIGKILL through ``kill``."""
        if sig == _signal.SIGKILL:
            self.kill(instance)
            return
        for pid in self.pids(instance):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self, instance: str) -> None:
        """SIGKILL to every process of the instance, forks under way included:
        ``cgroup.kill`` (Linux 5.14), else freeze, kill each, thaw."""
        v2 = self._v2(instance)
        if not v2.is_dir():
            return
        try:
            (v2 / "cgroup.kill").write_text("1")
            return
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s: cgroup.kill failed (%s); killing each process", instance, exc)
        frozen = _write_optional(v2 / "cgroup.freeze", "1", required=False)
        try:
            if frozen:  # a frozen process cannot fork any more; wait until all are
                end = time.monotonic() + 1.0
                while "frozen 1" not in (_read(v2 / "cgroup.events") or "frozen 1"):
                    if time.monotonic() > end:
                        break
                    time.sleep(0.005)
            for pid in self.pids(instance):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, _signal.SIGKILL)
        finally:
            if frozen:  # (SIGKILL is acted on at the thaw)
                _write_optional(v2 / "cgroup.freeze", "0", required=False)

    def figures(self, instance: str) -> Figures:
        v2 = self._v2(instance)
        memory: int | None = None
        where = self.layout.limits.get("memory")
        if where == "v2":
            memory = _read_int(v2 / "memory.current")
        elif where is not None:
            leaf = self._v1_parents["memory"] / f"{INSTANCE_PREFIX}{instance}"
            memory = _read_int(leaf / "memory.usage_in_bytes")
        cpu = flat_keyed(_read(v2 / "cpu.stat") or "").get("usage_usec")
        return Figures(tuple(self.pids(instance)), memory, cpu, self._oom_kills(instance))

    def _oom_kills(self, instance: str) -> int:
        where = self.layout.limits.get("memory")
        if where == "v2":
            text = _read(self._v2(instance) / "memory.events")
        elif where is not None:
            text = _read(
                self._v1_parents["memory"] / f"{INSTANCE_PREFIX}{instance}" / "memory.oom_control"
            )
        else:
            return 0
        return flat_keyed(text or "").get("oom_kill", 0)

    def exit_cause(self, instance: str, code: int | None) -> str | None:
        """Why the instance's main process ended (exit ``code``; None: not our
        child), if its cgroup knows: its OOM killer, which ends with SIGKILL."""
        kills = self._oom_kills(instance)
        if kills <= self._oom_base.get(instance, 0):
            return None
        self._oom_base[instance] = kills
        if code not in (None, -_signal.SIGKILL):
            return None  # it killed another process of the tree; this one ended by itself
        return oom_reason(self._memory_limit(instance))

    def _memory_limit(self, instance: str) -> int | None:
        where = self.layout.limits.get("memory")
        if where == "v2":
            text = _read(self._v2(instance) / "memory.max")
        elif where is not None:
            leaf = self._v1_parents["memory"] / f"{INSTANCE_PREFIX}{instance}"
            text = _read(leaf / "memory.limit_in_bytes")
        else:
            return None
        try:
            value = int(text or "")
        except ValueError:
            return None  # "max"
        return value if value < 1 << 62 else None  # (v1's "no limit" is a huge number)

    def remove(self, instance: str) -> bool:
        """Kill what is left of the instance and remove its cgroups (True: gone)."""
        self.kill(instance)
        gone = True
        for path in self._dirs(instance):
            gone = _rmdir_when_empty(path) and gone
        self._oom_base.pop(instance, None)
        return gone

    def remove_parents(self) -> None:
        """The branch's parents, if no instance cgroup is left in them."""
        for path in [self._v2_parent, *self._v1_parents.values()]:
            with contextlib.suppress(OSError):
                path.rmdir()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _write_optional(path: Path, value: str, *, required: bool) -> bool:
    """Write a cgroup file; a missing one is fine unless ``required``."""
    try:
        path.write_text(value)
        return True
    except FileNotFoundError:
        if required:
            raise
        return False
    except OSError as exc:
        if required or exc.errno not in (errno.EINVAL, errno.EPERM, errno.EACCES):
            raise
        return False


def _enable(path: Path, controllers: Iterable[str]) -> None:
    have = set((_read(path / "cgroup.subtree_control") or "").split())
    missing = [c for c in controllers if c not in have]
    if missing:
        (path / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))


def _reset_v2(path: Path, limits: Limits, layout: Layout) -> None:
    """A reused cgroup drops the limits a former spec set and this one has not."""
    given = set(limits.controllers())
    defaults = {
        "memory": [("memory.max", "max"), ("memory.swap.max", "max")],
        "cpu": [("cpu.max", f"max {CPU_PERIOD_US}")],
        "pids": [("pids.max", "max")],
    }
    for controller, files in defaults.items():
        if controller not in given and layout.limits.get(controller) == "v2":
            for name, value in files:
                _write_optional(path / name, value, required=False)


def _reset_v1(path: Path, controller: str) -> None:
    files = {
        "memory": [("memory.memsw.limit_in_bytes", "-1"), ("memory.limit_in_bytes", "-1")],
        "cpu": [("cpu.cfs_quota_us", "-1")],
        "pids": [("pids.max", "max")],
    }
    for name, value in files.get(controller, []):
        _write_optional(path / name, value, required=False)


def _rmdir_when_empty(path: Path, wait: float = 1.0) -> bool:
    """rmdir a cgroup once its killed processes are gone (EBUSY until then)."""
    end = time.monotonic() + wait
    while True:
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > end:
                log.warning("cannot remove cgroup %s: %s", path, exc.strerror)
                return False
            time.sleep(0.005)
