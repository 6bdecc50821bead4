"""Instance log files: rotation bounds, tail from the end, follow across rotation."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from branchd.errors import Invalid
from branchd.process import logs
from branchd.process.logs import (
    TAIL_LINE_MAX,
    TAIL_MAX_BYTES,
    backup_path,
    follow,
    log_paths,
    rotate_if_needed,
    tail,
)


def disk_use(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def test_log_paths(tmp_path: Path) -> None:
    out, err = log_paths(tmp_path, "shop", "worker-1")
    assert out == tmp_path / "shop" / "worker-1.stdout.log"
    assert err == tmp_path / "shop" / "worker-1.stderr.log"
    with pytest.raises(Invalid):
        log_paths(tmp_path, "..", "x")
    with pytest.raises(Invalid):
        log_paths(tmp_path, "shop", "a/b")


def test_small_or_missing_file_is_left_alone(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    assert not rotate_if_needed(log, 100, 2)
    log.write_bytes(b"a\n" * 10)
    assert not rotate_if_needed(log, 100, 2)
    assert log.read_bytes() == b"a\n" * 10


def test_rotation_keeps_disk_use_bounded_and_shifts(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    max_bytes, backups = 1000, 3
    for generation in range(10):
        with open(log, "ab") as f:  # the child appends far past the limit
            for i in range(300):
                f.write(f"gen {generation} line {i:04d}\n".encode())
        assert rotate_if_needed(log, max_bytes, backups)
        assert log.stat().st_size == 0
        assert disk_use(log) <= max_bytes * (backups + 1)
        newest = backup_path(log, 1).read_text()
        # the newest bytes, cut at a line start
        assert newest.startswith("gen ") and newest.endswith(f"gen {generation} line 0299\n")
        assert len(newest.encode()) <= max_bytes
    assert not backup_path(log, backups + 1).exists()
    for n in range(1, backups + 1):  # older generations shifted up one each time
        assert backup_path(log, n).read_text().startswith(f"gen {10 - n} ")


def test_rotation_without_backups_truncates(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(b"x" * 2000)
    assert rotate_if_needed(log, 1000, 0)
    assert log.stat().st_size == 0
    assert not backup_path(log, 1).exists()


def test_rotation_keeps_writing_through_an_open_append_fd(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    with open(log, "ab", buffering=0) as child:  # as the child holds it
        child.write(b"old\n" * 100)
        assert rotate_if_needed(log, 100, 1)
        child.write(b"new\n")
    assert log.read_bytes() == b"new\n"  # at offset 0, no hole of NULs
    assert backup_path(log, 1).read_bytes() == b"old\n" * 25


def test_tail_of_a_large_file(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    with open(log, "w") as f:
        for i in range(200_000):
            f.write(f"line {i}\n")
    assert tail(log, 3) == ["line 199997", "line 199998", "line 199999"]
    assert tail(log, 5000)[0] == "line 195000"
    assert len(tail(log, 5000)) == 5000
    assert tail(log, 0) == []


def test_tail_edge_cases(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    assert tail(log, 5) == []
    log.write_bytes(b"")
    assert tail(log, 5) == []
    log.write_bytes(b"a\nb\npartial")
    assert tail(log, 2) == ["b", "partial"]
    assert tail(log, 10) == ["a", "b", "partial"]
    log.write_bytes(b"bad \xff byte\n")
    assert tail(log, 1) == ["bad \ufffd byte"]


def test_tail_reaches_into_the_newest_backup(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"{i}\n" for i in range(10)))
    assert rotate_if_needed(log, 10, 1)
    log.write_text("new\n")
    assert tail(log, 3) == ["8", "9", "new"]
    assert tail(log, 3, include_backup=False) == ["new"]


async def next_line(lines: AsyncGenerator[str, None]) -> str:
    return await asyncio.wait_for(anext(lines), timeout=5.0)


async def test_follow_sees_appended_lines_and_survives_truncation(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("before the follow\n")
    lines = follow(log, poll_interval=0.01)
    try:
        with open(log, "a") as f:
            f.write("one\ntw")
            f.flush()
            assert await next_line(lines) == "one"
            f.write("o\n")
            f.flush()
            assert await next_line(lines) == "two"
            assert rotate_if_needed(log, 10, 1)  # copy-truncate under it
            f.write("after rotation\n")
            f.flush()
            assert await next_line(lines) == "after rotation"
    finally:
        await lines.aclose()


async def test_follow_waits_for_a_missing_file(tmp_path: Path) -> None:
    log = tmp_path / "later.log"
    lines = follow(log, poll_interval=0.01)
    try:
        log.write_text("hello\n")
        assert await next_line(lines) == "hello"
    finally:
        await lines.aclose()


def test_last_line_is_the_last_non_blank_one_read_from_the_end(tmp_path: Path) -> None:
    path = tmp_path / "w.stderr.log"
    assert logs.last_line(path) is None  # no file
    path.write_bytes(b"Usage: celery\n\nError: Invalid value for '-P'\n\n  \n")
    assert logs.last_line(path) == "Error: Invalid value for '-P'"
    # a huge file of one endless line: one bounded read, a bounded answer
    path.write_bytes(b"x" * (20 * 1024 * 1024))
    line = logs.last_line(path)
    assert line is not None and len(line) == logs.LAST_LINE_CHARS and line.endswith("...")
    # a file not written since the run began says nothing of that run
    assert logs.last_line(path, since=path.stat().st_mtime + 5) is None


def test_tail_of_a_huge_log_without_newlines_reads_a_bounded_amount(tmp_path: Path) -> None:
    # 400 MiB and not one newline (sparse: no disk used). tail=1 once read it all.
    log = tmp_path / "flood.log"
    with open(log, "wb") as f:
        f.truncate(400 * 1024 * 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lines = tail(log, 1)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert len(lines) == 1
    assert lines[0].startswith("[...] ")
    assert len(lines[0].encode()) <= TAIL_LINE_MAX + 64  # cut, with its note
    assert lines[0].endswith(f"[... {TAIL_MAX_BYTES - TAIL_LINE_MAX + 6} bytes cut]")
    assert grown_kib <= 20 * 1024


def test_tail_budget_and_long_lines(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    long = b"x" * (TAIL_LINE_MAX + 10)
    log.write_bytes(b"first\n" + long + b"\nlast\n")
    got = tail(log, 3)
    assert got[0] == "first" and got[2] == "last"
    assert got[1] == "x" * TAIL_LINE_MAX + " [... 10 bytes cut]"
    # a small budget: the oldest line kept is marked as cut at its start
    assert tail(log, 1, budget=3) == ["[...] st"]
    assert tail(log, 2, budget=8) == ["[...] xx", "last"]
