"""Instance output through the branch's log writer (issue 15, part 6): no line
lost or written twice through rotations and a daemon restart, the size bound
held, and a reopen after an external move of the file."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
from branchctl.cli import main
from click.testing import CliRunner

from tests.conftest import Branchd, wait_for

PY = sys.executable
LINE = 100  # bytes of each numbered line
#: Numbered lines at a given rate (bytes/s), then "done" on stderr, then idle.
NUMBERED = """
import sys, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
pad = "x" * 90
out = sys.stdout.buffer
i, start = 0, time.monotonic()
step = max(1, min(2000, int(rate / 100 / 50)))  # about 50 writes a second
while i < n:
    batch = min(step, n - i)
    out.write("".join("%09d %s\\n" % (j, pad) for j in range(i, i + batch)).encode())
    out.flush()
    i += batch
    ahead = i * 100 / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
sys.stderr.write("done\\n")
sys.stderr.flush()
time.sleep(1e9)
"""
NUMBER = re.compile(rb"(\d{9}) x{90}")


def kept_numbers(current: Path, backups: int) -> list[int]:
    """The line numbers in the backups (oldest first) and the current file.

    The oldest kept file starts at a rotation: if a line had been split there
    (it never is when lines are short), its head went with the file rotated
    away, so a first fragment is allowed, and only it."""
    files = [current.with_name(f"{current.name}.{n}") for n in range(backups, 0, -1)]
    data = b"".join(f.read_bytes() for f in [*files, current] if f.exists())
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    if lines and not NUMBER.fullmatch(lines[0]):
        lines = lines[1:]
    numbers = []
    for line in lines:
        match = NUMBER.fullmatch(line)
        assert match, line[:120]
        numbers.append(int(match.group(1)))
    return numbers


def add(b: Branchd, name: str, command: list[str], **fields: object) -> dict:
    b.call("PUT", "/v1/apps/web", {})
    return b.ok(  # type: ignore[no-any-return]
        "POST", "/v1/apps/web/instances", {"name": name, "command": command, **fields}, status=201
    )


def test_20_mb_s_through_rotations_and_a_restart_loses_and_doubles_nothing(
    branchd_factory: Callable[..., Branchd],
) -> None:
    b = branchd_factory()
    max_bytes, backups = 1024 * 1024, 3
    total = 500_000  # 50 MB at 20 MB/s: 2.5 s, about 48 rotations
    add(
        b,
        "num",
        [PY, "-c", NUMBERED, str(total), str(20e6)],
        startsecs=0.1,
        log_max_bytes=max_bytes,
        log_backups=backups,
    )
    logs = b.state_dir / "logs" / "web"
    current, err = logs / "num.stdout.log", logs / "num.stderr.log"
    pid = b.wait_state("web", "num", "running")["pid"]
    wait_for(lambda: current.with_name("num.stdout.log.1").exists(), 10)

    # The daemon goes (an upgrade) and comes back while the child writes on.
    b.signal(signal.SIGUSR2)
    assert b.wait_exit() == 0
    assert "done" not in err.read_text(), "the child was done before the daemon went"
    b2 = branchd_factory(state_dir=b.state_dir)
    assert b2.wait_state("web", "num", "running")["pid"] == pid  # adopted
    wait_for(lambda: "done" in err.read_text(), 30)

    numbers = kept_numbers(current, backups)
    # a contiguous range, without a duplicate, ending at the last line written
    assert numbers == list(range(numbers[0], total)), "a line lost or written twice"
    # the bound: every file at most max_bytes, no more than `backups` backups
    files = sorted(logs.glob("num.stdout.log*"))
    assert len(files) == backups + 1, [f.name for f in files]
    assert all(f.stat().st_size <= max_bytes for f in files)
    # ... and held by rotating, not by dropping: the backups are full
    assert len(numbers) * LINE > backups * (max_bytes - LINE)
    # the tail and the follow read the same lines as the files
    assert b2.call("GET", "/v1/apps/web/instances/num/logs?tail=2").text.splitlines() == [
        f"{n:09d} {'x' * 90}" for n in (total - 2, total - 1)
    ]


def test_logs_reopen_after_an_external_move(branchd_factory: Callable[..., Branchd]) -> None:
    b = branchd_factory()
    add(b, "slow", [PY, "-c", NUMBERED, str(10**9), str(LINE * 200)], startsecs=0.1)
    logs = b.state_dir / "logs" / "web"
    current = logs / "slow.stdout.log"
    wait_for(lambda: current.exists() and current.stat().st_size >= 10 * LINE, 10)
    moved = logs / "slow.stdout.log-20260101"
    current.rename(moved)  # as logrotate does, without copytruncate
    cli = CliRunner()
    r = cli.invoke(main, ["--url", b.url, "--token", str(b.token), "logs", "reopen"])
    assert r.exit_code == 0 and r.output == "reopened 2 log files\n", r.output  # stdout, stderr
    wait_for(lambda: current.exists() and current.stat().st_size >= 10 * LINE, 10)
    old = [int(line[:9]) for line in moved.read_bytes().splitlines()]
    new = [int(line[:9]) for line in current.read_bytes().splitlines()]
    assert old == list(range(len(old))) and new[0] == old[-1] + 1
    assert new == list(range(new[0], new[0] + len(new)))
    r = cli.invoke(main, ["--url", b.url, "--token", str(b.token), "logs", "web"])
    assert r.exit_code == 2 and "missing argument NAME" in r.output
    assert b.ok("POST", "/v1/logs/reopen") == {"reopened": 2}
    # the writer is small: one process per branch, a few MiB of its own
    writers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(part.endswith("logwriter.py") for part in p.info["cmdline"] or ())
        and str(b.state_dir / "logs") in (p.info["cmdline"] or ())
    ]
    assert len(writers) == 1
    assert writers[0].memory_full_info().uss < 16 * 1024 * 1024
