"""Key files: one 256-bit key as raw bytes, hex or base64; malformed ones rejected naming the
file; new ones written as hex, owner-only, never over an existing file."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from clients.key_files import KEY_BYTES, KeyFileError, parse_key, read_key_file, write_key_file

KEY = bytes(range(1, KEY_BYTES + 1))
"""A key no encoding could mistake for another: no zero, no repeated byte."""

ENCODINGS: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("raw", lambda key: key),
    ("hex", lambda key: key.hex().encode()),
    ("hex-upper", lambda key: key.hex().upper().encode()),
    ("base64", base64.b64encode),
    ("hex-newline", lambda key: key.hex().encode() + b"\n"),
    ("hex-padded", lambda key: b"  \t" + key.hex().encode() + b"\r\n\n"),
    ("base64-newline", lambda key: base64.b64encode(key) + b"\n"),
    ("base64-padded", lambda key: b"\n " + base64.b64encode(key) + b" \n"),
]


@pytest.mark.parametrize("encode", [e for _, e in ENCODINGS], ids=[n for n, _ in ENCODINGS])
def test_reads_each_encoding(tmp_path: Path, encode: Callable[[bytes], bytes]) -> None:
    path = tmp_path / "kek"
    path.write_bytes(encode(KEY))
    assert read_key_file(path) == KEY
    assert read_key_file(str(path)) == KEY
    assert parse_key(encode(KEY)) == KEY


def test_raw_key_of_whitespace_like_bytes_is_taken_as_is() -> None:
    # 32 bytes are a raw key even when they would strip or decode to something else.
    raw = b" " + bytes(range(0x30, 0x30 + KEY_BYTES - 2)) + b"\n"
    assert len(raw) == KEY_BYTES
    assert parse_key(raw) == raw


BAD_CONTENTS: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("whitespace", b" \n\t "),
    ("raw-31", bytes(31)),
    ("raw-33", bytes(33)),
    ("raw-with-newline", KEY + b"\n"),
    ("hex-62", KEY[:-1].hex().encode()),
    ("hex-66", (KEY + b"\x01").hex().encode()),
    ("hex-odd", KEY.hex().encode()[:-1]),
    ("hex-0x", b"0x" + KEY.hex().encode()),
    ("hex-not-digit", KEY.hex().encode()[:-1] + b"g"),
    ("base64-16", base64.b64encode(KEY[:16])),
    ("base64-24-newline", base64.b64encode(KEY[:24]) + b"\n"),
    ("base64-33", base64.b64encode(KEY + b"\x01")),
    ("base64-unpadded", base64.b64encode(KEY).rstrip(b"=")),
    ("base64-urlsafe-chars", base64.b64encode(KEY)[:-2] + b"-_"),
    ("binary-garbage", b"\xff\xfe" + bytes(range(200))),
    ("text", b"this is not a key, it is a sentence about keys\n"),
]


@pytest.mark.parametrize("content", [c for _, c in BAD_CONTENTS], ids=[n for n, _ in BAD_CONTENTS])
def test_rejects_what_is_not_one_key_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match="not a 256-bit key") as caught:
        read_key_file(path)
    assert str(path) in str(caught.value)
    assert f"holds {len(content)} bytes" in str(caught.value)


def test_parse_key_names_its_source() -> None:
    with pytest.raises(KeyFileError, match=r"^the SSE-C key is not a 256-bit key"):
        parse_key(b"short", "the SSE-C key")


def test_missing_or_unreadable_file_is_a_key_file_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.key"
    with pytest.raises(KeyFileError, match="cannot read key file") as caught:
        read_key_file(missing)
    assert str(missing) in str(caught.value)
    with pytest.raises(KeyFileError, match="cannot read key file"):
        read_key_file(tmp_path)  # a folder


def test_write_key_file_is_owner_only_hex_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    key = write_key_file(path)
    assert len(key) == KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.hex() + "\n"
    assert read_key_file(path) == key
    # Fresh keys are random: a second one differs.
    assert write_key_file(tmp_path / "other.key") != key


@pytest.mark.parametrize("encode", [e for _, e in ENCODINGS], ids=[n for n, _ in ENCODINGS])
def test_write_key_file_takes_a_given_key_in_any_encoding(
    tmp_path: Path, encode: Callable[[bytes], bytes]
) -> None:
    path = tmp_path / "given.key"
    assert write_key_file(path, encode(KEY)) == KEY
    assert read_key_file(path) == KEY
    assert path.read_text() == KEY.hex() + "\n"


def test_write_key_file_mode_ignores_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        path = tmp_path / "umask.key"
        write_key_file(path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_key_file_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "kept.key"
    original = write_key_file(path)
    with pytest.raises(KeyFileError, match="exists") as caught:
        write_key_file(path)
    assert str(path) in str(caught.value)
    with pytest.raises(KeyFileError, match="exists"):
        write_key_file(path, KEY)
    assert read_key_file(path) == original

    other = tmp_path / "not-a-key.txt"
    other.write_text("someone's notes\n")
    with pytest.raises(KeyFileError, match="exists"):
        write_key_file(other)
    assert other.read_text() == "someone's notes\n"


def test_write_key_file_refuses_a_malformed_key_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "never.key"
    with pytest.raises(KeyFileError, match="not a 256-bit key"):
        write_key_file(path, b"too short")
    assert not path.exists()
