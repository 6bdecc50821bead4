"""Issue 17, part 5: the daemon's side of sd_notify, against a datagram
socket of the test's own."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from branchd.sdnotify import Notifier, NotifySettings, message


@pytest.mark.parametrize(
    ("env", "address", "every"),
    [
        ({}, None, None),
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, "/run/systemd/notify", None),
        ({"NOTIFY_SOCKET": "@abstract"}, "\0abstract", None),
        ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "30000000"}, "/s", 15.0),
        ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, "/s", 1.0),
        # the watchdog of another process (a parent's), or none at all
        ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "8"}, "/s", None),
        ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "0"}, "/s", None),
        ({"WATCHDOG_USEC": "2000000"}, None, None),
    ],
)
def test_settings_from_the_environment(
    env: dict[str, str], address: str | None, every: float | None
) -> None:
    assert NotifySettings.from_env(env, pid=7) == NotifySettings(address, every)


def test_message_is_key_value_lines() -> None:
    assert message(READY=1, STATUS="two\nlines") == b"READY=1\nSTATUS=two lines"


def test_notifier_sends_and_never_blocks_or_raises(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        n = Notifier(NotifySettings(path, 0.5))
        n.ready("listening")
        assert rx.recv(4096).split(b"\n")[:2] == [b"READY=1", b"STATUS=listening"]
        for _ in range(10_000):  # a receiver that never reads: dropped, not blocked
            n.watchdog()
        n.stopping("bye")
        n.close()
    gone = Notifier(NotifySettings(str(tmp_path / "none"), None))
    gone.status("nobody listens")  # (logged once, not raised)
    Notifier(NotifySettings(None, None)).ready("not under systemd")
