"""The in-memory twin of the UDP transport: a network of branches in one process.

Tests only: production code never imports it (an import-linter contract).
Every datagram is delivered by a timer of the ``Scheduler`` it is given (a
``FakeScheduler`` in tests, so a run is stepped, never slept), and what
happens to it is drawn from one seeded ``random.Random``, so a run is a
function of its seed and of the order of the sends:

- ``loss``: the share of datagrams lost;
- ``delay``: (min, max) seconds, uniform; a spread reorders datagrams
  (equal delays keep the order they were sent in);
- ``partition(a, b)``: no datagram between a member of ``a`` and one of
  ``b``, either way, until ``heal()`` (checked when sent and when due, so a
  datagram in flight across a new cut is lost too);
- ``slow(addr)``: datagrams *to* ``addr`` arrive 0.5-2.5 s later than they
  would (a reader that is paused, swapping, or behind a full queue);
- an address with no open transport *refuses* what arrives there: the
  sender's transport is told, after a delay drawn as for a datagram (what a
  live host's kernel answers for a port nobody holds: a process that exited
  or was killed); ``silence(addr)`` makes datagrams to ``addr`` vanish
  instead (a host that is off, or unplugged), and closes the transport there.

``MemoryNetwork.transport(addr, receiver)`` makes one branch's transport; it
keeps the budget and counters of the UDP one (``TransportStats``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

from branchd.clock import Scheduler
from branchd.cluster.codec import DATAGRAM_BUDGET
from branchd.cluster.transport import (
    Counters,
    Receiver,
    Refusal,
    TransportStats,
    hand_over,
    tell_refused,
)

log = logging.getLogger(__name__)

#: The lateness of a slow reader's datagrams (seconds, uniform).
SLOW = (0.5, 2.5)


@dataclass(frozen=True)
class NetworkStats:
    """The network's own tally of the datagrams the transports sent."""

    delivered: int = 0
    lost: int = 0  # drawn by ``loss``
    cut: int = 0  # across a partition
    nowhere: int = 0  # no open transport at the address when due
    refused: int = 0  # of the nowhere: refused, the sender told (not silenced)


class MemoryNetwork:
    def __init__(
        self,
        scheduler: Scheduler,
        *,
        seed: int = 0,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.0, 0.0),
        budget: int = DATAGRAM_BUDGET,
    ) -> None:
        if not 0.0 <= loss <= 1.0 or not 0.0 <= delay[0] <= delay[1]:
            raise ValueError(f"loss in [0, 1] and 0 <= min <= max delay, not {loss}, {delay}")
        self._scheduler = scheduler
        self._rng = random.Random(seed)
        self.loss = loss
        self.delay = delay
        self.budget = budget
        self._nodes: dict[str, MemoryTransport] = {}
        self._cuts: list[tuple[frozenset[str], frozenset[str]]] = []
        self._slow: set[str] = set()
        self._silent: set[str] = set()
        self.hand_overed = self._lost = self._cut = self._nowhere = self._refused = 0

    def transport(
        self, addr: str, receiver: Receiver, refusal: Refusal | None = None
    ) -> MemoryTransport:
        """A branch's transport at ``addr`` (any unique name, ``"b1:8401"`` say)."""
        if addr in self._nodes:
            raise ValueError(f"address {addr!r} is taken")
        self._silent.discard(addr)  # a transport made there: its host is back
        node = MemoryTransport(self, addr, receiver, refusal)
        self._nodes[addr] = node
        return node

    # conditions ------------------------------------------------------------------

    def partition(self, a: Iterable[str], b: Iterable[str]) -> None:
        """No datagram between any of ``a`` and any of ``b`` until ``heal()``."""
        self._cuts.append((frozenset(a), frozenset(b)))

    def heal(self) -> None:
        self._cuts.clear()

    def slow(self, addr: str, slow: bool = True) -> None:
        """Make ``addr`` a slow reader (or a normal one again)."""
        if slow:
            self._slow.add(addr)
        else:
            self._slow.discard(addr)

    def silence(self, addr: str) -> None:
        """The host at ``addr`` is off: its transport (if open) closes and
        datagrams to it vanish, refused by nobody, until one is made there."""
        node = self._nodes.get(addr)
        if node is not None:
            node.close()
        self._silent.add(addr)

    def reachable(self, src: str, dst: str) -> bool:
        return not any((src in a and dst in b) or (src in b and dst in a) for a, b in self._cuts)

    def stats(self) -> NetworkStats:
        return NetworkStats(
            self.hand_overed, self._lost, self._cut, self._nowhere, self._refused
        )

    # the transports' side ----------------------------------------------------------

    def _send(self, src: str, dst: str, data: bytes) -> None:
        if not self.reachable(src, dst):
            self._cut += 1
            return
        if self.loss and self._rng.random() < self.loss:
            self._lost += 1
            return
        delay = self._delay()
        if dst in self._slow:
            delay += self._rng.uniform(*SLOW)
        when = self._scheduler.clock.monotonic() + delay
        self._scheduler.call_at(when, lambda: self._arrive(src, dst, data))

    def _delay(self) -> float:
        low, high = self.delay
        return self._rng.uniform(low, high) if high > low else low

    def _arrive(self, src: str, dst: str, data: bytes) -> None:
        if not self.reachable(src, dst):
            self._cut += 1
            return
        node = self._nodes.get(dst)
        if node is None:
            self._nowhere += 1
            if dst not in self._silent:
                self._refuse(src, dst)
            return
        self.hand_overed += 1
        node._arrived(src, data)

    def _refuse(self, src: str, dst: str) -> None:
        """The host at ``dst`` answers ``src`` that nothing listens there (an
        ICMP message: lost and delayed like a datagram, but never slowed, as
        a kernel answers it, not a reader)."""
        if self.loss and self._rng.random() < self.loss:
            return
        self._refused += 1
        when = self._scheduler.clock.monotonic() + self._delay()
        self._scheduler.call_at(when, lambda: self._refusal_arrives(src, dst))

    def _refusal_arrives(self, src: str, dst: str) -> None:
        node = self._nodes.get(src)
        if node is not None and self.reachable(dst, src):
            node._refused(dst)

    def _forget(self, addr: str) -> None:
        self._nodes.pop(addr, None)


class MemoryTransport:
    """One branch's end of a ``MemoryNetwork`` (the ``Transport`` Protocol)."""

    def __init__(
        self,
        network: MemoryNetwork,
        addr: str,
        receiver: Receiver,
        refusal: Refusal | None = None,
    ) -> None:
        self._network = network
        self._address = addr
        self._receiver = receiver
        self._refusal = refusal
        self._counters = Counters(log)
        self._closed = False

    @property
    def address(self) -> str:
        return self._address

    def stats(self) -> TransportStats:
        return self._counters.snapshot()

    def send(self, addr: str, data: bytes) -> None:
        c = self._counters
        if c.refused(self._closed, addr, data, self._network.budget):
            return
        c.sent += 1
        c.bytes_sent += len(data)
        self._network._send(self._address, addr, bytes(data))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._network._forget(self._address)

    def _arrived(self, src: str, data: bytes) -> None:
        if self._closed:
            return
        self._counters.received += 1
        self._counters.bytes_received += len(data)
        hand_over(self._receiver, src, data)

    def _refused(self, dst: str) -> None:
        if self._closed:
            return
        self._counters.refusals += 1
        tell_refused(self._refusal, dst)
