"""How branches' datagrams travel: the ``Transport`` Protocol and its UDP edge.

A transport carries opaque datagrams (the codec's compounds, later sealed)
of at most ``budget`` bytes between addresses ``"host:port"``. What arrives
is handed to the ``Receiver`` given when the transport is made, with the
sender's address. A datagram the peer's host *refused* (nothing listens at
that port: the ICMP port unreachable a live host's kernel answers for a
process that is gone) is told to the ``Refusal`` given, with the address it
was sent to; on Linux, ``UdpTransport`` asks the kernel for these
(``IP_RECVERR``), which an unconnected UDP socket does not hear of
otherwise. A transport never raises on a send: a datagram over the
budget, an unreachable peer or a send after ``close()`` is dropped and
counted in ``stats()``, and each cause is logged once.

``UdpTransport`` is the real one; its twin, the in-memory network with loss,
delay, partitions and slow readers, is ``cluster/memnet.py`` (tests only).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from branchd.cluster.codec import DATAGRAM_BUDGET

log = logging.getLogger(__name__)

#: Called with (sender's address, datagram) for each datagram that arrives.
Receiver = Callable[[str, bytes], None]

#: Called with the address of a datagram its host refused (nothing listens there).
Refusal = Callable[[str], None]


@dataclass(frozen=True)
class TransportStats:
    """What a transport did, since it was made."""

    sent: int = 0
    received: int = 0
    oversize: int = 0  # dropped: over the budget (sent or arriving)
    send_errors: int = 0  # dropped: the peer unreachable, a bad address
    closed: int = 0  # dropped: sent after close()
    bytes_sent: int = 0  # of the datagrams sent
    bytes_received: int = 0  # of the datagrams received (within the budget)
    refused: int = 0  # sent, then refused by the peer's host (nothing listens there)


class Transport(Protocol):
    @property
    def address(self) -> str:
        """Where this transport listens (the real port when bound to port 0)."""
        ...

    def send(self, addr: str, data: bytes) -> None:
        """Send one datagram; never raises (drops are counted)."""
        ...

    def stats(self) -> TransportStats: ...

    def close(self) -> None:
        """Stop sending and receiving (twice is fine)."""
        ...


def split_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` → (host, port); ValueError if malformed."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not a host:port address: {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def join_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Counters:
    """A transport's counters and its log-once memory (shared with the twin)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.sent = self.received = self.oversize = self.send_errors = self.closed = 0
        self.bytes_sent = self.bytes_received = self.refusals = 0
        self._log = logger
        self._said: set[str] = set()

    def snapshot(self) -> TransportStats:
        return TransportStats(
            self.sent,
            self.received,
            self.oversize,
            self.send_errors,
            self.closed,
            self.bytes_sent,
            self.bytes_received,
            self.refusals,
        )

    def once(self, cause: str, msg: str, *args: object) -> None:
        """Log ``msg`` as a warning the first time ``cause`` is seen, then at debug."""
        level = logging.DEBUG if cause in self._said else logging.WARNING
        self._said.add(cause)
        self._log.log(level, msg, *args)

    def refused(self, closed: bool, addr: str, data: bytes, budget: int) -> bool:
        """Count and say why a datagram cannot go (closed, over the budget)."""
        if closed:
            self.closed += 1
            self.once("closed", "datagram to %s dropped: the transport is closed", addr)
            return True
        if len(data) > budget:
            self.oversize += 1
            self.once(
                "oversize-out",
                "datagram of %d bytes over the budget of %d dropped",
                len(data),
                budget,
            )
            return True
        return False


def _ee_errno(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The error of a ``sock_extended_err`` (its first field, a u32)."""
    for _level, _type, data in ancdata:
        if len(data) >= 4:
            return int(struct.unpack("=I", data[:4])[0])
    return 0


def _cause(exc: BaseException) -> str:
    errno = getattr(exc, "errno", None)
    return f"{type(exc).__name__}:{errno}"


def hand_over(receiver: Receiver, addr: str, data: bytes) -> None:
    try:
        receiver(addr, data)
    except Exception:  # the receiver's fault: said, and the transport goes on
        log.exception("receiver of a datagram from %s failed", addr)


def tell_refused(refusal: Refusal | None, addr: str) -> None:
    if refusal is None:
        return
    try:
        refusal(addr)
    except Exception:  # as hand_over: said, and the transport goes on
        log.exception("the refusal handler for %s failed", addr)


#: A refusal is believed when it quotes the first _QUOTE_BYTES of one of the
#: last _QUOTES_KEPT datagrams sent to its address (a sealed frame's first 25
#: bytes hold its 12-byte random nonce); so many addresses are remembered.
_QUOTE_BYTES = 32
_QUOTES_KEPT = 8
_ADDRESSES_KEPT = 4096

#: Linux's socket options that queue ICMP errors of an unconnected UDP
#: socket for ``recvmsg(MSG_ERRQUEUE)`` (the socket module names neither).
_RECVERR: dict[int, tuple[int, int]] = {
    socket.AF_INET: (socket.IPPROTO_IP, 11),
    socket.AF_INET6: (socket.IPPROTO_IPV6, 25),
}


def _udp_socket(family: int, host: str, port: int) -> tuple[socket.socket, bool]:
    """A bound, non-blocking UDP socket, and whether it hears of refusals."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        recverr = sys.platform.startswith("linux") and hasattr(socket, "MSG_ERRQUEUE")
        if recverr:
            level, option = _RECVERR[family]
            sock.setsockopt(level, option, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, recverr


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.owner: UdpTransport | None = None  # set as soon as the endpoint is made

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.owner is not None:
            self.owner._arrived(data, join_addr(str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        if self.owner is not None:
            self.owner._errors(exc)


class UdpTransport:
    """UDP datagrams on an asyncio endpoint. Make it with ``await UdpTransport.open()``."""

    def __init__(
        self,
        endpoint: asyncio.DatagramTransport,
        receiver: Receiver,
        budget: int,
        refusal: Refusal | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._receiver = receiver
        self._refusal = refusal
        self._sock = sock  # set when it queues ICMP errors (read in _errors)
        #: the first bytes of the last datagrams sent, by address (refusals quote them)
        self._recent: dict[str, collections.deque[bytes]] = {}
        self._budget = budget
        self._counters = Counters(log)
        self._closed = False
        host, port = endpoint.get_extra_info("sockname")[:2]
        self._address = join_addr(str(host), int(port))

    @classmethod
    async def open(
        cls,
        bind: str,
        receiver: Receiver,
        budget: int = DATAGRAM_BUDGET,
        refusal: Refusal | None = None,
    ) -> UdpTransport:
        """Bind ``bind`` (``"HOST:PORT"``, IP literals; port 0 picks a free one)."""
        host, port = split_addr(bind)
        loop = asyncio.get_running_loop()
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:  # a name ("localhost"): its first address, as asyncio would bind
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            if not infos:
                raise OSError(errno.EADDRNOTAVAIL, f"{host} has no address") from None
            family, host = infos[0][0], str(infos[0][4][0])
        sock, recverr = _udp_socket(family, host, port)
        try:
            endpoint, proto = await loop.create_datagram_endpoint(_Protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        transport = cls(endpoint, receiver, budget, refusal, sock if recverr else None)
        proto.owner = transport
        return transport

    @property
    def address(self) -> str:
        return self._address

    def stats(self) -> TransportStats:
        return self._counters.snapshot()

    def send(self, addr: str, data: bytes) -> None:
        c = self._counters
        if c.refused(self._closed, addr, data, self._budget):
            return
        try:
            host, port = split_addr(addr)
            ipaddress.ip_address(host)  # never a name: sendto would resolve it, blocking
        except ValueError:
            c.send_errors += 1
            c.once(f"address:{addr}", "datagram dropped: %r is not an IP:port address", addr)
            return
        if self._sock is not None:
            if not self._sent_directly(data, (host, port)):
                return
            self._remember(addr, data)
        else:
            try:
                self._endpoint.sendto(data, (host, port))
            except OSError as e:  # asyncio hands most to error_received; not all
                self._send_failed(e, addr)
                return
        c.sent += 1
        c.bytes_sent += len(data)

    def _sent_directly(self, data: bytes, dest: tuple[str, int]) -> bool:
        """Send on the socket itself, where it hears of refusals: with
        IP_RECVERR, Linux fails the next ``sendto`` (to any address) with the
        error an ICMP message left pending, and that datagram is not sent; so
        the error queue is read (the refusal told) and the datagram sent
        again. A full socket buffer leaves it to asyncio's own queue."""
        assert self._sock is not None
        for _ in range(2):
            try:
                self._sock.sendto(data, dest)
                return True
            except (BlockingIOError, InterruptedError):
                self._endpoint.sendto(data, dest)
                return True
            except ConnectionRefusedError as e:
                self._errors(e)  # a pending error of an earlier datagram: once more
            except OSError as e:
                self._send_failed(e, join_addr(*dest))
                return False
        self._send_failed(ConnectionRefusedError(errno.ECONNREFUSED, "refused twice"), "?")
        return False

    def _remember(self, addr: str, data: bytes) -> None:
        """What a refusal must quote to be believed: the first bytes of one of
        the last datagrams sent to ``addr`` (under a key, they hold the
        frame's random nonce, which nobody off the path can know)."""
        sent = self._recent.pop(addr, None) or collections.deque(maxlen=_QUOTES_KEPT)
        sent.append(data[:_QUOTE_BYTES])
        self._recent[addr] = sent  # (last: the most recent)
        if len(self._recent) > _ADDRESSES_KEPT:
            self._recent.pop(next(iter(self._recent)))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._endpoint.close()

    # from the endpoint ---------------------------------------------------------

    def _arrived(self, data: bytes, addr: str) -> None:
        if self._closed:
            return
        c = self._counters
        if len(data) > self._budget:
            c.oversize += 1
            c.once(
                "oversize-in",
                "datagram of %d bytes from %s over the budget dropped",
                len(data),
                addr,
            )
            return
        c.received += 1
        c.bytes_received += len(data)
        hand_over(self._receiver, addr, data)

    def _errors(self, exc: Exception) -> None:
        """An error the socket reported: each ICMP error queued is read (so
        that none is left to wake the loop again) with the address its
        datagram was sent to; a refusal is told, any other error counted."""
        queued = False
        while self._sock is not None:
            try:
                quoted, ancdata, _, dest = self._sock.recvmsg(
                    _QUOTE_BYTES, 512, socket.MSG_ERRQUEUE
                )
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._send_failed(e, "?")
                break
            queued = True
            errno_ = _ee_errno(ancdata)
            addr = join_addr(str(dest[0]), int(dest[1])) if dest else "?"
            if errno_ == errno.ECONNREFUSED and not self._closed:
                if not self._quotes_ours(addr, quoted):
                    self._counters.send_errors += 1
                    self._counters.once(
                        "refusal-unknown",
                        "an ICMP refusal for %s quotes no datagram sent there: ignored",
                        addr,
                    )
                    continue
                self._counters.refusals += 1
                tell_refused(self._refusal, addr)
            else:
                self._send_failed(OSError(errno_, os.strerror(errno_ or 0)), addr)
        if not queued:
            self._send_failed(exc, "?")

    def _quotes_ours(self, addr: str, quoted: bytes) -> bool:
        n = min(len(quoted), _QUOTE_BYTES)
        return n > 0 and any(q[:n] == quoted[:n] for q in self._recent.get(addr, ()))

    def _send_failed(self, exc: Exception, addr: str) -> None:
        self._counters.send_errors += 1
        self._counters.once(_cause(exc), "a datagram could not be sent (to %s): %s", addr, exc)
