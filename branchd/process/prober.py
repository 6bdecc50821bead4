"""Probes carried out (I/O): connect, fetch, run; and sd_notify sockets.

``ProbeRunner`` is what the readiness service needs: one try of a probe,
answering None (it passed) or why not, never raising. ``NetProber`` is the
real one; ``FakeProber`` its twin for tests (answers set by hand).
``NotifySockets`` gives each instance with a ``notify`` probe a unix datagram
socket of its own in the abstract namespace (no file to clean up, no path
length limit), passed as ``$NOTIFY_SOCKET``; each datagram comes with its
sender's pid (SO_PASSCRED), so that only the instance's own processes count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
from collections.abc import Callable, Mapping
from typing import Protocol

import aiohttp
import psutil

from branchd import lazy_aiohttp
from branchd.clock import Scheduler, deadline
from branchd.process.probes import Notice, Probe, ProbeKind, parse_notice

log = logging.getLogger(__name__)


class ProbeRunner(Protocol):
    async def check(
        self,
        probe: Probe,
        timeout: float,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> str | None:
        """One try of ``probe`` within ``timeout``: None if it passed, else why not.
        An exec probe runs with ``env``, in ``cwd`` and as ``user`` (the instance's)."""
        ...


class NetProber:
    """The real runner: TCP connects, HTTP GETs (2xx), commands (exit 0)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._sched = scheduler

    async def check(
        self,
        probe: Probe,
        timeout: float,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> str | None:
        try:
            async with deadline(self._sched, self._sched.clock.monotonic() + timeout):
                match probe.kind:
                    case ProbeKind.TCP:
                        return await _tcp(probe)
                    case ProbeKind.HTTP:
                        return await _http(probe)
                    case ProbeKind.EXEC:
                        return await _exec(probe, env, cwd, user)
                return None  # notify: not a probe that is run
        except TimeoutError:
            return f"{probe.label}: no answer within {timeout:g}s"
        except Exception as exc:  # a probe's failure is an answer, never the loop's end
            log.debug("probe %s failed", probe.text, exc_info=True)
            return f"{probe.label}: {exc or type(exc).__name__}"


async def _tcp(probe: Probe) -> str | None:
    try:
        _, writer = await asyncio.open_connection(probe.host, probe.port)
    except ConnectionRefusedError:
        return f"{probe.label} refused"
    except OSError as exc:
        return f"{probe.label}: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def _http(probe: Probe) -> str | None:
    await lazy_aiohttp.loaded()  # (off the loop: the first client use loads it)
    # (trust_env off: no proxy from the daemon's environment between us and it)
    try:
        async with (
            aiohttp.ClientSession(trust_env=False) as session,
            session.get(probe.url) as response,
        ):
            if 200 <= response.status < 300:
                return None
            return f"{probe.url} answered {response.status}"
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, ConnectionRefusedError):
            return f"{probe.url} refused"
        return f"{probe.url}: {exc.os_error.strerror or exc.os_error}"
    except aiohttp.ClientError as exc:
        return f"{probe.url}: {exc or type(exc).__name__}"


async def _exec(
    probe: Probe, env: Mapping[str, str] | None, cwd: str | None, user: str | None
) -> str | None:
    # (as the instance's user, when branchd may switch to it: as root)
    as_user = user if user is not None and os.geteuid() == 0 else None
    try:
        proc = await asyncio.create_subprocess_exec(
            *probe.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,  # (so that a timeout kills what it started too)
            user=as_user,
        )
    except FileNotFoundError:
        return f"{probe.label}: no such command"
    except OSError as exc:
        return f"{probe.label}: {exc.strerror or exc}"
    try:
        _, err = await proc.communicate()
    finally:
        if proc.returncode is None:  # cancelled (its timeout): it goes, with its group
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
    if proc.returncode == 0:
        return None
    lines = err.decode("utf-8", "replace").strip().splitlines()
    said = f": {lines[-1][:200]}" if lines else ""
    return f"{probe.label} exited with code {proc.returncode}{said}"


class FakeProber:
    """A runner for tests: each probe (by text) answers what was set, last
    set wins (default: "not set"); every try is recorded in ``tries``."""

    def __init__(self) -> None:
        self.answers: dict[str, str | None] = {}
        self.tries: list[str] = []

    def set(self, probe: str, answer: str | None) -> None:
        self.answers[probe] = answer

    async def check(
        self,
        probe: Probe,
        timeout: float,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> str | None:
        self.tries.append(probe.text)
        return self.answers.get(probe.text, f"{probe.label}: not set")


# sd_notify --------------------------------------------------------------------

NoticeCallback = Callable[[int | None, Notice], None]

_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifySockets:
    """One datagram socket per instance, read on the event loop."""

    def __init__(self, branch_id: str) -> None:
        self._branch = branch_id[:16]
        self._socks: dict[str, socket.socket] = {}

    def address(self, name: str) -> str:
        """$NOTIFY_SOCKET for ``name`` (abstract: its first byte is "@")."""
        return f"@branchd/{self._branch}/{name}"

    def open(self, name: str, on_notice: NoticeCallback) -> str:
        """The socket of ``name``, bound if it was not (a second call keeps it)."""
        address = self.address(name)
        if name in self._socks:
            return address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind("\0" + address[1:])
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._read, sock, on_notice)
        except BaseException:
            sock.close()
            raise
        self._socks[name] = sock
        return address

    def _read(self, sock: socket.socket, on_notice: NoticeCallback) -> None:
        for _ in range(64):  # what is there now; the loop comes back for more
            try:
                data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(_CREDS.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.debug("notify socket read failed", exc_info=True)
                return
            sender = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = _CREDS.unpack(payload[: _CREDS.size])[0]
            try:
                on_notice(sender, parse_notice(data))
            except Exception:
                log.exception("notify message handling failed")

    def close(self, name: str) -> None:
        sock = self._socks.pop(name, None)
        if sock is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def close_all(self) -> None:
        for name in list(self._socks):
            self.close(name)


def sent_by(sender: int | None, root: int) -> bool:
    """Whether pid ``sender`` is process ``root`` or one of its descendants."""
    if sender is None:
        return False
    if sender == root:
        return True
    try:
        return any(p.pid == root for p in psutil.Process(sender).parents())
    except psutil.Error:
        return False
