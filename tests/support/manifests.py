"""Small manifests for store tests: one lossless byte tensor stored as given chunks."""

from __future__ import annotations

from collections.abc import Sequence

from clients._generated.deltavault.common.v1 import common_pb2
from store_svc.digest import Algorithm
from store_svc.manifests import FORMAT_VERSION


def byte_tensor_manifest(
    chunks: Sequence[common_pb2.ChunkRef], algorithm: Algorithm = Algorithm.BLAKE3
) -> common_pb2.Manifest:
    """A delta manifest of one lossless uint8 tensor whose bytes are ``chunks``, in order."""
    size = sum(chunk.size for chunk in chunks)
    part = common_pb2.EncodedPart(
        name="codes", dtype="uint8", shape=[size], nbits=8 * size, byte_length=size, chunks=chunks
    )
    tensor = common_pb2.TensorEntry(
        name="layer.0.weight",
        kind=common_pb2.STORAGE_KIND_LOSSLESS,
        method="lossless",
        shape=[size],
        dtype="uint8",
        parts=[part],
        nbits=part.nbits,
    )
    return common_pb2.Manifest(
        format_version=FORMAT_VERSION,
        digest_algorithm=algorithm.to_proto(),
        base_fingerprint="base-1",
        tensors=[tensor],
    )
