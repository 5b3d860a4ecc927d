"""Ed25519 manifest signatures: proof of who produced a manifest, checked by the store on
commit and by readers before they use a byte of it.

A signature covers the manifest's digest, which names the manifest's exact bytes and so
everything in it: the base fingerprint, every tensor's encoding and every chunk digest
(of the sealed bytes, for a sealed manifest). The signed message is
``b"deltavault manifest signature v1\\n" + "<algorithm>:<hex digest>"``; the prefix keeps a
manifest signature from ever being valid for anything else the same key signs.

A key's id is ``ed25519:`` + hex of the first 16 bytes of SHA-256 of its raw 32-byte public
key. Key files are PEM: ``NAME.key`` (PKCS#8 private key, unencrypted, mode 0600) and
``NAME.pub`` (SubjectPublicKeyInfo); a *trusted keys* folder is a folder of ``*.pub`` files.

Signatures are stored beside the manifest they sign, one object per signer:
``signatures/<algorithm>/<2 hex>/<64 hex>/<key id hex>``, each a serialized
``ManifestSignature``. Ed25519 is deterministic, so a signer re-signing writes nothing new.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from clients._generated.deltavault.common.v1 import common_pb2
from store_svc.backends.base import Backend, ObjectInfo, ObjectNotFound
from store_svc.digest import Algorithm, Digest

SIGNATURE_PREFIX = "signatures/"
_MESSAGE_PREFIX = b"deltavault manifest signature v1\n"
_KEY_ID_PREFIX = "ed25519:"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


class SignatureError(ValueError):
    """A signature that is malformed or does not verify for the manifest it accompanies."""


class UntrustedSigner(SignatureError):
    """A signature that verifies, by a key the checker does not trust."""


def signed_message(digest: Digest) -> bytes:
    return _MESSAGE_PREFIX + str(digest).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    return _KEY_ID_PREFIX + hashlib.sha256(_raw(public_key)).digest()[:16].hex()


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Signer:
    """A private key that signs manifest digests."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def from_file(cls, path: Path | str) -> Signer:
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except OSError as exc:
            raise SignatureError(f"cannot read signing key {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise SignatureError(f"{path} is not a PEM private key: {exc}") from None
        except TypeError:  # cryptography's answer to a passphrase-protected key
            raise SignatureError(
                f"{path} is passphrase-protected: signing keys are unencrypted PEM; protect "
                "the file (mode 0600, a mounted Secret) instead"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, digest: Digest) -> common_pb2.ManifestSignature:
        return common_pb2.ManifestSignature(
            key_id=self.key_id,
            public_key=_raw(self._key.public_key()),
            signature=self._key.sign(signed_message(digest)),
        )


def generate_key_pair(folder: Path | str, name: str) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair as ``folder/NAME.key`` (0600) and ``folder/NAME.pub``;
    refuses to overwrite either. Returns both paths and the key id."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{name}{PRIVATE_SUFFIX}", folder / f"{name}{PUBLIC_SUFFIX}"
    for path in (private, public):
        if path.exists():
            raise SignatureError(f"{path} exists: key files are never overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public, key_id(key.public_key())


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys whose signatures a checker accepts, by key id."""

    keys: Mapping[str, Ed25519PublicKey]
    source: str = "trusted keys"

    @classmethod
    def load(cls, folder: Path | str) -> TrustedKeys:
        """Every ``*.pub`` file in ``folder``; ``SignatureError`` if there is none or one
        is not an Ed25519 public key."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SignatureError(f"trusted keys folder {folder} does not exist")
        keys: dict[str, Ed25519PublicKey] = {}
        for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except OSError as exc:
                raise SignatureError(f"cannot read trusted key {path}: {exc.strerror}") from None
            except ValueError as exc:
                raise SignatureError(f"{path} is not a PEM public key: {exc}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise SignatureError(f"{path} is not an Ed25519 public key")
            keys[key_id(key)] = key
        if not keys:
            raise SignatureError(f"no *{PUBLIC_SUFFIX} key in trusted keys folder {folder}")
        return cls(keys, f"the trusted keys in {folder}")

    def __contains__(self, key_id: object) -> bool:
        return key_id in self.keys


def check_signature(signature: common_pb2.ManifestSignature, digest: Digest) -> str:
    """The signer's key id if ``signature`` is a valid signature of ``digest`` by the key
    it names, else ``SignatureError``."""
    try:
        public = Ed25519PublicKey.from_public_bytes(signature.public_key)
    except ValueError:
        raise SignatureError(
            f"signature {signature.key_id!r} carries no valid Ed25519 public key"
        ) from None
    if key_id(public) != signature.key_id:
        raise SignatureError(f"signature {signature.key_id!r} names a key it does not carry")
    try:
        public.verify(signature.signature, signed_message(digest))
    except InvalidSignature:
        raise SignatureError(
            f"the signature by {signature.key_id} does not verify for manifest {digest}: "
            "the manifest or the signature was altered"
        ) from None
    return signature.key_id


def trusted_signers(
    signatures: Iterable[common_pb2.ManifestSignature],
    digest: Digest,
    trusted: TrustedKeys | None,
) -> list[str]:
    """Key ids of the valid signatures of ``digest`` (all of them must be valid), keeping
    only trusted signers when ``trusted`` is given; ``UntrustedSigner`` if some valid
    signature is by a key outside ``trusted``."""
    signers = [check_signature(signature, digest) for signature in signatures]
    if trusted is None:
        return signers
    unknown = [signer for signer in signers if signer not in trusted]
    if unknown:
        raise UntrustedSigner(
            f"manifest {digest} is signed by {', '.join(unknown)}, not among "
            f"{trusted.source} ({', '.join(sorted(trusted.keys)) or 'none'})"
        )
    return signers


def require_trusted_signature(
    signatures: Iterable[common_pb2.ManifestSignature], digest: Digest, trusted: TrustedKeys
) -> str:
    """The key id of a trusted signer of ``digest``: what a reader runs before using a
    manifest. ``SignatureError`` if any signature is bad (the store refuses those, so one
    means tampering), ``UntrustedSigner`` if no valid one is by a trusted key. Valid
    signatures by other keys are ignored: anyone may countersign, and that must not lock
    readers out of a manifest their own keys vouch for."""
    signers = [check_signature(signature, digest) for signature in signatures]
    vouched = [signer for signer in signers if signer in trusted]
    if vouched:
        return vouched[0]
    if not signers:
        raise UntrustedSigner(f"manifest {digest} is not signed; {trusted.source} require it")
    raise UntrustedSigner(
        f"manifest {digest} is signed by {', '.join(signers)}, not among {trusted.source} "
        f"({', '.join(sorted(trusted.keys))})"
    )


@dataclass(frozen=True)
class SignaturePolicy:
    """What the store accepts on commit. Every signature sent is always checked."""

    trusted: TrustedKeys | None = None
    """Refuse signatures by any other key."""
    required: bool = False
    """Refuse a manifest without a valid signature (by a trusted key, when ``trusted``)."""


def signature_key(digest: Digest, signer: str) -> str:
    """Object key of ``signer``'s signature of the manifest ``digest``."""
    return f"{signatures_key_prefix(digest)}{signer.removeprefix(_KEY_ID_PREFIX)}"


def signatures_key_prefix(digest: Digest) -> str:
    return f"{SIGNATURE_PREFIX}{digest.algorithm.value}/{digest.hex[:2]}/{digest.hex}/"


def manifest_of_signature_key(key: str) -> Digest:
    _, algorithm, _, hex_value, _ = key.split("/")
    return Digest(Algorithm(algorithm), bytes.fromhex(hex_value))


class SignatureStore:
    """Signatures beside their manifests, write-once like every stored object."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def add(self, digest: Digest, signatures: Iterable[common_pb2.ManifestSignature]) -> None:
        """Store signatures already checked by the caller (``check_signature``)."""
        for signature in signatures:
            data = signature.SerializeToString(deterministic=True)
            self._backend.put_if_absent(signature_key(digest, signature.key_id), data)

    def of(self, digest: Digest) -> list[common_pb2.ManifestSignature]:
        """Every stored signature of ``digest``, by key id (unparseable ones skipped: a
        reader re-checks every signature anyway)."""
        found = []
        for info in sorted(self._backend.list(signatures_key_prefix(digest)), key=_by_key):
            try:
                signature = common_pb2.ManifestSignature.FromString(self._backend.get(info.key))
            except (ObjectNotFound, DecodeError):
                continue
            found.append(signature)
        return found

    def keys(self) -> Iterator[tuple[str, int]]:
        """(key, size) of every stored signature: what garbage collection judges."""
        for info in self._backend.list(SIGNATURE_PREFIX):
            yield info.key, info.size


def _by_key(info: ObjectInfo) -> str:
    return info.key
