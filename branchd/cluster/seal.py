"""Sealing gossip frames with the cluster key: AES-256-GCM, pure functions.

Every datagram and every push-pull body a branch sends is ``seal()``-ed with
its keyring's primary key and ``unseal()``-ed by the receiver with whichever
installed key the frame names, so frames sealed with any installed key open
and a key rotation (``keyring.py``) never splits the cluster. AES-GCM is an
AEAD: it authenticates *and* encrypts, so a branch without the key is never
admitted and never reads a member's address (an HMAC would authenticate but
show the addresses). It comes from the OpenSSL the interpreter already runs,
or from the ``cryptography`` package where that cannot be reached
(``aead.py`` says why); only cluster code loads either.

A frame, big-endian::

    version (1) | key id (4) | timestamp, ms (8) | nonce (12) | ciphertext + tag (n + 16)

The header (version, key id, timestamp and nonce) is the AEAD's associated
data, so none of it can be changed without the tag failing. The overhead is
``OVERHEAD`` = 1 + 4 + 8 + 12 + 16 = 41 bytes: a 1,400-byte datagram carries
1,359 bytes of messages. The nonce is 12 random bytes per frame (the caller
draws them, so this stays pure); random GCM nonces are safe for about 2**32
frames per key, some 60 years at 2 packets a second.

A frame is dropped, with a typed reason the gossip loop counts, when it is
short, of another version, under a key not installed, fails its tag, is
stamped outside the replay window (``WINDOW``, 30 s either side of the
receiver's clock), or repeats a nonce seen within the window. The nonces seen
are a pure bounded value (``Seen``) that ``unseal`` returns updated.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from branchd.cluster import aead
from branchd.cluster.keyring import KEY_ID_BYTES, Keyring

VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER = struct.Struct(f">B{KEY_ID_BYTES}sQ{NONCE_BYTES}s")
#: version + key id + timestamp + nonce: the associated data.
HEADER_BYTES = _HEADER.size
#: What sealing adds to a payload: 1 + 4 + 8 + 12 + 16 = 41 bytes.
OVERHEAD = HEADER_BYTES + TAG_BYTES
#: How far a frame's timestamp may be from the receiver's clock, either way (s).
WINDOW = 30.0
#: How many nonces ``Seen`` holds at most by default (about 2 MiB at most).
SEEN_CAPACITY = 65_536


class DropReason(StrEnum):
    TOO_SHORT = "too_short"
    BAD_VERSION = "bad_version"
    UNKNOWN_KEY = "unknown_key"
    BAD_TAG = "bad_tag"
    TOO_OLD = "too_old"
    FROM_THE_FUTURE = "from_the_future"
    REPLAYED = "replayed"


@dataclass(frozen=True)
class Dropped:
    """``unseal``'s answer for a frame it will not open (a value, not an
    exception: mypy makes every caller handle it, and a flood of bad packets
    is counted, never logged as an error)."""

    reason: DropReason


def _ms(t: float) -> int:
    return int(t * 1000)


@dataclass(frozen=True)
class Seen:
    """The nonces of the frames opened, by the second of their (authenticated)
    timestamp, so a replay is looked up in one bucket only.

    Buckets older than the window are pruned on every ``unseal``; beyond
    ``capacity`` nonces the oldest bucket goes too and ``floor_ms`` rises to
    its end: a frame stamped at or before the floor is too old, so a nonce
    forgotten early can still never be replayed.
    """

    capacity: int = SEEN_CAPACITY
    buckets: Mapping[int, frozenset[bytes]] = field(default_factory=lambda: MappingProxyType({}))
    size: int = 0
    floor_ms: int = -1

    def has(self, nonce: bytes, stamp_ms: int) -> bool:
        """Whether a frame stamped ``stamp_ms`` with ``nonce`` was opened."""
        return nonce in self.buckets.get(stamp_ms // 1000, frozenset())

    def add(self, nonce: bytes, stamp_ms: int) -> Seen:
        second = stamp_ms // 1000
        buckets = dict(self.buckets)
        buckets[second] = buckets.get(second, frozenset()) | {nonce}
        size, floor_ms = self.size + 1, self.floor_ms
        while size > self.capacity:
            oldest = min(buckets)
            size -= len(buckets.pop(oldest))
            floor_ms = max(floor_ms, (oldest + 1) * 1000 - 1)
        return Seen(self.capacity, MappingProxyType(buckets), size, floor_ms)

    def pruned(self, now_ms: int, window_ms: int) -> Seen:
        """Without the buckets whose every frame is now too old."""
        cutoff = now_ms - window_ms  # a frame stamped before this is too old
        stale = [s for s in self.buckets if (s + 1) * 1000 <= cutoff]
        if not stale:
            return self
        buckets = {s: n for s, n in self.buckets.items() if (s + 1) * 1000 > cutoff}
        size = sum(len(n) for n in buckets.values())
        return Seen(self.capacity, MappingProxyType(buckets), size, self.floor_ms)


def seal(keyring: Keyring, payload: bytes, now: float, nonce: bytes) -> bytes:
    """``payload`` sealed with the keyring's primary key, stamped ``now``
    (seconds since the epoch) and under ``nonce`` (12 fresh random bytes)."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes, not {len(nonce)}")
    key = keyring.primary_key
    header = _HEADER.pack(VERSION, key.id_bytes, _ms(now), nonce)
    return header + aead.default().encrypt(key.secret, nonce, payload, header)


def unseal(
    keyring: Keyring,
    frame: bytes,
    now: float,
    seen: Seen,
    *,
    window: float = WINDOW,
) -> tuple[bytes, Seen] | Dropped:
    """The payload of ``frame`` and ``seen`` with its nonce, or why it is dropped.

    The tag is checked before the clock, so a frame dropped as too old,
    from the future or replayed is one a member really sealed (a forger's
    frames count as bad tags, whatever their header says).
    """
    if len(frame) < OVERHEAD:
        return Dropped(DropReason.TOO_SHORT)
    version, key_id, stamp_ms, nonce = _HEADER.unpack_from(frame)
    if version != VERSION:
        return Dropped(DropReason.BAD_VERSION)
    key = keyring.get(key_id.hex())
    if key is None:
        return Dropped(DropReason.UNKNOWN_KEY)
    header = frame[:HEADER_BYTES]
    opened = aead.default().decrypt(key.secret, nonce, frame[HEADER_BYTES:], header)
    if opened is None:
        return Dropped(DropReason.BAD_TAG)
    payload = opened
    now_ms, window_ms = _ms(now), _ms(window)
    if stamp_ms < now_ms - window_ms or stamp_ms <= seen.floor_ms:
        return Dropped(DropReason.TOO_OLD)
    if stamp_ms > now_ms + window_ms:
        return Dropped(DropReason.FROM_THE_FUTURE)
    seen = seen.pruned(now_ms, window_ms)
    if seen.has(nonce, stamp_ms):
        return Dropped(DropReason.REPLAYED)
    return payload, seen.add(nonce, stamp_ms)
