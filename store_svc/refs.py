"""Refs: mutable names (``namespace/name``) pointing at manifest digests.

Backends offer only write-once objects, and that is enough for compare-and-swap. Each ref
is a log of numbered versions, ``refs/<namespace>/<name>/<20-digit seq>``, each holding a
target digest or a tombstone. Updating a ref writes version ``latest + 1`` with
``put_if_absent``: of two racing writers that read the same latest version, exactly one
creates the next one and the other gets ``RefConflict``. Older versions are deleted after
a successful write; tombstones are kept, so a ref's sequence never restarts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

from store_svc.backends.base import Backend, BackendError, ObjectNotFound
from store_svc.digest import Digest
from store_svc.errors import InvalidArgument, NotFound, RefConflict, Unavailable

log = logging.getLogger(__name__)

REF_PREFIX = "refs/"
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
# Both are matched with fullmatch: "$" would also match before a final newline, and let
# "ns/name\n" stand for the ref "ns/name".
_REF_PATTERN = re.compile(rf"({_SEGMENT})/({_SEGMENT})")
# A prefix of a ref name: "", part of a namespace, "namespace/", or "namespace/" + part of a name.
_REF_PREFIX_PATTERN = re.compile(rf"({_SEGMENT}(/([A-Za-z0-9._-]{{0,128}}))?)?")
_SEQ_DIGITS = 20
_TOMBSTONE = b"deleted\n"
_MAX_READ_RETRIES = 8


@dataclass(frozen=True, order=True)
class RefName:
    """A validated ref name: ``namespace/name``, each segment ``[A-Za-z0-9][A-Za-z0-9._-]*``."""

    namespace: str
    name: str

    @classmethod
    def parse(cls, text: str) -> RefName:
        match = _REF_PATTERN.fullmatch(text)
        if not match:
            raise InvalidArgument(
                f"ref {text!r} must be 'namespace/name', each part 1-128 characters of "
                "letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return cls(match.group(1), match.group(2))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def key_prefix(self) -> str:
        return f"{REF_PREFIX}{self.namespace}/{self.name}/"


@dataclass(frozen=True)
class _Version:
    seq: int
    target: Digest | None  # None: tombstone


class RefStore:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def resolve(self, ref: RefName) -> Digest | None:
        """The ref's target, or None if it does not exist."""
        latest = self._latest(ref)
        return latest.target if latest else None

    def update(
        self, ref: RefName, target: Digest, expected: Digest | None, *, force: bool = False
    ) -> Digest | None:
        """Point ``ref`` at ``target`` if it points at ``expected`` (None: absent).

        With ``force`` the current target is ignored. Returns the previous target.
        Raises ``RefConflict`` when the ref moved.
        """
        return self._write(ref, target, expected, force=force)

    def delete(self, ref: RefName, expected: Digest | None) -> Digest:
        """Remove ``ref`` (if ``expected`` is given, only while it points there).

        Returns the previous target. ``NotFound`` if it is absent and nothing was expected,
        ``RefConflict`` if it does not point at ``expected``.
        """
        current = self.resolve(ref)
        if current is None and expected is None:
            raise NotFound(f"no ref {ref}")
        if current is None or (expected is not None and current != expected):
            raise RefConflict(str(ref), expected, current)
        previous = self._write(ref, None, current, force=False)
        assert previous is not None  # guaranteed by the compare-and-swap above
        return previous

    def list(
        self, prefix: str = "", start_after: RefName | None = None
    ) -> Iterator[tuple[RefName, Digest]]:
        """Live refs whose ``namespace/name`` starts with ``prefix``, sorted by name, each
        after ``start_after``. Targets are read lazily, as the caller iterates."""
        if not _REF_PREFIX_PATTERN.fullmatch(prefix):
            raise InvalidArgument(f"ref prefix {prefix!r} is not a valid ref prefix")
        newest: dict[RefName, int] = {}
        for info in self._backend.list(REF_PREFIX + prefix):
            ref, seq = _parse_version_key(info.key)
            if (start_after is None or ref > start_after) and seq > newest.get(ref, -1):
                newest[ref] = seq
        for ref in sorted(newest):
            target = self._read_version(ref, newest[ref])
            if target is not None:
                yield ref, target

    def all_targets(self) -> Iterator[Digest]:
        """Targets of every live ref: the roots of garbage collection."""
        for _, target in self.list():
            yield target

    def _read_version(self, ref: RefName, seq: int) -> Digest | None:
        try:
            return _parse_target(self._backend.get(_version_key(ref, seq)))
        except ObjectNotFound:  # superseded and compacted meanwhile: read it afresh
            return self.resolve(ref)

    def _write(
        self, ref: RefName, target: Digest | None, expected: Digest | None, *, force: bool
    ) -> Digest | None:
        while True:
            latest = self._latest(ref)
            current = latest.target if latest else None
            if not force and current != expected:
                raise RefConflict(str(ref), expected, current)
            seq = latest.seq + 1 if latest else 0
            body = _TOMBSTONE if target is None else f"{target}\n".encode()
            if self._backend.put_if_absent(_version_key(ref, seq), body):
                try:
                    self._compact(ref, seq)
                except BackendError as exc:  # the move happened; leftovers are harmless
                    log.warning("ref %s moved, older versions not yet deleted: %s", ref, exc)
                return current
            if not force:  # another writer created this version first
                raise RefConflict(str(ref), expected, self.resolve(ref))

    def _latest(self, ref: RefName) -> _Version | None:
        for _ in range(_MAX_READ_RETRIES):
            seqs = [_parse_version_key(info.key)[1] for info in self._backend.list(ref.key_prefix)]
            if not seqs:
                return None
            try:
                body = self._backend.get(_version_key(ref, max(seqs)))
            except ObjectNotFound:  # compacted between list and get: list again
                continue
            return _Version(max(seqs), _parse_target(body))
        raise Unavailable(f"ref {ref} kept changing while being read; retry")

    def _compact(self, ref: RefName, newest: int) -> None:
        for info in self._backend.list(ref.key_prefix):
            if _parse_version_key(info.key)[1] < newest:
                self._backend.delete(info.key)


def _version_key(ref: RefName, seq: int) -> str:
    return f"{ref.key_prefix}{seq:0{_SEQ_DIGITS}d}"


def _parse_version_key(key: str) -> tuple[RefName, int]:
    _, namespace, name, seq = key.split("/")
    return RefName(namespace, name), int(seq)


def _parse_target(body: bytes) -> Digest | None:
    if body == _TOMBSTONE:
        return None
    return Digest.parse(body.decode().strip())
