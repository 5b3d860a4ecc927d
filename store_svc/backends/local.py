"""The local backend: objects as files under one folder; the embedded default.

A write goes to a temporary file in the destination folder, is fsynced, and is published
with ``link(2)``, which fails if the name exists: create-if-absent is atomic, and a reader
never sees a partial object. Temporary files (``.tmp-*``) left by a crash are invisible
and swept at start-up once they are an hour old.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from store_svc.backends.base import BackendError, ObjectInfo, ObjectNotFound, check_key

_TEMP_PREFIX = ".tmp-"
_STALE_TEMP_SECONDS = 3600.0


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
        if path.exists():
            return False
        temp = path.parent / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temp, path)
            except FileExistsError:
                return False
            _fsync_dir(path.parent)
            return True
        except OSError as exc:  # incl. a key that is also a folder (``a/b`` and ``a/b/c``)
            raise BackendError(f"cannot write {key!r}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise BackendError(f"cannot read {key!r}: {exc}") from exc

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        if not path.is_file():
            raise ObjectNotFound(key)
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Walk only the folders that can hold keys starting with ``prefix``."""
        folder = prefix.rpartition("/")[0]
        yield from self._walk(self._root / folder, f"{folder}/" if folder else "", prefix)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def close(self) -> None:
        """Nothing to release: files are opened per call."""

    def _walk(self, folder: Path, key_prefix: str, prefix: str) -> Iterator[ObjectInfo]:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            key = key_prefix + entry.name
            if entry.name.startswith(_TEMP_PREFIX):
                continue
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

    def _sweep_stale_temps(self) -> None:
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for temp in self._root.rglob(f"{_TEMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if temp.stat().st_mtime < cutoff:
                    temp.unlink()


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
