"""What branches say to each other about membership: typed, frozen, no bytes.

The transport (a later part) encodes these; the core (``membership.py``)
reads and writes only these. Every message names its sender (``src``, the
branch id, and ``src_addr``, where to answer) and may carry piggybacked
``updates``: the rumours of the dissemination component of SWIM.

A member is known by its id and the *epoch* of its run (a restarted branch
has a new, higher epoch, which replaces the old run at once). Within one
run the *incarnation* orders what is said about it: only the member itself
raises it, to refute a suspicion.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class MemberState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"  # declared dead by the others (a suspicion timed out, or its host refused)
    LEFT = "left"  # said goodbye itself: never confused with dead


#: At the same epoch and incarnation, a higher rank overrides a lower one.
RANK: dict[MemberState, int] = {
    MemberState.ALIVE: 0,
    MemberState.SUSPECT: 1,
    MemberState.DEAD: 2,
    MemberState.LEFT: 3,
}


@dataclass(frozen=True)
class Update:
    """One rumour: member ``id`` (run ``epoch``) is in ``state`` at ``incarnation``.

    ``origin`` is the branch that said so first (for a suspicion, the
    confirmations are counted by distinct origins; a leave has its own id).
    ``meta`` is the member's own short record (its branch record's compact
    form, memberlist's node meta): carried by alive updates only, since only
    the member changes it, with a new incarnation; "" on the others, which
    keep what is known.
    """

    id: str
    addr: str
    epoch: int
    incarnation: int
    state: MemberState
    origin: str
    meta: str = ""


@dataclass(frozen=True)
class Ping:
    src: str
    src_addr: str
    seq: int
    target: str  # the id meant: a different branch at that address does not answer
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Ack:
    src: str
    src_addr: str
    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True)
class PingReq:
    """Ping ``target`` for me and tell me (Lifeguard: a Nack if it is silent)."""

    src: str
    src_addr: str
    seq: int
    target: str
    target_addr: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Nack:
    """The relay of a PingReq heard nothing from the target in time, or
    (``refused``) the target's host refused the relay's ping: nothing
    listens at its address."""

    src: str
    src_addr: str
    seq: int
    updates: tuple[Update, ...] = ()
    refused: bool = False


@dataclass(frozen=True)
class Gossip:
    """Only rumours, sent every gossip interval to a few members."""

    src: str
    src_addr: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Sync:
    """Push-pull: the sender's whole view; ``reply`` asks for the receiver's."""

    src: str
    src_addr: str
    states: tuple[Update, ...]
    reply: bool


Message = Ping | Ack | PingReq | Nack | Gossip | Sync
