"""Instance log files: where they live, tail and follow, and the rotation loop.

A child's output normally reaches its files through the branch's log writer
(``logwriter``), which rotates at write time by rename, losing nothing. Some
children write into their files directly: started with rotation off, or by
an older daemon and adopted, or when no writer could be had. Rotation cannot
rename a file under such a child, so for those files only the loop here
copies the newest bytes to ``<file>.1`` and truncates the file in place
(copy-truncate); the child's next write lands at offset 0, and bytes written
between the copy and the truncation are lost (the window is one ``read()``).

These functions do blocking file I/O; callers on the event loop should run
``rotate_if_needed`` and ``tail`` of big files in a thread. ``LogService`` is
the service the API and the daemon use: it finds an instance's files, reads
them off the event loop and runs the rotation loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import BinaryIO, Protocol

from branchd.clock import Scheduler
from branchd.errors import Invalid, LogWriterUnavailable
from branchd.model import InstanceSpec, valid_name
from branchd.process.logpipes import LogPipes

log = logging.getLogger(__name__)

_BLOCK = 64 * 1024
#: follow() yields a line without newline once it grows this long.
MAX_LINE = 1024 * 1024


def log_paths(log_dir: Path, app: str, name: str) -> tuple[Path, Path]:
    """The (stdout, stderr) log files of one instance."""
    for part in (app, name):
        if not valid_name(part):
            raise Invalid(f"invalid name {part!r} for a log path")
    base = log_dir / app
    return base / f"{name}.stdout.log", base / f"{name}.stderr.log"


def backup_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate_if_needed(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate ``path`` if it holds ``max_bytes`` or more; say whether it did.

    Keeps ``path.1`` (newest) .. ``path.<backups>``, each at most about
    ``max_bytes``; with ``backups == 0`` the file is just emptied.
    ``max_bytes <= 0`` disables rotation.
    """
    if max_bytes <= 0:
        return False
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    if backups <= 0:
        os.truncate(path, 0)
        return True
    for n in range(backups - 1, 0, -1):
        older = backup_path(path, n)
        if older.exists():
            os.replace(older, backup_path(path, n + 1))
    tmp = path.with_name(f"{path.name}.rotating")
    try:
        with open(path, "rb") as src, _open_like(tmp, src.fileno()) as dst:
            end = src.seek(0, os.SEEK_END)
            start = max(0, end - max_bytes)
            if start > 0:
                start = _next_line_start(src.fileno(), start, end)
            src.seek(start)
            # Copy to the end as it is now, including what the child appends
            # meanwhile (up to another max_bytes), then truncate at once.
            budget = end - start + max_bytes
            while budget > 0:
                chunk = src.read(min(_BLOCK, budget))
                if not chunk:
                    break
                dst.write(chunk)
                budget -= len(chunk)
            dst.flush()  # a full disk fails here, before the log is emptied
            os.truncate(path, 0)
    except OSError:
        # (a full disk: no half copy is left behind, and the log keeps its lines)
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, backup_path(path, 1))
    return True


def _open_like(path: Path, like: int) -> BinaryIO:
    """``path`` for writing, with the mode and owner of the open file ``like``
    (a backup is as private as the log it comes from)."""
    st = os.fstat(like)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, st.st_mode & 0o777)
    try:
        os.fchmod(fd, st.st_mode & 0o777)
        if os.geteuid() == 0:
            os.fchown(fd, st.st_uid, st.st_gid)
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")


def _next_line_start(fd: int, start: int, end: int) -> int:
    """The first line start at or after ``start`` (``start`` if none is near)."""
    buf = os.pread(fd, min(_BLOCK, end - start + 1), start - 1)
    i = buf.find(b"\n")
    if i == -1 or start + i >= end:
        return start  # no line start in reach: keep the cut line
    return start + i


#: last_line() reads at most this much from the end of a file.
LAST_LINE_BYTES = 8192
LAST_LINE_CHARS = 300


def last_line(path: Path, since: float | None = None) -> str | None:
    """The last non-blank line of ``path``, at most ``LAST_LINE_CHARS`` long; None if none.

    One read of at most ``LAST_LINE_BYTES`` from the end, whatever the file's
    size: cheap enough to call on the event loop. With ``since`` (a wall
    time), a file not written since then gives None: an old run's last words
    are not this run's.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if since is not None and st.st_mtime < since:
                return None
            start = max(0, st.st_size - LAST_LINE_BYTES)
            data = os.pread(f.fileno(), st.st_size - start, start)
    except OSError:
        return None
    for raw in reversed(data.splitlines()):
        line = raw.decode("utf-8", errors="replace").strip()
        if line:
            if len(line) > LAST_LINE_CHARS:
                line = line[: LAST_LINE_CHARS - 3] + "..."
            return line
    return None


#: A tail reads at most this much in all (a log without newlines must not be
#: read whole: a 400 MiB one once took 1.9 GB of daemon memory for tail=1).
TAIL_MAX_BYTES = 1024 * 1024
#: A longer line in a tail is cut to this, with a note of how much was cut.
TAIL_LINE_MAX = 64 * 1024
#: The start of a line the tail's budget did not reach back to.
CUT_START = b"[...] "


def tail(
    path: Path, n: int, *, include_backup: bool = True, budget: int = TAIL_MAX_BYTES
) -> list[str]:
    """The last ``n`` lines of ``path`` (without newlines), read from the end.

    At most ``budget`` bytes are read in all: a line whose start lies beyond
    it begins with ``[...] ``, and a line longer than ``TAIL_LINE_MAX`` is cut
    to that with a note. If the file has fewer than ``n`` lines (it was just
    rotated), the rest comes from the end of the newest backup when
    ``include_backup`` and the budget allow.
    """
    if n <= 0:
        return []
    whole = True
    try:
        lines, used, whole = _tail_bytes(path, n, budget)
    except FileNotFoundError:
        lines, used = [], 0
    if include_backup and whole and len(lines) < n and used < budget:
        older = backup_path(path, 1)
        with contextlib.suppress(FileNotFoundError):
            lines = _tail_bytes(older, n - len(lines), budget - used)[0] + lines
    return [_cut(line).decode("utf-8", errors="replace") for line in lines]


def _cut(line: bytes) -> bytes:
    if len(line) <= TAIL_LINE_MAX:
        return line
    return line[:TAIL_LINE_MAX] + b" [... %d bytes cut]" % (len(line) - TAIL_LINE_MAX)


def _tail_bytes(path: Path, n: int, budget: int) -> tuple[list[bytes], int, bool]:
    """The last ``n`` lines, the bytes read, and whether the file's start was reached."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        chunks: list[bytes] = []
        newlines = 0
        used = 0
        # n + 1 newlines guarantee n whole lines after the first (cut) one.
        while pos > 0 and newlines <= n and used < budget:
            size = min(_BLOCK, pos, budget - used)
            pos -= size
            f.seek(pos)
            chunk = f.read(size)
            chunks.append(chunk)
            used += len(chunk)
            newlines += chunk.count(b"\n")
    data = b"".join(reversed(chunks))
    if not data:
        return [], used, True
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    if pos > 0 and len(lines) <= n and lines:
        # the budget ran out inside the oldest line we keep: say it is cut
        lines[0] = CUT_START + lines[0]
    return lines[-n:], used, pos == 0


def follow(path: Path, poll_interval: float = 0.2) -> AsyncGenerator[str, None]:
    """Yield each complete line appended to ``path`` after this call.

    The starting offset is taken now, not at the first ``anext()``; use as
    ``async for line in follow(path)``, and ``aclose()`` it when done.

    Survives rotation by rename (a new inode at the path: the old file is
    read to its end first, through the descriptor held on it, so no line
    written before the rename is missed), copy-truncate rotation (the size
    drops below our offset: start again at 0) and an external move. A file
    that does not exist yet is waited for. A truncation followed by growth
    past our old offset within one poll goes unnoticed; keep the poll short.

    What it holds is bounded whatever the reader's pace: it reads only when
    asked for the next line (a slow reader leaves the rest in the file), at
    most 1 MiB a read, and a line longer than ``MAX_LINE`` is yielded in pieces.
    """
    offset, inode = _size_and_inode(path)
    return _follow(path, offset, inode, poll_interval)


async def _follow(
    path: Path, offset: int, inode: int | None, poll_interval: float
) -> AsyncGenerator[str, None]:
    pending = b""
    held: BinaryIO | None = None  # the file at offset, once opened
    try:
        while True:
            if held is None and inode is not None:
                held = _open_inode(path, inode)
                if held is None:  # gone before we held it: the next one from 0
                    offset, inode = 0, None
            if held is not None:
                size = os.fstat(held.fileno()).st_size
                if size < offset:  # truncated in place (copy-truncate)
                    offset, pending = 0, b""
                if size > offset:
                    data = os.pread(held.fileno(), min(size - offset, _BLOCK * 16), offset)
                    offset += len(data)
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    if len(pending) >= MAX_LINE:
                        lines.append(pending)
                        pending = b""
                    for line in lines:
                        yield line.decode("utf-8", errors="replace")
                    continue  # read on to the end before looking at the path
            _, now_inode = _size_and_inode(path)
            if now_inode != inode:
                # Rotated or moved: all of the old file was read just above.
                if held is not None:
                    held.close()
                    held = None
                offset, inode = 0, now_inode
                if pending:
                    yield pending.decode("utf-8", errors="replace")
                    pending = b""
                continue
            await asyncio.sleep(poll_interval)
    finally:
        if held is not None:
            held.close()


def _open_inode(path: Path, inode: int) -> BinaryIO | None:
    """``path`` opened for reading if it still is that inode."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (held across polls; closed by the caller)
    except FileNotFoundError:
        return None
    if os.fstat(f.fileno()).st_ino != inode:
        f.close()
        return None
    return f


def _size_and_inode(path: Path) -> tuple[int, int | None]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0, None
    return st.st_size, st.st_ino


class Instances(Protocol):
    """What the log service needs of the engine."""

    def lookup(self, app: str, name: str) -> InstanceSpec: ...
    def specs(self, app: str | None = None) -> list[InstanceSpec]: ...


class LogService:
    """Instances' log files: paths, tail, follow, and the rotation loop."""

    def __init__(
        self,
        log_dir: Path,
        instances: Instances,
        check_interval: float,
        *,
        scheduler: Scheduler,
        pipes: LogPipes | None = None,
    ) -> None:
        self._log_dir = log_dir
        self._pipes = pipes
        self._sched = scheduler
        self._instances = instances
        self._interval = check_interval
        self._task: asyncio.Task[None] | None = None

    def path(self, app: str, name: str, stream: str) -> Path:
        spec = self._instances.lookup(app, name)
        out, err = log_paths(self._log_dir, spec.app, spec.name)
        return err if stream == "stderr" else out

    async def read_logs(self, app: str, name: str, stream: str, n: int) -> list[str]:
        return await asyncio.to_thread(tail, self.path(app, name, stream), n)

    def follow_logs(self, app: str, name: str, stream: str) -> AsyncIterator[str]:
        return follow(self.path(app, name, stream))

    async def reopen(self) -> int:
        """Have the log writer reopen every file by its path (after an
        external logrotate moved them); how many it reopened. A child that
        writes into its file directly keeps the file it has."""
        if self._pipes is None:
            return 0
        return await asyncio.to_thread(self._pipes.reopen)

    async def rotate_once(self) -> None:
        """One step of the rotation loop: every instance's files over their limit."""
        # Rotation copies up to max_bytes: keep that off the event loop.
        await asyncio.to_thread(self._rotate_all, self._instances.specs())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._sched.sleep(self._interval)
            await self.rotate_once()

    def _rotate_all(self, specs: list[InstanceSpec]) -> None:
        written: dict[str, tuple[int, int]] = {}
        if self._pipes is not None:
            try:
                written = self._pipes.files()
            except LogWriterUnavailable as e:
                log.warning("%s", e.message)
        for spec in specs:
            limits = spec.log_max_bytes, spec.log_backups
            for path in log_paths(self._log_dir, spec.app, spec.name):
                if str(path) in written:
                    # the writer rotates it as it writes; a changed limit applies now
                    if written[str(path)] != limits and self._pipes is not None:
                        with contextlib.suppress(LogWriterUnavailable):
                            self._pipes.set_limits(path, *limits)
                    continue
                try:
                    rotate_if_needed(path, spec.log_max_bytes, spec.log_backups)
                except OSError:
                    log.warning("cannot rotate %s", path, exc_info=True)
