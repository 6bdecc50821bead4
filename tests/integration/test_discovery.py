"""Zeroconf discovery on a real LAN of network namespaces (tests/netns.py):
three branches, each running ``ZeroconfDiscovery`` on its namespace's
address (tests/integration/discovery_node.py), find each other and never
themselves; one that closes is only logged by the others, and found again
when it comes back as a new run; a malformed announcement and a failing
callback are said once and survived. Skips without root or ``ip``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tests.conftest import wait_for
from tests.netns import Lan, Netns

ROOT = Path(__file__).resolve().parents[2]
API, GOSSIP = 8080, 7946
DEADLINE = 20.0


class Node:
    """discovery_node.py running in one namespace, its output gathered."""

    def __init__(
        self, ns: Netns, branch_id: str, epoch: int = 1, refused: tuple[str, ...] = ()
    ) -> None:
        self.ns, self.id = ns, branch_id
        argv = [sys.executable, "-m", "tests.integration.discovery_node"]
        argv += [branch_id, ns.addr, str(API), str(GOSSIP), str(epoch), *refused]
        self.proc = ns.exec(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[dict[str, Any]] = []
        self.log: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pump(self.proc.stdout, lambda line: self.lines.append(json.loads(line)))
        self._pump(self.proc.stderr, self.log.append)

    @staticmethod
    def _pump(pipe: IO[str], into: Callable[[str], None]) -> None:
        def run() -> None:
            try:
                for line in pipe:
                    into(line)
            except ValueError:  # the pipe closed by Lan.close()
                pass

        threading.Thread(target=run, daemon=True).start()

    def found(self) -> dict[str, dict[str, Any]]:
        """The latest peer found for each id."""
        return {p["id"]: p for p in (line["found"] for line in self.lines if "found" in line)}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0, "".join(self.log)[-3000:]
        wait_for(lambda: {"closed": self.id} in self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def warned(self, *words: str) -> int:
        return sum(x.startswith("WARNING") and all(w in x for w in words) for x in self.log)


def expect(node: Node, others: list[Node]) -> None:
    def seen() -> bool:
        assert node.alive(), "".join(node.log)[-3000:]
        return set(node.found()) == {o.id for o in others}

    wait_for(seen, timeout=DEADLINE)


def test_three_branches_on_a_lan_each_find_the_other_two(lan: Callable[..., Lan]) -> None:
    net = lan(3)
    nodes = [Node(ns, f"branch{i}") for i, ns in enumerate(net.nodes)]
    for node in nodes:
        expect(node, [o for o in nodes if o is not node])
    for node in nodes:
        assert node.id not in node.found()  # never itself
        for other in nodes:
            if other is not node:
                assert node.found()[other.id] == {
                    "id": other.id,
                    "api_url": f"http://{other.ns.addr}:{API}",
                    "gossip_addr": f"{other.ns.addr}:{GOSSIP}",
                    "version": "0.1.0",
                    "epoch": 1,
                }
        assert not any("WARNING" in line for line in node.log), node.log


def test_a_branch_that_closes_is_only_logged_and_found_again_as_its_new_run(
    lan: Callable[..., Lan],
) -> None:
    net = lan(3)
    a, b, c = (Node(ns, f"branch{i}") for i, ns in enumerate(net.nodes))
    for node, others in ((a, [b, c]), (b, [a, c]), (c, [a, b])):
        expect(node, others)

    c.stop()  # withdraws its announcement: goodbyes
    for node in (a, b):
        wait_for(lambda n=node: any("branch2" in x and "withdrew" in x for x in n.log))
        assert node.alive()

    again = Node(net[2], "branch2", epoch=2)
    for node in (a, b):
        wait_for(lambda n=node: n.found()["branch2"]["epoch"] == 2, timeout=DEADLINE)
    expect(again, [a, b])


#: Announces a branchd service whose TXT record is of a later layout (v=9).
ROGUE = """
import asyncio, sys
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

async def main():
    zc = AsyncZeroconf(interfaces=[sys.argv[1]], ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(
        "_branchd._tcp.local.", "rogue._branchd._tcp.local.", port=1, properties=b"\\x03v=9",
        server="rogue.local.", parsed_addresses=[sys.argv[1]],
    )
    await (await zc.async_register_service(info))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_malformed_announcement_and_a_failing_callback_are_said_once_and_survived(
    lan: Callable[..., Lan],
) -> None:
    net = lan(4)
    rogue = net[3].exec([sys.executable, "-c", ROGUE, net[3].addr], stdout=subprocess.PIPE)
    a = Node(net[0], "branch0", refused=("branch1",))
    b, c = Node(net[1], "branch1"), Node(net[2], "branch2")
    assert rogue.stdout is not None and rogue.stdout.readline() == b"ready\n"
    expect(b, [a, c])
    expect(c, [a, b])
    wait_for(lambda: set(a.found()) == {"branch2"}, timeout=DEADLINE)
    for node in (a, b, c):
        wait_for(lambda n=node: n.warned("malformed", "v='9'"), timeout=DEADLINE)
    wait_for(lambda: a.warned("found() callback failed for branch1"))
    for node in (a, b, c):
        assert node.alive() and node.warned("malformed") == 1, node.log
