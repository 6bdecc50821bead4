"""The wire form of the membership messages: bytes in, typed messages out.

Pure: no sockets, no clock. Every message of ``messages.py`` is a compact JSON
array (no keys at all: the position names the field), and a datagram is a
*compound*: ``[1, message, message, ...]``, the leading 1 being the version
of this form. A message is ``[kind, src, src_addr, <fields>..., updates]``,
an update ``[id, addr, epoch, incarnation, state, origin]`` with the state
as one letter, and a seventh field, the member's meta, when it has one.

Why JSON rather than a struct format: most of a message is strings (ids and
addresses), which a struct format would carry as length-prefixed bytes anyway,
so it would save little (the keys are gone already); JSON is in the standard
library, readable in a packet capture, and its sizes are exact sums of the
encoded parts, which is what :func:`pack` needs to fill a datagram.

:func:`pack` fills datagrams of at most ``budget`` bytes in the order given,
starting a new one when the next message does not fit; a message too big for
a datagram of its own keeps only the first of its piggybacked updates (the
core orders them by priority). :func:`unpack` and :func:`decode` raise
``BadMessage`` for any bytes that are not a valid message, and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from branchd.cluster.messages import (
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
from branchd.errors import BadMessage

#: The largest datagram branches send (safe under the usual 1,500-byte MTU).
DATAGRAM_BUDGET = 1400
#: The version of this wire form, first in every compound.
VERSION = 1
#: Integers on the wire are unsigned 63-bit (sequence numbers, epochs, incarnations).
MAX_INT = 2**63 - 1

_STATE = {
    MemberState.ALIVE: "a",
    MemberState.SUSPECT: "s",
    MemberState.DEAD: "d",
    MemberState.LEFT: "l",
}
_STATE_BACK = {v: k for k, v in _STATE.items()}

_HEAD = b"[%d" % VERSION
_TAIL = b"]"


def _dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# encoding -------------------------------------------------------------------------


def encode_update(u: Update) -> bytes:
    fields: list[object] = [u.id, u.addr, u.epoch, u.incarnation, _STATE[u.state], u.origin]
    if u.meta:
        fields.append(u.meta)
    return _dump(fields)


def _fields(msg: Message) -> list[object]:
    """The message's array without its trailing updates (Sync: with its flag)."""
    match msg:
        case Ping():
            return ["p", msg.src, msg.src_addr, msg.seq, msg.target]
        case Ack():
            return ["a", msg.src, msg.src_addr, msg.seq]
        case PingReq():
            return ["r", msg.src, msg.src_addr, msg.seq, msg.target, msg.target_addr]
        case Nack():  # the refused flag only when set: a plain nack stays as it was
            return ["n", msg.src, msg.src_addr, msg.seq, *([1] if msg.refused else [])]
        case Gossip():
            return ["g", msg.src, msg.src_addr]
        case Sync():
            return ["s", msg.src, msg.src_addr, int(msg.reply)]


def _updates(msg: Message) -> tuple[Update, ...]:
    return msg.states if isinstance(msg, Sync) else msg.updates


def _assemble(head: bytes, updates: Sequence[bytes]) -> bytes:
    """``head`` is the fields' array without its closing bracket."""
    return head + b",[" + b",".join(updates) + b"]]"


def _head(msg: Message) -> bytes:
    return _dump(_fields(msg))[:-1]


def encode(msg: Message) -> bytes:
    """One message alone (a push-pull body), all its updates kept."""
    return _assemble(_head(msg), [encode_update(u) for u in _updates(msg)])


def _compound(parts: Iterable[bytes]) -> bytes:
    return b",".join([_HEAD, *parts]) + _TAIL


def _size(parts_bytes: int, count: int) -> int:
    """The size of a compound of ``count`` parts totalling ``parts_bytes``."""
    return len(_HEAD) + len(_TAIL) + parts_bytes + count  # one comma before each part


def _trimmed(msg: Message, room: int) -> bytes:
    """The message with the longest prefix of its updates that fits ``room``
    bytes, or ValueError if even none does (a Sync is never trimmed)."""
    head = _head(msg)
    updates = [encode_update(u) for u in _updates(msg)]
    whole = _assemble(head, updates)
    if len(whole) <= room:
        return whole
    if isinstance(msg, Sync):
        raise ValueError(
            f"a Sync of {len(whole)} bytes does not fit a datagram of {room}: push-pull it"
        )
    size = len(head) + 4  # ",[" and "]]"
    kept = 0
    for u in updates:
        extra = len(u) + (1 if kept else 0)
        if size + extra > room:
            break
        size += extra
        kept += 1
    if size > room:
        raise ValueError(f"{type(msg).__name__} from {msg.src!r} does not fit {room} bytes")
    return _assemble(head, updates[:kept])


def pack(messages: Sequence[Message], budget: int = DATAGRAM_BUDGET) -> list[bytes]:
    """The messages as compounds of at most ``budget`` bytes each, in order.

    A message goes into the current datagram if it fits there whole, else
    into a new one; one that does not fit a datagram of its own whole keeps
    the longest prefix of its updates that does (the first are the most
    urgent). ValueError if a message does not fit even with no update (an id
    of a kilobyte, a Sync: push-pull goes over HTTP).
    """
    room = budget - _size(0, 1)  # what one message may take in a datagram of its own
    datagrams: list[bytes] = []
    current: list[bytes] = []
    used = 0
    for msg in messages:
        part = _trimmed(msg, room)
        if current and _size(used + len(part), len(current) + 1) > budget:
            datagrams.append(_compound(current))
            current, used = [], 0
        current.append(part)
        used += len(part)
    if current:
        datagrams.append(_compound(current))
    return datagrams


# decoding -------------------------------------------------------------------------


def _load(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise BadMessage(f"not a message: {e}") from None


def _str(v: object, what: str) -> str:
    if not isinstance(v, str):
        raise BadMessage(f"{what}: a string expected, not {type(v).__name__}")
    return v


def _int(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_INT:
        raise BadMessage(f"{what}: an integer in [0, 2**63) expected, not {v!r:.40}")
    return v


def _list(v: object, n: int | None, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise BadMessage(f"{what}: an array expected, not {type(v).__name__}")
    if n is not None and len(v) != n:
        raise BadMessage(f"{what}: {n} fields expected, not {len(v)}")
    return v


def _update(v: object) -> Update:
    f = _list(v, None, "update")
    if len(f) not in (6, 7):
        raise BadMessage(f"update: 6 or 7 fields expected, not {len(f)}")
    state = _STATE_BACK.get(f[4]) if isinstance(f[4], str) else None
    if state is None:
        raise BadMessage(f"update: unknown state {f[4]!r:.20}")
    return Update(
        id=_str(f[0], "update id"),
        addr=_str(f[1], "update addr"),
        epoch=_int(f[2], "update epoch"),
        incarnation=_int(f[3], "update incarnation"),
        state=state,
        origin=_str(f[5], "update origin"),
        meta=_str(f[6], "update meta") if len(f) == 7 else "",
    )


_ARITY = {"p": 6, "a": 5, "r": 7, "n": 5, "g": 4, "s": 5}


def _message(v: object) -> Message:
    f = _list(v, None, "message")
    kind = f[0] if f else None
    arity = _ARITY.get(kind) if isinstance(kind, str) else None
    if arity is None:
        raise BadMessage(f"unknown message kind {kind!r:.20}")
    if len(f) != arity and not (kind == "n" and len(f) == arity + 1):
        raise BadMessage(f"message {kind!r}: {arity} fields expected, not {len(f)}")
    src, src_addr = _str(f[1], "src"), _str(f[2], "src_addr")
    ups = tuple(_update(u) for u in _list(f[-1], None, "updates"))
    match kind:
        case "p":
            return Ping(src, src_addr, _int(f[3], "seq"), _str(f[4], "target"), ups)
        case "a":
            return Ack(src, src_addr, _int(f[3], "seq"), ups)
        case "r":
            seq, target = _int(f[3], "seq"), _str(f[4], "target")
            return PingReq(src, src_addr, seq, target, _str(f[5], "target_addr"), ups)
        case "n":
            if len(f) == 6 and (type(f[4]) is not int or f[4] != 1):
                raise BadMessage(f"nack refused: 1 expected, not {f[4]!r:.20}")
            return Nack(src, src_addr, _int(f[3], "seq"), ups, refused=len(f) == 6)
        case "g":
            return Gossip(src, src_addr, ups)
        case _:  # "s"
            if type(f[3]) is not int or f[3] not in (0, 1):
                raise BadMessage(f"sync reply: 0 or 1 expected, not {f[3]!r:.20}")
            return Sync(src, src_addr, ups, bool(f[3]))


def decode(data: bytes) -> Message:
    """One message alone (as :func:`encode` wrote it); BadMessage if it is not."""
    return _message(_load(data))


def unpack(data: bytes) -> list[Message]:
    """The messages of one compound datagram; BadMessage if any is not valid
    (a datagram is taken or dropped whole)."""
    f = _list(_load(data), None, "compound")
    if not f or type(f[0]) is not int or f[0] != VERSION:
        raise BadMessage(f"not a compound of version {VERSION}")
    return [_message(m) for m in f[1:]]
