"""Side files (config, tokenizer, shard index) kept in the store beside a manifest's tensors.

A delta's manifest names the fine-tune's side files, so a rebuilt checkpoint carries the
fine-tune's config (its labels, its generation settings) rather than the base's; a
registered base's names the base's, so it can be rebuilt with no local copy at all. Each
file is stored as content-addressed chunks like any tensor part: a tokenizer shared by a
hundred fine-tunes is stored once.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from clients._generated.deltavault.common.v1 import common_pb2
from clients.store_client import StoreClient
from store_svc.digest import Algorithm
from store_svc.manifests import is_plain_file_name


def upload_files(
    store: StoreClient, paths: Iterable[Path], algorithm: Algorithm = Algorithm.BLAKE3
) -> list[common_pb2.FileEntry]:
    """Store each file's bytes (sending only the chunks the store lacks); their entries."""
    entries = []
    for path in paths:
        data = path.read_bytes()
        chunks, _ = store.upload(data, algorithm)
        entries.append(
            common_pb2.FileEntry(
                name=path.name, size=sum(chunk.size for chunk in chunks), chunks=chunks
            )
        )
    return entries


def write_files(store: StoreClient, files: Iterable[common_pb2.FileEntry], out: Path) -> None:
    """Write each stored file into the folder ``out`` (replacing a file of that name)."""
    for file in files:
        if not is_plain_file_name(file.name):  # the store refuses these; never trust it
            raise ValueError(f"stored file name {file.name!r} is not a plain file name")
        (out / file.name).write_bytes(store.read(file.chunks))
