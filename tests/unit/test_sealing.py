"""Client-side sealing: chunks sealed convergently under a data key (authenticated, so any
change is caught), and the data key wrapped under key-encryption keys that can be rotated
without touching a chunk."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import blake3
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from clients._generated.deltavault.common.v1 import common_pb2
from clients.key_files import KEY_BYTES, write_key_file
from clients.sealing import (
    NONCE_BYTES,
    OVERHEAD,
    SCHEME,
    TAG_BYTES,
    WRAP_ALGORITHM,
    ChunkSealer,
    SealingError,
    SealingKeys,
    data_key_id,
    kek_id,
    load_keyring,
    new_keyring,
    plain_size,
    rewrap,
    save_keyring,
    unwrap,
)
from store_svc.manifests import FORMAT_VERSION


def flipped(data: bytes | memoryview, bit: int) -> bytes:
    """``data`` with bit number ``bit`` (0 = the first byte's lowest) inverted."""
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.fixture
def data_key() -> bytes:
    return os.urandom(KEY_BYTES)


@pytest.fixture
def sealer(data_key: bytes) -> ChunkSealer:
    return ChunkSealer(data_key)


# --- chunks --------------------------------------------------------------------------------

SIZES = [0, 1, 15, 16, 17, 4096, (1 << 20) + 3]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_and_size(sealer: ChunkSealer, size: int) -> None:
    plain = os.urandom(size)
    sealed = sealer.seal(plain)
    assert len(sealed) == size + OVERHEAD == size + NONCE_BYTES + TAG_BYTES
    assert plain_size(len(sealed)) == size
    assert sealer.open(sealed) == plain
    assert sealer.open(bytes(sealed)) == plain
    if size:
        assert bytes(sealed[NONCE_BYTES:-TAG_BYTES]) != plain  # the body is not the plaintext


def test_sealed_bytes_follow_the_documented_scheme(data_key: bytes, sealer: ChunkSealer) -> None:
    """Rebuilt independently from the module docstring's scheme (keyed-BLAKE3 nonce,
    AES-256-GCM, scheme and data key id as associated data) and its key-derivation contexts:
    a change here changes the stored format, and chunks sealed before would not open."""

    def derived(context: str) -> bytes:
        return blake3.blake3(data_key, derive_key_context=f"deltavault {context}").digest()

    plain = os.urandom(1000)
    dk_id = "dk:" + derived("data key id v1")[:16].hex()
    nonce = blake3.blake3(plain, key=derived("chunk nonce key v1")).digest(length=NONCE_BYTES)
    associated = f"aes-256-gcm-convergent/v1\n{dk_id}".encode()
    body = AESGCM(derived("chunk encryption key v1")).encrypt(nonce, plain, associated)
    assert sealer.data_key_id == dk_id
    assert bytes(sealer.seal(plain)) == nonce + body
    # The associated data binds the scheme and the data key id: without it, nothing opens.
    unbound = AESGCM(derived("chunk encryption key v1")).encrypt(nonce, plain, None)
    with pytest.raises(SealingError, match="does not authenticate"):
        sealer.open(nonce + unbound)


def test_seals_any_byte_buffer_the_same(sealer: ChunkSealer) -> None:
    plain = os.urandom(1000)
    whole = bytes(sealer.seal(plain))
    assert bytes(sealer.seal(memoryview(bytearray(plain)))) == whole
    assert bytes(sealer.seal(memoryview(plain))) == whole
    # A slice of a larger buffer, as ``StoreClient.upload`` passes its chunks.
    framed = b"head" + plain + b"tail"
    assert bytes(sealer.seal(memoryview(framed)[4:-4])) == whole


def test_convergent_under_one_data_key(data_key: bytes) -> None:
    plain = os.urandom(4096)
    first = bytes(ChunkSealer(data_key).seal(plain))
    assert bytes(ChunkSealer(data_key).seal(plain)) == first  # another sealer, same key
    assert bytes(ChunkSealer(data_key).seal(bytes(plain))) == first


def test_different_data_keys_seal_differently(data_key: bytes) -> None:
    plain = os.urandom(4096)
    mine = bytes(ChunkSealer(data_key).seal(plain))
    theirs = bytes(ChunkSealer(os.urandom(KEY_BYTES)).seal(plain))
    assert mine != theirs
    assert mine[:NONCE_BYTES] != theirs[:NONCE_BYTES]
    assert mine[NONCE_BYTES:] != theirs[NONCE_BYTES:]


def test_different_plaintexts_get_different_nonces(sealer: ChunkSealer) -> None:
    base = os.urandom(256)
    plaintexts = [base] + [flipped(base, bit) for bit in range(0, 256 * 8, 7)]
    plaintexts += [os.urandom(256) for _ in range(100)] + [b"", b"\x00", b"\x00\x00"]
    nonces = {bytes(sealer.seal(plain)[:NONCE_BYTES]) for plain in plaintexts}
    assert len(nonces) == len(plaintexts)


def test_every_flipped_bit_fails_to_authenticate(sealer: ChunkSealer) -> None:
    sealed = bytes(sealer.seal(os.urandom(40)))
    assert len(sealed) == 40 + OVERHEAD
    for bit in range(len(sealed) * 8):  # nonce, body and tag alike
        with pytest.raises(SealingError, match="does not authenticate"):
            sealer.open(flipped(sealed, bit))


@pytest.mark.parametrize(
    "where",
    [
        "nonce-first",
        "nonce-last",
        "body-first",
        "body-middle",
        "body-last",
        "tag-first",
        "tag-last",
    ],
)
def test_a_flipped_bit_in_a_large_chunk_fails(sealer: ChunkSealer, where: str) -> None:
    size = 1 << 20
    sealed = bytes(sealer.seal(os.urandom(size)))
    byte = {
        "nonce-first": 0,
        "nonce-last": NONCE_BYTES - 1,
        "body-first": NONCE_BYTES,
        "body-middle": NONCE_BYTES + size // 2,
        "body-last": NONCE_BYTES + size - 1,
        "tag-first": NONCE_BYTES + size,
        "tag-last": len(sealed) - 1,
    }[where]
    with pytest.raises(SealingError, match="does not authenticate") as caught:
        sealer.open(flipped(sealed, byte * 8 + 5), "chunk blake3:abc")
    assert "chunk blake3:abc" in str(caught.value)
    assert sealer.data_key_id in str(caught.value)


def test_truncated_or_extended_chunk_fails(sealer: ChunkSealer) -> None:
    sealed = bytes(sealer.seal(os.urandom(100)))
    for damaged in (sealed[:-1], sealed[1:], sealed + b"\x00", b"\x00" + sealed):
        with pytest.raises(SealingError, match="does not authenticate"):
            sealer.open(damaged)


def test_another_data_key_cannot_open(sealer: ChunkSealer) -> None:
    sealed = sealer.seal(os.urandom(1000))
    other = ChunkSealer(os.urandom(KEY_BYTES))
    with pytest.raises(SealingError, match="does not authenticate") as caught:
        other.open(sealed)
    assert other.data_key_id in str(caught.value)


@pytest.mark.parametrize("length", [0, 1, NONCE_BYTES, OVERHEAD - 1])
def test_too_short_to_be_sealed(sealer: ChunkSealer, length: int) -> None:
    with pytest.raises(SealingError, match=f"chunk X is {length} bytes: too short"):
        sealer.open(os.urandom(length), "chunk X")


def test_overhead_sized_garbage_is_checked_not_taken_as_empty(sealer: ChunkSealer) -> None:
    assert sealer.open(sealer.seal(b"")) == b""
    with pytest.raises(SealingError, match="does not authenticate"):
        sealer.open(os.urandom(OVERHEAD))


def test_no_window_of_the_plaintext_or_the_key_appears_in_the_sealed_bytes(
    data_key: bytes,
) -> None:
    window = 32
    sealer = ChunkSealer(data_key)
    for plain in (os.urandom(16 << 10), bytes(16 << 10), b"A" * (16 << 10)):
        sealed = bytes(sealer.seal(plain))
        sealed_windows = {sealed[i : i + window] for i in range(len(sealed) - window + 1)}
        plain_windows = {plain[i : i + window] for i in range(len(plain) - window + 1)}
        assert not plain_windows & sealed_windows
        assert data_key not in sealed


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_a_data_key_is_32_bytes(length: int) -> None:
    with pytest.raises(SealingError, match=f"not {length}"):
        ChunkSealer(os.urandom(length))


# --- key ids -------------------------------------------------------------------------------


def test_key_ids_are_stable_distinct_and_reveal_no_key() -> None:
    key = os.urandom(KEY_BYTES)
    assert kek_id(key) == kek_id(key) and data_key_id(key) == data_key_id(key)
    assert kek_id(key).startswith("kek:") and data_key_id(key).startswith("dk:")
    # One key used both ways gets unrelated names (the derivation contexts differ).
    assert kek_id(key)[4:] != data_key_id(key)[3:]
    assert kek_id(key) != kek_id(os.urandom(KEY_BYTES))
    for name in (kek_id(key), data_key_id(key)):
        assert key.hex()[:8] not in name
    assert ChunkSealer(key).data_key_id == data_key_id(key)


# --- keyrings and wrappings ----------------------------------------------------------------


def test_new_keyring_wraps_a_fresh_data_key() -> None:
    kek = os.urandom(KEY_BYTES)
    record, key = new_keyring(kek)
    assert len(key) == KEY_BYTES
    assert record.scheme == SCHEME
    assert record.data_key_id == data_key_id(key)
    [wrapped] = record.wrapped_keys
    assert (wrapped.kek_id, wrapped.algorithm) == (kek_id(kek), WRAP_ALGORITHM)
    assert key not in wrapped.wrapped
    assert unwrap(record, [kek]) == key
    assert unwrap(record, [os.urandom(KEY_BYTES), kek]) == key  # whichever KEK fits
    assert new_keyring(kek)[1] != key  # every keyring a new data key


def test_unwrap_with_the_wrong_kek_names_wanted_and_given() -> None:
    kek, wrong = os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)
    record, _ = new_keyring(kek)
    with pytest.raises(SealingError, match="is wrapped for KEK") as caught:
        unwrap(record, [wrong])
    message = str(caught.value)
    assert record.data_key_id in message
    wanted, _, given = message.partition("given")
    assert kek_id(kek) in wanted and kek_id(wrong) not in wanted
    assert kek_id(wrong) in given and kek_id(kek) not in given
    assert kek.hex() not in message and wrong.hex() not in message
    with pytest.raises(SealingError, match="given are none"):
        unwrap(record, [])


def test_unwrap_names_every_kek_a_rotated_keyring_wants() -> None:
    old, new, stranger = (os.urandom(KEY_BYTES) for _ in range(3))
    record = rewrap(new_keyring(old)[0], [old], new, keep_old=True)
    with pytest.raises(SealingError) as caught:
        unwrap(record, [stranger])
    assert f"{kek_id(old)}, {kek_id(new)}" in str(caught.value)


def test_a_damaged_wrapping_is_reported() -> None:
    kek = os.urandom(KEY_BYTES)
    record, _ = new_keyring(kek)
    wrapped = record.wrapped_keys[0].wrapped
    for damaged in (flipped(wrapped, 0), flipped(wrapped, len(wrapped) * 8 - 1), wrapped[:-8]):
        record.wrapped_keys[0].wrapped = damaged
        with pytest.raises(SealingError, match=f"wrapping under {kek_id(kek)} is damaged"):
            unwrap(record, [kek])


def test_a_damaged_old_wrapping_does_not_hide_a_good_new_one() -> None:
    old, new = os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)
    first, data_key = new_keyring(old)
    record = rewrap(first, [old], new, keep_old=True)
    record.wrapped_keys[0].wrapped = flipped(record.wrapped_keys[0].wrapped, 3)
    assert unwrap(record, [old, new]) == data_key
    with pytest.raises(SealingError, match="is damaged"):
        unwrap(record, [old])


def test_a_wrapping_of_another_data_key_is_refused() -> None:
    kek = os.urandom(KEY_BYTES)
    record, _ = new_keyring(kek)
    other, _ = new_keyring(kek)
    record.wrapped_keys[0].wrapped = other.wrapped_keys[0].wrapped  # intact, wrong key
    wrong = f"data key {record.data_key_id}: .* is another data key"
    with pytest.raises(SealingError, match=wrong):
        unwrap(record, [kek])


def test_unknown_scheme_or_wrap_algorithm_is_not_opened() -> None:
    kek = os.urandom(KEY_BYTES)
    record, _ = new_keyring(kek)
    record.scheme = "rot13/v0"
    with pytest.raises(SealingError, match="unknown sealing scheme 'rot13/v0'"):
        unwrap(record, [kek])
    record, _ = new_keyring(kek)
    record.wrapped_keys[0].algorithm = "des-kw"
    with pytest.raises(SealingError, match="is wrapped for KEK"):
        unwrap(record, [kek])


def test_rewrap_without_keep_old_leaves_only_the_new_kek() -> None:
    old, new = os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)
    record, key = new_keyring(old)
    sealed = ChunkSealer(key).seal(b"sealed before the rotation")
    before = record.SerializeToString(deterministic=True)

    rotated = rewrap(record, [old], new, keep_old=False)
    assert record.SerializeToString(deterministic=True) == before  # the input is untouched
    assert [w.kek_id for w in rotated.wrapped_keys] == [kek_id(new)]
    assert (rotated.scheme, rotated.data_key_id) == (record.scheme, record.data_key_id)
    assert unwrap(rotated, [new]) == key
    with pytest.raises(SealingError, match="is wrapped for KEK"):
        unwrap(rotated, [old])
    # Chunks are not re-sealed: what was sealed before opens with the rotated record's key.
    assert ChunkSealer(unwrap(rotated, [new])).open(sealed) == b"sealed before the rotation"


def test_rewrap_keeping_old_lets_both_open() -> None:
    old, new = os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)
    record, key = new_keyring(old)
    rotated = rewrap(record, [old], new, keep_old=True)
    assert sorted(w.kek_id for w in rotated.wrapped_keys) == sorted([kek_id(old), kek_id(new)])
    assert rotated.data_key_id == record.data_key_id == data_key_id(key)
    assert unwrap(rotated, [old]) == key
    assert unwrap(rotated, [new]) == key
    # Wrapping again for a KEK already there replaces that wrapping, never doubles it.
    again = rewrap(rotated, [new], new, keep_old=True)
    assert sorted(w.kek_id for w in again.wrapped_keys) == sorted([kek_id(old), kek_id(new)])
    assert unwrap(again, [old]) == unwrap(again, [new]) == key


def test_rewrap_needs_a_kek_that_opens_the_record() -> None:
    old, new = os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)
    record, _ = new_keyring(old)
    with pytest.raises(SealingError, match="is wrapped for KEK"):
        rewrap(record, [new], new, keep_old=False)


# --- keyring files -------------------------------------------------------------------------


def test_keyring_file_round_trips_and_holds_no_key(tmp_path: Path) -> None:
    kek = os.urandom(KEY_BYTES)
    record, key = new_keyring(kek)
    path = tmp_path / "keyring.json"
    save_keyring(path, record, replace=False)
    loaded = load_keyring(path)
    assert loaded == record
    assert unwrap(loaded, [kek]) == key
    text = path.read_text()
    for secret in (key, kek):
        assert secret.hex() not in text
        assert base64.b64encode(secret).decode() not in text
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away


def test_save_keyring_refuses_to_replace_unless_asked(tmp_path: Path) -> None:
    old, new = os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)
    record, key = new_keyring(old)
    path = tmp_path / "keyring.json"
    save_keyring(str(path), record, replace=False)
    saved = path.read_bytes()
    rotated = rewrap(record, [old], new, keep_old=False)
    with pytest.raises(SealingError, match="exists: pass replace"):
        save_keyring(path, rotated, replace=False)
    assert path.read_bytes() == saved

    save_keyring(path, rotated, replace=True)
    assert load_keyring(path) == rotated
    assert unwrap(load_keyring(path), [new]) == key


MALFORMED_KEYRINGS: list[tuple[str, str]] = [
    ("empty", ""),
    ("not-json", "scheme = aes\n"),
    ("json-number", "3"),
    ("json-list", "[]"),
    ("unknown-field", '{"scheme": "aes-256-gcm-convergent/v1", "colour": "blue"}'),
    ("empty-object", "{}"),
    ("no-wrapped-keys", '{"scheme": "aes-256-gcm-convergent/v1", "dataKeyId": "dk:00"}'),
    ("other-scheme", '{"scheme": "rot13/v0", "wrappedKeys": [{"kekId": "kek:00"}]}'),
]


@pytest.mark.parametrize(
    "text", [t for _, t in MALFORMED_KEYRINGS], ids=[n for n, _ in MALFORMED_KEYRINGS]
)
def test_load_keyring_rejects_a_malformed_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keyring.json"
    path.write_text(text)
    with pytest.raises(SealingError, match="keyring") as caught:
        load_keyring(path)
    assert str(path) in str(caught.value)


def test_load_keyring_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SealingError, match="cannot read keyring"):
        load_keyring(tmp_path / "absent.json")


def test_load_keyring_rejects_a_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(b"\xff\xfe\x00\x01 not text")
    with pytest.raises(SealingError, match="keyring") as caught:
        load_keyring(path)
    assert str(path) in str(caught.value)


# --- what a client holds -------------------------------------------------------------------


def sealed_manifest(sealing: common_pb2.ChunkSealing | None) -> common_pb2.Manifest:
    manifest = common_pb2.Manifest(format_version=FORMAT_VERSION)
    if sealing is not None:
        manifest.sealing.CopyFrom(sealing)
    return manifest


def test_for_writing_needs_a_keyring() -> None:
    with pytest.raises(SealingError, match="needs a keyring"):
        SealingKeys([os.urandom(KEY_BYTES)]).for_writing()


def test_for_writing_opens_the_keyring() -> None:
    kek = os.urandom(KEY_BYTES)
    record, key = new_keyring(kek)
    assert SealingKeys([kek], record).for_writing() == (record, key)
    with pytest.raises(SealingError, match="is wrapped for KEK"):
        SealingKeys([os.urandom(KEY_BYTES)], record).for_writing()


def test_from_files_reads_keks_and_keyring(tmp_path: Path) -> None:
    kek = write_key_file(tmp_path / "kek")
    other = write_key_file(tmp_path / "other-kek")
    record, key = new_keyring(kek)
    save_keyring(tmp_path / "keyring.json", record, replace=False)
    keys = SealingKeys.from_files(
        [tmp_path / "other-kek", tmp_path / "kek"], tmp_path / "keyring.json"
    )
    assert list(keys.keks) == [other, kek]
    assert keys.for_writing() == (record, key)
    assert SealingKeys.from_files([tmp_path / "kek"]).keyring is None


def test_sealer_for_an_unsealed_manifest_is_none() -> None:
    keys = SealingKeys([os.urandom(KEY_BYTES)])
    assert keys.sealer_for(sealed_manifest(None)) is None


def test_sealer_for_a_sealed_manifest_opens_its_chunks() -> None:
    kek = os.urandom(KEY_BYTES)
    record, key = new_keyring(kek)
    sealed = ChunkSealer(key).seal(b"a chunk of a sealed manifest")
    sealer = SealingKeys([kek]).sealer_for(sealed_manifest(record))  # no keyring needed to read
    assert sealer is not None
    assert sealer.data_key_id == record.data_key_id
    assert sealer.open(sealed) == b"a chunk of a sealed manifest"
    with pytest.raises(SealingError, match="is wrapped for KEK"):
        SealingKeys([os.urandom(KEY_BYTES)]).sealer_for(sealed_manifest(record))
