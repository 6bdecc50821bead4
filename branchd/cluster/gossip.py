"""The gossip service: the pure membership core driven over a transport.

``Gossip`` feeds the core (``membership.step``) its events and carries out
the commands it answers, and nothing else decides anything here:

- ``Send``: the messages of one turn (one event, or one datagram's messages)
  are grouped by address, packed into compound datagrams (``codec.pack``,
  1,400 bytes, less the seal's 41 when a keyring is set), each sealed under
  the keyring's primary key and handed to the transport. A push-pull
  ``Sync`` too big for a datagram is split into several (only the first asks
  for a reply): merging a view is the same in one piece or many.
- ``SetTimer``: a ``Scheduler`` timer that feeds the event back (a stale one
  is harmless: the core checks its token); all are cancelled by ``close()``.
- ``Notify``: a ``MemberChanged`` on the event bus.

What arrives is opened (a frame that will not open is counted by its
``seal.DropReason``), unpacked (bytes that are not messages are counted)
and fed as ``Received``. A failure in any of it is logged once per cause
and counted; the service carries on.

Push-pull may go over HTTP: given a ``PushPull`` (the daemon's, which
posts to the member's API), every ``Sync`` that asks for a reply is handed
to it, and its answer fed back as a received message; :meth:`exchange` is
the other side (the API's handler). Without one, or when it has no way to
reach that member, the Sync goes out in datagrams like any message.

One thing is the service's own: a *reconnect*, every push-pull interval, to
one member believed dead (not left), by feeding the core a ``Join`` with its
address, so that the two sides of a healed partition find each other again
(Serf's reconnect, which memberlist leaves to its user).

The transport is made by the factory given (``UdpTransport.open`` in the
daemon, a ``MemoryNetwork`` transport in tests), handed this service's
receiver; production code never names the in-memory twin.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import random
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from branchd.clock import Scheduler, Timer, deadline
from branchd.cluster import codec, membership, seal
from branchd.cluster.keyring import Keyring
from branchd.cluster.membership import (
    Command,
    Event,
    Join,
    Leave,
    Membership,
    Notify,
    Received,
    Send,
    SetTimer,
)
from branchd.cluster.messages import MemberState, Message, Sync, Update
from branchd.cluster.timing import MembershipConfig
from branchd.cluster.transport import Receiver, Refusal, Transport, TransportStats
from branchd.errors import BadMessage
from branchd.events import EventBus, MemberChanged

log = logging.getLogger(__name__)

#: Makes the transport, handed the service's receiver and refusal handler
#: (may be a coroutine).
TransportFactory = Callable[[Receiver, Refusal], Transport | Awaitable[Transport]]

#: Carries a push-pull to the member at a gossip address and returns its
#: answer; None: no other way to that member than datagrams.
PushPull = Callable[[str, Sync], Awaitable[Sync] | None]

#: memberlist's MetaMaxSize: a member's meta rides on every alive rumour.
META_MAX = 512

#: How long ``leave()`` waits by default for its goodbye to be spent (s).
LEAVE_TIMEOUT = 3.0


@dataclass(frozen=True)
class MemberView:
    """One member as this branch sees it (``since``: on the monotonic clock)."""

    id: str
    addr: str
    epoch: int
    incarnation: int
    state: MemberState
    since: float
    is_self: bool = False
    meta: str = ""


@dataclass(frozen=True)
class GossipStats:
    datagrams_sent: int = 0
    datagrams_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    #: frames that would not open, by ``seal.DropReason`` value (every reason listed)
    dropped: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    bad_messages: int = 0  # opened (or unsealed) datagrams that were not messages
    unsendable: int = 0  # messages that fit no datagram (an id of a kilobyte)
    failures: int = 0  # errors caught in the background (logged once per cause)
    transport: TransportStats = field(default_factory=TransportStats)


class Gossip:
    """One branch's membership, alive on a transport. ``await start(seeds)``
    joins; ``await leave()`` says goodbye; ``close()`` stops it."""

    def __init__(
        self,
        member_id: str,
        addr: str | None,
        epoch: int,
        transport: TransportFactory,
        scheduler: Scheduler,
        config: MembershipConfig,
        keyring: Keyring | None = None,
        bus: EventBus | None = None,
        seed: int | None = None,
        push_pull: PushPull | None = None,
        meta: str = "",
    ) -> None:
        """``addr`` is what the others dial (``None``: the transport's own
        address, once made); ``seed`` makes the run's choices repeatable."""
        self._id = member_id
        self._addr = addr
        self._epoch = epoch
        self._factory = transport
        self._scheduler = scheduler
        self._clock = scheduler.clock
        self._config = config
        self._keyring = keyring
        self._bus = bus
        self._push_pull = push_pull
        self._meta = _checked_meta(meta)
        self._tasks: set[asyncio.Task[None]] = set()
        self._seed = secrets.randbits(64) if seed is None else seed
        self._rng = random.Random(self._seed)
        self._state: Membership | None = None
        self._transport: Transport | None = None
        self._seeds: tuple[str, ...] = ()
        self._seen = seal.Seen()
        self._timers: dict[int, Timer] = {}
        self._timer_ids = itertools.count()
        self._closed = False
        self._goodbye = asyncio.Event()
        self._said: set[str] = set()
        self._counts: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter({r.value: 0 for r in seal.DropReason})
        #: Called after a turn that changed any member (set by whoever reads the view).
        self.on_change: Callable[[], None] | None = None

    # the service's side ----------------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def address(self) -> str | None:
        """What the others dial; None until started with no ``addr`` given."""
        return self._state.me.addr if self._state is not None else self._addr

    @property
    def budget(self) -> int:
        """The bytes of messages one datagram carries (the seal's share taken)."""
        if self._keyring is None:
            return codec.DATAGRAM_BUDGET
        return codec.DATAGRAM_BUDGET - seal.OVERHEAD

    def use_keyring(self, keyring: Keyring) -> None:
        """Seal and open with this keyring from now on (a rotation's step)."""
        self._keyring = keyring

    async def start(self, seeds: Iterable[str] = ()) -> None:
        """Make the transport (once) and join through ``seeds``, gossip
        addresses (none: a cluster of one, until someone joins it). Called
        again, it joins through the new seeds."""
        if self._closed:
            raise RuntimeError("this gossip service is closed")
        self._seeds = tuple(seeds)
        if self._transport is None:
            made = self._factory(self._arrived, self._refused)
            self._transport = await made if inspect.isawaitable(made) else made
            addr = self._addr or self._transport.address
            self._state = membership.new(
                self._id, addr, self._epoch, seed=self._seed, meta=self._meta
            )
            self._arm_reconnect()
        self._turn((Join(self._seeds),))

    def set_meta(self, meta: str) -> None:
        """Our meta is now ``meta`` (at most ``META_MAX`` bytes): spread with
        a new incarnation if it changed."""
        self._meta = _checked_meta(meta)
        self._turn((membership.SetMeta(self._meta),))

    def exchange(self, sync: Sync) -> Sync:
        """The answering side of a push-pull carried by another way (HTTP):
        merge ``sync`` and answer with our whole view."""
        st = self._state
        if st is None or self._closed:
            raise RuntimeError("this gossip service is not running")
        self._counts["messages_received"] += 1
        self._turn((Received(replace(sync, reply=False)),))
        st = self._state
        assert st is not None
        return Sync(st.me.id, st.me.addr, membership.states(st), reply=False)

    def merge(self, sync: Sync) -> None:
        """Take a view got by another way (a join's answer)."""
        self._counts["messages_received"] += 1
        self._turn((Received(replace(sync, reply=False)),))

    def own_view(self) -> Sync:
        """Our whole view as a push-pull that asks for the other's (a join)."""
        st = self._state
        if st is None:
            raise RuntimeError("this gossip service is not started")
        return Sync(st.me.id, st.me.addr, membership.states(st), reply=True)

    async def leave(self, timeout: float = LEAVE_TIMEOUT) -> bool:
        """Say goodbye and wait (at most ``timeout`` s) until it has gone out
        as often as the core spreads a rumour; True if it did (or if there
        was nobody to tell)."""
        if self._state is None or self._closed:
            return False
        self._turn((Leave(),))
        try:
            async with deadline(self._scheduler, self._clock.monotonic() + timeout):
                await self._goodbye.wait()
        except TimeoutError:
            log.warning("the leave of %s was not spent within %.1fs", self._id, timeout)
            return False
        return True

    def close(self) -> None:
        """Stop: no more timers, sends or receives (twice is fine). Without a
        ``leave()`` first, the others find this branch dead."""
        if self._closed:
            return
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        if self._transport is not None:
            self._transport.close()

    def members(self) -> tuple[MemberView, ...]:
        """Every member known (this branch included, ``is_self``), by id."""
        st = self._state
        if st is None:
            return ()
        views = [_view(m) for m in st.view()]
        views.append(replace(_view(st.me), is_self=True))
        return tuple(sorted(views, key=lambda v: v.id))

    def state_of(self, member_id: str) -> MemberState | None:
        st = self._state
        if st is None:
            return None
        return st.me.state if member_id == self._id else st.state_of(member_id)

    def stats(self) -> GossipStats:
        c = self._counts
        return GossipStats(
            datagrams_sent=c["datagrams_sent"],
            datagrams_received=c["datagrams_received"],
            messages_sent=c["messages_sent"],
            messages_received=c["messages_received"],
            dropped=MappingProxyType(dict(self._dropped)),
            bad_messages=c["bad_messages"],
            unsendable=c["unsendable"],
            failures=c["failures"],
            transport=self._transport.stats() if self._transport else TransportStats(),
        )

    # one turn: events in, commands carried out -------------------------------------

    def _turn(self, events: Iterable[Event]) -> None:
        if self._closed or self._state is None:
            return
        sends: dict[str, list[Message]] = {}
        members = self._state.members
        try:
            for event in events:
                now = self._clock.monotonic()
                self._state, commands = membership.step(self._state, event, self._config, now)
                for command in commands:
                    self._carry_out(command, sends)
        except Exception as e:  # the state stays as the last good step left it
            self._failed("step", e)
        for addr, messages in sends.items():
            self._send(addr, self._pushed_over(addr, messages))
        self._check_goodbye()
        # the core replaces the mapping on any change to a member (its state,
        # incarnation, meta, timers): who reads the view need not poll it
        if self.on_change is not None and self._state.members is not members:
            try:
                self.on_change()
            except Exception as e:
                self._failed("on_change", e)

    def _carry_out(self, command: Command, sends: dict[str, list[Message]]) -> None:
        match command:
            case Send(to=to, message=message):
                sends.setdefault(to, []).append(message)
            case SetTimer(at=at, event=event):
                self._arm(at, event)
            case Notify(member=m, was=was, reaped=reaped):
                log.info(
                    "member %s (%s) %s -> %s%s",
                    m.id,
                    m.addr,
                    was.value if was else "new",
                    m.state.value,
                    ", forgotten" if reaped else "",
                )
                if self._bus is not None:
                    self._bus.publish(
                        MemberChanged(m.id, m.addr, m.state.value, m.incarnation, reaped)
                    )

    def _arm(self, at: float, event: Event) -> None:
        key = next(self._timer_ids)

        def fire() -> None:
            self._timers.pop(key, None)
            self._turn((event,))

        self._timers[key] = self._scheduler.call_at(at, fire)

    def _arm_reconnect(self) -> None:
        key = next(self._timer_ids)

        def fire() -> None:
            self._timers.pop(key, None)
            if self._closed:
                return
            try:
                self._reconnect()
            except Exception as e:
                self._failed("reconnect", e)
            self._arm_reconnect()

        when = self._clock.monotonic() + self._config.push_pull_interval
        self._timers[key] = self._scheduler.call_at(when, fire)

    def _reconnect(self) -> None:
        """Push-pull with one member believed dead: after a partition heals,
        the two sides' views meet again and the wrongly dead refute."""
        st = self._state
        if st is None or st.me.state is not MemberState.ALIVE:
            return
        view = st.view()
        dead = [m for m in view if m.state is MemberState.DEAD]
        if not dead:
            return
        target = self._rng.choice(dead)
        alone = not any(m.state in (MemberState.ALIVE, MemberState.SUSPECT) for m in view)
        # the core retries a Join's addresses while alone: keep the seeds among them
        self._turn((Join((target.addr, *self._seeds) if alone else (target.addr,)),))

    def _check_goodbye(self) -> None:
        st = self._state
        if st is None or st.me.state is not MemberState.LEFT or self._goodbye.is_set():
            return
        pending = any(b.update.id == self._id for b in st.queue)
        listeners = any(m.state in (MemberState.ALIVE, MemberState.SUSPECT) for m in st.view())
        if not pending or not listeners:
            self._goodbye.set()

    # out ---------------------------------------------------------------------------

    def _pushed_over(self, addr: str, messages: list[Message]) -> list[Message]:
        """Hand the push-pulls asking for a reply to ``self._push_pull`` (if
        it can reach ``addr``); what is left goes out in datagrams."""
        if self._push_pull is None:
            return messages
        rest: list[Message] = []
        for m in messages:
            carried = self._push_pull(addr, m) if isinstance(m, Sync) and m.reply else None
            if carried is None:
                rest.append(m)
                continue
            self._counts["messages_sent"] += 1
            task = asyncio.ensure_future(self._answered(addr, carried))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return rest

    async def _answered(self, addr: str, answer: Awaitable[Sync]) -> None:
        try:
            sync = await answer
        except asyncio.CancelledError:
            raise
        except Exception as e:  # that member is away, or refused: the next period tries another
            self._once(
                f"push-pull:{type(e).__name__}",
                logging.INFO,
                "push-pull with %s failed: %s",
                addr,
                e,
            )
            return
        self.merge(sync)

    def _send(self, addr: str, messages: list[Message]) -> None:
        transport = self._transport
        if transport is None or not messages:
            return
        budget = self.budget
        try:
            parts = [p for m in messages for p in _fitted(m, budget)]
            datagrams = codec.pack(parts, budget)
        except ValueError as e:
            self._counts["unsendable"] += len(messages)
            self._once("unsendable", logging.WARNING, "messages to %s not sent: %s", addr, e)
            return
        try:
            for datagram in datagrams:
                if self._keyring is not None:
                    wall = self._clock.wall()
                    datagram = seal.seal(self._keyring, datagram, wall, secrets.token_bytes(12))
                transport.send(addr, datagram)
                self._counts["datagrams_sent"] += 1
            self._counts["messages_sent"] += len(parts)
        except Exception as e:
            self._failed("send", e)

    # in ----------------------------------------------------------------------------

    def _arrived(self, sender: str, data: bytes) -> None:
        if self._closed:
            return
        try:
            self._counts["datagrams_received"] += 1
            payload = data
            if self._keyring is not None:
                opened = seal.unseal(self._keyring, data, self._clock.wall(), self._seen)
                if isinstance(opened, seal.Dropped):
                    self._dropped[opened.reason.value] += 1
                    self._once(
                        f"dropped:{opened.reason.value}",
                        logging.INFO,
                        "a frame from %s dropped: %s",
                        sender,
                        opened.reason.value,
                    )
                    return
                payload, self._seen = opened
            try:
                messages = codec.unpack(payload)
            except BadMessage as e:
                self._counts["bad_messages"] += 1
                self._once("bad", logging.INFO, "a datagram from %s dropped: %s", sender, e)
                return
            self._counts["messages_received"] += len(messages)
        except Exception as e:
            self._failed("receive", e)
            return
        self._turn(Received(m) for m in messages)

    def _refused(self, addr: str) -> None:
        """The transport says nothing listens at ``addr`` (never trusted
        alone: the core wants a relay's refusal too before a death)."""
        log.debug("a datagram to %s was refused: nothing listens there", addr)
        self._turn((membership.Refused(addr),))

    # failures ------------------------------------------------------------------------

    def _failed(self, where: str, exc: BaseException) -> None:
        self._counts["failures"] += 1
        cause = f"{where}:{type(exc).__name__}"
        first = cause not in self._said
        self._said.add(cause)
        log.log(
            logging.ERROR if first else logging.DEBUG,
            "gossip %s failed in %s (%s); carrying on",
            self._id,
            where,
            exc,
            exc_info=exc if first else None,
        )

    def _once(self, cause: str, level: int, msg: str, *args: object) -> None:
        first = cause not in self._said
        self._said.add(cause)
        log.log(level if first else logging.DEBUG, msg, *args)


def _view(m: membership.Member) -> MemberView:
    return MemberView(m.id, m.addr, m.epoch, m.incarnation, m.state, m.since, meta=m.meta)


def _checked_meta(meta: str) -> str:
    if len(meta.encode()) > META_MAX:
        raise ValueError(f"a member's meta is {len(meta.encode())} bytes; at most {META_MAX}")
    return meta


#: What a compound adds around one message: ``[1,`` and ``]``.
_EMPTY = Sync("", "", (), False)
_COMPOUND = len(codec.pack([_EMPTY])[0]) - len(codec.encode(_EMPTY))


def _fitted(message: Message, budget: int) -> list[Message]:
    """The message, or a Sync too big for one datagram split into Syncs that
    each fit (only the first asks for a reply: one answer is enough)."""
    if not isinstance(message, Sync):
        return [message]
    room = budget - _COMPOUND
    if len(codec.encode(message)) <= room:
        return [message]
    base = len(codec.encode(replace(message, states=())))
    chunks: list[list[Update]] = [[]]
    size = base
    for u in message.states:
        extra = len(codec.encode_update(u)) + (1 if chunks[-1] else 0)
        if chunks[-1] and size + extra > room:
            chunks.append([])
            size, extra = base, extra - 1
        chunks[-1].append(u)
        size += extra
    return [
        Sync(message.src, message.src_addr, tuple(c), message.reply and i == 0)
        for i, c in enumerate(chunks)
    ]
