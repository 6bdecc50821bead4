"""One branch's discovery alone, for tests/integration/test_discovery.py:

    python -m tests.integration.discovery_node ID ADDR API GOSSIP EPOCH [REFUSED_ID...]

runs ``ZeroconfDiscovery`` on ADDR and prints JSON lines to stdout:
``{"started": ID}`` once started, then ``{"found": {...Peer...}}`` for each
peer found (its callback raises for each REFUSED_ID instead). Logs, removals
among them, go to stderr. SIGTERM closes it (its announcement withdrawn) and
it prints ``{"closed": ID}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import sys

from branchd.cluster.discovery import Announcement, Peer, ZeroconfDiscovery


def say(**line: object) -> None:
    print(json.dumps(line), flush=True)


async def main(
    branch_id: str, addr: str, api: int, gossip: int, epoch: int, refused: list[str]
) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    def found(peer: Peer) -> None:
        if peer.id in refused:
            raise RuntimeError(f"{peer.id} refused by this test")
        say(found=dataclasses.asdict(peer))

    service = ZeroconfDiscovery(Announcement(branch_id, "0.1.0", api, gossip, epoch), addr, found)
    await service.start()
    say(started=branch_id)
    await stop.wait()
    await service.close()
    say(closed=branch_id)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
    i, a, api, gossip, epoch, *refused = sys.argv[1:]
    asyncio.run(main(i, a, int(api), int(gossip), int(epoch), refused))
