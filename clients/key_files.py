"""Symmetric key files: one 256-bit key per file, as a person or a Kubernetes Secret holds it.

A key file holds exactly 32 bytes, either raw or as text: 64 hex digits or standard
base64, with optional surrounding whitespace (a Secret's value mounted as a file is raw
bytes; one pasted by hand is usually hex or base64). :func:`write_key_file` writes hex,
readable only by its owner. The same format serves the store's server-side encryption key
(SSE-C, ``store_svc``) and the SDK's key-encryption keys (``clients.sealing``).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

KEY_BYTES = 32


class KeyFileError(ValueError):
    """A key file that is absent, unreadable, or not one 256-bit key."""


def parse_key(content: bytes, source: str = "key") -> bytes:
    """The 32-byte key ``content`` holds: raw, hex or base64 (see the module docstring)."""
    if len(content) == KEY_BYTES:
        return content
    text = content.strip()
    for decode in (bytes.fromhex, _strict_base64):
        try:
            key = decode(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError, binascii.Error):
            continue
        if len(key) == KEY_BYTES:
            return key
    raise KeyFileError(
        f"{source} is not a 256-bit key: want 32 raw bytes, 64 hex digits or base64 of 32 bytes "
        f"(it holds {len(content)} bytes)"
    )


def read_key_file(path: Path | str) -> bytes:
    """The key in ``path``; ``KeyFileError`` naming the file if it is absent or malformed."""
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    return parse_key(content, f"key file {path}")


def write_key_file(path: Path | str, key: bytes | None = None) -> bytes:
    """Write ``key`` (default: a fresh random one) to ``path`` as hex, mode 0600, refusing
    to overwrite an existing file; returns the key."""
    key = secrets.token_bytes(KEY_BYTES) if key is None else parse_key(key)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists: a key file is never overwritten") from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key.hex() + "\n")
    return key


def _strict_base64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
