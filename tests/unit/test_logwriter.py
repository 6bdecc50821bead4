"""The log writer's rotation at write time (issue 15, part 6), in process:
where a chunk is cut, the bound, whole lines, a full disk, and a follow that
reads across a rotation by rename."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from branchd.process.logs import follow, tail
from branchd.process.logwriter import LogFile, room_split


@pytest.mark.parametrize(
    ("size", "chunk", "max_bytes", "cut"),
    [
        (0, b"a\nb\n", 10, None),  # fits
        (6, b"a\nb\n", 10, None),  # fits exactly
        (7, b"a\nb\n", 10, 2),  # up to the last newline that fits
        (0, b"a\nb\n", 0, None),  # rotation off
        (9, b"abc\n", 10, 0),  # no newline fits: rotate first
        (0, b"x" * 15, 10, 10),  # a line longer than the file: split
        (12, b"a\n", 10, 0),  # already over (a lowered limit): rotate first
    ],
)
def test_room_split(size: int, chunk: bytes, max_bytes: int, cut: int | None) -> None:
    assert room_split(size, chunk, max_bytes) == cut


def numbered(start: int, stop: int) -> bytes:
    return b"".join(b"%06d\n" % i for i in range(start, stop))


def test_rotation_by_rename_keeps_every_line_once_and_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    f = LogFile(str(path), max_bytes=100, backups=3)
    f.open()
    data = numbered(0, 1000)
    for at in range(0, len(data), 37):  # chunks cut anywhere, mid-line too
        f.write(data[at : at + 37])
    f.close()
    files = [path.with_name(f"x.log.{n}") for n in (3, 2, 1)] + [path]
    assert all(p.stat().st_size <= 100 for p in files)
    assert not path.with_name("x.log.4").exists()
    for p in files:  # whole lines in every file
        assert p.read_bytes().endswith(b"\n")
    kept = b"".join(p.read_bytes() for p in files)
    assert data.endswith(kept) and len(kept) > 3 * (100 - 7)


def test_a_part_line_is_held_back_until_it_ends_or_flushed(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    f = LogFile(str(path), max_bytes=1000, backups=1)
    f.open()
    f.write(b"one\ntw")
    assert path.read_bytes() == b"one\n"
    f.write(b"o\n")
    assert path.read_bytes() == b"one\ntwo\n"
    f.write(b"prompt> ")
    f.flush()  # (the writer flushes it after HOLD_SECS)
    assert path.read_bytes() == b"one\ntwo\nprompt> "
    assert tail(path, 1) == ["prompt> "]


def test_no_backups_empties_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    f = LogFile(str(path), max_bytes=10, backups=0)
    f.open()
    f.write(b"12345678\nabc\n")
    assert path.read_bytes() == b"abc\n"
    assert list(tmp_path.iterdir()) == [path]


def test_a_full_disk_drops_output_and_says_so_later(tmp_path: Path) -> None:
    f = LogFile("/dev/full", max_bytes=10, backups=2)  # every write: ENOSPC
    f.open()
    f.write(b"lost line\n" * 5)  # never blocks, never raises, never rotates /dev/full
    assert f.lost == 50
    path = tmp_path / "x.log"
    os.close(f.fd)
    f.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # room again
    f.regular = True
    f.max_bytes = 10_000
    f.write(b"back\n")
    text = path.read_text()
    assert text.startswith("[branchd: 50 bytes of output lost") and text.endswith("back\n")
    assert f.lost == 0


def test_a_moved_file_is_reopened_by_path(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    f = LogFile(str(path), max_bytes=1000, backups=1)
    f.open()
    f.write(b"before\n")
    path.rename(tmp_path / "x.log.old")
    f.reopen()
    f.write(b"after\n")
    assert (tmp_path / "x.log.old").read_bytes() == b"before\n"
    assert path.read_bytes() == b"after\n"


async def test_follow_reads_the_old_file_to_its_end_across_a_rename(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"")
    lines = follow(path, poll_interval=0.01)
    f = LogFile(str(path), max_bytes=70, backups=2)
    f.open()
    try:
        got: list[str] = []
        f.write(numbered(0, 5))
        while len(got) < 5:
            got.append(await asyncio.wait_for(anext(lines), 5.0))
        # between two polls: the rest of the file, then a rotation by rename
        f.write(numbered(5, 20))
        assert path.with_name("x.log.1").read_bytes() == numbered(0, 10)
        while len(got) < 20:
            got.append(await asyncio.wait_for(anext(lines), 5.0))
        assert got == [f"{i:06d}" for i in range(20)]
    finally:
        f.close()
        await lines.aclose()


def test_the_daemon_side_names_the_writer_and_its_message_size() -> None:
    """logpipes does not import the writer (it runs as a script of its own):
    its path and message size are written there again, and must agree."""
    from branchd.process import logpipes, logwriter

    assert Path(logwriter.__file__) == logpipes.WRITER
    assert logpipes.MESSAGE_MAX == logwriter.MESSAGE_MAX
