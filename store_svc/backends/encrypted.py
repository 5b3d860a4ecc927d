"""Encryption at rest over any backend: every object AES-256-GCM sealed with one store key.

This is how the local backend honours SSE-C (``--sse c --sse-key-file``): what reaches the
disk is ciphertext, so a copy of the folder, a backup or a stolen disk reveals nothing of
the content without the key. The store process itself handles plaintext.

Stored object layout (all sizes in bytes)::

    magic "DVE1" (4) | format version 1 (1) | nonce (12) | ciphertext (n) | GCM tag (16)

The associated data is the 17-byte header followed by the object's key, so an object
copied or renamed to another key, or given another header, fails authentication like a
flipped bit does. Each object gets a fresh random 96-bit nonce. Objects are write-once, so
a key never encrypts twice under one nonce unless two random nonces collide: NIST SP
800-38D bounds random-nonce GCM at 2**32 encryptions per key (collision chance below
2**-32). Every ``put_if_absent`` counts, including those that find the object already
there; a store that nears that many writes should move to a new key (re-encrypting).

What stays visible: object keys (chunk and manifest digests, ref names), object count,
sizes (plaintext size + ``OVERHEAD``) and modification times. ``stat`` and ``list``
report the plaintext size, the stored size minus ``OVERHEAD``: garbage collection's
"bytes freed" then counts the content's bytes, as without encryption.

Objects written before encryption was turned on have no header and are refused on read
(``ObjectNotAuthentic``); the store does not mix plaintext and ciphertext objects.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from store_svc.backends.base import Backend, BackendError, ObjectInfo, check_key
from store_svc.errors import StoreError

MAGIC = b"DVE1"
FORMAT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 1 + NONCE_BYTES
OVERHEAD = HEADER_BYTES + TAG_BYTES
"""Stored size minus plaintext size, for every object."""
KEY_BYTES = 32


class ObjectNotAuthentic(BackendError, StoreError):
    """A stored object that does not decrypt under the store's key: another key wrote it,
    it was altered or moved, or it was never encrypted. Retrying cannot help.

    Also a ``StoreError`` with DATA_LOSS, the status a chunk whose bytes no longer match
    its digest gets: to a client, ciphertext altered on disk is the same damage.
    """

    code = grpc.StatusCode.DATA_LOSS

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"object {key!r} {reason}")
        self.key = key


class EncryptedBackend:
    """The ``Backend`` contract over ``inner``, every object sealed with ``key`` (32 bytes).

    Atomicity, write-once, listing and errors are ``inner``'s; reads add
    ``ObjectNotAuthentic`` (a ``BackendError``).
    """

    def __init__(self, inner: Backend, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the store encryption key must be {KEY_BYTES} bytes, not {len(key)}")
        self._inner = inner
        self._aead = AESGCM(key)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        check_key(key)  # before spending a nonce and an encryption on it
        header = MAGIC + bytes((FORMAT_VERSION,)) + secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(header[-NONCE_BYTES:], data, _associated(header, key))
        return self._inner.put_if_absent(key, header + sealed)

    def get(self, key: str) -> bytes:
        stored = self._inner.get(key)
        header = stored[:HEADER_BYTES]
        if len(stored) < OVERHEAD or not header.startswith(MAGIC):
            raise ObjectNotAuthentic(
                key,
                "is not encrypted by the store (no encryption header): written before "
                "encryption was turned on, or by something else",
            )
        if header[len(MAGIC)] != FORMAT_VERSION:
            raise ObjectNotAuthentic(key, f"has unknown encryption format {header[len(MAGIC)]}")
        try:
            return self._aead.decrypt(
                header[-NONCE_BYTES:], stored[HEADER_BYTES:], _associated(header, key)
            )
        except InvalidTag:
            raise ObjectNotAuthentic(
                key,
                "does not authenticate under the store's encryption key: wrong key or tampered",
            ) from None

    def stat(self, key: str) -> ObjectInfo:
        return _plaintext_info(self._inner.stat(key))

    def exists(self, key: str) -> bool:
        return self._inner.exists(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for info in self._inner.list(prefix):
            yield _plaintext_info(info)

    def delete(self, key: str) -> None:
        self._inner.delete(key)

    def close(self) -> None:
        self._inner.close()


def _associated(header: bytes, key: str) -> bytes:
    # The header has a fixed length, so header + key is unambiguous.
    return header + key.encode("ascii")


def _plaintext_info(info: ObjectInfo) -> ObjectInfo:
    """``info`` with the size of the plaintext (0 for a stored object too short to hold
    any, which ``get`` refuses)."""
    return ObjectInfo(info.key, max(0, info.size - OVERHEAD), info.modified)
