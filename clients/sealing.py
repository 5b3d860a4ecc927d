"""Client-side chunk sealing: the store, and whoever holds its bucket, sees only ciphertext.

Keys, from the outside in:

- A **key-encryption key** (KEK) is 32 random bytes the user holds in a key file
  (``clients.key_files``; a Kubernetes Secret mounted as a file). It never leaves the client.
- A **data key** is 32 random bytes that seals chunks. It is kept only wrapped: encrypted
  under one or more KEKs with AES key wrap (RFC 3394, integrity-checked). A *keyring* file
  holds a data key's wrappings (``ChunkSealing`` as protobuf JSON: safe to share, useless
  without a KEK); every manifest sealed under it records the same wrappings, so a reader
  needs only a KEK.
- Rotating a KEK re-wraps the data key under the new KEK (:func:`rewrap`): the keyring and
  the manifests' records change, the sealed chunks do not, and nothing is re-uploaded.

Scheme ``aes-256-gcm-convergent/v1``: from the data key, BLAKE3's key derivation gives an
encryption key and a nonce key. A chunk P is sealed as ``nonce || AES-256-GCM(P) || tag``
with ``nonce = BLAKE3-keyed(nonce key, P)[:12]`` and the scheme and data key id as
associated data. The nonce is a keyed function of the content, so equal chunks under one
data key seal to equal bytes (the store still deduplicates them, on ciphertext digests)
and different chunks get different nonces (a collision needs ~2^48 distinct chunks).
This is convergent encryption keyed per data key: the README's "Encryption" section
discusses what it reveals (equality of chunks, to the store; confirmation of a guessed
chunk, only to holders of the data key).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from google.protobuf import json_format

from clients._generated.deltavault.common.v1 import common_pb2
from clients.key_files import KEY_BYTES, read_key_file

SCHEME = "aes-256-gcm-convergent/v1"
WRAP_ALGORITHM = "aes-256-kw"
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
"""Bytes a sealed chunk has beyond its plaintext."""


class SealingError(ValueError):
    """No usable key for a sealed manifest, a malformed keyring, or a chunk that does not
    authenticate (tampered, or sealed under another key)."""


def _derived(key: bytes, context: str) -> bytes:
    return blake3.blake3(key, derive_key_context=f"deltavault {context}").digest()


def kek_id(kek: bytes) -> str:
    """A KEK's public name: a keyed hash that reveals nothing of the key."""
    return "kek:" + _derived(kek, "kek id v1")[:16].hex()


def data_key_id(data_key: bytes) -> str:
    return "dk:" + _derived(data_key, "data key id v1")[:16].hex()


class ChunkSealer:
    """Seals and opens chunks under one data key."""

    def __init__(self, data_key: bytes) -> None:
        if len(data_key) != KEY_BYTES:
            raise SealingError(f"a data key is {KEY_BYTES} bytes, not {len(data_key)}")
        self.data_key_id = data_key_id(data_key)
        self._aead = AESGCM(_derived(data_key, "chunk encryption key v1"))
        self._nonce_key = _derived(data_key, "chunk nonce key v1")
        self._associated = f"{SCHEME}\n{self.data_key_id}".encode()

    def seal(self, plain: bytes | memoryview) -> memoryview:
        """``nonce || ciphertext || tag`` of ``plain``: the same for the same bytes."""
        plain = memoryview(plain).cast("B")
        nonce = blake3.blake3(plain, key=self._nonce_key).digest(length=NONCE_BYTES)
        sealed = bytearray(len(plain) + OVERHEAD)
        sealed[:NONCE_BYTES] = nonce
        self._aead.encrypt_into(nonce, plain, self._associated, memoryview(sealed)[NONCE_BYTES:])
        return memoryview(sealed)

    def open(self, sealed: bytes | memoryview, what: str = "chunk") -> bytes:
        """The plaintext of a sealed chunk; ``SealingError`` if it does not authenticate."""
        view = memoryview(sealed).cast("B")
        if len(view) < OVERHEAD:
            raise SealingError(f"{what} is {len(view)} bytes: too short to be sealed")
        try:
            return self._aead.decrypt(view[:NONCE_BYTES], view[NONCE_BYTES:], self._associated)
        except InvalidTag:
            raise SealingError(
                f"{what} does not authenticate under data key {self.data_key_id}: "
                "its bytes were altered, or it was sealed under another key"
            ) from None


def plain_size(sealed_size: int) -> int:
    return sealed_size - OVERHEAD


# --- keyrings and wrappings --------------------------------------------------------------


def new_keyring(kek: bytes) -> tuple[common_pb2.ChunkSealing, bytes]:
    """A fresh random data key wrapped under ``kek``: (its record, the key)."""
    data_key = secrets.token_bytes(KEY_BYTES)
    record = common_pb2.ChunkSealing(scheme=SCHEME, data_key_id=data_key_id(data_key))
    record.wrapped_keys.append(_wrap(data_key, kek))
    return record, data_key


def _wrap(data_key: bytes, kek: bytes) -> common_pb2.WrappedKey:
    return common_pb2.WrappedKey(
        kek_id=kek_id(kek), algorithm=WRAP_ALGORITHM, wrapped=aes_key_wrap(kek, data_key)
    )


def unwrap(record: common_pb2.ChunkSealing, keks: Iterable[bytes]) -> bytes:
    """The data key ``record`` wraps, opened with whichever of ``keks`` it was wrapped
    for; ``SealingError`` naming the KEKs it needs if none of them is given."""
    if record.scheme != SCHEME:
        raise SealingError(f"unknown sealing scheme {record.scheme!r}; this client has {SCHEME}")
    by_id = {kek_id(kek): kek for kek in keks}
    problems = []
    for wrapped in record.wrapped_keys:
        kek = by_id.get(wrapped.kek_id)
        if kek is None or wrapped.algorithm != WRAP_ALGORITHM:
            continue
        try:
            data_key = aes_key_unwrap(kek, wrapped.wrapped)
        except InvalidUnwrap:
            problems.append(f"its wrapping under {wrapped.kek_id} is damaged")
            continue
        if data_key_id(data_key) != record.data_key_id:
            problems.append(f"the key wrapped under {wrapped.kek_id} is another data key")
            continue
        return data_key
    if problems:  # a usable wrapping, had it not been damaged: say so, not "no KEK"
        raise SealingError(f"data key {record.data_key_id}: {'; '.join(problems)}")
    wanted = ", ".join(w.kek_id for w in record.wrapped_keys) or "none"
    given = ", ".join(by_id) or "none"
    raise SealingError(
        f"data key {record.data_key_id} is wrapped for KEK(s) {wanted}; the KEK(s) given are "
        f"{given}"
    )


def rewrap(
    record: common_pb2.ChunkSealing, keks: Iterable[bytes], new_kek: bytes, *, keep_old: bool
) -> common_pb2.ChunkSealing:
    """``record`` with its data key (opened with ``keks``) wrapped under ``new_kek``; the
    other wrappings dropped unless ``keep_old``. The chunks it seals are unchanged."""
    data_key = unwrap(record, keks)
    rotated = common_pb2.ChunkSealing(scheme=record.scheme, data_key_id=record.data_key_id)
    if keep_old:
        rotated.wrapped_keys.extend(w for w in record.wrapped_keys if w.kek_id != kek_id(new_kek))
    rotated.wrapped_keys.append(_wrap(data_key, new_kek))
    return rotated


def load_keyring(path: Path | str) -> common_pb2.ChunkSealing:
    try:
        text = Path(path).read_bytes().decode()
    except OSError as exc:
        raise SealingError(f"cannot read keyring {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SealingError(f"keyring {path} is not a deltavault keyring: not text") from None
    try:
        record = json_format.Parse(text, common_pb2.ChunkSealing())
    except json_format.ParseError as exc:
        raise SealingError(f"keyring {path} is not a deltavault keyring: {exc}") from None
    if record.scheme != SCHEME or not record.wrapped_keys:
        raise SealingError(f"keyring {path} holds no {SCHEME} data key")
    return record


def save_keyring(path: Path | str, record: common_pb2.ChunkSealing, *, replace: bool) -> None:
    """Write a keyring (atomically: a temporary file renamed over ``path``); refuses to
    replace an existing one unless ``replace`` (a rotation)."""
    path = Path(path)
    if path.exists() and not replace:
        raise SealingError(f"keyring {path} exists: pass replace to rotate it")
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json_format.MessageToJson(record, indent=2) + "\n")
    temporary.replace(path)


# --- what a client holds -----------------------------------------------------------------


@dataclass(frozen=True)
class SealingKeys:
    """The KEKs a client holds and, to write, the keyring whose data key seals new chunks."""

    keks: Sequence[bytes] = field(repr=False)
    """Never in a repr: a traceback or a log line must not carry a key."""
    keyring: common_pb2.ChunkSealing | None = None

    @classmethod
    def from_files(
        cls, kek_files: Sequence[Path | str], keyring: Path | str | None = None
    ) -> SealingKeys:
        keks = [read_key_file(path) for path in kek_files]
        return cls(keks, load_keyring(keyring) if keyring is not None else None)

    def for_writing(self) -> tuple[common_pb2.ChunkSealing, bytes]:
        """(the manifest's sealing record, the data key) for a new sealed manifest."""
        if self.keyring is None:
            raise SealingError("sealing new data needs a keyring (deltavault keys init)")
        return self.keyring, unwrap(self.keyring, self.keks)

    def sealer_for(self, manifest: common_pb2.Manifest) -> ChunkSealer | None:
        """The sealer that opens ``manifest``'s chunks; None if it is not sealed."""
        if not manifest.HasField("sealing"):
            return None
        return ChunkSealer(unwrap(manifest.sealing, self.keks))
