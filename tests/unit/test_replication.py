"""The rule of replicated declarations: last writer wins by version, a newer
delete of a live record ends it, equal versions are the same write."""

from __future__ import annotations

import pytest

from branchd.hlc import Version
from branchd.replication import Outcome, Record, Stamp, decide, digest

OLD = Version(1_000, 0, "a")
NEW = Version(2_000, 0, "a")
TIE_A = Version(3_000, 1, "a")
TIE_B = Version(3_000, 1, "b")  # same (time, counter): the branch id breaks the tie

KEEP, TAKE, END = Outcome.KEEP, Outcome.TAKE, Outcome.END


@pytest.mark.parametrize(
    ("local", "remote", "outcome"),
    [
        (None, Stamp(OLD), TAKE),  # never seen: theirs
        (None, Stamp(OLD, deleted=True), TAKE),  # an unknown delete is kept too
        (Stamp(OLD), Stamp(NEW), TAKE),  # newer write wins
        (Stamp(NEW), Stamp(OLD), KEEP),  # a stale copy never overwrites
        (Stamp(NEW), Stamp(NEW), KEEP),  # the same write: nothing to do
        (Stamp(OLD), Stamp(NEW, deleted=True), END),  # a newer delete ends a live record
        (Stamp(NEW), Stamp(OLD, deleted=True), KEEP),  # declared again after the delete
        (Stamp(OLD, deleted=True), Stamp(NEW), TAKE),  # declared again elsewhere
        (Stamp(NEW, deleted=True), Stamp(OLD), KEEP),  # an older live copy stays deleted
        (Stamp(OLD, deleted=True), Stamp(NEW, deleted=True), TAKE),  # tombstones converge
        (Stamp(NEW, deleted=True), Stamp(NEW, deleted=True), KEEP),
        (Stamp(TIE_A), Stamp(TIE_B), TAKE),
        (Stamp(TIE_B), Stamp(TIE_A), KEEP),
    ],
)
def test_decide(local: Stamp | None, remote: Stamp, outcome: Outcome) -> None:
    assert decide(local, remote) is outcome


def test_every_branch_picks_the_same_winner_whatever_the_order() -> None:
    copies = [Stamp(OLD), Stamp(NEW, deleted=True), Stamp(TIE_A), Stamp(TIE_B), Stamp(NEW)]
    for order in (copies, copies[::-1], copies[2:] + copies[:2]):
        held: Stamp | None = None
        for c in order:
            if decide(held, c) is not KEEP:
                held = c
        assert held == Stamp(TIE_B)


def test_a_record_round_trips_and_bad_ones_are_refused() -> None:
    body = {"name": "web", "env": {}, "version": NEW.to_wire(), "origin": "a"}
    rec = Record("app", body, deleted=True)
    assert Record.from_wire(rec.to_wire()) == rec
    assert rec.key == ("web",) and rec.version == NEW and rec.stamp == Stamp(NEW, True)
    queue = Record("queue", {"app": "web", "name": "q", "version": OLD.to_wire(), "origin": "b"})
    assert queue.key == ("web", "q")
    for bad in (
        {},
        {"kind": "instance", "record": body},
        {"kind": "app", "record": "x"},
        {"kind": "app", "record": {**body, "version": "nope"}},
        {"kind": "app", "record": {"env": {}, "version": NEW.to_wire(), "origin": "a"}},
        {"kind": "app", "record": {**body, "origin": None}},
        {"kind": "app", "record": body, "deleted": "yes"},
    ):
        with pytest.raises(ValueError):
            Record.from_wire(bad)


def test_the_digest_says_whether_two_sets_of_writes_are_the_same() -> None:
    a = [("app", ("web",), NEW, False), ("queue", ("web", "q"), OLD, False)]
    assert digest(a) == digest(a[::-1])  # order does not matter
    assert digest(a) != digest([a[0], ("queue", ("web", "q"), OLD, True)])
    assert digest(a) != digest([a[0], ("queue", ("web", "q"), NEW, False)])
    assert digest(a) != digest(a[:1]) and digest([]) == digest([])
