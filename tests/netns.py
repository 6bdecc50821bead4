"""A LAN made of network namespaces, for tests that need real multicast.

``Lan(k)`` makes k namespaces, each with one interface ``eth0`` at
``10.213.<subnet>.<i+1>/24``, joined by a bridge that lives in a namespace
of its own: nothing is added to the host's network, and nothing sent inside
reaches the host's interfaces. Each ``Netns`` runs commands inside with
``exec`` (a ``Popen``) or ``run``, and its cable can be cut and mended
(``link_down``/``link_up``: its bridge port goes down, as if unplugged).

``close()`` (or leaving the ``with``) ends what was started inside (the
processes ``exec`` started, SIGTERM then SIGKILL after 5 s, their pipes
closed; then anything left in the namespaces, such as their children) and
deletes the namespaces, which takes their links with them. Names carry a
random suffix so that runs side by side never meet.

It needs root and iproute2's ``ip``; ``unavailable()`` says why not, for a
skip. The ``lan`` fixture of tests/conftest.py wraps it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PREFIX = "bdt"
IFACE = "eth0"
PREFIX_LEN = 24


def ip(*args: str) -> str:
    """Run ``ip ARGS`` and return its output; CalledProcessError with its stderr."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    return done.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's ip"
    probe = f"{PREFIX}{secrets.token_hex(3)}p"
    try:
        ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"cannot make a network namespace: {e.stderr.strip()}"
    ip("netns", "del", probe)
    return None


@dataclass
class Netns:
    """One namespace of a ``Lan``: ``addr`` on ``eth0``, port ``port`` of the bridge."""

    name: str
    addr: str
    lan: Lan = field(repr=False)
    port: str = field(repr=False)  # the bridge's end of its veth, in the bridge's namespace
    procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def exec(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside (``ip netns exec`` execs it: the Popen's pid is
        the command's). Ended by ``Lan.close()`` if still running."""
        proc = subprocess.Popen(self.argv(argv), **popen_kwargs)
        self.procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside to its end, its output captured as text."""
        return subprocess.run(
            self.argv(argv), capture_output=True, text=True, timeout=timeout, check=check
        )

    def link_down(self) -> None:
        """Unplug: the bridge's port goes down (eth0 keeps its address, loses
        its carrier); nothing reaches this namespace or leaves it."""
        ip("-n", self.lan.bridge, "link", "set", self.port, "down")

    def link_up(self) -> None:
        ip("-n", self.lan.bridge, "link", "set", self.port, "up")


class Lan:
    """``size`` namespaces on one bridge (see the module's docstring)."""

    def __init__(self, size: int, subnet: int = 0) -> None:
        if not 1 <= size <= 250 or not 0 <= subnet <= 255:
            raise ValueError("1-250 namespaces, on a subnet 0-255")
        suffix = secrets.token_hex(3)
        self.bridge = f"{PREFIX}{suffix}b"
        self.nodes: list[Netns] = []
        self._made: list[str] = []
        try:
            self._add(self.bridge)
            ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            # No snooping: with no querier on this LAN, a snooping bridge may
            # stop forwarding a group it has not seen joined.
            ip("-n", self.bridge, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
            ip("-n", self.bridge, "link", "set", "br0", "up")
            for i in range(size):
                name, port = f"{PREFIX}{suffix}n{i}", f"p{i}"
                self._add(name)
                node = Netns(name, f"10.213.{subnet}.{i + 1}", self, port)
                veth = ("type", "veth", "peer", "name", IFACE, "netns", name)
                ip("-n", self.bridge, "link", "add", port, *veth)
                ip("-n", self.bridge, "link", "set", port, "master", "br0", "up")
                ip("-n", name, "addr", "add", f"{node.addr}/{PREFIX_LEN}", "dev", IFACE)
                ip("-n", name, "link", "set", IFACE, "up")
                ip("-n", name, "link", "set", "lo", "up")
                # No default route here: a multicast sender that names no interface
                # needs this one.
                ip("-n", name, "route", "add", "224.0.0.0/4", "dev", IFACE)
                self.nodes.append(node)
        except BaseException:
            self.close()
            raise

    def _add(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> Netns:
        return self.nodes[i]

    def __len__(self) -> int:
        return len(self.nodes)

    def close(self) -> None:
        """End what runs inside, delete the namespaces (twice is fine)."""
        for node in self.nodes:
            for proc in node.procs:
                _end(proc)
        for name in self._made:
            # what exec's commands started (a daemon's workers), still inside
            with contextlib.suppress(subprocess.CalledProcessError):
                for pid in ip("netns", "pids", name).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        while self._made:
            name = self._made.pop()
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "del", name)


def _end(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM, SIGKILL after ``grace`` s; then its pipes are closed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
