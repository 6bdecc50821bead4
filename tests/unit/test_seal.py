"""Sealed gossip frames (``branchd.cluster.seal``): AES-256-GCM under the
keyring, a timestamp and a nonce against replays, every drop typed.

Pure: the tests hand the clock (``now``) and the nonces; nothing sleeps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from branchd.cluster.keyring import KEY_BYTES, ClusterKey, Keyring
from branchd.cluster.seal import (
    HEADER_BYTES,
    NONCE_BYTES,
    OVERHEAD,
    SEEN_CAPACITY,
    VERSION,
    WINDOW,
    Dropped,
    DropReason,
    Seen,
    seal,
    unseal,
)

K1 = ClusterKey.from_secret(b"\x01" * KEY_BYTES)
K2 = ClusterKey.from_secret(b"\x02" * KEY_BYTES)
RING = Keyring.of(K1)
T = 1_700_000_000.0  # seconds since the epoch: the tests' "now"
_nonces = itertools.count(1)


def nonce() -> bytes:
    """A fresh nonce (a counter: unique is what matters here, not random)."""
    return next(_nonces).to_bytes(NONCE_BYTES, "big")


def opened(ring: Keyring, frame: bytes, now: float = T, seen: Seen | None = None) -> bytes:
    got = unseal(ring, frame, now, seen or Seen())
    assert not isinstance(got, Dropped), got
    return got[0]


def dropped(ring: Keyring, frame: bytes, now: float = T, seen: Seen | None = None) -> DropReason:
    got = unseal(ring, frame, now, seen or Seen())
    assert isinstance(got, Dropped), got
    return got.reason


def test_the_overhead_is_41_bytes_and_a_datagram_keeps_1359_for_messages() -> None:
    assert (HEADER_BYTES, OVERHEAD) == (1 + 4 + 8 + 12, 1 + 4 + 8 + 12 + 16)
    for n in (0, 1, 1359):
        assert len(seal(RING, b"x" * n, T, nonce())) == n + OVERHEAD
    assert len(seal(RING, b"x" * (1400 - OVERHEAD), T, nonce())) == 1400


def test_a_frame_opens_to_its_payload_and_remembers_its_nonce() -> None:
    n = nonce()
    frame = seal(RING, b"ping from b1", T, n)
    got = unseal(RING, frame, T + 0.5, Seen())
    assert not isinstance(got, Dropped)
    payload, seen = got
    assert payload == b"ping from b1"
    assert seen.has(n, int(T * 1000)) and seen.size == 1


def test_the_header_is_plain_and_the_payload_is_not() -> None:
    frame = seal(RING, b"10.0.0.7:8401 is alive", T, n := nonce())
    assert frame[0] == VERSION and frame[1:5] == K1.id_bytes
    assert int.from_bytes(frame[5:13], "big") == int(T * 1000) and frame[13:25] == n
    assert b"10.0.0.7" not in frame  # a branch without the key never reads an address


def test_a_wrong_nonce_size_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="12 bytes, not 8"):
        seal(RING, b"x", T, b"\x00" * 8)


@pytest.mark.parametrize("cut", [0, 1, HEADER_BYTES, OVERHEAD - 1])
def test_a_short_frame_is_too_short(cut: int) -> None:
    assert dropped(RING, seal(RING, b"", T, nonce())[:cut]) is DropReason.TOO_SHORT


def test_another_version_is_dropped() -> None:
    frame = bytearray(seal(RING, b"x", T, nonce()))
    frame[0] = VERSION + 1
    assert dropped(RING, bytes(frame)) is DropReason.BAD_VERSION


def test_a_frame_under_a_key_not_installed_is_an_unknown_key() -> None:
    assert dropped(RING, seal(Keyring.of(K2), b"x", T, nonce())) is DropReason.UNKNOWN_KEY


def test_a_forged_frame_under_a_known_key_id_fails_its_tag() -> None:
    forger = Keyring.of(ClusterKey(K1.id, b"\x09" * KEY_BYTES))  # knows the id, not the key
    assert dropped(RING, seal(forger, b"let me in", T, nonce())) is DropReason.BAD_TAG


def test_every_byte_of_a_frame_is_guarded() -> None:
    frame = seal(RING, b"a member's record", T, nonce())
    for i in range(len(frame)):
        for bit in (0x01, 0x80):
            bad = bytearray(frame)
            bad[i] ^= bit
            want = (
                DropReason.BAD_VERSION
                if i == 0
                else DropReason.UNKNOWN_KEY
                if i < 5
                else DropReason.BAD_TAG  # timestamp and nonce are associated data
            )
            assert dropped(RING, bytes(bad)) is want, (i, bit)
    # cut or lengthened, or the tag moved: the tag fails too
    assert dropped(RING, frame[:-1]) is DropReason.BAD_TAG
    assert dropped(RING, frame + b"\x00") is DropReason.BAD_TAG


@pytest.mark.parametrize(
    ("sent_at", "reason"),
    [
        (T - WINDOW - 0.01, DropReason.TOO_OLD),
        (T - 3600, DropReason.TOO_OLD),
        (T + WINDOW + 0.01, DropReason.FROM_THE_FUTURE),
        (T + 3600, DropReason.FROM_THE_FUTURE),
    ],
)
def test_a_frame_stamped_outside_the_window_is_dropped(sent_at: float, reason: DropReason) -> None:
    assert dropped(RING, seal(RING, b"x", sent_at, nonce())) is reason


@pytest.mark.parametrize("sent_at", [T - WINDOW + 0.01, T, T + WINDOW - 0.01])
def test_a_frame_within_the_window_opens(sent_at: float) -> None:
    assert opened(RING, seal(RING, b"x", sent_at, nonce())) == b"x"


def test_the_window_is_a_setting() -> None:
    frame = seal(RING, b"x", T - 10, nonce())
    assert isinstance(unseal(RING, frame, T, Seen(), window=5.0), Dropped)
    assert not isinstance(unseal(RING, frame, T, Seen(), window=15.0), Dropped)


def test_a_replay_within_the_window_is_dropped_and_after_it_is_too_old() -> None:
    frame = seal(RING, b"ack", T, nonce())
    got = unseal(RING, frame, T, Seen())
    assert not isinstance(got, Dropped)
    seen = got[1]
    for later in (0.0, 1.0, WINDOW - 0.01):
        assert unseal(RING, frame, T + later, seen) == Dropped(DropReason.REPLAYED)
    assert unseal(RING, frame, T + WINDOW + 0.01, seen) == Dropped(DropReason.TOO_OLD)
    # the same payload sealed again (a new nonce) is a new frame
    assert not isinstance(unseal(RING, seal(RING, b"ack", T, nonce()), T, seen), Dropped)


def test_seen_is_pruned_by_time_so_it_stays_small_over_a_long_run() -> None:
    seen, sizes = Seen(), []
    for tick in range(600):  # 10 minutes of 5 frames a second
        now = T + tick / 5
        got = unseal(RING, seal(RING, b"x", now, nonce()), now, seen)
        assert not isinstance(got, Dropped)
        seen = got[1]
        sizes.append(seen.size)
    assert max(sizes) <= 5 * (2 * WINDOW + 2)  # a window either side, a second of slack
    assert seen.size == sum(len(n) for n in seen.buckets.values())


def test_beyond_its_capacity_seen_forgets_the_oldest_and_they_become_too_old() -> None:
    seen = Seen(capacity=4)
    frames = [seal(RING, f"m{i}".encode(), T + i, nonce()) for i in range(6)]
    for frame in frames:
        got = unseal(RING, frame, T + 6, seen)
        assert not isinstance(got, Dropped)
        seen = got[1]
    assert seen.size == 4 and seen.floor_ms == int((T + 2) * 1000) - 1
    # the forgotten ones still never open again: they are below the floor
    assert [dropped(RING, f, T + 6, seen) for f in frames] == [DropReason.TOO_OLD] * 2 + [
        DropReason.REPLAYED
    ] * 4
    assert Seen().capacity == SEEN_CAPACITY


def test_unseal_changes_nothing_in_place() -> None:
    seen = Seen()
    got = unseal(RING, seal(RING, b"x", T, nonce()), T, seen)
    assert not isinstance(got, Dropped)
    assert seen == Seen() and got[1] != seen


@given(payload=hs.binary(max_size=1400 - OVERHEAD), n=hs.binary(min_size=12, max_size=12))
def test_unseal_of_seal_is_the_payload(payload: bytes, n: bytes) -> None:
    assert opened(RING, seal(RING, payload, T, n)) == payload


@given(
    payload=hs.binary(max_size=64),
    n=hs.binary(min_size=12, max_size=12),
    skew=hs.floats(min_value=-WINDOW + 0.01, max_value=WINDOW - 0.01),
)
def test_any_frame_within_the_window_opens_once(payload: bytes, n: bytes, skew: float) -> None:
    frame = seal(RING, payload, T + skew, n)
    got = unseal(RING, frame, T, Seen())
    assert not isinstance(got, Dropped) and got[0] == payload
    assert unseal(RING, frame, T, got[1]) == Dropped(DropReason.REPLAYED)


# A rotation: three branches step through install new -> use new -> remove old,
# each at its own time, with each step on all of them before the next begins
# (what the cluster-wide API call will do). At every moment every branch opens
# every other one's frames.

ROTATION = (
    Keyring.of(K1),
    Keyring.of(K1).install(K2),
    Keyring.of(K1).install(K2).use(K2.id),
    Keyring.of(K2),
)
STEPS: tuple[Callable[[Keyring], Keyring], ...] = (
    lambda ring: ring.install(K2),
    lambda ring: ring.use(K2.id),
    lambda ring: ring.remove(K1.id),
)


def _all_open_each_other(rings: list[Keyring], now: float) -> None:
    for sender, receiver in itertools.permutations(range(len(rings)), 2):
        frame = seal(rings[sender], f"from b{sender}".encode(), now, nonce())
        assert opened(rings[receiver], frame, now) == f"from b{sender}".encode(), (
            [r.ids for r in rings],
            [r.primary for r in rings],
            sender,
            receiver,
        )


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_rotation_never_splits_three_branches(order: tuple[int, ...]) -> None:
    rings = [Keyring.of(K1)] * 3
    now = T
    _all_open_each_other(rings, now)
    for step in STEPS:
        for branch in order:  # one branch at a time takes the step
            rings[branch] = step(rings[branch])
            now += 1
            _all_open_each_other(rings, now)
    assert rings == [ROTATION[-1]] * 3


def test_every_mix_of_neighbouring_steps_opens_both_ways() -> None:
    for lo in range(len(ROTATION) - 1):
        for mix in itertools.product((lo, lo + 1), repeat=3):
            _all_open_each_other([ROTATION[i] for i in mix], T)


def test_skipping_the_barrier_splits_the_cluster() -> None:
    # why each step must reach every branch first: one that has not installed
    # the new key cannot open a frame from one that already seals with it
    frame = seal(ROTATION[2], b"x", T, nonce())
    assert dropped(ROTATION[0], frame) is DropReason.UNKNOWN_KEY
    assert dropped(ROTATION[3], seal(ROTATION[0], b"x", T, nonce())) is DropReason.UNKNOWN_KEY
