"""The namespace LAN of tests/netns.py itself: unicast and multicast cross the
bridge, a cut cable stops both until mended, and nothing is left behind."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from tests.conftest import wait_for
from tests.netns import Lan, ip

GROUP = "239.213.0.1"
PORT = 9999

#: Answers each datagram, sent to its address or to GROUP, back to its sender.
ECHO = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", {PORT}))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton("{GROUP}") + socket.inet_aton(sys.argv[1]))
print("ready", flush=True)
while True:
    data, sender = s.recvfrom(100)
    s.sendto(data, sender)
"""

#: Exit 0 if a datagram sent to argv[2] (from argv[1]'s interface) is answered.
ASK = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[1]))
s.settimeout(0.3)
s.sendto(b"hello", (sys.argv[2], {PORT}))
try:
    sys.exit(0 if s.recvfrom(100)[0] == b"hello" else 1)
except TimeoutError:
    sys.exit(1)
"""


def answered(lan: Lan, to: str) -> bool:
    done = lan[0].run([sys.executable, "-c", ASK, lan[0].addr, to], check=False)
    return done.returncode == 0


def test_unicast_and_multicast_cross_the_bridge_until_a_cable_is_cut(
    lan: Callable[..., Lan],
) -> None:
    net = lan(2)
    assert [n.addr for n in net.nodes] == ["10.213.0.1", "10.213.0.2"]
    echo = net[1].exec([sys.executable, "-c", ECHO, net[1].addr], stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None and echo.stdout.readline() == "ready\n"
    assert wait_for(lambda: answered(net, net[1].addr))
    assert answered(net, GROUP)

    net[1].link_down()
    assert not answered(net, net[1].addr)
    assert not answered(net, GROUP)

    net[1].link_up()
    assert wait_for(lambda: answered(net, net[1].addr))
    assert answered(net, GROUP)


def test_closing_ends_what_runs_inside_and_removes_every_namespace(
    lan: Callable[..., Lan],
) -> None:
    net = lan(2, subnet=7)
    assert net[1].addr == "10.213.7.2"
    sleeper = net[0].exec([sys.executable, "-c", "import time; time.sleep(600)"])
    # a child that exec did not start, left behind by its parent
    net[1].run(["sh", "-c", "sleep 600 >/dev/null 2>&1 &"])
    names = [net.bridge, *(n.name for n in net.nodes)]
    assert set(names) <= set(ip("netns", "list").split())

    net.close()
    assert sleeper.poll() is not None
    listed = ip("netns", "list").split()
    assert not set(names) & set(listed)
    net.close()  # twice is fine
