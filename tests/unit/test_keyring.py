"""The cluster keyring (``branchd.cluster.keyring``): keys from text, and the
pure install / use / remove of a rotation, with clear errors."""

from __future__ import annotations

import base64

import pytest

from branchd.cluster.keyring import (
    KEY_BYTES,
    ClusterKey,
    Keyring,
    generate_key,
    key_id_of,
    parse_key,
)
from branchd.errors import Conflict, Invalid, NotFound

K1 = ClusterKey.from_secret(b"\x01" * KEY_BYTES)
K2 = ClusterKey.from_secret(b"\x02" * KEY_BYTES)
K3 = ClusterKey.from_secret(b"\x03" * KEY_BYTES)


def test_a_generated_key_parses_back_to_32_bytes_and_each_is_new() -> None:
    text = generate_key()
    key = parse_key(text)
    assert len(key.secret) == KEY_BYTES and key.text() == text
    assert parse_key(generate_key()).id != key.id


def test_the_key_id_is_8_hex_digits_derived_from_the_key() -> None:
    assert len(K1.id) == 8 and int(K1.id, 16) >= 0
    assert K1.id == key_id_of(K1.secret) and len(K1.id_bytes) == 4
    assert K1.id != K2.id
    assert parse_key(K1.text()).id == K1.id  # the same key, the same id everywhere


def test_a_key_file_s_newline_and_spaces_are_ignored() -> None:
    assert parse_key(f"  {K1.text()}\n") == K1


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is empty"),
        ("   \n", "is empty"),
        ("not base64 at all!", "not base64"),
        (K1.text().rstrip("="), "not base64"),  # padding missing
        (base64.b64encode(b"x" * 16).decode(), "16 bytes, not 32"),
        (base64.b64encode(b"x" * 33).decode(), "33 bytes, not 32"),
        (base64.urlsafe_b64encode(b"\xfb" * 32).decode(), "not base64"),
    ],
)
def test_a_bad_key_is_refused_saying_why_and_how_to_make_one(text: str, says: str) -> None:
    with pytest.raises(Invalid, match=says) as caught:
        parse_key(text)
    assert "openssl rand -base64 32" in caught.value.message


def test_the_secret_never_shows_in_a_repr() -> None:
    assert K1.text() not in repr(Keyring.of(K1)) and repr(K1.secret) not in repr(K1)


def test_a_keyring_of_one_key_seals_with_it() -> None:
    ring = Keyring.of(K1)
    assert ring.ids == (K1.id,) and ring.primary == K1.id and ring.primary_key == K1


def test_install_use_remove_is_a_rotation_of_values() -> None:
    start = Keyring.of(K1)
    installed = start.install(K2)
    assert installed.ids == (K1.id, K2.id) and installed.primary == K1.id
    switched = installed.use(K2.id)
    assert switched.primary == K2.id and switched.ids == installed.ids
    done = switched.remove(K1.id)
    assert done == Keyring.of(K2)
    assert start == Keyring.of(K1)  # nothing was changed in place


def test_repeated_steps_change_nothing() -> None:
    ring = Keyring.of(K1).install(K2)
    assert ring.install(K2) is ring and ring.install(K1) is ring
    assert ring.use(K1.id) is ring


def test_the_primary_is_never_removed() -> None:
    ring = Keyring.of(K1).install(K2)
    with pytest.raises(Conflict, match=f"{K1.id} is the primary: use another key first"):
        ring.remove(K1.id)
    with pytest.raises(Conflict, match="is the primary"):
        Keyring.of(K1).remove(K1.id)  # nor the last key


@pytest.mark.parametrize("step", ["use", "remove"])
def test_an_unknown_id_is_not_found_naming_the_installed_ones(step: str) -> None:
    ring = Keyring.of(K1).install(K2)
    with pytest.raises(NotFound, match=f"no cluster key '{K3.id}'.*{K1.id}, {K2.id}"):
        getattr(ring, step)(K3.id)


def test_a_different_key_with_an_installed_id_is_refused() -> None:
    forged = ClusterKey(K1.id, b"\x09" * KEY_BYTES)  # an id collision, made by hand
    with pytest.raises(Conflict, match=f"another key with id {K1.id}"):
        Keyring.of(K1).install(forged)


@pytest.mark.parametrize(
    ("keys", "primary", "says"),
    [
        ((), "00000000", "at least one key"),
        ((K1, K1), K1.id, "each key id once"),
        ((K1,), K2.id, "not in the keyring"),
    ],
)
def test_a_keyring_is_never_empty_and_its_primary_is_in_it(
    keys: tuple[ClusterKey, ...], primary: str, says: str
) -> None:
    with pytest.raises(Invalid, match=says):
        Keyring(keys, primary)


def test_a_key_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(Invalid, match="32 bytes, not 16"):
        ClusterKey.from_secret(b"x" * 16)
