"""The local backend: objects as files under one folder; the embedded default.

A write goes to a temporary file in the destination folder, is fsynced, and is published
with ``link(2)``, which fails if the name exists: create-if-absent is atomic, and a reader
never sees a partial object. Every folder the write creates is fsynced into its parent, so
an object reported created survives a power loss. Temporary files (``.tmp-*``) left by a
crash are invisible and swept at start-up once they are an hour old.

A key cannot be both an object and a folder of other objects (``a/b`` and ``a/b/c``):
writing the second raises ``BackendError``. The store's key layout never does that.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from store_svc.backends.base import BackendError, ObjectInfo, ObjectNotFound, check_key

_TEMP_PREFIX = ".tmp-"
_STALE_TEMP_SECONDS = 3600.0
# A path component that is a file, or a missing one: either way no object is there.
_ABSENT_ERRORS = (FileNotFoundError, NotADirectoryError)


class LocalBackend:
    def __init__(self, root: Path) -> None:
        self._root = Path(root).resolve()
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create store folder {self._root}: {exc}") from exc
        self._sweep_stale_temps()

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        if self._lstat(key, path) is not None:  # cheap early answer; link() decides races
            return False
        try:
            _make_folders(path.parent)
            temp = path.parent / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
            with open(temp, "xb") as handle:
                try:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                    os.link(temp, path)
                except FileExistsError:
                    self._require_object(key, path)
                    return False
                finally:
                    temp.unlink()
            _fsync_folder(path.parent)
        except OSError as exc:
            raise BackendError(f"cannot write {key!r}: {exc}") from exc
        return True

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (*_ABSENT_ERRORS, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise BackendError(f"cannot read {key!r}: {exc}") from exc

    def stat(self, key: str) -> ObjectInfo:
        st = self._lstat(key, self._path(key))
        if st is None:
            raise ObjectNotFound(key)
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def exists(self, key: str) -> bool:
        return self._lstat(key, self._path(key)) is not None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects under ``prefix``, in byte order of their keys (more than the protocol
        promises), reading only the folders that can hold such keys."""
        folder = prefix.rpartition("/")[0]
        if folder:
            try:
                check_key(folder)
            except ValueError:  # no valid key starts with this prefix (and no escaping root)
                return
        yield from self._walk(self._root / folder, f"{folder}/" if folder else "", prefix)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (*_ABSENT_ERRORS, IsADirectoryError):  # a folder is not an object: absent
            return
        except OSError as exc:
            raise BackendError(f"cannot delete {key!r}: {exc}") from exc

    def close(self) -> None:
        """Nothing to release: files are opened per call."""

    def _walk(self, folder: Path, key_prefix: str, prefix: str) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(folder) as scan:
                entries = [entry for entry in scan if not entry.name.startswith(_TEMP_PREFIX)]
        except _ABSENT_ERRORS:
            return
        except OSError as exc:
            raise BackendError(f"cannot list {folder}: {exc}") from exc
        entries.sort(key=_sort_name)
        for entry in entries:
            key = key_prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                below = key + "/"
                if below.startswith(prefix) or prefix.startswith(below):
                    yield from self._walk(Path(entry.path), below, prefix)
            elif key.startswith(prefix):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # deleted since the scan: not listed
                    continue
                yield ObjectInfo(key, st.st_size, st.st_mtime)

    def _path(self, key: str) -> Path:
        if any(part.startswith(_TEMP_PREFIX) for part in check_key(key).split("/")):
            raise ValueError(f"invalid object key {key!r}: {_TEMP_PREFIX}* names are reserved")
        return self._root / key

    @staticmethod
    def _lstat(key: str, path: Path) -> os.stat_result | None:
        """The object's file status, or None if no object (a folder is none) is there."""
        try:
            st = path.lstat()
        except _ABSENT_ERRORS:
            return None
        except OSError as exc:
            raise BackendError(f"cannot stat {key!r}: {exc}") from exc
        return st if stat.S_ISREG(st.st_mode) else None

    @staticmethod
    def _require_object(key: str, path: Path) -> None:
        """After link() found the name taken: an object, or a folder standing in the way."""
        if not path.is_file():
            raise BackendError(f"cannot write {key!r}: a folder of other objects has its name")

    def _sweep_stale_temps(self) -> None:
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for temp in self._root.rglob(f"{_TEMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if temp.lstat().st_mtime < cutoff:
                    temp.unlink()


def _make_folders(folder: Path) -> None:
    """Create ``folder`` and missing parents, each fsynced into its parent."""
    if folder.is_dir():
        return
    _make_folders(folder.parent)
    with contextlib.suppress(FileExistsError):  # made by a racing writer, or a file
        folder.mkdir()
    # Also when a racing writer made it: this write must not return before it is durable.
    _fsync_folder(folder.parent)


def _sort_name(entry: os.DirEntry[str]) -> str:
    """A folder sorts as its name plus ``/``: the keys below it then fall exactly where
    byte order of whole keys puts them (``a-b`` < ``a/x`` < ``a0``)."""
    return entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
