"""Zeroconf discovery on a real LAN of network namespaces (tests/netns.py):
three branches, each running ``ZeroconfDiscovery`` on its namespace's
address (tests/integration/discovery_node.py), find each other and never
themselves; one that closes is only logged by the others, and found again
when it comes back as a new run. Skips without root or ``ip``."""

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

    def __init__(self, ns: Netns, branch_id: str, epoch: int = 1) -> None:
        self.ns, self.id = ns, branch_id
        argv = [sys.executable, "-m", "tests.integration.discovery_node"]
        argv += [branch_id, ns.addr, str(API), str(GOSSIP), str(epoch)]
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
