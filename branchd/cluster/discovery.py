"""Finding the other branches on a LAN by zeroconf (mDNS/DNS-SD).

Each branch announces ``<id>._branchd._tcp.local.`` with a TXT record that
says who it is and where it listens (an ``Announcement``), and browses for
the others' announcements. What it finds it hands to a ``found(Peer)``
callback, which feeds the gossip's ``join``. Discovery only says where a
branch may be: a withdrawn announcement is logged and nothing more, since
only SWIM decides that a branch is gone.

Two parts: the TXT record as bytes (``encode``/``decode``, pure), and the
``ZeroconfDiscovery`` service, which is the edge. The service multicasts on
the interface of the one address it is given, never on all of them, and
refuses a loopback address (``lo`` carries no multicast, and a branch on a
single box has nobody to find). zeroconf itself is imported by ``start()``
only, so a branch that never starts discovery never loads it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from branchd.cluster.transport import join_addr
from branchd.errors import BadMessage, ConfigError

if TYPE_CHECKING:
    from zeroconf import ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_branchd._tcp.local."
#: RFC 6763 section 6.2: a TXT record should stay under 200 bytes, so that the
#: answer with its SRV and A records fits one packet without fragmentation.
TXT_MAX = 200
#: The TXT layout this release writes and reads (its ``v`` key).
TXT_VERSION = "1"
#: A branch id as it may appear in a DNS label (store.py makes 32 hex digits).
_ID = re.compile(r"[A-Za-z0-9_-]{1,63}")
_VERSION = re.compile(r"[\x21-\x7e]{1,32}")  # printable ASCII, no space
_REQUIRED = ("v", "id", "ver", "api", "gossip", "epoch")
#: How long one announcement may take to resolve (its SRV, TXT and A records), ms.
RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class Announcement:
    """What a branch says of itself: its id, its release, the ports of its
    HTTP API and gossip, and the epoch of its run (a restart has a new one)."""

    id: str
    version: str
    api_port: int
    gossip_port: int
    epoch: int


@dataclass(frozen=True)
class Peer:
    """Another branch, found: where to reach it."""

    id: str
    api_url: str  # http://ip:port
    gossip_addr: str  # ip:port, what gossip's join takes
    version: str
    epoch: int

    @classmethod
    def of(cls, a: Announcement, ip: str) -> Peer:
        return cls(
            a.id,
            f"http://{join_addr(ip, a.api_port)}",
            join_addr(ip, a.gossip_port),
            a.version,
            a.epoch,
        )


#: Called with each branch found (again when its announcement changes).
Found = Callable[[Peer], None]


def encode(a: Announcement) -> bytes:
    """The TXT record of an announcement (RFC 6763: length-prefixed
    ``key=value`` strings); ValueError for a field that cannot be written or
    a record over ``TXT_MAX`` bytes."""
    if not _ID.fullmatch(a.id):
        raise ValueError(f"a branch id for zeroconf is 1-63 of A-Z a-z 0-9 _ -, not {a.id!r}")
    if not _VERSION.fullmatch(a.version):
        raise ValueError(f"a version is 1-32 printable ASCII characters, not {a.version!r}")
    for what, port in (("api", a.api_port), ("gossip", a.gossip_port)):
        if not 1 <= port <= 65535:
            raise ValueError(f"the {what} port must be 1-65535, not {port}")
    if a.epoch < 0:
        raise ValueError(f"an epoch is not negative: {a.epoch}")
    pairs = (
        ("v", TXT_VERSION),
        ("id", a.id),
        ("ver", a.version),
        ("api", str(a.api_port)),
        ("gossip", str(a.gossip_port)),
        ("epoch", str(a.epoch)),
    )
    strings = [f"{k}={v}".encode("ascii") for k, v in pairs]
    txt = b"".join(bytes((len(s),)) + s for s in strings)
    # The field limits keep the largest record at 158 bytes; checked anyway,
    # so that a field added later cannot slip past the limit.
    if len(txt) > TXT_MAX:
        raise ValueError(f"the TXT record would be {len(txt)} bytes, over {TXT_MAX}")
    return txt


def decode(txt: bytes) -> Announcement:
    """The announcement in a TXT record; BadMessage saying what is wrong with
    a malformed one. Keys this release does not know are ignored (a later
    release may add some); ``v`` must be this release's."""
    if len(txt) > TXT_MAX:
        raise BadMessage(f"TXT record of {len(txt)} bytes, over {TXT_MAX}")
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(txt):
        end = pos + 1 + txt[pos]
        if end > len(txt):
            raise BadMessage("TXT record truncated: a string runs past its end")
        raw, pos = txt[pos + 1 : end], end
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise BadMessage(f"TXT string not ASCII: {raw!r:.80}") from None
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise BadMessage(f"TXT string not key=value: {text!r:.80}")
        if key in fields:
            raise BadMessage(f"TXT key {key!r} twice")
        fields[key] = value
    # the layout first: a later one may have other keys, and that is the news
    if fields.get("v", TXT_VERSION) != TXT_VERSION:
        raise BadMessage(f"TXT layout v={fields['v']!r}, this release reads v={TXT_VERSION}")
    missing = [k for k in _REQUIRED if k not in fields]
    if missing:
        raise BadMessage(f"TXT record without {', '.join(missing)}")
    if not _ID.fullmatch(fields["id"]):
        raise BadMessage(f"TXT id not a branch id: {fields['id']!r:.80}")
    if not _VERSION.fullmatch(fields["ver"]):
        raise BadMessage(f"TXT ver not a version: {fields['ver']!r:.80}")
    return Announcement(
        fields["id"],
        fields["ver"],
        _number(fields, "api", 1, 65535),
        _number(fields, "gossip", 1, 65535),
        _number(fields, "epoch", 0, 2**64 - 1),
    )


def _number(fields: dict[str, str], key: str, low: int, high: int) -> int:
    text = fields[key]
    # isdigit() alone takes "²" and int() takes " 7" or "+7": neither is ours
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise BadMessage(f"TXT {key} not a number in {low}-{high}: {text!r:.80}")
    return int(text)


def instance_name(branch_id: str) -> str:
    return f"{branch_id}.{SERVICE_TYPE}"


def multicast_ip(addr: str) -> str:
    """``addr`` if zeroconf may multicast on its interface, else ConfigError:
    an IPv4 address (this release's zeroconf is IPv4 only), not loopback (no
    multicast there), not unspecified (that would be every interface)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ConfigError(f"zeroconf needs an IP address, not {addr!r}") from None
    if ip.version != 4:
        raise ConfigError(f"zeroconf discovery is IPv4 only, not {addr}")
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
        raise ConfigError(
            f"zeroconf refuses {addr}: it needs the address of one interface that carries "
            "multicast (a loopback or unspecified address has none or all of them)"
        )
    return str(ip)


class Discovery(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


class ZeroconfDiscovery:
    """Announce this branch and browse for the others on the interface of
    ``addr``. ``await start()``; ``await close()`` withdraws the announcement.

    After ``start()`` nothing raises: a failure (an announcement that does not
    resolve or is malformed, a ``found`` that raises, a registration refused)
    is logged, as a warning the first time for its cause, and the service
    carries on. ``found`` may be called more than once for one peer.
    """

    def __init__(self, me: Announcement, addr: str, found: Found) -> None:
        """ConfigError for an address zeroconf must not use (``multicast_ip``);
        ValueError for an announcement that cannot be written."""
        self._me = me
        self._ip = multicast_ip(addr)
        self._txt = encode(me)
        self._name = instance_name(me.id)
        self._found = found
        self._link = ipaddress.IPv4Network(self._ip)  # its interface's, once started
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: dict[str, Peer] = {}  # by instance name: what found() was told
        self._said: set[str] = set()
        self._closed = False

    @property
    def name(self) -> str:
        """This branch's instance name."""
        return self._name

    async def start(self) -> None:
        """Open the mDNS sockets on ``addr``'s interface, browse, and announce
        (in the background: probing for the name takes about a second).
        ConfigError if ``addr`` is not this host's; OSError if the sockets
        cannot be opened. Twice is fine."""
        if self._closed:
            raise RuntimeError("this discovery service is closed")
        if self._zc is not None:
            return
        self._link = _link_of(self._ip)
        from zeroconf import DNSQuestionType, IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        self._zc = AsyncZeroconf(interfaces=[self._ip], ip_version=IPVersion.V4Only)
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            self._name,
            port=self._me.api_port,
            properties=self._txt,
            server=f"{self._me.id}.local.",  # the id is one label, at most 63 bytes
            parsed_addresses=[self._ip],
        )
        # QM: answers come back multicast, so each branch's cache learns from
        # the answer to anyone's question (zeroconf's default first QU asks
        # for a unicast answer only the asker hears).
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf,
            SERVICE_TYPE,
            handlers=[self._changed],
            question_type=DNSQuestionType.QM,
        )
        self._spawn(self._register(self._zc, info))

    async def close(self) -> None:
        """Stop browsing and withdraw the announcement (goodbye packets).
        Never raises; twice is fine."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            try:
                await self._browser.async_cancel()
            except Exception:
                log.warning("the zeroconf browser did not stop cleanly", exc_info=True)
        if self._zc is not None:
            try:
                await self._zc.async_close()  # unregisters: goodbyes for our records
            except Exception:
                log.warning("zeroconf did not close cleanly", exc_info=True)

    # background ------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _once(self, cause: str, msg: str, *args: object, exc_info: bool = False) -> None:
        level = logging.DEBUG if cause in self._said else logging.WARNING
        self._said.add(cause)
        log.log(level, msg, *args, exc_info=exc_info)

    async def _register(self, zc: AsyncZeroconf, info: AsyncServiceInfo) -> None:
        from zeroconf import NonUniqueNameException

        try:
            announced = await zc.async_register_service(info)
            await announced
        except NonUniqueNameException:
            self._once(
                "register",
                "another host announces %s: two branches share the id %s (a copied state "
                "dir?); this one stays unannounced but still finds the others",
                self._name,
                self._me.id,
            )
        except Exception:
            self._once("register", "zeroconf could not announce %s", self._name, exc_info=True)

    def _changed(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """The browser's handler (on the loop): resolve what appeared or changed."""
        from zeroconf import ServiceStateChange

        if name == self._name or self._closed:
            return
        if state_change is ServiceStateChange.Removed:
            self._seen.pop(name, None)
            log.info("%s withdrew its announcement (only gossip says whether it is gone)", name)
            return
        self._spawn(self._resolve(zeroconf, name))

    async def _resolve(self, zc: Zeroconf, name: str) -> None:
        from zeroconf import DNSQuestionType, IPVersion
        from zeroconf.asyncio import AsyncServiceInfo

        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(zc, RESOLVE_TIMEOUT_MS, DNSQuestionType.QM):
                self._once("unresolved", "%s did not answer within %d ms", name, RESOLVE_TIMEOUT_MS)
                return
            try:
                a = decode(info.text or b"")
            except BadMessage as e:
                self._once("malformed", "%s announces a malformed record: %s", name, e)
                return
            if a.id == self._me.id:
                return
            ips = info.parsed_addresses(IPVersion.V4Only)
            # The mDNS socket hears the group on every interface where anyone
            # on this host joined it (Linux's IP_MULTICAST_ALL): a branch
            # heard from another interface is not ours to join.
            ours = [ip for ip in ips if ipaddress.IPv4Address(ip) in self._link]
            if not ours:
                self._once("off-link", "%s announces %s, not on %s: ignored", name, ips, self._link)
                return
            peer = Peer.of(a, ours[0])
            if self._seen.get(name) == peer:
                return
            self._seen[name] = peer
        except Exception as e:  # zeroconf's own failure: said, and the next event retries
            self._once(f"resolve:{type(e).__name__}", "resolving %s failed", name, exc_info=True)
            return
        log.info("found branch %s at %s", peer.id, peer.gossip_addr)
        try:
            self._found(peer)
        except Exception:
            self._seen.pop(name, None)  # told again on its next announcement
            self._once("found", "the found() callback failed for %s", peer.id, exc_info=True)


def _link_of(ip: str) -> ipaddress.IPv4Network:
    """The network of the interface that has ``ip``; ConfigError if none has
    it (zeroconf would start with no interface at all and find nothing)."""
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for a in adapter.ips:
            if a.ip == ip:
                return ipaddress.IPv4Network(f"{ip}/{a.network_prefix}", strict=False)
    raise ConfigError(f"zeroconf: {ip} is not an address of this host")
