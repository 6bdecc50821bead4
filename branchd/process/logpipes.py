"""The daemon's side of the log writer (``branchd.process.logwriter``).

``LogPipes`` hands the writer the read end of a new pipe per log file and
gives the launcher the write end for the child's stdout or stderr. It starts
the writer when none runs for this log dir, and finds the one that outlived
a previous daemon (same socket name), so a restarted daemon goes on with the
writer that holds its adopted instances' pipes.

Calls are short blocking round trips on a unix socket (tens of
microseconds; starting the writer, once, tens of milliseconds); they may come
from the event loop's thread and from worker threads, hence the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from branchd.errors import LogWriterUnavailable, SpawnError

log = logging.getLogger(__name__)

#: The size asked for each pipe (Linux F_SETPIPE_SZ): a burst of output is
#: taken in without blocking the child while the writer is busy with another.
PIPE_SIZE = 256 * 1024
_F_SETPIPE_SZ = 1031
#: The writer's own complaints (a full disk, a failed rotation) go here.
WRITER_LOG = "logwriter.log"
CALL_TIMEOUT = 5.0
#: The writer's program, run as a script of its own (``-I -S``): the daemon
#: never imports it (its code is 50 KiB of the daemon's memory otherwise).
WRITER = Path(__file__).with_name("logwriter.py")
#: The most one message to or from the writer holds: logwriter.MESSAGE_MAX
#: (tests/unit/test_logwriter.py checks they agree).
MESSAGE_MAX = 1024 * 1024


def socket_name(log_dir: Path) -> str:
    """The abstract socket of the writer of ``log_dir`` (one per branch),
    without its leading NUL."""
    digest = hashlib.sha256(os.path.realpath(log_dir).encode()).hexdigest()[:20]
    return f"branchd-logwriter-{digest}"


class LogPipes:
    def __init__(self, log_dir: Path, *, python: str = sys.executable) -> None:
        self._log_dir = log_dir
        self._python = python
        self._name = socket_name(log_dir)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def open(
        self, path: Path, max_bytes: int, backups: int, uid: int | None, gid: int | None
    ) -> int:
        """The write end of a new pipe into ``path``; the caller closes it.

        Raises SpawnError if the writer cannot open the file, and
        LogWriterUnavailable if there is no writer to be had.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # (a smaller pipe works too)
                fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
            answer = self._call(
                {
                    "op": "add",
                    "path": str(path),
                    "max_bytes": max_bytes,
                    "backups": backups,
                    "uid": uid,
                    "gid": gid,
                },
                [r],
            )
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        if "error" in answer:
            os.close(w)
            raise SpawnError(str(answer["error"]))
        return w

    def drain(self, paths: Iterable[Path]) -> None:
        """Have the writer write what its pipes into ``paths`` hold now (a
        child that just exited: its last words are in its files after this)."""
        self._call({"op": "drain", "paths": [str(p) for p in paths]}, start=False)

    def reopen(self) -> int:
        """Reopen every file by its path (after an external logrotate moved
        them); how many were reopened (0 when no writer runs)."""
        return int(self._call({"op": "reopen"}, start=False).get("reopened", 0))

    def files(self) -> dict[str, tuple[int, int]]:
        """The files the writer writes, with their (max_bytes, backups)."""
        answer = self._call({"op": "files"}, start=False)
        return {p: (int(v[0]), int(v[1])) for p, v in answer.get("files", {}).items()}

    def writer_pid(self) -> int | None:
        return self._call({"op": "files"}, start=False).get("pid")

    def set_limits(self, path: Path, max_bytes: int, backups: int) -> None:
        self._call(
            {"op": "limits", "path": str(path), "max_bytes": max_bytes, "backups": backups},
            start=False,
        )

    def close(self) -> None:
        """Let go of the writer (it goes on while its pipes do)."""
        with self._lock:
            self._drop()

    # -------------------------------------------------------------------------

    def _call(
        self, request: dict[str, Any], fds: list[int] | None = None, *, start: bool = True
    ) -> dict[str, Any]:
        data = json.dumps(request).encode()
        with self._lock:
            for attempt in (1, 2):  # a writer that died: once more, with a new one
                sock = self._connected(start)
                if sock is None:
                    return {}
                try:
                    socket.send_fds(sock, [data], fds or [])
                    reply = sock.recv(MESSAGE_MAX)
                    if not reply:
                        raise ConnectionResetError("the log writer closed the connection")
                    answer: dict[str, Any] = json.loads(reply)
                    return answer
                except (OSError, ValueError) as e:
                    self._drop()
                    if attempt == 2:
                        raise LogWriterUnavailable(f"log writer: {e}") from None
        raise AssertionError("unreachable")

    def _connected(self, start: bool) -> socket.socket | None:
        if self._sock is not None:
            return self._sock
        sock = self._connect()
        if sock is None and start:
            self._start_writer()
            sock = self._connect()
            if sock is None:
                raise LogWriterUnavailable("the log writer did not come up")
        self._sock = sock
        return sock

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(CALL_TIMEOUT)
        try:
            sock.connect("\0" + self._name)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            return None
        except OSError as e:
            sock.close()
            raise LogWriterUnavailable(f"cannot reach the log writer: {e}") from None
        return sock

    def _start_writer(self) -> None:
        try:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            with open(self._log_dir / WRITER_LOG, "ab") as errors:
                # -I -S: no site-packages, no environment; the script needs
                # only the standard library, so the process stays small.
                done = subprocess.run(
                    [self._python, "-I", "-S", str(WRITER), self._name, str(self._log_dir)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    cwd="/",
                    env={},
                    start_new_session=True,
                    timeout=CALL_TIMEOUT,
                    check=False,
                )
        except (OSError, subprocess.SubprocessError) as e:
            raise LogWriterUnavailable(f"cannot start the log writer: {e}") from None
        if done.returncode not in (0, 3):  # 3: another one has just bound the name
            raise LogWriterUnavailable(f"the log writer exited with {done.returncode}")
        log.info("started the log writer for %s", self._log_dir)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
