"""The rule by which every branch agrees on the declarations (apps, queues).

A declaration is a replicated record: each branch keeps its own copy, and a
copy from another branch replaces ours only when it is a later write, by its
``Version`` (hybrid logical clock + branch id: a total order every branch
computes alike, so no coordinator is needed). A delete is a write too: a
tombstone with the delete's version, so a branch that still holds the record
is told it is gone rather than give it back. Equal versions are the same
write (the HLC stamps each write once), so there is nothing to choose.

Tombstones are kept ``TOMBSTONE_RETENTION`` and then purged: a branch away
longer than that may bring a deleted record back (Cassandra's gc_grace).

Pure: no store, no clock; the store and the cluster's sync apply it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from branchd.hlc import Version

#: How long a delete's tombstone is kept (s) before it is purged.
TOMBSTONE_RETENTION = 24 * 3600.0

#: The kinds of declaration replicated, and the wire keys that name one.
KEYS: Mapping[str, tuple[str, ...]] = {"app": ("name",), "queue": ("app", "name")}


class Outcome(StrEnum):
    """What to do with a copy received from another branch."""

    KEEP = "keep"  # ours is as new or newer: nothing to do
    TAKE = "take"  # theirs is newer: write it as it is (its version, its origin)
    END = "end"  # theirs is a newer delete of a record live here: end it here first


@dataclass(frozen=True)
class Stamp:
    """What the rule needs of a copy: its last write and whether it is a delete."""

    version: Version
    deleted: bool = False


def decide(local: Stamp | None, remote: Stamp) -> Outcome:
    """Last writer wins, by version; a newer delete of a live record ends it
    (an app's instances stop before it is forgotten)."""
    if local is not None and remote.version <= local.version:
        return Outcome.KEEP
    if remote.deleted and local is not None and not local.deleted:
        return Outcome.END
    return Outcome.TAKE


@dataclass(frozen=True)
class Record:
    """One declaration as the branches exchange it: its kind, the model's wire
    form (``App.to_wire()``/``Queue.to_wire()``, version and origin included)
    and whether it is a tombstone (then the body is its last live form)."""

    kind: str  # "app" | "queue"
    body: Mapping[str, Any]
    deleted: bool = False

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(str(self.body[k]) for k in KEYS[self.kind])

    @property
    def version(self) -> Version:
        return Version.from_wire(str(self.body["version"]))

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.version, self.deleted)

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "deleted": self.deleted, "record": dict(self.body)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Record:
        """Raises ValueError on what is not a record (a peer's bad body)."""
        try:
            kind, body, deleted = d["kind"], d["record"], d.get("deleted", False)
        except (KeyError, TypeError):
            raise ValueError("a declaration record needs kind and record") from None
        if kind not in KEYS or not isinstance(body, Mapping) or not isinstance(deleted, bool):
            raise ValueError(f"not a declaration record: kind {kind!r}")
        rec = cls(kind, dict(body), deleted)
        try:
            rec.key  # noqa: B018 - checks the key fields are there
            rec.version  # noqa: B018
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a {kind} record lacks {exc}") from None
        if not body.get("origin"):
            raise ValueError(f"a {kind} record needs its origin")
        return rec


def digest(entries: Iterable[tuple[str, tuple[str, ...], Version, bool]]) -> str:
    """A summary of (kind, key, version, deleted) of every record: two
    branches with the same one hold the same writes (a version names one
    write, so the bodies need not be hashed; a tombstone's body is not compared)."""
    h = hashlib.sha256()
    for kind, key, version, deleted in sorted(entries):
        h.update(f"{kind}\0{chr(31).join(key)}\0{version.to_wire()}\0{int(deleted)}\n".encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Copy:
    """One branch's copy of an instance name that two branches hold (made on
    both while they could not see each other, or being moved)."""

    branch: str
    #: When it was created there (wall clock, s).
    created_at: float
    #: Its branch drains: its instances are on their way out.
    draining: bool = False


def collision_winner(a: Copy, b: Copy) -> Copy:
    """The copy that stays of a name two branches hold; the other is stopped
    and removed by its own branch. In order: the one on a branch that is not
    draining (a drained branch's instances are leaving: a move made the
    other); the one created first (first come, first served: the one the
    name's reservation would have let through had the branches seen each
    other); the lower branch id. Both branches compute the same answer."""
    return min((a, b), key=lambda c: (c.draining, c.created_at, c.branch))
