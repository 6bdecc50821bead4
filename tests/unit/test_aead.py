"""AES-256-GCM from libcrypto (ctypes) and from cryptography: the same bytes."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from branchd.cluster import aead

OPENSSL = aead.openssl()
PYCA = aead.PycaAead()
BOTH = [b for b in (OPENSSL, PYCA) if b is not None]


def test_this_interpreter_reaches_libcrypto() -> None:
    # CPython with ssl (every supported build): the cheap path is the one used
    assert OPENSSL is not None and aead.default().name == "openssl"


# McGrew and Viega, "The Galois/Counter Mode of Operation", AES-256 test cases 13, 14
VECTORS = [
    (bytes(32), bytes(12), b"", b"", bytes.fromhex("530f8afbc74536b9a963b4f1c4cb738b")),
    (
        bytes(32),
        bytes(12),
        bytes(16),
        b"",
        bytes.fromhex("cea7403d4d606b6e074ec5d3baf39d18" "d0d1c8a799996bf0265b98b5d48ab919"),
    ),
]


@pytest.mark.parametrize("impl", BOTH, ids=lambda b: b.name)
@pytest.mark.parametrize(("key", "nonce", "data", "aad", "sealed"), VECTORS)
def test_the_published_vectors(
    impl: aead.Aead, key: bytes, nonce: bytes, data: bytes, aad: bytes, sealed: bytes
) -> None:
    assert impl.encrypt(key, nonce, data, aad) == sealed
    assert impl.decrypt(key, nonce, sealed, aad) == data


@settings(max_examples=200, deadline=None)
@given(data=hs.binary(max_size=1500), aad=hs.binary(max_size=64))
def test_both_make_the_same_bytes_and_open_each_others(data: bytes, aad: bytes) -> None:
    assert OPENSSL is not None
    key, nonce = os.urandom(32), os.urandom(12)
    sealed = OPENSSL.encrypt(key, nonce, data, aad)
    assert sealed == PYCA.encrypt(key, nonce, data, aad)
    assert PYCA.decrypt(key, nonce, sealed, aad) == data
    assert OPENSSL.decrypt(key, nonce, sealed, aad) == data


@pytest.mark.parametrize("impl", BOTH, ids=lambda b: b.name)
def test_anything_changed_fails_the_tag(impl: aead.Aead) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    sealed = impl.encrypt(key, nonce, b"the members and their addresses", b"header")
    for i in (0, len(sealed) // 2, len(sealed) - 1):
        bad = sealed[:i] + bytes([sealed[i] ^ 1]) + sealed[i + 1 :]
        assert impl.decrypt(key, nonce, bad, b"header") is None
    assert impl.decrypt(key, nonce, sealed, b"headeR") is None
    assert impl.decrypt(os.urandom(32), nonce, sealed, b"header") is None
    assert impl.decrypt(key, os.urandom(12), sealed, b"header") is None
    assert impl.decrypt(key, nonce, sealed[:15], b"header") is None
    with pytest.raises(ValueError, match="32-byte key"):
        impl.encrypt(key[:16], nonce, b"x", b"")
