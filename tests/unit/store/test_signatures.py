"""Manifest signatures: Ed25519 keys and their files, what verifies and what does not, the
store's signature policy on commit, and signatures living and dying with their manifests."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from clients._generated.deltavault.common.v1 import common_pb2
from store_svc.backends.local import LocalBackend
from store_svc.digest import Algorithm, Digest
from store_svc.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from store_svc.manifests import FORMAT_VERSION, manifest_digest, manifest_key
from store_svc.refs import RefName
from store_svc.repository import RefMove, Repository
from store_svc.signatures import (
    SIGNATURE_PREFIX,
    SignatureError,
    SignaturePolicy,
    Signer,
    TrustedKeys,
    UntrustedSigner,
    check_signature,
    generate_key_pair,
    key_id,
    manifest_of_signature_key,
    require_trusted_signature,
    signature_key,
    signed_message,
    trusted_signers,
)

DIGEST = Digest.of(b"a manifest, as far as a signature can tell")
OTHER_DIGEST = Digest.of(b"another manifest")


def new_signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


def trusting(*signers: Signer) -> TrustedKeys:
    """Trusted keys holding exactly these signers' public keys."""
    keys = {}
    for signer in signers:
        public = Ed25519PublicKey.from_public_bytes(signer.sign(DIGEST).public_key)
        assert key_id(public) == signer.key_id
        keys[signer.key_id] = public
    return TrustedKeys(keys, "the test's keys")


# --- keys and key files --------------------------------------------------------------------


def test_generate_key_pair_writes_owner_only_private_and_public(tmp_path: Path) -> None:
    folder = tmp_path / "keys" / "nested"  # created as needed
    private, public, kid = generate_key_pair(folder, "ci")
    assert (private, public) == (folder / "ci.key", folder / "ci.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert b"PRIVATE" not in public.read_bytes()

    signer = Signer.from_file(private)
    assert signer.key_id == kid
    assert kid.startswith("ed25519:") and len(kid) == len("ed25519:") + 32
    assert check_signature(signer.sign(DIGEST), DIGEST) == kid
    assert kid in TrustedKeys.load(folder)


def test_generate_key_pair_never_overwrites(tmp_path: Path) -> None:
    private, public, _ = generate_key_pair(tmp_path, "ci")
    before = (private.read_bytes(), public.read_bytes())
    with pytest.raises(SignatureError, match="exists: key files are never overwritten"):
        generate_key_pair(tmp_path, "ci")
    assert (private.read_bytes(), public.read_bytes()) == before

    (tmp_path / "half.pub").write_text("someone else's public key\n")
    with pytest.raises(SignatureError, match=r"half\.pub exists"):
        generate_key_pair(tmp_path, "half")
    assert not (tmp_path / "half.key").exists()


def test_each_key_pair_is_new(tmp_path: Path) -> None:
    assert generate_key_pair(tmp_path, "a")[2] != generate_key_pair(tmp_path, "b")[2]


def test_signer_from_a_bad_file(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="cannot read signing key"):
        Signer.from_file(tmp_path / "absent.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    with pytest.raises(SignatureError, match="is not a PEM private key"):
        Signer.from_file(garbage)
    x25519 = tmp_path / "x25519.key"
    x25519.write_bytes(
        X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(SignatureError, match="is not an Ed25519 private key"):
        Signer.from_file(x25519)


def test_signer_from_a_passphrase_protected_file(tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(SignatureError, match=r"encrypted\.key"):
        Signer.from_file(encrypted)


# --- checking one signature ----------------------------------------------------------------


def test_a_valid_signature_checks_and_is_deterministic() -> None:
    signer = new_signer()
    signature = signer.sign(DIGEST)
    assert check_signature(signature, DIGEST) == signer.key_id
    assert signature.key_id == signer.key_id
    assert len(signature.public_key) == 32 and len(signature.signature) == 64
    assert signer.sign(DIGEST) == signature  # Ed25519: re-signing writes nothing new


def test_the_signed_message_is_domain_separated() -> None:
    assert signed_message(DIGEST) == b"deltavault manifest signature v1\n" + str(DIGEST).encode()
    # A signature of the bare digest text (say, by the same key for another purpose) fails.
    key = Ed25519PrivateKey.generate()
    signature = Signer(key).sign(DIGEST)
    signature.signature = key.sign(str(DIGEST).encode())
    with pytest.raises(SignatureError, match="does not verify"):
        check_signature(signature, DIGEST)


def test_a_signature_of_another_digest_fails() -> None:
    signature = new_signer().sign(OTHER_DIGEST)
    with pytest.raises(SignatureError, match="does not verify") as caught:
        check_signature(signature, DIGEST)
    assert str(DIGEST) in str(caught.value)
    sha = Digest(Algorithm.SHA256, DIGEST.value)  # same bytes, other algorithm
    with pytest.raises(SignatureError, match="does not verify"):
        check_signature(new_signer().sign(DIGEST), sha)


def test_an_altered_signature_fails() -> None:
    signature = new_signer().sign(DIGEST)
    for index in (0, 31, 63):
        damaged = bytearray(signature.signature)
        damaged[index] ^= 0x01
        altered = common_pb2.ManifestSignature()
        altered.CopyFrom(signature)
        altered.signature = bytes(damaged)
        with pytest.raises(SignatureError, match="does not verify"):
            check_signature(altered, DIGEST)
    signature.signature = signature.signature[:-1]
    with pytest.raises(SignatureError, match="does not verify"):
        check_signature(signature, DIGEST)


def test_a_key_id_that_does_not_match_its_public_key_fails() -> None:
    mine, theirs = new_signer(), new_signer()
    signature = mine.sign(DIGEST)
    signature.key_id = theirs.key_id  # claims to be by a (perhaps trusted) other key
    with pytest.raises(SignatureError, match="names a key it does not carry"):
        check_signature(signature, DIGEST)
    with pytest.raises(SignatureError, match="names a key it does not carry"):
        trusted_signers([signature], DIGEST, trusting(theirs))


def test_a_signature_carrying_another_key_fails() -> None:
    mine, theirs = new_signer(), new_signer()
    signature = mine.sign(DIGEST)
    stolen = theirs.sign(DIGEST)
    signature.public_key, signature.key_id = stolen.public_key, stolen.key_id
    with pytest.raises(SignatureError, match="does not verify"):
        check_signature(signature, DIGEST)


@pytest.mark.parametrize("public_key", [b"", b"\x01" * 31, b"\x01" * 33, b"\x02" * 64])
def test_a_garbage_public_key_fails(public_key: bytes) -> None:
    signature = new_signer().sign(DIGEST)
    signature.public_key = public_key
    with pytest.raises(SignatureError, match="carries no valid Ed25519 public key"):
        check_signature(signature, DIGEST)


# --- trust -----------------------------------------------------------------------------------


def test_trusted_signers_lists_every_signer_without_trust() -> None:
    a, b = new_signer(), new_signer()
    signatures = [a.sign(DIGEST), b.sign(DIGEST)]
    assert trusted_signers(signatures, DIGEST, None) == [a.key_id, b.key_id]
    assert trusted_signers([], DIGEST, None) == []
    assert trusted_signers(signatures, DIGEST, trusting(a, b)) == [a.key_id, b.key_id]


def test_one_bad_signature_spoils_the_lot() -> None:
    a = new_signer()
    with pytest.raises(SignatureError, match="does not verify"):
        trusted_signers([a.sign(DIGEST), a.sign(OTHER_DIGEST)], DIGEST, None)


def test_an_untrusted_signer_raises() -> None:
    trusted, stranger = new_signer(), new_signer()
    with pytest.raises(UntrustedSigner, match=stranger.key_id) as caught:
        trusted_signers([trusted.sign(DIGEST), stranger.sign(DIGEST)], DIGEST, trusting(trusted))
    assert trusted.key_id in str(caught.value)  # the trusted ones are listed
    assert "the test's keys" in str(caught.value)


def test_require_trusted_signature() -> None:
    trusted, stranger = new_signer(), new_signer()
    keys = trusting(trusted)
    assert require_trusted_signature([trusted.sign(DIGEST)], DIGEST, keys) == trusted.key_id
    with pytest.raises(SignatureError, match="is not signed"):
        require_trusted_signature([], DIGEST, keys)
    with pytest.raises(UntrustedSigner):
        require_trusted_signature([stranger.sign(DIGEST)], DIGEST, keys)
    with pytest.raises(SignatureError, match="does not verify"):
        require_trusted_signature([trusted.sign(OTHER_DIGEST)], DIGEST, keys)


def test_a_reader_ignores_countersignatures_by_keys_it_does_not_trust() -> None:
    """Anyone may add a valid signature beside a manifest; that must not lock readers out
    of one their own keys vouch for. A bad signature, though, means tampering."""
    trusted, stranger = new_signer(), new_signer()
    keys = trusting(trusted)
    both = [stranger.sign(DIGEST), trusted.sign(DIGEST)]
    assert require_trusted_signature(both, DIGEST, keys) == trusted.key_id
    with pytest.raises(SignatureError, match="does not verify"):
        require_trusted_signature([*both, stranger.sign(OTHER_DIGEST)], DIGEST, keys)


def test_trusted_keys_load_reads_every_public_key(tmp_path: Path) -> None:
    ids = {generate_key_pair(tmp_path, name)[2] for name in ("alice", "bob")}
    (tmp_path / "README.txt").write_text("only *.pub files count\n")
    keys = TrustedKeys.load(tmp_path)
    assert set(keys.keys) == ids
    assert str(tmp_path) in keys.source
    assert all(kid in keys for kid in ids)
    assert new_signer().key_id not in keys


def test_trusted_keys_load_of_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "alice.key").write_text("a private key alone trusts no one\n")
    with pytest.raises(SignatureError, match=r"no \*\.pub key in trusted keys folder"):
        TrustedKeys.load(tmp_path)


def test_trusted_keys_load_of_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="does not exist"):
        TrustedKeys.load(tmp_path / "absent")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SignatureError, match="does not exist"):
        TrustedKeys.load(tmp_path / "a-file")


def test_trusted_keys_load_of_a_non_ed25519_key(tmp_path: Path) -> None:
    generate_key_pair(tmp_path, "good")
    (tmp_path / "x25519.pub").write_bytes(
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(SignatureError, match=r"x25519\.pub is not an Ed25519 public key"):
        TrustedKeys.load(tmp_path)


def test_trusted_keys_load_of_a_garbage_pub_file(tmp_path: Path) -> None:
    (tmp_path / "garbage.pub").write_text("ssh-ed25519 AAAA... not PEM\n")
    with pytest.raises(SignatureError, match=r"garbage\.pub is not a PEM public key"):
        TrustedKeys.load(tmp_path)


def test_signature_keys_sit_beside_their_manifest() -> None:
    signer = new_signer()
    key = signature_key(DIGEST, signer.key_id)
    hex_id = signer.key_id.removeprefix("ed25519:")
    assert key == f"{SIGNATURE_PREFIX}blake3/{DIGEST.hex[:2]}/{DIGEST.hex}/{hex_id}"
    assert manifest_of_signature_key(key) == DIGEST


# --- the repository's policy ---------------------------------------------------------------


OpenRepository = Callable[..., Repository]


@pytest.fixture
def open_repository(tmp_path: Path) -> Iterator[OpenRepository]:
    """``open_repository(policy=None)``: a repository on a local folder of the test's,
    closed (its probe threads stopped) when the test ends."""
    opened: list[Repository] = []

    def open_one(policy: SignaturePolicy | None = None) -> Repository:
        repo = Repository(
            LocalBackend(tmp_path / "store"), max_chunk_bytes=1 << 20, signature_policy=policy
        )
        opened.append(repo)
        return repo

    yield open_one
    for repo in opened:
        repo.close()


def stored_manifest(repo: Repository, payload: bytes | None = None) -> common_pb2.Manifest:
    """A manifest of one stored chunk (not committed)."""
    data = os.urandom(64) if payload is None else payload
    chunk = Digest.of(data)
    repo.chunks.put(chunk, data)
    part = common_pb2.EncodedPart(
        name="p",
        byte_length=len(data),
        chunks=[common_pb2.ChunkRef(digest=chunk.to_proto(), size=len(data))],
    )
    return common_pb2.Manifest(
        format_version=FORMAT_VERSION,
        digest_algorithm=Algorithm.BLAKE3.to_proto(),
        tensors=[common_pb2.TensorEntry(name="t", parts=[part])],
    )


def signature_objects(repo: Repository, digest: Digest | None = None) -> list[str]:
    prefix = SIGNATURE_PREFIX if digest is None else signature_key(digest, "")
    return [info.key for info in repo.backend.list(prefix)]


def test_without_policy_unsigned_and_signed_commits_work(open_repository: OpenRepository) -> None:
    repo = open_repository()
    unsigned = stored_manifest(repo)
    result, _ = repo.commit(unsigned)
    assert not result.already_present
    assert repo.signatures.of(result.digest) == []

    signer = new_signer()
    manifest = stored_manifest(repo)
    digest = manifest_digest(manifest)
    result, _ = repo.commit(manifest, signatures=[signer.sign(digest)])
    assert result.digest == digest
    [stored] = repo.signatures.of(digest)
    assert stored == signer.sign(digest)
    assert check_signature(stored, digest) == signer.key_id
    assert signature_objects(repo) == [signature_key(digest, signer.key_id)]


@pytest.mark.parametrize(
    "damage", ["other-digest", "wrong-key-id", "garbage-public-key", "altered-signature"]
)
def test_a_bad_signature_is_refused_and_nothing_is_written(
    open_repository: OpenRepository, damage: str
) -> None:
    repo = open_repository()
    manifest = stored_manifest(repo)
    digest = manifest_digest(manifest)
    signer = new_signer()
    signature = signer.sign(OTHER_DIGEST if damage == "other-digest" else digest)
    if damage == "wrong-key-id":
        signature.key_id = new_signer().key_id
    elif damage == "garbage-public-key":
        signature.public_key = b"\x00" * 7
    elif damage == "altered-signature":
        signature.signature = bytes(64)
    ref = RefName("ns", "signed")
    with pytest.raises(InvalidArgument, match="manifest not committed"):
        repo.commit(manifest, RefMove(ref, None), signatures=[signer.sign(digest), signature])
    assert not repo.manifests.exists(digest)
    assert not repo.backend.exists(manifest_key(digest))
    assert signature_objects(repo) == []
    assert repo.refs.resolve(ref) is None


def test_every_signature_of_one_commit_is_stored(open_repository: OpenRepository) -> None:
    repo = open_repository()
    manifest = stored_manifest(repo)
    digest = manifest_digest(manifest)
    signers = [new_signer() for _ in range(3)]
    repo.commit(manifest, signatures=[signer.sign(digest) for signer in signers])
    stored = repo.signatures.of(digest)
    assert sorted(s.key_id for s in stored) == sorted(signer.key_id for signer in signers)
    assert [s.key_id for s in stored] == sorted(s.key_id for s in stored)  # by key id


def test_a_bad_signature_on_an_existing_manifest_is_refused(
    open_repository: OpenRepository,
) -> None:
    repo = open_repository()
    manifest = stored_manifest(repo)
    digest = manifest_digest(manifest)
    repo.commit(manifest)
    forged = new_signer().sign(digest)
    forged.signature = bytes(64)
    with pytest.raises(InvalidArgument, match="does not verify"):
        repo.commit(manifest, signatures=[forged])
    assert repo.signatures.of(digest) == []


def test_required_policy_refuses_unsigned(open_repository: OpenRepository) -> None:
    repo = open_repository(SignaturePolicy(required=True))
    manifest = stored_manifest(repo)
    digest = manifest_digest(manifest)
    with pytest.raises(FailedPrecondition, match="requires manifests signed by an Ed25519 key"):
        repo.commit(manifest)
    assert not repo.manifests.exists(digest)

    signer = new_signer()  # without a trust list, any valid signature will do
    result, _ = repo.commit(manifest, signatures=[signer.sign(digest)])
    assert result.digest == digest and repo.manifests.exists(digest)
    assert [s.key_id for s in repo.signatures.of(digest)] == [signer.key_id]


def test_a_stored_signature_lets_the_manifest_be_committed_again_to_move_a_ref(
    open_repository: OpenRepository,
) -> None:
    repo = open_repository(SignaturePolicy(required=True))
    manifest = stored_manifest(repo)
    digest = manifest_digest(manifest)
    repo.commit(manifest, signatures=[new_signer().sign(digest)])
    _, previous = repo.commit(manifest, RefMove(RefName("team", "m"), None))
    assert previous is None and repo.refs.resolve(RefName("team", "m")) == digest


def test_trusted_policy_refuses_unknown_keys_and_accepts_trusted(
    open_repository: OpenRepository, tmp_path: Path
) -> None:
    private, _, trusted_id = generate_key_pair(tmp_path / "keys", "release")
    trusted = Signer.from_file(private)
    policy = SignaturePolicy(trusted=TrustedKeys.load(tmp_path / "keys"), required=True)
    repo = open_repository(policy)
    manifest = stored_manifest(repo)
    digest = manifest_digest(manifest)

    stranger = new_signer()
    with pytest.raises(PermissionDenied, match=stranger.key_id):
        repo.commit(manifest, signatures=[stranger.sign(digest)])
    with pytest.raises(PermissionDenied):  # a trusted signature does not vouch for another
        repo.commit(manifest, signatures=[trusted.sign(digest), stranger.sign(digest)])
    with pytest.raises(FailedPrecondition, match="signed by a trusted key"):
        repo.commit(manifest)
    assert not repo.manifests.exists(digest)
    assert signature_objects(repo) == []

    result, _ = repo.commit(manifest, signatures=[trusted.sign(digest)])
    assert result.digest == digest and not result.already_present
    assert [s.key_id for s in repo.signatures.of(digest)] == [trusted_id]


def test_trusted_policy_without_required_still_refuses_strangers(
    open_repository: OpenRepository,
) -> None:
    trusted, stranger = new_signer(), new_signer()
    repo = open_repository(SignaturePolicy(trusted=trusting(trusted)))
    manifest = stored_manifest(repo)
    digest = manifest_digest(manifest)
    with pytest.raises(PermissionDenied):
        repo.commit(manifest, signatures=[stranger.sign(digest)])
    assert repo.commit(manifest)[0].digest == digest  # unsigned is allowed


def test_recommitting_with_a_second_signer_adds_its_signature(
    open_repository: OpenRepository,
) -> None:
    repo = open_repository(SignaturePolicy(required=True))
    manifest = stored_manifest(repo)
    digest = manifest_digest(manifest)
    first, second = new_signer(), new_signer()
    assert not repo.commit(manifest, signatures=[first.sign(digest)])[0].already_present

    result, _ = repo.commit(manifest, signatures=[second.sign(digest)])
    assert result.already_present
    stored = repo.signatures.of(digest)
    assert sorted(s.key_id for s in stored) == sorted([first.key_id, second.key_id])
    assert all(check_signature(s, digest) for s in stored)

    repo.commit(manifest, signatures=[first.sign(digest)])  # re-signing adds nothing
    assert len(repo.signatures.of(digest)) == 2
    assert len(signature_objects(repo, digest)) == 2


def test_signatures_are_per_manifest(open_repository: OpenRepository) -> None:
    repo = open_repository()
    signer = new_signer()
    a, b = stored_manifest(repo), stored_manifest(repo)
    repo.commit(a, signatures=[signer.sign(manifest_digest(a))])
    repo.commit(b)
    assert len(repo.signatures.of(manifest_digest(a))) == 1
    assert repo.signatures.of(manifest_digest(b)) == []


def test_garbage_collection_sweeps_signatures_with_their_manifests(
    open_repository: OpenRepository,
) -> None:
    repo = open_repository()
    signer, cosigner = new_signer(), new_signer()
    live, dead = stored_manifest(repo), stored_manifest(repo)
    live_digest, dead_digest = manifest_digest(live), manifest_digest(dead)
    kept, temporary = RefName("ns", "kept"), RefName("ns", "temporary")
    repo.commit(live, RefMove(kept, None), signatures=[signer.sign(live_digest)])
    repo.commit(dead, RefMove(temporary, None), signatures=[signer.sign(dead_digest)])
    repo.commit(dead, signatures=[cosigner.sign(dead_digest)])
    assert len(signature_objects(repo, dead_digest)) == 2

    # Referenced: nothing goes.
    stats = repo.collect_garbage(grace_seconds=0, dry_run=False)
    assert stats.manifests_swept == 0
    assert len(signature_objects(repo)) == 3

    repo.refs.delete(temporary, dead_digest)
    young = repo.collect_garbage(grace_seconds=3600, dry_run=False)  # dead is young: kept
    assert young.manifests_swept == 0 and len(signature_objects(repo)) == 3
    dry = repo.collect_garbage(grace_seconds=0, dry_run=True)
    assert dry.manifests_swept == 1 and len(signature_objects(repo)) == 3

    swept = repo.collect_garbage(grace_seconds=0, dry_run=False)
    assert swept.manifests_swept == 1
    assert swept.bytes_freed == dry.bytes_freed
    assert not repo.manifests.exists(dead_digest)
    assert signature_objects(repo, dead_digest) == []
    assert signature_objects(repo) == [signature_key(live_digest, signer.key_id)]
    assert [s.key_id for s in repo.signatures.of(live_digest)] == [signer.key_id]


def test_garbage_collection_sweeps_a_signature_whose_manifest_is_gone(
    open_repository: OpenRepository,
) -> None:
    repo = open_repository()
    manifest = stored_manifest(repo)
    digest = manifest_digest(manifest)
    repo.commit(manifest, signatures=[new_signer().sign(digest)])
    repo.backend.delete(manifest_key(digest))  # as a crash between two deletes might leave it
    repo.collect_garbage(grace_seconds=0, dry_run=False)
    assert signature_objects(repo) == []
