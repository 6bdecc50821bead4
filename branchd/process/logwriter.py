"""The log writer: one small process per branch that owns its instances' output.

Each instance writes its stdout and stderr into pipes whose read ends this
process holds; it appends what it reads to the instance's log files and
rotates a file at write time, when the next bytes would take it past its
``max_bytes``: rename ``x.log`` to ``x.log.1`` (the older ones shift up) and
open a new ``x.log``. No byte is copied, so none can be lost or written twice
between a copy and a truncation, which is what copy-truncate could do.

It runs in a session of its own, so it outlives the daemon (a restart, an
upgrade after SIGUSR2, a crash): output keeps landing, rotated, while no
daemon runs. It ends once no daemon is connected and every pipe it holds has
reached its end (all the instances and their children have gone).

This file imports nothing but the standard library and is run as a script
(``python -I -S logwriter.py NAME LOG_DIR``), so the process stays small
(about 10 MiB resident, 6 MiB of it its own, nearly the same with 1 or 200
instances: docs/benchmarks.md). The daemon's side is ``branchd.process.logpipes``.

Protocol: an abstract unix SEQPACKET socket (``logpipes.socket_name``); one JSON
request per message, with the read end of a pipe as SCM_RIGHTS for "add";
one JSON answer per request. Only a peer of the writer's own uid (or root)
is served.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any

#: One read from a pipe. 128 KiB: larger reads measured slower (a buffer
#: past glibc's mmap threshold is mapped and unmapped at every read).
CHUNK = 128 * 1024
#: A request or an answer is at most this long.
MESSAGE_MAX = 1024 * 1024
#: A log file that was moved or removed by someone else is reopened by path
#: at the next write after at most this many seconds, even without a reopen.
MOVED_CHECK = 1.0
#: The end of a line not yet ended is held back this long (or until the line
#: ends), so that a rotation falls between whole lines; a longer part line is
#: written at once.
HOLD_SECS = 0.2
LINE_HOLD = 64 * 1024
#: A new writer that no daemon connects to within this time ends.
LONELY_START = 10.0
#: A "drain" reads at most this much of one pipe (a child that never stops
#: writing must not hold the answer forever).
DRAIN_MAX = 4 * 1024 * 1024
LOG_MODE = 0o640


def backup_name(path: str, n: int) -> str:
    return f"{path}.{n}"


def room_split(size: int, chunk: bytes, max_bytes: int) -> int | None:
    """How much of ``chunk`` goes into a file of ``size`` bytes before it is
    rotated; None when all of it fits (or rotation is off).

    The cut is after the last newline that fits, so lines stay whole; with no
    newline in reach, a file that holds something is rotated first (0) and
    an empty one takes as much as fits (a line longer than ``max_bytes`` is
    split; so is one whose start already fills the file). The file never
    grows past ``max_bytes``.
    """
    if max_bytes <= 0 or size + len(chunk) <= max_bytes:
        return None
    room = max(0, max_bytes - size)
    cut = chunk.rfind(b"\n", 0, room) + 1
    if cut > 0:
        return cut
    return 0 if size > 0 else room


class LogFile:
    """One log file, opened by path, shared by every pipe that writes into it
    (a restarted instance whose old child still writes, say).

    (Plain classes here, not dataclasses: importing dataclasses costs the
    process 2 MiB.)"""

    def __init__(
        self,
        path: str,
        max_bytes: int,
        backups: int,
        *,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.uid, self.gid = uid, gid
        self.fd = -1
        self.size = 0
        self.regular = True
        self.refs = 0
        self.lost = 0
        self.checked = 0.0
        #: the start of a line whose end has not come yet, and since when
        self.pending = b""
        self.pending_since = 0.0

    def open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE)
        try:
            st = os.fstat(fd)
            self.regular = (st.st_mode & 0o170000) == 0o100000
            if self.regular:
                os.fchmod(fd, LOG_MODE)
                if self.uid is not None:
                    os.fchown(fd, self.uid, self.gid if self.gid is not None else -1)
        except OSError:
            os.close(fd)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.size, self.checked = fd, st.st_size, time.monotonic()

    def close(self) -> None:
        self.flush()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reopen(self) -> None:
        """The file at our path again (after someone moved ours away)."""
        self.open()

    def write(self, data: bytes) -> None:
        """Append what ends in a newline now, hold back the rest (``flush``)."""
        end = data.rfind(b"\n") + 1
        if not self.regular or len(self.pending) + len(data) - end > LINE_HOLD:
            end = len(data)
        if end == 0:  # no line ends here yet
            if not self.pending:
                self.pending_since = time.monotonic()
            self.pending += data
            return
        head, tail = self.pending, data[end:]
        if tail:
            self.pending_since = time.monotonic()
        self.pending = tail
        if self.max_bytes > 0 and self.size + len(head) + end > self.max_bytes:
            self._put(head + data[:end])  # a rotation is due: the careful way
            return
        # The usual case, without copying the chunk (a copy of 256 KiB costs
        # more than a second write; writev measured slower still).
        self._check_moved()
        if head:
            self._append(head)
        self._append(memoryview(data)[:end])

    def flush(self) -> None:
        """Write a held-back part line now."""
        if self.pending:
            data, self.pending = self.pending, b""
            self._put(data)

    def _put(self, data: bytes) -> None:
        if not data:
            return
        self._check_moved()
        while data:
            cut = room_split(self.size, data, self.max_bytes) if self.regular else None
            if cut is None:
                self._append(data)
                return
            self._append(data[:cut])
            data = data[cut:]
            if not self.rotate():
                self._append(data)  # (over the bound for now rather than lose it)
                return

    def rotate(self) -> bool:
        """Rename and reopen; False if it could not (the old file is kept on)."""
        try:
            if self.backups <= 0:
                os.ftruncate(self.fd, 0)  # nothing is to be kept
                self.size = 0
                return True
            for n in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(backup_name(self.path, n), backup_name(self.path, n + 1))
            # (moved away by someone else: a new file is all we need)
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, backup_name(self.path, 1))
            self.open()
            return True
        except OSError as e:
            say(f"cannot rotate {self.path}: {e.strerror}")
            return False

    def _append(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self.lost:
                self._note_lost()
                if self.lost:
                    self.lost += len(view)
                    return
            try:
                n = os.write(self.fd, view)
            except OSError as e:
                # A full disk: the bytes are dropped (the child is never
                # blocked), counted, and said once there is room again.
                if not self.lost:
                    say(f"cannot write {self.path}: {e.strerror}; dropping output")
                self.lost += len(view)
                return
            self.size += n
            view = view[n:]

    def _note_lost(self) -> None:
        note = f"[branchd: {self.lost} bytes of output lost: the log could not be written]\n"
        try:
            n = os.write(self.fd, note.encode())
        except OSError:
            return
        self.size += n
        self.lost = 0

    def _check_moved(self) -> None:
        now = time.monotonic()
        if now - self.checked < MOVED_CHECK:
            return
        self.checked = now
        try:
            moved = os.stat(self.path).st_ino != os.fstat(self.fd).st_ino
        except FileNotFoundError:
            moved = True
        except OSError:
            return
        if moved:
            with contextlib.suppress(OSError):
                self.reopen()


class Writer:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.sel = selectors.DefaultSelector()
        self.files: dict[str, LogFile] = {}
        #: pipe read end -> its file
        self.pipes: dict[int, LogFile] = {}
        self.clients: set[socket.socket] = set()
        self.had_client = False
        self.started = time.monotonic()
        self.reopen_asked = False
        self.sel.register(listener, selectors.EVENT_READ, "listen")

    def done(self) -> bool:
        if self.pipes or self.clients:
            return False
        return self.had_client or time.monotonic() - self.started > LONELY_START

    def run(self) -> None:
        while not self.done():
            held = any(f.pending for f in self.files.values())
            for key, _ in self.sel.select(timeout=HOLD_SECS if held else 1.0):
                if key.data == "listen":
                    self.accept()
                elif key.data == "client":
                    self.serve(key.fileobj)  # type: ignore[arg-type]
                else:
                    self.pump(key.fd)
            if self.reopen_asked:
                self.reopen_asked = False
                self.reopen()
            if held:
                now = time.monotonic()
                for f in self.files.values():
                    if f.pending and now - f.pending_since >= HOLD_SECS:
                        f.flush()

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            conn.close()  # another user's: it could make us open any path
            return
        self.clients.add(conn)
        self.had_client = True
        self.sel.register(conn, selectors.EVENT_READ, "client")

    def serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            msg, fds, _, _ = socket.recv_fds(conn, MESSAGE_MAX, 4)
        except OSError:
            msg = b""
        if not msg:
            self.sel.unregister(conn)
            self.clients.discard(conn)
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        try:
            answer = self.handle(json.loads(msg), fds)
        except Exception as e:  # a bad request is answered, never the end of us
            answer = {"error": str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"}
        with contextlib.suppress(OSError):
            conn.send(json.dumps(answer).encode())

    def handle(self, req: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = req.get("op")
        if op == "add" and len(fds) == 1:
            return self.add(req, fds[0])
        for fd in fds:
            os.close(fd)
        if op == "add":
            raise ValueError("add takes one pipe")
        if op == "drain":
            for fd, f in list(self.pipes.items()):
                if f.path in req["paths"]:
                    self.pump(fd, until_empty=True)
            for path in req["paths"]:
                if path in self.files:
                    self.files[path].flush()
            return {"ok": True}
        if op == "reopen":
            return {"ok": True, "reopened": self.reopen()}
        if op == "files":
            return {
                "ok": True,
                "pid": os.getpid(),
                "files": {p: [f.max_bytes, f.backups] for p, f in self.files.items()},
            }
        if op == "limits":
            known = self.files.get(req["path"])
            if known is not None:
                known.max_bytes, known.backups = int(req["max_bytes"]), int(req["backups"])
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")

    def add(self, req: dict[str, Any], fd: int) -> dict[str, Any]:
        try:
            path = str(req["path"])
            limits = int(req["max_bytes"]), int(req["backups"])
            f = self.files.get(path)
            if f is None:
                f = LogFile(path, *limits, uid=req.get("uid"), gid=req.get("gid"))
                try:
                    f.open()
                except OSError as e:
                    raise OSError(f"cannot open log file {path!r}: {e.strerror}") from None
                self.files[path] = f
            f.max_bytes, f.backups = limits
            os.set_blocking(fd, False)
        except Exception:
            os.close(fd)
            raise
        f.refs += 1
        self.pipes[fd] = f
        self.sel.register(fd, selectors.EVENT_READ, "pipe")
        return {"ok": True}

    def pump(self, fd: int, *, until_empty: bool = False) -> None:
        f = self.pipes.get(fd)
        if f is None:
            return
        total = 0
        while True:
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.release(fd, f)
                return
            f.write(data)
            total += len(data)
            if not until_empty or total >= DRAIN_MAX:
                return

    def release(self, fd: int, f: LogFile) -> None:
        f.flush()  # (the part line of a child that has gone)
        self.sel.unregister(fd)
        del self.pipes[fd]
        os.close(fd)
        f.refs -= 1
        if f.refs <= 0:
            f.close()
            del self.files[f.path]

    def reopen(self) -> int:
        done = 0
        for f in self.files.values():
            try:
                f.reopen()
                done += 1
            except OSError as e:
                say(f"cannot reopen {f.path}: {e.strerror}")
        return done


def say(text: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(f"branchd log writer {os.getpid()}: {text}\n")
        sys.stderr.flush()


def main(argv: list[str]) -> int:
    """``logwriter.py NAME LOG_DIR``: bind the abstract socket NAME, detach
    (the parent exits 0 once the socket is bound, or 3 if another writer has
    it), then serve. LOG_DIR is only there to be seen in ``ps``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0" + argv[1])
    except OSError as e:
        return 3 if e.errno == errno.EADDRINUSE else 1
    sock.listen(64)
    if os.fork() > 0:
        os._exit(0)  # the daemon waits for this exit: the socket is bound
    os.setsid()  # (already a session leader's child: a session of our own)
    # A stop of everything (systemd's SIGTERM to the whole unit) must not
    # end us before the instances' last words are written: we end when their
    # pipes do. SIGHUP reopens the files (logrotate's postrotate).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    writer = Writer(sock)
    signal.signal(signal.SIGHUP, lambda *_: setattr(writer, "reopen_asked", True))
    writer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
