"""AES-256-GCM for the seal, from the OpenSSL this interpreter already runs.

Why not simply ``cryptography``: importing it costs a clustered branch about
7 MiB of resident memory (its Rust extension and a second copy of OpenSSL's
state), more than the whole budget of the cluster (issue 13: RSS growth of
at most 5 MiB over a single branch). Python's own ``ssl`` module has already
mapped libcrypto into the process (asyncio imports it), so the same
AES-256-GCM is reached through its EVP interface with ctypes for about
0.2 MiB. The EVP calls are the documented one-shot AEAD sequence
(``EVP_EncryptInit_ex``, set the IV length, the key and IV, the AAD as an
update without output, the data, ``EVP_EncryptFinal_ex``, get the tag; the
reverse with the tag set before ``EVP_DecryptFinal_ex``, which fails on a
bad tag).

Where that libcrypto cannot be reached (an interpreter without ``ssl``, or
linked against a library without these symbols), ``cryptography``'s AESGCM
is used instead: the same algorithm, so branches of both kinds talk. The
suite checks both against each other and against NIST's test vectors.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from ctypes import byref
from typing import Any, Protocol

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

# EVP_CTRL_GCM_* (openssl/evp.h; the same values since OpenSSL 1.0.1)
_SET_IVLEN = 0x9
_GET_TAG = 0x10
_SET_TAG = 0x11


class Aead(Protocol):
    name: str

    def encrypt(self, key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        """``data`` encrypted, with its 16-byte tag appended."""
        ...

    def decrypt(self, key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes | None:
        """The plaintext, or None when the tag does not hold."""
        ...


def _check(key: bytes, nonce: bytes) -> None:
    if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError(f"AES-256-GCM takes a {KEY_BYTES}-byte key and a {NONCE_BYTES}-byte nonce")


class OpenSslAead:
    """AES-256-GCM through libcrypto's EVP interface (ctypes)."""

    name = "openssl"

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        c_int, c_void_p, c_char_p = ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p
        pint = ctypes.POINTER(c_int)
        lib.EVP_CIPHER_CTX_new.restype = c_void_p
        lib.EVP_CIPHER_CTX_new.argtypes = []
        lib.EVP_CIPHER_CTX_free.restype = None
        lib.EVP_CIPHER_CTX_free.argtypes = [c_void_p]
        lib.EVP_aes_256_gcm.restype = c_void_p
        lib.EVP_aes_256_gcm.argtypes = []
        lib.EVP_CIPHER_CTX_ctrl.restype = c_int
        lib.EVP_CIPHER_CTX_ctrl.argtypes = [c_void_p, c_int, c_int, c_void_p]
        for name in ("EVP_EncryptInit_ex", "EVP_DecryptInit_ex"):
            fn = getattr(lib, name)
            fn.restype = c_int
            fn.argtypes = [c_void_p, c_void_p, c_void_p, c_char_p, c_char_p]
        for name in ("EVP_EncryptUpdate", "EVP_DecryptUpdate"):
            fn = getattr(lib, name)
            fn.restype = c_int
            fn.argtypes = [c_void_p, c_void_p, pint, c_char_p, c_int]
        for name in ("EVP_EncryptFinal_ex", "EVP_DecryptFinal_ex"):
            fn = getattr(lib, name)
            fn.restype = c_int
            fn.argtypes = [c_void_p, c_void_p, pint]
        self._cipher = lib.EVP_aes_256_gcm()
        if not self._cipher:
            raise OSError("libcrypto has no AES-256-GCM")

    def _ctx(self) -> int:
        ctx: int | None = self._lib.EVP_CIPHER_CTX_new()
        if not ctx:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        return ctx

    def encrypt(self, key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        _check(key, nonce)
        lib, ctx = self._lib, self._ctx()
        try:
            n = ctypes.c_int(0)
            out = ctypes.create_string_buffer(len(data) + TAG_BYTES)
            ok = (
                lib.EVP_EncryptInit_ex(ctx, self._cipher, None, None, None) == 1
                and lib.EVP_CIPHER_CTX_ctrl(ctx, _SET_IVLEN, NONCE_BYTES, None) == 1
                and lib.EVP_EncryptInit_ex(ctx, None, None, key, nonce) == 1
                and (not aad or lib.EVP_EncryptUpdate(ctx, None, byref(n), aad, len(aad)) == 1)
                and lib.EVP_EncryptUpdate(ctx, out, ctypes.byref(n), data, len(data)) == 1
            )
            written = n.value
            tail = ctypes.c_int(0)
            ok = ok and lib.EVP_EncryptFinal_ex(ctx, byref(out, written), byref(tail)) == 1
            tag = ctypes.create_string_buffer(TAG_BYTES)
            ok = ok and lib.EVP_CIPHER_CTX_ctrl(ctx, _GET_TAG, TAG_BYTES, tag) == 1
            if not ok or written + tail.value != len(data):
                raise OSError("AES-256-GCM encryption failed in libcrypto")
            return out.raw[: len(data)] + tag.raw
        finally:
            lib.EVP_CIPHER_CTX_free(ctx)

    def decrypt(self, key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes | None:
        _check(key, nonce)
        if len(sealed) < TAG_BYTES:
            return None
        data, tag = sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]
        lib, ctx = self._lib, self._ctx()
        try:
            n = ctypes.c_int(0)
            out = ctypes.create_string_buffer(len(data) + TAG_BYTES)
            tag_buf = ctypes.create_string_buffer(tag, TAG_BYTES)
            ok = (
                lib.EVP_DecryptInit_ex(ctx, self._cipher, None, None, None) == 1
                and lib.EVP_CIPHER_CTX_ctrl(ctx, _SET_IVLEN, NONCE_BYTES, None) == 1
                and lib.EVP_DecryptInit_ex(ctx, None, None, key, nonce) == 1
                and (not aad or lib.EVP_DecryptUpdate(ctx, None, byref(n), aad, len(aad)) == 1)
                and lib.EVP_DecryptUpdate(ctx, out, ctypes.byref(n), data, len(data)) == 1
                and lib.EVP_CIPHER_CTX_ctrl(ctx, _SET_TAG, TAG_BYTES, tag_buf) == 1
            )
            if not ok:
                return None
            written = n.value
            tail = ctypes.c_int(0)
            if lib.EVP_DecryptFinal_ex(ctx, ctypes.byref(out, written), ctypes.byref(tail)) != 1:
                return None  # the tag does not hold
            return out.raw[: written + tail.value]
        finally:
            lib.EVP_CIPHER_CTX_free(ctx)


class PycaAead:
    """AES-256-GCM from ``cryptography`` (the fallback)."""

    name = "cryptography"

    def __init__(self) -> None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aesgcm, self._invalid = AESGCM, InvalidTag

    def encrypt(self, key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        _check(key, nonce)
        sealed: bytes = self._aesgcm(key).encrypt(nonce, data, aad)
        return sealed

    def decrypt(self, key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes | None:
        _check(key, nonce)
        try:
            opened: bytes = self._aesgcm(key).decrypt(nonce, sealed, aad)
        except self._invalid:
            return None
        return opened


def openssl() -> OpenSslAead | None:
    """The libcrypto that Python's ``_ssl`` links, or None if it cannot be used."""
    try:
        import _ssl  # the extension module: dlsym on it reaches its libcrypto

        return OpenSslAead(ctypes.CDLL(_ssl.__file__))
    except (ImportError, OSError, AttributeError) as exc:
        log.info("libcrypto's AES-GCM is not reachable (%s): using cryptography's", exc)
        return None


@functools.cache
def default() -> Aead:
    """The AEAD of this process: libcrypto's if reachable, else cryptography's."""
    return openssl() or PycaAead()
