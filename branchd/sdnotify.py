"""The daemon's side of sd_notify(3): telling systemd it is ready, what it
does, and that its loop still turns (``Type=notify``, ``WatchdogSec=``).

A few lines over a unix datagram socket named by ``$NOTIFY_SOCKET``; no
systemd library. Without that variable (not run by systemd) every send is a
no-op. The receiving side, for instances, is ``process/prober.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NotifySettings:
    """What the environment says (pure: ``from_env``)."""

    #: The socket's address ("\\0..." for an abstract one); None: no systemd.
    address: str | None
    #: How often WATCHDOG=1 is owed (half of WATCHDOG_USEC, s); None: no watchdog.
    watchdog_every: float | None

    @classmethod
    def from_env(cls, env: Mapping[str, str], pid: int) -> NotifySettings:
        path = env.get("NOTIFY_SOCKET") or None
        if path is not None and path.startswith("@"):
            path = "\0" + path[1:]  # abstract namespace
        every: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is for: not a child's
        if usec.isdigit() and int(usec) > 0 and watchdog_pid in ("", str(pid)):
            every = int(usec) / 1e6 / 2
        return cls(path if path and path != "\0" else None, every if path else None)


def message(**fields: str | int) -> bytes:
    """``KEY=VALUE`` lines, as sd_notify takes them (a value on one line)."""
    return "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()).encode()


class Notifier:
    """Sends to systemd; every failure is logged once and never raised (a
    daemon must run on when systemd's socket is gone)."""

    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings
        self._sock: socket.socket | None = None
        self._failed = False

    def send(self, **fields: str | int) -> None:
        address = self.settings.address
        if address is None or self._failed:
            return
        try:
            if self._sock is None:
                # non-blocking: a receiver that does not read (its queue full)
                # must never hold the event loop; that message is dropped
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                self._sock = socket.socket(socket.AF_UNIX, kind)
            self._sock.sendto(message(**fields), address)
        except BlockingIOError:
            log.debug("systemd's notify socket is full: %s dropped", sorted(fields))
        except OSError as exc:
            self._failed = True
            self.close()
            log.warning("cannot tell systemd (NOTIFY_SOCKET %s): %s", address, exc)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
