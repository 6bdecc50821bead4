"""The pure parts of instance cgroups (issue 15, part 5): where the daemon's
cgroups are, from /proc/self/mountinfo and /proc/self/cgroup texts; which
hierarchy each limit takes; the files a limit writes; the OOM reason; and
an exit's cause reaching the instance's reason through the state machine."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from branchd.errors import SpawnError
from branchd.model import Autorestart, Policy, State
from branchd.process.cgroups import (
    CgroupTree,
    Layout,
    Limits,
    Located,
    Mode,
    Mount,
    cpu_quota_us,
    decide,
    flat_keyed,
    locate,
    oom_reason,
    parse_mountinfo,
    parse_proc_cgroup,
    size_text,
    v1_files,
    v2_files,
)
from branchd.process.launcher import LaunchSpec, ProcessLauncher
from branchd.process.machine import Backoff, Exited, Proc, Spawned, Start, step

#: The CI machine's layout: v2 at /sys/fs/cgroup/unified (no controllers of
#: its own) beside v1 hierarchies, the memory one nested by the sandbox.
HYBRID_MOUNTINFO = """\
23 1 253:0 / / rw,relatime - ext4 /dev/root rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/98db
2:cpuacct:/
1:cpu:/
0::/
"""
#: A unified machine, the daemon a systemd service with Delegate=yes and
#: DelegateSubgroup=supervisor.
UNIFIED_MOUNTINFO = """\
25 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""
UNIFIED_CGROUP = "0::/system.slice/branchd.service/supervisor\n"


def test_parse_mountinfo_keeps_the_cgroup_mounts_and_their_controllers() -> None:
    mounts = parse_mountinfo(HYBRID_MOUNTINFO)
    assert [m.point for m in mounts] == [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/systemd",
        "/sys/fs/cgroup/unified",
    ]
    assert mounts[0] == Mount("/sys/fs/cgroup/cpu", "/", "cgroup", frozenset({"cpu"}))
    assert mounts[-1] == Mount("/sys/fs/cgroup/unified", "/", "cgroup2")
    # optional fields before the "-", and octal escapes in the mount point
    line = r"30 25 0:26 /sub /mnt/my\040cg rw shared:4 master:1 - cgroup2 cgroup2 rw"
    assert parse_mountinfo(line) == [Mount("/mnt/my cg", "/sub", "cgroup2")]
    assert parse_mountinfo("garbage\n\n1 2 3\n") == []


def test_parse_proc_cgroup() -> None:
    own = parse_proc_cgroup(HYBRID_CGROUP + "7:cpu,cpuacct:/x\n")
    assert own[""] == "/" and own["memory"] == "/process_api/98db"
    assert own["cpu"] == "/x" and own["cpuacct"] == "/x" and own["name=systemd"] == "/"


@pytest.mark.parametrize(
    ("mountinfo", "cgroup", "located"),
    [
        (
            HYBRID_MOUNTINFO,
            HYBRID_CGROUP,
            Located(
                "/sys/fs/cgroup/unified/",
                {
                    "cpu": "/sys/fs/cgroup/cpu/",
                    "memory": "/sys/fs/cgroup/memory/process_api/98db",
                    "pids": "/sys/fs/cgroup/pids/",
                },
            ),
        ),
        # DelegateSubgroup=supervisor: the branch's parent goes beside the daemon's leaf
        (UNIFIED_MOUNTINFO, UNIFIED_CGROUP, Located("/sys/fs/cgroup/system.slice/branchd.service")),
        (
            UNIFIED_MOUNTINFO,
            "0::/user.slice/u.scope\n",
            Located("/sys/fs/cgroup/user.slice/u.scope"),
        ),
        # no cgroup2 mount: no v2 base (process groups), whatever v1 has
        (HYBRID_MOUNTINFO.replace("cgroup2 cgroup2", "tmpfs tmpfs"), HYBRID_CGROUP, None),
        # a mount of a subtree that does not show our cgroup
        (UNIFIED_MOUNTINFO.replace(" / /sys", " /other /sys"), UNIFIED_CGROUP, Located(None)),
        (UNIFIED_MOUNTINFO, "", Located(None)),
    ],
)
def test_locate(mountinfo: str, cgroup: str, located: Located | None) -> None:
    got = locate(mountinfo, cgroup)
    if located is None:
        assert got.unified is None and set(got.v1) == {"cpu", "memory", "pids"}
    else:
        assert got == located


HYBRID = Located("/u", {"memory": "/m", "cpu": "/c", "pids": "/p"})


@pytest.mark.parametrize(
    ("located", "controllers", "limits", "mode"),
    [
        (HYBRID, "hugetlb", {"memory": "/m", "cpu": "/c", "pids": "/p"}, Mode.CGROUP_V1_HYBRID),
        (HYBRID, "cpu memory pids", {"memory": "v2", "cpu": "v2", "pids": "v2"}, Mode.CGROUP_V2),
        (HYBRID, "memory io", {"memory": "v2", "cpu": "/c", "pids": "/p"}, Mode.CGROUP_V1_HYBRID),
        (Located("/u"), "cpuset io memory pids", {"memory": "v2", "pids": "v2"}, Mode.CGROUP_V2),
        (Located("/u"), "", {}, Mode.CGROUP_V2),  # tracking and kill, no limits
        (Located(None, {"memory": "/m"}), "memory", {}, Mode.PROCESS_GROUP),
    ],
)
def test_decide_takes_each_controller_from_v2_else_v1(
    located: Located, controllers: str, limits: dict[str, str], mode: Mode
) -> None:
    layout = decide(located, controllers)
    assert dict(layout.limits) == limits and layout.mode == mode


def test_limit_files() -> None:
    none = Limits()
    assert none.controllers() == [] and v2_files(none) == []
    assert all(v1_files(none, c) == [] for c in ("memory", "cpu", "pids"))
    limits = Limits(memory_max=64 << 20, cpu_max=0.5, pids_max=32)
    assert limits.controllers() == ["memory", "cpu", "pids"]
    assert v2_files(limits) == [
        ("memory.max", "67108864"),
        ("memory.swap.max", "0"),
        ("cpu.max", "50000 100000"),
        ("pids.max", "32"),
    ]
    assert v1_files(limits, "memory") == [
        ("memory.limit_in_bytes", "67108864"),
        ("memory.memsw.limit_in_bytes", "67108864"),
    ]
    assert v1_files(limits, "cpu") == [
        ("cpu.cfs_period_us", "100000"),
        ("cpu.cfs_quota_us", "50000"),
    ]
    assert v1_files(limits, "pids") == [("pids.max", "32")]
    assert v1_files(limits, "freezer") == []


@pytest.mark.parametrize(
    ("share", "quota"),
    [(0.5, 50000), (2.0, 200000), (0.01, 1000), (0.001, 1000), (1.234567, 123457)],
)
def test_cpu_quota(share: float, quota: int) -> None:
    assert cpu_quota_us(share) == quota


@pytest.mark.parametrize(
    ("n", "text"),
    [(64 << 20, "64MiB"), (3 << 29, "1.5GiB"), (1000, "1000B"), (1024, "1KiB"), (1 << 40, "1TiB")],
)
def test_size_text(n: int, text: str) -> None:
    assert size_text(n) == text


def test_oom_reason_and_the_counters() -> None:
    assert oom_reason(64 << 20) == "killed: memory_max 64MiB reached (oom_kill)"
    assert oom_reason(None) == "killed: the memory limit reached (oom_kill)"
    events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n"
    assert flat_keyed(events)["oom_kill"] == 1
    v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    assert flat_keyed(v1)["oom_kill"] == 3
    assert flat_keyed("usage_usec 1234\nuser_usec 1000\nbad line x\n") == {
        "usage_usec": 1234,
        "user_usec": 1000,
    }


def test_the_mode_of_a_layout() -> None:
    assert Layout(None).mode == Mode.PROCESS_GROUP
    assert Layout("/u", {"memory": "v2"}).v1_bases() == {}
    assert Layout("/u", {"memory": "/m", "cpu": "v2"}).v1_bases() == {"memory": "/m"}


POLICY = Policy(autorestart=Autorestart.NEVER, startsecs=0.0, startretries=3)
OOM = "killed: memory_max 64MiB reached (oom_kill)"


def _running(policy: Policy) -> Proc:
    proc, _ = step(Proc(), Start(), policy, 0.0, Backoff(1.0, 8.0))
    proc, _ = step(proc, Spawned(42), policy, 0.0, Backoff(1.0, 8.0))
    return proc


def test_an_exits_cause_is_the_instances_reason() -> None:
    proc = _running(POLICY)
    assert proc.state == State.RUNNING
    gone, _ = step(proc, Exited(-9, cause=OOM), POLICY, 5.0, Backoff(1.0, 8.0))
    assert (gone.state, gone.reason, gone.exit_code) == (State.EXITED, OOM, -9)
    # while starting, it is why the start failed
    starting = replace(POLICY, startsecs=10.0)
    proc = _running(starting)
    assert proc.state == State.STARTING
    failed, _ = step(proc, Exited(-9, "MemoryError", cause=OOM), starting, 1.0, Backoff(1.0, 8.0))
    assert (failed.state, failed.reason) == (State.BACKOFF, OOM)
    plain, _ = step(proc, Exited(1), starting, 1.0, Backoff(1.0, 8.0))
    assert plain.reason == "exited too quickly (code 1)"


def test_a_limit_without_cgroups_fails_the_start_with_the_reason(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    try:
        launcher = ProcessLauncher(loop)  # (no cgroups)
        assert launcher.supervision == Mode.PROCESS_GROUP
        spec = LaunchSpec(
            argv=("true",),
            env={},
            cwd=None,
            user=None,
            stdout_path=tmp_path / "out",
            stderr_path=tmp_path / "err",
            cgroup="p1",
            limits=Limits(memory_max=64 << 20, pids_max=10),
        )
        with pytest.raises(
            SpawnError,
            match=r"^memory_max, pids_max needs cgroups, and this branch runs in process-group",
        ):
            launcher.spawn(spec)
        assert not (tmp_path / "out").exists()  # nothing started
    finally:
        loop.close()


def test_the_oom_cause_counts_only_kills_since_the_start_that_ended_the_main(
    tmp_path: Path,
) -> None:
    # (plain files stand in for the cgroup's: only the reading is tested)
    tree = CgroupTree(Layout(str(tmp_path), {"memory": "v2"}), "b1")
    leaf = tmp_path / "branchd-b1" / "i-w1"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text("67108864\n")
    (leaf / "memory.events").write_text("oom 2\noom_kill 2\n")
    assert tree.instances() == ["w1"]
    tree._oom_base["w1"] = 2  # (what prepare records: the kills before this start)
    assert tree.exit_cause("w1", -9) is None  # killed, but not by the OOM killer
    (leaf / "memory.events").write_text("oom 3\noom_kill 3\n")
    assert tree.exit_cause("w1", -9) == "killed: memory_max 64MiB reached (oom_kill)"
    assert tree.exit_cause("w1", -9) is None  # (counted once)
    (leaf / "memory.events").write_text("oom 4\noom_kill 4\n")
    assert tree.exit_cause("w1", 0) is None  # it killed another of the tree
    (leaf / "memory.events").write_text("oom 5\noom_kill 5\n")
    (leaf / "memory.max").write_text("max\n")
    assert tree.exit_cause("w1", None) == "killed: the memory limit reached (oom_kill)"
    # v1: memory.oom_control, and "no limit" is a huge number
    v1 = CgroupTree(Layout(str(tmp_path), {"memory": str(tmp_path / "v1")}), "b2")
    (tmp_path / "branchd-b2" / "i-w2").mkdir(parents=True)
    leaf1 = tmp_path / "v1" / "branchd-b2" / "i-w2"
    leaf1.mkdir(parents=True)
    (leaf1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (leaf1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert v1.exit_cause("w2", -9) == "killed: the memory limit reached (oom_kill)"
