"""SWIM membership with the Lifeguard refinements, as a pure state machine.

``step(state, event, config, now)`` returns the next ``Membership`` and the
commands its runtime must carry out: ``Send`` a message, ``SetTimer`` (feed
an event back at a time), ``Notify`` that a member changed. No I/O, no
clock, no asyncio; randomness comes from a seeded generator held in the
state, so a run is a function of its seed and its events.

What it does, in SWIM's terms:

- every probe period (``Tick``) it pings the next member of a shuffled
  round-robin order; without an ack by the probe timeout it asks
  ``indirect_checks`` others to ping it (``PingReq``); without any ack by
  the end of the period the member becomes *suspect*;
- a suspect that hears of it refutes by raising its incarnation; otherwise
  it is *dead* after a suspicion timeout that starts at ``max`` and shrinks
  towards ``min`` with each independent confirmation (memberlist's
  ``remainingSuspicionTime``);
- Lifeguard's local health (``awareness``): failed probes without the
  relays' nacks, and refutations, raise a score that stretches the probe
  interval and timeout; each ack lowers it;
- every update rides piggybacked on pings, acks and gossip messages, each
  sent at most ``retransmit_mult * ceil(log10(N + 1))`` times, but for our
  own suspicion of a member, re-armed while that member is still suspect
  (so that a lost accusation still reaches the suspect, which refutes);
- a datagram its host *refused* (``Refused``: nothing listens at that port,
  which the kernel of a live host says of a process that is gone, as after
  ``kill -9``) ends a probe at once: the relays are asked without waiting
  for the probe timeout, and when the target's host refused both our ping
  and a relay's, the member is *dead* at once, with no suspicion: a
  suspicion waits for a member that may be slow, and a port nobody holds is
  not slow (a slow or paused reader still holds its port; its host never
  refuses). A member that went silent (its host off, a cable cut) is still
  found by the timeouts alone;
- a graceful ``Leave`` is told as *left*, which nothing at that epoch
  overrides; a new epoch of the same id (a restarted branch) replaces the
  old run at once; dead and left members are forgotten after ``reap_after``;
- push-pull (``Sync``) exchanges whole views, on ``Join`` and periodically;
- each member may carry a short ``meta`` (its branch record's compact
  form): ``SetMeta`` changes ours with a new incarnation, so that it spreads
  like any alive rumour and overrides the old one everywhere.

Timer events carry a token (a probe's sequence number, the periodic loops'
token, a member's token) so that a stale timer is a no-op: nothing is ever
cancelled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from branchd.cluster.codec import encode_update
from branchd.cluster.messages import (
    RANK,
    Ack,
    Gossip,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    Sync,
    Update,
)
from branchd.cluster.timing import (
    MembershipConfig,
    push_pull_scale,
    remaining_suspicion_time,
    retransmit_limit,
    suspicion_timeout,
)

ALIVE, SUSPECT, DEAD, LEFT = (
    MemberState.ALIVE,
    MemberState.SUSPECT,
    MemberState.DEAD,
    MemberState.LEFT,
)
_GONE = (DEAD, LEFT)

# State ----------------------------------------------------------------------


@dataclass(frozen=True)
class Suspicion:
    """A suspicion's clock: confirmations by distinct origins shorten it."""

    started: float
    k: int  # confirmations wanted to reach the minimum timeout
    lo: float
    hi: float
    seen: frozenset[str]  # origins already counted (the first one included)
    n: int = 0  # independent confirmations so far

    def deadline(self) -> float:
        return self.started + remaining_suspicion_time(self.n, self.k, 0.0, self.lo, self.hi)


@dataclass(frozen=True)
class Member:
    """What this branch believes of one member; also the snapshot it notifies."""

    id: str
    addr: str
    epoch: int
    incarnation: int
    state: MemberState
    since: float  # when it entered this state, on our clock
    token: int = 0  # its timers (suspicion, reap) carry it; any change makes them stale
    suspicion: Suspicion | None = None
    meta: str = ""

    def update(self, origin: str) -> Update:
        # Only an alive update carries the meta: the others never change it,
        # and a suspicion or a death is smaller without it.
        meta = self.meta if self.state is ALIVE else ""
        return Update(self.id, self.addr, self.epoch, self.incarnation, self.state, origin, meta)


@dataclass(frozen=True)
class Probe:
    target: str
    seq: int
    started: float
    acked: bool = False
    indirect: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    refused: bool = False  # the target's host refused our ping
    refusals: int = 0  # relays whose ping its host refused too


@dataclass(frozen=True)
class Relay:
    """A PingReq we carry out: answer ``seq`` to ``addr``."""

    addr: str
    seq: int
    target_addr: str = ""


@dataclass(frozen=True)
class Broadcast:
    update: Update
    transmits: int = 0
    size: int = 0  # its encoded bytes (one comma included), counted once


#: The bytes of piggybacked updates one message carries: a datagram (1,400)
#: less the seal (41) and the largest message head (a PingReq between two
#: long ids and addresses, under 200). Counted here, not left to the codec's
#: trimming, so that every update counted as sent was sent: an alive update
#: carries its member's record (a few hundred bytes), and ten of them did not
#: fit, so the last were cut from the datagram while counted as told (a
#: suspicion among them could then reach nobody, not even the suspect).
PIGGYBACK_BYTES = 1150


@dataclass(frozen=True)
class Membership:
    """One branch's whole view. Build it with ``new()``; change it with ``step()``."""

    me: Member
    members: Mapping[str, Member] = field(default_factory=dict)  # never mutated: replaced
    order: tuple[str, ...] = ()  # the shuffled probe order
    index: int = 0
    probe: Probe | None = None
    relays: Mapping[int, Relay] = field(default_factory=dict)
    queue: tuple[Broadcast, ...] = ()
    awareness: int = 0  # Lifeguard's local health score: 0 is healthy
    seq: int = 0
    tokens: int = 0  # the last token handed out
    loop: int = 0  # the periodic timers' token; 0 until the first Join
    gossiping: bool = False  # a GossipTick is armed (none while nothing is queued)
    seeds: tuple[str, ...] = ()  # the last Join's addresses, retried while we know no one
    rng: int = 0

    def view(self) -> tuple[Member, ...]:
        """Every member but this one, sorted by id."""
        return tuple(self.members[k] for k in sorted(self.members))

    def state_of(self, member_id: str) -> MemberState | None:
        m = self.members.get(member_id)
        return m.state if m is not None else None


def new(member_id: str, addr: str, epoch: int, seed: int = 0, meta: str = "") -> Membership:
    """A branch alone, alive at incarnation 0; ``Join`` starts its timers."""
    me = Member(member_id, addr, epoch, 0, ALIVE, since=0.0, meta=meta)
    return Membership(me=me, rng=seed & _MASK)


# Events ---------------------------------------------------------------------


@dataclass(frozen=True)
class Join:
    """Start (once) and push-pull with these addresses; an empty tuple: alone."""

    seeds: tuple[str, ...] = ()


@dataclass(frozen=True)
class Leave:
    """Say goodbye: the others mark this branch left, never dead."""


@dataclass(frozen=True)
class SetMeta:
    """Our meta is now this: told to all with a new incarnation (if it changed)."""

    meta: str


@dataclass(frozen=True)
class Tick:
    """The probe period."""

    token: int


@dataclass(frozen=True)
class GossipTick:
    token: int


@dataclass(frozen=True)
class PushPullTick:
    token: int


@dataclass(frozen=True)
class ProbeTimeout:
    """No direct ack yet: go indirect."""

    seq: int


@dataclass(frozen=True)
class IndirectTimeout:
    """The probe's period is over: suspect the target unless it answered."""

    seq: int


@dataclass(frozen=True)
class RelayTimeout:
    """A PingReq we relayed got no ack: send the requester a Nack."""

    seq: int


@dataclass(frozen=True)
class SuspicionTimeout:
    member: str
    token: int


@dataclass(frozen=True)
class Reap:
    member: str
    token: int


@dataclass(frozen=True)
class Received:
    message: Message


@dataclass(frozen=True)
class Refused:
    """The host at ``addr`` refused a datagram of ours: nothing listens at
    that port (an ICMP port unreachable, on Linux; the memory network's
    closed transport)."""

    addr: str


TimerEvent = (
    Tick
    | GossipTick
    | PushPullTick
    | ProbeTimeout
    | IndirectTimeout
    | RelayTimeout
    | SuspicionTimeout
    | Reap
)
Event = Join | Leave | SetMeta | Received | Refused | TimerEvent

#: Refusals (ours and the relays') that make a member dead at once: two
#: vantage points, so that one forged or stray ICMP message is not enough.
REFUSALS_FOR_DEATH = 2

# Commands -------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    to: str  # an address
    message: Message


@dataclass(frozen=True)
class SetTimer:
    at: float
    event: TimerEvent


@dataclass(frozen=True)
class Notify:
    """A member appeared, changed state or run, or was forgotten (``reaped``)."""

    member: Member
    was: MemberState | None
    reaped: bool = False


Command = Send | SetTimer | Notify

# The step -------------------------------------------------------------------


def step(
    st: Membership, event: Event, config: MembershipConfig, now: float
) -> tuple[Membership, list[Command]]:
    """Apply one event; return the new state and the commands to carry out."""
    out: list[Command] = []
    alive = st.me.state is ALIVE
    match event:
        case Join(seeds=seeds) if alive:
            st = _join(st, seeds, config, now, out)
        case Leave() if alive:
            st = _leave(st, config, now, out)
        case SetMeta(meta=meta) if alive and meta != st.me.meta:
            me = replace(st.me, meta=meta, incarnation=st.me.incarnation + 1)
            st = _enqueue(replace(st, me=me), me.update(me.id))
        case Tick(token=t) if t == st.loop and alive:
            st = _tick(st, config, now, out)
        case GossipTick(token=t) if t == st.loop:
            st = _gossip(st, config, now, out)
        case PushPullTick(token=t) if t == st.loop and alive:
            st = _push_pull(st, config, now, out)
        case ProbeTimeout(seq=s) if _probing(st, s) and _direct(st):
            st = _go_indirect(st, config, now, out)
        case IndirectTimeout(seq=s) if _probing(st, s):
            st = _conclude(st, config, now, out)
        case RelayTimeout(seq=s) if s in st.relays:
            relay = st.relays[s]
            st, ups = _piggyback(_drop_relay(st, s), config)
            out.append(Send(relay.addr, Nack(st.me.id, st.me.addr, relay.seq, ups)))
        case SuspicionTimeout(member=mid, token=t) if _current(st, mid, t, (SUSPECT,)):
            m = st.members[mid]
            st = _set(st, replace(m.update(st.me.id), state=DEAD, meta=""), config, now, out)
        case Reap(member=mid, token=t) if _current(st, mid, t, _GONE):
            m = st.members[mid]
            rest = {k: v for k, v in st.members.items() if k != mid}
            st = replace(st, members=rest)
            out.append(Notify(m, m.state, reaped=True))
        case Received(message=msg):
            st = _receive(st, msg, config, now, out)
        case Refused(addr=addr):
            st = _refused(st, addr, config, now, out)
    if st.queue and st.members and not st.gossiping and st.loop and st.me.state is ALIVE:
        st = _arm_gossip(st, config, now, out, woken=True)
    return st, out


def _arm_gossip(
    st: Membership, config: MembershipConfig, now: float, out: list[Command], woken: bool
) -> Membership:
    """The gossip loop runs while rumours are queued: an idle branch is not
    woken five times a second to find nothing to say. Woken by a rumour, its
    first tick comes at a random point of the interval, where the tick of a
    loop that never slept would have come: a rumour moves as fast as before."""
    wait = config.gossip_interval
    if woken:
        st, r = _random(st)
        wait *= 1.0 - r  # in (0, interval]
    out.append(SetTimer(now + wait, GossipTick(st.loop)))
    return replace(st, gossiping=True)


def _probing(st: Membership, seq: int) -> bool:
    return st.probe is not None and st.probe.seq == seq


def _direct(st: Membership) -> bool:
    """A probe waits for its direct ack (not answered, not gone indirect)."""
    return st.probe is not None and not st.probe.acked and not st.probe.indirect


def _current(st: Membership, mid: str, token: int, states: tuple[MemberState, ...]) -> bool:
    m = st.members.get(mid)
    return m is not None and m.token == token and m.state in states


def _n(st: Membership) -> int:
    """The cluster size as memberlist estimates it: every known member and us."""
    return len(st.members) + 1


# Starting, leaving, the periodic loops ----------------------------------------


def _join(
    st: Membership, seeds: Iterable[str], config: MembershipConfig, now: float, out: list[Command]
) -> Membership:
    if st.loop == 0:  # the first Join starts the three loops
        st = replace(st, tokens=st.tokens + 1, loop=st.tokens + 1)
        st, r = _random(st)
        # A random phase, so that branches started together do not probe in step.
        out.append(SetTimer(now + config.probe_interval * r, Tick(st.loop)))
        st = _arm_gossip(st, config, now, out, woken=False)
        out.append(SetTimer(now + config.push_pull_interval, PushPullTick(st.loop)))
    st = replace(st, seeds=tuple(a for a in dict.fromkeys(seeds) if a != st.me.addr))
    _sync_seeds(st, out)
    return st


def _sync_seeds(st: Membership, out: list[Command]) -> None:
    for addr in st.seeds:
        out.append(Send(addr, Sync(st.me.id, st.me.addr, _states(st), reply=True)))


def _leave(
    st: Membership, config: MembershipConfig, now: float, out: list[Command]
) -> Membership:
    me = replace(st.me, state=LEFT, since=now)
    st = _enqueue(replace(st, me=me, probe=None), me.update(me.id))
    if not st.gossiping:  # the loop carries the goodbye until it is spent
        st = _arm_gossip(st, config, now, out, woken=True)
    # Tell a few at once; the gossip loop carries on until the rumour is spent.
    st, targets = _sample(st, _gossip_targets(st, config, now), config.gossip_nodes)
    for m in targets:
        st, ups = _piggyback(st, config)
        out.append(Send(m.addr, Gossip(me.id, me.addr, ups)))
    return st


def _tick(st: Membership, config: MembershipConfig, now: float, out: list[Command]) -> Membership:
    if st.probe is not None:  # the last period's probe ends now, if it has not
        st = _conclude(st, config, now, out)
    scale = st.awareness + 1
    out.append(SetTimer(now + config.probe_interval * scale, Tick(st.loop)))
    st, target = _next_target(st)
    if target is None:  # alone: a lost join is tried again, once a period
        _sync_seeds(st, out)
        return st
    st = replace(st, seq=st.seq + 1)
    st = replace(st, probe=Probe(target.id, st.seq, now))
    if target.state is SUSPECT:  # tell it first, so that it can refute at once
        told = target.update(st.me.id)
        st, ups = _piggyback(st, config, room=PIGGYBACK_BYTES - _wire_size(told))
        ups = (told, *ups)
    else:
        st, ups = _piggyback(st, config)
    out.append(Send(target.addr, Ping(st.me.id, st.me.addr, st.seq, target.id, ups)))
    out.append(SetTimer(now + config.probe_timeout * scale, ProbeTimeout(st.seq)))
    out.append(SetTimer(now + config.probe_interval * scale, IndirectTimeout(st.seq)))
    return st


def _next_target(st: Membership) -> tuple[Membership, Member | None]:
    """The next live member of the round-robin; reshuffled at each wrap."""
    order, index = st.order, st.index
    for _ in range(len(order) + 2):
        if index >= len(order):
            live = sorted(k for k, m in st.members.items() if m.state in (ALIVE, SUSPECT))
            st, shuffled = _shuffle(st, live)
            order, index = tuple(shuffled), 0
            if not order:
                break
        m = st.members.get(order[index])
        index += 1
        if m is not None and m.state in (ALIVE, SUSPECT):
            return replace(st, order=order, index=index), m
    return replace(st, order=order, index=index), None


def _go_indirect(
    st: Membership, config: MembershipConfig, now: float, out: list[Command]
) -> Membership:
    probe = st.probe
    assert probe is not None
    target = st.members.get(probe.target)
    peers: list[Member] = []
    if target is not None:
        others = [m for m in st.view() if m.state is ALIVE and m.id != target.id]
        st, peers = _sample(st, others, config.indirect_checks)
        for peer in peers:
            st, ups = _piggyback(st, config)
            req = PingReq(st.me.id, st.me.addr, probe.seq, target.id, target.addr, ups)
            out.append(Send(peer.addr, req))
    return replace(st, probe=replace(probe, indirect=True, expected_nacks=len(peers)))


def _conclude(
    st: Membership, config: MembershipConfig, now: float, out: list[Command]
) -> Membership:
    """A probe's period is over: without an ack, lower our health and suspect."""
    probe = st.probe
    assert probe is not None
    st = replace(st, probe=None)
    if probe.acked:
        return st
    # Lifeguard: relays that nack show the fault is the target's; missing
    # nacks (or no relays at all) hint that it is ours. A refusal shows it
    # is the target's.
    delta = probe.expected_nacks - probe.nacks if probe.expected_nacks > 0 else 1
    st = _health(st, 0 if probe.refused else delta, config)
    target = st.members.get(probe.target)
    if target is None or target.state not in (ALIVE, SUSPECT):
        return st
    if int(probe.refused) + probe.refusals >= REFUSALS_FOR_DEATH:
        return _set(st, replace(target.update(st.me.id), state=DEAD, meta=""), config, now, out)
    # a suspect already: this failed probe is one more confirmation
    return _apply(st, replace(target.update(st.me.id), state=SUSPECT, meta=""), config, now, out)


def _gossip(
    st: Membership, config: MembershipConfig, now: float, out: list[Command]
) -> Membership:
    # the loop sleeps until a rumour is queued (after a leave: it ends), and
    # while there is nobody to tell (alone, a rumour is never spent)
    targets = _gossip_targets(st, config, now) if st.queue else []
    if not targets:
        return replace(st, gossiping=False)
    out.append(SetTimer(now + config.gossip_interval, GossipTick(st.loop)))
    st, targets = _sample(st, targets, config.gossip_nodes)
    for m in targets:
        st, ups = _piggyback(st, config)
        if not ups:
            break
        out.append(Send(m.addr, Gossip(st.me.id, st.me.addr, ups)))
    return st


def _gossip_targets(st: Membership, config: MembershipConfig, now: float) -> list[Member]:
    """Live members, and the recently dead (so that a wrongly dead one can refute)."""
    return [
        m
        for m in st.view()
        if m.state in (ALIVE, SUSPECT)
        or (m.state is DEAD and now - m.since < config.gossip_to_the_dead_time)
    ]


def _push_pull(
    st: Membership, config: MembershipConfig, now: float, out: list[Command]
) -> Membership:
    interval = push_pull_scale(config.push_pull_interval, _n(st))
    out.append(SetTimer(now + interval, PushPullTick(st.loop)))
    st, peers = _sample(st, [m for m in st.view() if m.state is ALIVE], 1)
    for peer in peers:
        out.append(Send(peer.addr, Sync(st.me.id, st.me.addr, _states(st), reply=True)))
    return st


def states(st: Membership) -> tuple[Update, ...]:
    """Our whole view as push-pull carries it: us first, then every member."""
    return _states(st)


def _states(st: Membership) -> tuple[Update, ...]:
    me = st.me.update(st.me.id)
    return (me, *(m.update(m.id if m.state is LEFT else st.me.id) for m in st.view()))


# Messages ---------------------------------------------------------------------


def _receive(
    st: Membership, msg: Message, config: MembershipConfig, now: float, out: list[Command]
) -> Membership:
    if isinstance(msg, Sync):
        for u in msg.states:
            # memberlist's mergeState: a death said by push-pull is only a suspicion
            st = _apply(st, replace(u, state=SUSPECT) if u.state is DEAD else u, config, now, out)
        if msg.reply:
            out.append(Send(msg.src_addr, Sync(st.me.id, st.me.addr, _states(st), reply=False)))
        return st
    for u in msg.updates:
        st = _apply(st, u, config, now, out)
    match msg:
        case Ping(seq=seq, target=target) if target == st.me.id:
            st, ups = _piggyback(st, config)
            out.append(Send(msg.src_addr, Ack(st.me.id, st.me.addr, seq, ups)))
        case Ack(seq=seq):
            if st.probe is not None and st.probe.seq == seq and not st.probe.acked:
                st = _health(replace(st, probe=replace(st.probe, acked=True)), -1, config)
            elif seq in st.relays:
                relay = st.relays[seq]
                st, ups = _piggyback(_drop_relay(st, seq), config)
                out.append(Send(relay.addr, Ack(st.me.id, st.me.addr, relay.seq, ups)))
        case Nack(seq=seq, refused=refused) if st.probe is not None and st.probe.seq == seq:
            p = st.probe
            st = replace(st, probe=replace(p, nacks=p.nacks + 1, refusals=p.refusals + refused))
            st = _answered(st, config, now, out)
        case PingReq(seq=seq, target=target, target_addr=target_addr):
            st = replace(st, seq=st.seq + 1)
            relay = Relay(msg.src_addr, seq, target_addr)
            st = replace(st, relays={**st.relays, st.seq: relay})
            st, ups = _piggyback(st, config)
            out.append(Send(target_addr, Ping(st.me.id, st.me.addr, st.seq, target, ups)))
            # memberlist nacks at 80 % of the probe timeout, so the nack is in time
            out.append(SetTimer(now + config.probe_timeout * 0.8, RelayTimeout(st.seq)))
    return st


def _refused(
    st: Membership, addr: str, config: MembershipConfig, now: float, out: list[Command]
) -> Membership:
    """Nothing listens at ``addr``: tell the requesters of our relays to it
    at once; a probe of the member there goes indirect at once."""
    for seq, relay in list(st.relays.items()):
        if relay.target_addr == addr:
            st, ups = _piggyback(_drop_relay(st, seq), config)
            out.append(Send(relay.addr, Nack(st.me.id, st.me.addr, relay.seq, ups, refused=True)))
    probe = st.probe
    if probe is None or probe.acked or probe.refused:
        return st
    target = st.members.get(probe.target)
    if target is None or target.addr != addr:
        return st
    st = replace(st, probe=replace(probe, refused=True))
    if not probe.indirect:
        st = _go_indirect(st, config, now, out)
    return _answered(st, config, now, out)


def _answered(
    st: Membership, config: MembershipConfig, now: float, out: list[Command]
) -> Membership:
    """A refused probe ends as soon as every relay asked has nacked: the
    end of its period would add nothing but the wait."""
    p = st.probe
    if p is not None and p.refused and not p.acked and p.nacks >= p.expected_nacks:
        return _conclude(st, config, now, out)
    return st


def _drop_relay(st: Membership, seq: int) -> Membership:
    return replace(st, relays={k: v for k, v in st.relays.items() if k != seq})


def _apply(
    st: Membership, u: Update, config: MembershipConfig, now: float, out: list[Command]
) -> Membership:
    """Merge one rumour into the view (the SWIM override rules, plus epochs)."""
    if u.id == st.me.id:
        return _about_me(st, u, config)
    cur = st.members.get(u.id)
    if cur is None:
        if u.state in _GONE:
            return st  # never learn a member only to bury it
        st, pos = _below(st, len(st.order) + 1)
        st = replace(st, order=(*st.order[:pos], u.id, *st.order[pos:]))
        if pos < st.index:
            st = replace(st, index=st.index + 1)
        return _set(st, u, config, now, out)
    if u.epoch < cur.epoch or (u.epoch == cur.epoch and cur.state is LEFT):
        return st
    if u.epoch > cur.epoch:  # a restarted branch: its new run replaces the old at once
        return _set(st, u, config, now, out)
    if u.state is SUSPECT and cur.state is SUSPECT and u.incarnation == cur.incarnation:
        return _confirm(st, cur, u, config, now, out)
    if (u.incarnation, RANK[u.state]) <= (cur.incarnation, RANK[cur.state]):
        return st
    return _set(st, u, config, now, out)


def _about_me(st: Membership, u: Update, config: MembershipConfig) -> Membership:
    """Refute a suspicion or a death of this run by raising our incarnation."""
    me = st.me
    if u.epoch != me.epoch or me.state is LEFT:
        return st  # our old run's fate, or a goodbye already said
    if u.incarnation < me.incarnation or (u.state is ALIVE and u.incarnation == me.incarnation):
        return st
    me = replace(me, incarnation=u.incarnation + 1)
    st = _health(replace(st, me=me), 1, config)  # Lifeguard: being accused is a hint
    return _enqueue(st, me.update(me.id))


def _set(
    st: Membership, u: Update, config: MembershipConfig, now: float, out: list[Command]
) -> Membership:
    """Make member ``u.id`` what ``u`` says; arm its timers; spread the news."""
    cur = st.members.get(u.id)
    token = st.tokens + 1
    changed = cur is None or cur.state is not u.state or cur.epoch != u.epoch
    since = now if changed or cur is None else cur.since
    # A rumour without meta (a suspicion, a death) keeps what this run said.
    meta = u.meta or (cur.meta if cur is not None and cur.epoch == u.epoch else "")
    m = Member(u.id, u.addr, u.epoch, u.incarnation, u.state, since, token, meta=meta)
    if u.state is SUSPECT:
        m = replace(m, suspicion=_suspicion(st, u.origin, config, now))
        assert m.suspicion is not None
        out.append(SetTimer(m.suspicion.deadline(), SuspicionTimeout(m.id, token)))
    elif u.state in _GONE:
        out.append(SetTimer(now + config.reap_after, Reap(m.id, token)))
    st = replace(st, members={**st.members, m.id: m}, tokens=token)
    if changed:
        out.append(Notify(m, cur.state if cur is not None else None))
    return _enqueue(st, u)


def _suspicion(st: Membership, origin: str, config: MembershipConfig, now: float) -> Suspicion:
    n = _n(st)
    # memberlist: k confirmations reach the minimum two probe periods early;
    # with too few others to confirm (us and the suspect aside), wait for none.
    k = config.suspicion_mult - 2
    if n - 2 < k:
        k = 0
    lo = suspicion_timeout(config.suspicion_mult, n, config.probe_interval)
    hi = config.suspicion_max_timeout_mult * lo
    return Suspicion(now, k, lo, hi, frozenset({origin}))


def _confirm(
    st: Membership,
    cur: Member,
    u: Update,
    config: MembershipConfig,
    now: float,
    out: list[Command],
) -> Membership:
    s = cur.suspicion
    if s is None or s.n >= s.k or u.origin in s.seen:
        return st
    s = replace(s, n=s.n + 1, seen=s.seen | {u.origin})
    token = st.tokens + 1
    m = replace(cur, suspicion=s, token=token)
    st = replace(st, members={**st.members, m.id: m}, tokens=token)
    if s.deadline() <= now:  # overdue: dead now
        return _set(st, replace(m.update(st.me.id), state=DEAD, meta=""), config, now, out)
    out.append(SetTimer(s.deadline(), SuspicionTimeout(m.id, token)))
    return _enqueue(st, u)  # pass the confirmation on


def _health(st: Membership, delta: int, config: MembershipConfig) -> Membership:
    score = min(max(0, st.awareness + delta), config.awareness_max_multiplier - 1)
    return replace(st, awareness=score)


# Dissemination ----------------------------------------------------------------


def _enqueue(st: Membership, u: Update) -> Membership:
    """Queue a rumour; a newer one about the same member replaces the older."""
    rest = tuple(b for b in st.queue if b.update.id != u.id)
    return replace(st, queue=(*rest, Broadcast(u, size=_wire_size(u))))


def _wire_size(u: Update) -> int:
    """The bytes ``u`` takes among a message's updates (its comma included)."""
    return len(encode_update(u)) + 1


def _piggyback(
    st: Membership, config: MembershipConfig, room: int = PIGGYBACK_BYTES
) -> tuple[Membership, tuple[Update, ...]]:
    """The least-sent rumours for one message, least-sent first, as many as
    fit ``room`` bytes (and ``max_piggyback``); each spent after the
    retransmit limit.

    Our own suspicion of a member is the exception: it is re-armed (its count
    starts again) for as long as that member is still suspect at that run and
    incarnation, so that a rumour lost (in a short partition, say) still
    reaches the suspect, which can then refute, instead of living on at its
    accuser alone until the suspicion's maximum declares it dead.
    """
    if not st.queue:
        return st, ()
    limit = retransmit_limit(config.retransmit_mult, _n(st))
    ranked = sorted(range(len(st.queue)), key=lambda i: st.queue[i].transmits)
    chosen: list[int] = []
    for i in ranked:
        if len(chosen) >= config.max_piggyback or room < _SMALLEST_UPDATE:
            break
        if st.queue[i].size <= room:  # (one too big for what is left: a smaller may fit)
            chosen.append(i)
            room -= st.queue[i].size
    picked = set(chosen)
    queue: list[Broadcast] = []
    for i, b in enumerate(st.queue):
        if i in picked:
            b = replace(b, transmits=b.transmits + 1)
            if b.transmits >= limit:
                if not _still_our_suspicion(st, b.update):
                    continue
                b = replace(b, transmits=0)
        queue.append(b)
    return replace(st, queue=tuple(queue)), tuple(st.queue[i].update for i in chosen)


#: No update is smaller (a short id and address, no meta).
_SMALLEST_UPDATE = 30


def _still_our_suspicion(st: Membership, u: Update) -> bool:
    """``u`` is our accusation of a member we still suspect, at that run and incarnation."""
    if u.state is not SUSPECT or u.origin != st.me.id:
        return False
    m = st.members.get(u.id)
    return (
        m is not None
        and m.state is SUSPECT
        and (m.epoch, m.incarnation) == (u.epoch, u.incarnation)
    )


# Randomness: splitmix64, its state held in Membership.rng ----------------------

_MASK = (1 << 64) - 1


def _splitmix(rng: int) -> tuple[int, int]:
    """One step of splitmix64 on a bare state: (the next state, the draw)."""
    x = (rng + 0x9E3779B97F4A7C15) & _MASK
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return x, z ^ (z >> 31)


def _next(st: Membership) -> tuple[Membership, int]:
    x, z = _splitmix(st.rng)
    return replace(st, rng=x), z


def _random(st: Membership) -> tuple[Membership, float]:
    st, z = _next(st)
    return st, (z >> 11) / float(1 << 53)


def _below(st: Membership, n: int) -> tuple[Membership, int]:
    st, z = _next(st)
    return st, z % n


# _shuffle and _sample draw on the bare state and replace the Membership once:
# the same draws as one _below each, but a shuffle of N members is not N
# dataclass replaces of the state (at N = 1000, each branch's reshuffle was
# 1,000 of them: the simulator's top cost).


def _shuffle(st: Membership, items: list[str]) -> tuple[Membership, list[str]]:
    items = list(items)
    rng = st.rng
    for i in range(len(items) - 1, 0, -1):
        rng, z = _splitmix(rng)
        j = z % (i + 1)
        items[i], items[j] = items[j], items[i]
    return replace(st, rng=rng), items


def _sample(st: Membership, items: list[Member], k: int) -> tuple[Membership, list[Member]]:
    items = list(items)
    k = min(k, len(items))
    rng = st.rng
    for i in range(k):
        rng, z = _splitmix(rng)
        j = z % (len(items) - i)
        items[i], items[i + j] = items[i + j], items[i]
    return replace(st, rng=rng), items[:k]
