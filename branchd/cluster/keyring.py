"""The cluster keys a branch holds, as a frozen value with pure operations.

A cluster key is 32 random bytes (an AES-256 key), written as their base64
(``generate_key()`` makes one; ``parse_key()`` reads one and says what is
wrong with a bad one). Each key is known by a short *key id* derived from the
key itself (the first 4 bytes of a SHA-256 of it, 8 hex digits): the id rides
in every sealed frame (``seal.py``) and names the key in the API, and the key
never leaves the branch.

A ``Keyring`` holds one or more keys and names its *primary*, the key that
seals what this branch sends; any installed key opens. A rotation is three
steps, each carried out on every branch before the next begins, so the
cluster never splits (memberlist's and Serf's keyring do the same):

1. ``install(new)`` on all: everyone opens frames sealed with either key;
2. ``use(new_id)`` on all: everyone seals with the new key, still opens the old;
3. ``remove(old_id)`` on all.

A branch without a cluster key has no keyring at all (``None``), never an
empty one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from dataclasses import dataclass, field

from branchd.errors import Conflict, Invalid, NotFound

#: An AES-256 key.
KEY_BYTES = 32
#: The bytes of a key id in a frame (printed as twice as many hex digits).
KEY_ID_BYTES = 4
#: Prefixed to the key before hashing, so that the id is no other use's hash.
_ID_CONTEXT = b"branchd cluster key id\x00"


def key_id_of(secret: bytes) -> str:
    """The key id of a key: 8 hex digits, the first 4 bytes of a SHA-256."""
    return hashlib.sha256(_ID_CONTEXT + secret).digest()[:KEY_ID_BYTES].hex()


@dataclass(frozen=True)
class ClusterKey:
    """One key: its id and its 32 bytes (never shown by ``repr``)."""

    id: str
    secret: bytes = field(repr=False)

    @classmethod
    def from_secret(cls, secret: bytes) -> ClusterKey:
        if len(secret) != KEY_BYTES:
            raise Invalid(f"a cluster key is {KEY_BYTES} bytes, not {len(secret)}")
        return cls(key_id_of(secret), secret)

    @property
    def id_bytes(self) -> bytes:
        """The id as it is written in a frame."""
        return bytes.fromhex(self.id)

    def text(self) -> str:
        """The key as a user writes it (``--cluster-key``): base64 of its bytes."""
        return base64.b64encode(self.secret).decode("ascii")


def generate_key() -> str:
    """A new cluster key, as text: the base64 of 32 bytes from the OS's CSPRNG."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def parse_key(text: str) -> ClusterKey:
    """A key from its text (surrounding whitespace, as in a key file, is ignored).

    Raises ``Invalid`` for anything but the standard base64 of exactly 32
    bytes, saying which of the two it is not and how to make a good one.
    """
    how = "make one with `openssl rand -base64 32`"
    stripped = text.strip()
    if not stripped:
        raise Invalid(f"the cluster key is empty: {how}")
    try:
        secret = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(
            f"the cluster key is not base64 (standard alphabet, with padding): {how}"
        ) from None
    if len(secret) != KEY_BYTES:
        raise Invalid(
            f"the cluster key decodes to {len(secret)} bytes, not {KEY_BYTES} "
            f"(an AES-256 key): {how}"
        )
    return ClusterKey.from_secret(secret)


@dataclass(frozen=True)
class Keyring:
    """The keys this branch opens frames with, in the order installed, and the
    id of the one it seals with (``primary``). Never empty."""

    keys: tuple[ClusterKey, ...]
    primary: str

    def __post_init__(self) -> None:
        ids = [k.id for k in self.keys]
        if not ids:
            raise Invalid("a keyring holds at least one key")
        if len(set(ids)) != len(ids):
            raise Invalid("a keyring holds each key id once")
        if self.primary not in ids:
            raise Invalid(f"the primary key {self.primary} is not in the keyring")

    @classmethod
    def of(cls, key: ClusterKey) -> Keyring:
        """A keyring of one key, its primary (a branch started with ``--cluster-key``)."""
        return cls((key,), key.id)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(k.id for k in self.keys)

    @property
    def primary_key(self) -> ClusterKey:
        found = self.get(self.primary)
        assert found is not None  # __post_init__
        return found

    def get(self, key_id: str) -> ClusterKey | None:
        """The installed key of that id, or None."""
        return next((k for k in self.keys if k.id == key_id), None)

    def install(self, key: ClusterKey) -> Keyring:
        """This keyring with ``key`` added (not made primary). Installing a key
        already held changes nothing, so a repeated or forwarded call is
        harmless; a different key with the same id is refused (``Conflict``)."""
        held = self.get(key.id)
        if held is not None:
            if held.secret != key.secret:
                raise Conflict(f"another key with id {key.id} is installed: generate a new key")
            return self
        return Keyring((*self.keys, key), self.primary)

    def use(self, key_id: str) -> Keyring:
        """This keyring sealing with the installed key ``key_id`` (``NotFound``
        for an id not installed: install the key first)."""
        self._installed(key_id)
        return self if key_id == self.primary else Keyring(self.keys, key_id)

    def remove(self, key_id: str) -> Keyring:
        """This keyring without ``key_id``. The primary is never removed
        (``Conflict``: use another key first), nor an unknown id (``NotFound``)."""
        self._installed(key_id)
        if key_id == self.primary:
            raise Conflict(
                f"cluster key {key_id} is the primary: use another key first, then remove it"
            )
        return Keyring(tuple(k for k in self.keys if k.id != key_id), self.primary)

    def _installed(self, key_id: str) -> None:
        if self.get(key_id) is None:
            raise NotFound(
                f"no cluster key {key_id!r} is installed (installed: {', '.join(self.ids)})"
            )
