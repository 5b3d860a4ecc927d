"""Every DeltaStore RPC fuzzed with hypothesis against one real store on loopback.

Each strategy builds a request and records what is wrong with it (``tests.support.fuzz``:
a malformed digest, a ref that breaks the rule, a frame at the wrong offset, a manifest
whose sums disagree...). Every case checks the same contract:

- a request with a fault is refused with INVALID_ARGUMENT, OUT_OF_RANGE or
  RESOURCE_EXHAUSTED (DATA_LOSS for bytes that do not hash to their digest), with a message
  naming the field or the rule; a well-formed one gets OK or the refusal the store's state
  calls for (NOT_FOUND, FAILED_PRECONDITION, ABORTED), computed from that state here;
- never INTERNAL or UNKNOWN, never a hang (every call has a deadline);
- a refused call writes nothing (the backend's objects are compared before and after),
  and one that succeeds writes just what it should;
- the store still serves a round trip at the end.

The store holds fixed seed chunks and three manifests under ``seed/`` refs; fuzzed refs
live in ``fz/``. Garbage collection, which may sweep what earlier tests left unreferenced,
runs last.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import assume, example, given
from hypothesis import strategies as st

from clients._generated.deltavault.common.v1 import common_pb2
from clients._generated.deltavault.store.v1 import store_pb2, store_pb2_grpc
from clients.errors import ConflictError, NotFoundError
from clients.wire import method_path, parse_with_bytes
from store_svc.backends.local import LocalBackend
from store_svc.cas import chunk_key
from store_svc.digest import Algorithm, Digest
from store_svc.manifests import FORMAT_VERSION, manifest_key, serialize
from tests.integration.conftest import (
    SMALL_CHUNK,
    SMALL_FRAME,
    RunningStore,
    start_store,
    stop_store,
)
from tests.support.fuzz import (
    ALGORITHMS,
    DEADLINE_SECONDS,
    INVALID,
    NASTY_REFS,
    OK,
    Code,
    Expected,
    Faulty,
    Outcome,
    accepted,
    damaged,
    digest_fields,
    expect,
    fuzz_settings,
    malformed_digests,
    maybe,
    mostly,
    optional_digest_fields,
    random_digests,
    ref_fields,
    refused,
    run_call,
    stored,
    valid_refs,
)
from tests.support.manifests import byte_tensor_manifest

MAX_FRAME = SMALL_FRAME * 4
MAX_CHUNK = 1 << 20
MAX_MESSAGE = MAX_FRAME + 64 * 1024
"""The module store's limits (passed to it explicitly; the message cap is StoreConfig's)."""
UINT64 = st.integers(0, 2**64 - 1)
DATA_LOSS = Code.DATA_LOSS
RESOURCE_EXHAUSTED = Code.RESOURCE_EXHAUSTED

# --- the seed: chunks and manifests the store holds before any case runs ------------------

PAYLOADS = (b"", b"x", bytes(range(256)) * 4, random.Random(7).randbytes(SMALL_CHUNK))
CHUNKS = {Digest.of(payload, a): payload for payload in PAYLOADS for a in Algorithm}
"""Every seed chunk, under both algorithms."""


def _seed_manifest(algorithm: Algorithm, label: str) -> common_pb2.Manifest:
    """A manifest naming every seed chunk of ``algorithm`` (so GC keeps them all)."""
    chunks = [
        common_pb2.ChunkRef(digest=d.to_proto(), size=len(p))
        for d, p in CHUNKS.items()
        if d.algorithm is algorithm
    ]
    manifest = byte_tensor_manifest(chunks, algorithm)
    manifest.labels["seed"] = label
    return manifest


def manifest_digest(manifest: common_pb2.Manifest) -> Digest:
    """The digest the store names a manifest by (``store_svc/FORMAT.md``)."""
    algorithm = Algorithm.from_proto(manifest.digest_algorithm)
    return Digest.of_manifest(serialize(manifest), algorithm)


SEED_REFS = {
    "seed/blake3": _seed_manifest(Algorithm.BLAKE3, "blake3"),
    "seed/sha256": _seed_manifest(Algorithm.SHA256, "sha256"),
    "seed/other": _seed_manifest(Algorithm.BLAKE3, "other"),
}
TARGETS = {manifest_digest(m): m for m in SEED_REFS.values()}
"""The stored manifests fuzzed refs may point at."""

present_chunks = st.sampled_from(sorted(CHUNKS, key=str))
targets = st.sampled_from(sorted(TARGETS, key=str))


class Seeded:
    """The module's store, seeded, with a plain stub and a channel for raw bytes (a plain
    class: hypothesis prints a dataclass argument field by field with every failing case)."""

    def __init__(self, running: RunningStore, backend: LocalBackend) -> None:
        self.running, self.backend = running, backend
        self.channel = grpc.insecure_channel(running.target)
        self.stub = store_pb2_grpc.DeltaStoreStub(self.channel)

    def __repr__(self) -> str:
        return f"Seeded({self.running.target})"

    def unary(self, method: str, request: Message) -> Outcome[Any]:
        rpc = getattr(self.stub, method)
        return run_call(lambda: [rpc(request, timeout=DEADLINE_SECONDS)])

    def current(self, ref: str) -> Digest | None:
        """Where a well-formed ref points now (None: absent)."""
        try:
            return self.running.client.resolve_ref(ref)
        except NotFoundError:
            return None

    def unchanged(self, call: Callable[[], Outcome[Any]]) -> Outcome[Any]:
        """Run ``call`` and check that it wrote and deleted nothing."""
        before = stored(self.backend)
        outcome = call()
        assert stored(self.backend) == before, f"{outcome.code.name} call changed the store"
        return outcome


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    root: Path = tmp_path_factory.mktemp("fuzz-store")
    backend = LocalBackend(root / "store")
    running = start_store(backend, root, max_frame_bytes=MAX_FRAME, max_chunk_bytes=MAX_CHUNK)
    running.client.put_chunks(list(CHUNKS.items()))
    for ref, manifest in SEED_REFS.items():
        info = running.client.commit_manifest(manifest, ref=ref)
        assert info.digest == manifest_digest(manifest)
    seeded = Seeded(running, backend)
    yield seeded
    seeded.channel.close()
    stop_store(running)


def faults_of(fields: Iterable[Faulty[Any]]) -> list[Expected]:
    return [fault for _, faults in fields for fault in faults]


def well_formed(proto: common_pb2.Digest) -> Digest | None:
    try:
        return Digest.from_proto(proto)
    except ValueError:
        return None


# --- MissingChunks --------------------------------------------------------------------

chunk_digests = st.one_of(present_chunks, random_digests())


@fuzz_settings(120)
@given(fields=st.lists(digest_fields(chunk_digests, "digests"), max_size=12))
def test_missing_chunks(seeded: Seeded, fields: list[Faulty[common_pb2.Digest]]) -> None:
    request = store_pb2.MissingChunksRequest(digests=[proto for proto, _ in fields])
    outcome = seeded.unchanged(lambda: seeded.unary("MissingChunks", request))
    expect(faults_of(fields), accepted).check(outcome)
    if outcome.code is OK:
        asked = [Digest.from_proto(proto) for proto, _ in fields]
        absent = list(dict.fromkeys(d for d in asked if d not in CHUNKS))
        assert [Digest.from_proto(d) for d in outcome.responses[0].missing] == absent


# --- PutChunks ------------------------------------------------------------------------


def frames_of(
    digest: common_pb2.Digest, payload: bytes, cuts: Iterable[int]
) -> list[store_pb2.PutChunksRequest]:
    """``payload`` as one chunk's frames, cut at ``cuts`` (repeated cuts: empty frames;
    each cut below ``len(payload)``, as the frame reaching the end completes the chunk)."""
    bounds = [0, *sorted(cuts), len(payload)]
    return [
        store_pb2.PutChunksRequest(
            digest=digest, total_size=len(payload), offset=start, data=payload[start:stop]
        )
        for start, stop in itertools.pairwise(bounds)
    ]


@st.composite
def chunk_uploads(draw: st.DrawFn) -> tuple[Digest, list[store_pb2.PutChunksRequest]]:
    """A well-formed chunk in frames: new bytes, or a seed chunk (deduplicated)."""
    payload = draw(st.one_of(st.binary(max_size=2048), st.sampled_from(PAYLOADS)))
    digest = Digest.of(payload, draw(st.sampled_from(list(Algorithm))))
    cuts = draw(st.lists(st.integers(0, len(payload) - 1), max_size=3)) if payload else []
    return digest, frames_of(digest.to_proto(), payload, cuts)


@dataclass(frozen=True)
class Broken:
    """A chunk upload that breaks a rule: its frames, the refusal, and whether it must be
    the stream's first message (gRPC itself refuses it, before the servicer sees it)."""

    frames: list[store_pb2.PutChunksRequest]
    expected: Expected
    alone: bool = False


EVERY_UPLOAD_WORD = ("digest", "offset", "total_size", "complete", "claimed", "limit")
random_frames = st.builds(
    store_pb2.PutChunksRequest,
    digest=st.one_of(random_digests().map(Digest.to_proto), malformed_digests()),
    total_size=UINT64,
    offset=UINT64,
    data=st.binary(max_size=64),
)


@st.composite
def broken_uploads(draw: st.DrawFn) -> Broken:  # noqa: PLR0911 (a return per break)
    """One chunk that breaks one rule of the upload protocol (or random frames)."""
    payload = draw(st.binary(min_size=2, max_size=2048))
    algorithm = draw(st.sampled_from(list(Algorithm)))
    proto = Digest.of(payload, algorithm).to_proto()
    cut = draw(st.integers(1, len(payload) - 1))
    first, second = frames_of(proto, payload, [cut])
    match draw(st.sampled_from(BREAKS)):
        case "other bytes":
            claimed = Digest.of(payload + b"!", algorithm).to_proto()
            return Broken(frames_of(claimed, payload, [cut]), refused("claimed", codes={DATA_LOSS}))
        case "malformed digest":
            return Broken(frames_of(draw(malformed_digests()), payload, [cut]), refused("digest"))
        case "gap or overlap":
            second.offset = draw(UINT64.filter(lambda offset: offset != cut))
            return Broken([first, second], refused("offset"))
        case "first frame not at 0":
            first.offset = draw(st.integers(1, 2**64 - 1))
            return Broken([first, second], refused("offset"))
        case "truncated":
            return Broken([first], refused("incomplete"))
        case "past total_size":
            second.data += draw(st.binary(min_size=1, max_size=64))
            return Broken([first, second], refused("total_size"))
        case "total_size changes":
            second.total_size = draw(UINT64.filter(lambda size: size != len(payload)))
            return Broken([first, second], refused("total_size"))
        case "interleaved":
            other = Digest.of(b"z", algorithm).to_proto()
            between = store_pb2.PutChunksRequest(digest=other, total_size=1, data=b"z")
            return Broken([first, between, second], refused("complete"))
        case "chunk too large":
            first.total_size = draw(st.integers(MAX_CHUNK + 1, 2**64 - 1))
            return Broken([first], refused("total_size", codes={RESOURCE_EXHAUSTED}))
        case "frame too large":
            big = b"\x01" * draw(st.integers(MAX_FRAME + 1, MAX_MESSAGE - 1024))
            frames = frames_of(Digest.of(big, algorithm).to_proto(), big, [])
            return Broken(frames, refused("frame", codes={RESOURCE_EXHAUSTED}))
        case "message too large":
            big = b"\x02" * draw(st.integers(MAX_MESSAGE + 1, MAX_MESSAGE + 4096))
            frames = frames_of(Digest.of(big, algorithm).to_proto(), big, [])
            return Broken(frames, refused("larger than max", codes={RESOURCE_EXHAUSTED}), True)
        case _:
            frames = draw(st.lists(random_frames, min_size=1, max_size=4))
            return Broken(frames, refused(*EVERY_UPLOAD_WORD, codes=INVALID | {DATA_LOSS}))


BREAKS = (
    "other bytes",
    "malformed digest",
    "gap or overlap",
    "first frame not at 0",
    "truncated",
    "past total_size",
    "total_size changes",
    "interleaved",
    "chunk too large",
    "frame too large",
    "message too large",
    "random frames",
)


@dataclass(frozen=True)
class Upload:
    """A PutChunks stream: well-formed chunks, then perhaps a broken one."""

    valid: list[tuple[Digest, list[store_pb2.PutChunksRequest]]]
    broken: Broken | None

    @property
    def frames(self) -> list[store_pb2.PutChunksRequest]:
        frames = [frame for _, chunk in self.valid for frame in chunk]
        return frames + (self.broken.frames if self.broken else [])

    @property
    def keys(self) -> set[str]:
        """What the stream must write: the well-formed chunks before any break."""
        return {chunk_key(digest) for digest, _ in self.valid}


@st.composite
def uploads(draw: st.DrawFn) -> Upload:
    broken = draw(st.none() | broken_uploads())
    valid = [] if broken and broken.alone else draw(st.lists(chunk_uploads(), max_size=3))
    return Upload(valid, broken)


def wait_until_stored(backend: LocalBackend, keys: set[str]) -> None:
    """A refused stream's earlier chunks were queued for writing before the refusal; give
    those writes time to land, so that what they wrote can be compared."""
    deadline = time.monotonic() + 10
    while not keys <= stored(backend).keys() and time.monotonic() < deadline:
        time.sleep(0.01)


def resized_chunk() -> Upload:
    """A chunk whose second frame says another total_size: once refused as if another
    chunk had begun ("frame for X arrived before chunk X was complete")."""
    first, second = frames_of(Digest.of(b"abcd").to_proto(), b"abcd", [2])
    second.total_size = 5
    return Upload([], Broken([first, second], refused("total_size")))


def oversized_chunk() -> Upload:
    """A chunk above the limit: once refused without naming total_size."""
    (frame,) = frames_of(Digest.of(b"x").to_proto(), b"x", [])
    frame.total_size = MAX_CHUNK + 1
    return Upload([], Broken([frame], refused("total_size", codes={RESOURCE_EXHAUSTED})))


@fuzz_settings(150)
@given(upload=uploads())
@example(upload=resized_chunk())
@example(upload=oversized_chunk())
def test_put_chunks(seeded: Seeded, upload: Upload) -> None:
    before = stored(seeded.backend)
    outcome = run_call(
        lambda: [seeded.stub.PutChunks(iter(upload.frames), timeout=DEADLINE_SECONDS)]
    )
    (upload.broken.expected if upload.broken else accepted()).check(outcome)
    if outcome.code is not OK:
        wait_until_stored(seeded.backend, upload.keys)
    after = stored(seeded.backend)
    assert before.keys() <= after.keys()
    assert after.keys() - before.keys() == upload.keys - before.keys()
    if outcome.code is OK:
        (response,) = outcome.responses
        assert response.chunks_written == len(upload.keys - before.keys())
        assert response.chunks_written + response.chunks_deduplicated == len(upload.valid)
        assert response.bytes_received == sum(len(frame.data) for frame in upload.frames)


# --- GetChunks ------------------------------------------------------------------------


@st.composite
def chunk_ranges(draw: st.DrawFn) -> Faulty[store_pb2.ChunkRange]:
    proto, faults = draw(digest_fields(mostly(present_chunks, random_digests()), "ranges.digest"))
    digest = well_formed(proto)
    size = len(CHUNKS.get(digest, b"")) if digest else 0
    offset = draw(mostly(st.integers(0, size), st.one_of(st.integers(size, size + 2), UINT64)))
    within = st.one_of(st.just(0), st.integers(0, max(size - offset, 0)))
    length = draw(
        mostly(within, st.one_of(st.integers(max(size - offset, 0) + 1, 2**64 - 1), UINT64))
    )
    return store_pb2.ChunkRange(digest=proto, offset=offset, length=length), faults


def read_expectation(ranges: list[store_pb2.ChunkRange]) -> tuple[Expected, list[bytes]]:
    """What a well-formed GetChunks gets: the ranges are read in order until one names an
    absent chunk (NOT_FOUND) or reaches past its chunk's end (INVALID_ARGUMENT)."""
    slices: list[bytes] = []
    for chunk_range in ranges:
        data = CHUNKS.get(Digest.from_proto(chunk_range.digest))
        if data is None:
            return refused("absent", codes={Code.NOT_FOUND}), slices
        offset = chunk_range.offset
        end = len(data) if chunk_range.length == 0 else offset + chunk_range.length
        if offset > len(data) or end > len(data):
            return refused("range", "outside"), slices
        slices.append(data[offset:end])
    return accepted(), slices


def received_ranges(frames: Iterable[store_pb2.GetChunksResponse]) -> list[bytes]:
    """The frames' data joined per range (a range ends with its ``last`` frame)."""
    ranges, pieces = [], []
    for frame in frames:
        pieces.append(frame.data)
        if frame.last:
            ranges.append(b"".join(pieces))
            pieces = []
    return ranges


@fuzz_settings(120)
@given(fields=st.lists(chunk_ranges(), max_size=6))
def test_get_chunks(seeded: Seeded, fields: list[Faulty[store_pb2.ChunkRange]]) -> None:
    ranges = [chunk_range for chunk_range, _ in fields]
    request = store_pb2.GetChunksRequest(ranges=ranges)
    outcome = seeded.unchanged(
        lambda: run_call(lambda: seeded.stub.GetChunks(request, timeout=DEADLINE_SECONDS))
    )
    faults = faults_of(fields)
    expected, slices = (expect(faults, accepted), []) if faults else read_expectation(ranges)
    expected.check(outcome)
    assert received_ranges(outcome.responses) == slices


# --- CommitManifest -------------------------------------------------------------------

names = st.one_of(
    st.sampled_from(["w", "layer.0.weight", "../../etc/passwd", "a/b\\c", "\x00\x1f", "é"]),
    st.text(min_size=1, max_size=20),
)
"""Tensor and part names: to the store any non-empty text is a name."""


def chunk_refs(
    algorithm: Algorithm, strict: bool
) -> st.SearchStrategy[Faulty[common_pb2.ChunkRef]]:
    """A chunk a manifest names: stored, absent (not a fault: FAILED_PRECONDITION), of the
    other algorithm, or malformed."""

    def ref(digest: Digest | common_pb2.Digest, size: int) -> common_pb2.ChunkRef:
        proto = digest.to_proto() if isinstance(digest, Digest) else digest
        return common_pb2.ChunkRef(digest=proto, size=size)

    same = st.sampled_from([d for d in sorted(CHUNKS, key=str) if d.algorithm is algorithm])
    other = st.sampled_from([d for d in sorted(CHUNKS, key=str) if d.algorithm is not algorithm])
    size = st.integers(0, 2**32)
    absent = st.builds(
        lambda value, n: (ref(Digest(algorithm, value), n), ()),
        st.binary(min_size=32, max_size=32),
        size,
    )
    stored_chunk = same.map(lambda d: (ref(d, len(CHUNKS[d])), ()))
    return maybe(
        strict,
        mostly(stored_chunk, absent),
        st.one_of(
            other.map(lambda d: (ref(d, len(CHUNKS[d])), (refused("digest_algorithm"),))),
            st.builds(lambda d, n: (ref(d, n), (refused("digest"),)), malformed_digests(), size),
        ),
    )


@st.composite
def parts(draw: st.DrawFn, algorithm: Algorithm, strict: bool) -> Faulty[common_pb2.EncodedPart]:
    chunks = draw(st.lists(chunk_refs(algorithm, strict), max_size=3))
    faults = faults_of(chunks)
    length = sum(chunk.size for chunk, _ in chunks)
    byte_length = draw(maybe(strict, st.just(length), st.integers(0, 2**63)))
    if byte_length != length:
        faults.append(refused("byte_length"))
    part = common_pb2.EncodedPart(
        name=draw(names),
        dtype=draw(st.text(max_size=10)),
        shape=draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)),
        nbits=draw(st.integers(0, 2**60)),
        byte_length=byte_length,
        chunks=[chunk for chunk, _ in chunks],
    )
    return part, tuple(faults)


SNAPSHOT = common_pb2.STORAGE_KIND_SNAPSHOT
KINDS = st.one_of(
    st.sampled_from([k for k in common_pb2.StorageKind.values() if k != SNAPSHOT]),
    st.integers(SNAPSHOT + 1, 2**31 - 1).map(common_pb2.StorageKind.ValueType),
)
"""Storage kinds but a snapshot, known or not (an open enum takes any value)."""


@st.composite
def tensor_entries(
    draw: st.DrawFn, algorithm: Algorithm, strict: bool
) -> Faulty[common_pb2.TensorEntry]:
    drawn = draw(st.lists(parts(algorithm, strict), max_size=2))
    faults = faults_of(drawn)
    dims = maybe(strict, st.integers(0, 2**40), st.integers(-(2**63), 2**63 - 1))
    shape = draw(st.lists(dims, max_size=4))
    if any(dim < 0 for dim in shape):
        faults.append(refused("negative dimension"))
    total = sum(part.nbits for part, _ in drawn)
    nbits = draw(maybe(strict, st.just(total), UINT64))
    if nbits != total:
        faults.append(refused("nbits"))
    entry = common_pb2.TensorEntry(
        name=draw(maybe(strict, names, st.just(""))),
        kind=draw(KINDS),
        method=draw(st.text(max_size=10)),
        method_version=draw(st.integers(0, 2**32 - 1)),
        shape=shape,
        dtype=draw(st.text(max_size=10)),
        params=draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
        parts=[part for part, _ in drawn],
        nbits=nbits,
    )
    return entry, tuple(faults)


PLAIN_FILE_NAMES = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True).filter(
    lambda name: name not in (".", "..")
)
BAD_FILE_NAMES = (
    "",
    ".",
    "..",
    "../config.json",
    "a/b",
    "/etc/passwd",
    "a\\b",
    "a\x00",
    "é",
    "a\n",
)


@st.composite
def file_entries(
    draw: st.DrawFn, algorithm: Algorithm, strict: bool
) -> Faulty[common_pb2.FileEntry]:
    chunks = draw(st.lists(chunk_refs(algorithm, strict), max_size=2))
    name = draw(maybe(strict, PLAIN_FILE_NAMES, st.sampled_from(BAD_FILE_NAMES)))
    faults = faults_of(chunks) + ([refused("file name")] if name in BAD_FILE_NAMES else [])
    size = sum(chunk.size for chunk, _ in chunks)
    claimed = draw(maybe(strict, st.just(size), UINT64))
    if claimed != size:
        faults.append(refused("size"))
    entry = common_pb2.FileEntry(name=name, size=claimed, chunks=[c for c, _ in chunks])
    return entry, tuple(faults)


timestamps = st.builds(
    Timestamp, seconds=st.integers(-(2**63), 2**63 - 1), nanos=st.integers(-(2**31), 2**31 - 1)
)


def by_name(entry: Faulty[common_pb2.TensorEntry | common_pb2.FileEntry]) -> str:
    return entry[0].name


@st.composite
def manifests(draw: st.DrawFn) -> Faulty[common_pb2.Manifest]:
    """A manifest over the seed chunks: strict (well-formed, though it may name absent
    chunks) half the time, else perhaps inconsistent in any of its fields."""
    strict = draw(st.booleans())
    faults = []
    version = draw(maybe(strict, st.just(FORMAT_VERSION), st.integers(0, 2**32 - 1)))
    if version != FORMAT_VERSION:
        faults.append(refused("format_version"))
    known = st.sampled_from(ALGORITHMS)
    algorithm_field = draw(maybe(strict, known, st.integers(-(2**31), 2**31 - 1)))
    algorithm = Algorithm.BLAKE3  # the chunks' algorithm, when the manifest's is unknown
    if algorithm_field in ALGORITHMS:
        algorithm = Algorithm.from_proto(algorithm_field)  # type: ignore[arg-type]
    else:
        faults.append(refused("digest_algorithm"))
    unique = by_name if strict else None
    tensors = draw(st.lists(tensor_entries(algorithm, strict), max_size=3, unique_by=unique))
    files = draw(st.lists(file_entries(algorithm, strict), max_size=2, unique_by=unique))
    faults += faults_of(tensors) + faults_of(files)
    tensor_names = {by_name(entry) for entry in tensors}
    if "" in tensor_names or len(tensor_names) < len(tensors):
        faults.append(refused("tensor name"))
    if len({by_name(entry) for entry in files}) < len(files):
        faults.append(refused("named twice"))
    snapshots = draw(st.lists(st.booleans(), min_size=len(tensors), max_size=len(tensors)))
    if strict:  # a registered base (every entry a snapshot) or a delta (none)
        snapshots = [all(snapshots)] * len(tensors)
    for (entry, _), snapshot in zip(tensors, snapshots, strict=True):
        if snapshot:
            entry.kind = SNAPSHOT
    if 0 < sum(snapshots) < len(tensors):
        faults.append(refused("registered base"))
    manifest = common_pb2.Manifest(
        format_version=version,
        digest_algorithm=algorithm_field,  # type: ignore[arg-type]
        base_fingerprint=draw(st.text(max_size=20)),
        tensors=[entry for entry, _ in tensors],
        labels=draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
        producer=draw(st.text(max_size=10)),
        files=[entry for entry, _ in files],
    )
    if draw(st.booleans()):
        manifest.created_at.CopyFrom(draw(timestamps))
    return manifest, tuple(faults)


@st.composite
def commits(draw: st.DrawFn) -> Faulty[store_pb2.CommitManifestRequest]:
    """A manifest, perhaps with a ref to move to it (a compare-and-swap, or forced)."""
    manifest, faults = draw(manifests())
    request = store_pb2.CommitManifestRequest(manifest=manifest)
    ref, ref_faults = draw(st.one_of(st.just(("", ())), ref_fields()))
    if not ref:  # no ref to move: the other ref fields are not read
        return request, faults
    expected, expected_faults = draw(
        optional_digest_fields(st.one_of(targets, random_digests()), "expected_ref_target")
    )
    request.ref, request.force_ref = ref, draw(st.booleans())
    if expected is not None:
        request.expected_ref_target.CopyFrom(expected)
    return request, (*faults, *ref_faults, *expected_faults)


def named_chunks(manifest: common_pb2.Manifest) -> set[Digest]:
    refs = [c for t in manifest.tensors for p in t.parts for c in p.chunks]
    refs += [c for f in manifest.files for c in f.chunks]
    return {Digest.from_proto(ref.digest) for ref in refs}


def compare_and_swap(
    seeded: Seeded, ref: str, expected: common_pb2.Digest | None, force: bool
) -> Expected:
    """ABORTED unless ``ref`` points at ``expected`` (None: is absent) or ``force``."""
    wanted = None if expected is None else Digest.from_proto(expected)
    if not force and seeded.current(ref) != wanted:
        return refused("ref", codes={Code.ABORTED})
    return accepted()


def optional(message: Message, field: str) -> Any:
    """A message field's value, or None when it is unset."""
    return getattr(message, field) if message.HasField(field) else None


def commit_expectation(seeded: Seeded, request: store_pb2.CommitManifestRequest) -> Expected:
    """What a well-formed commit gets: FAILED_PRECONDITION if a chunk is absent, ABORTED
    if the ref's compare-and-swap loses, else OK."""
    if named_chunks(request.manifest) - CHUNKS.keys():
        return refused("absent", codes={Code.FAILED_PRECONDITION})
    if not request.ref:
        return accepted()
    expected = optional(request, "expected_ref_target")
    return compare_and_swap(seeded, request.ref, expected, request.force_ref)


@fuzz_settings(150)
@given(case=commits())
def test_commit_manifest(seeded: Seeded, case: Faulty[store_pb2.CommitManifestRequest]) -> None:
    request, faults = case
    expected = expect(faults, lambda: commit_expectation(seeded, request))
    before = stored(seeded.backend)
    outcome = seeded.unary("CommitManifest", request)
    expected.check(outcome)
    after = stored(seeded.backend)
    if outcome.code is OK:
        digest = manifest_digest(request.manifest)
        assert Digest.from_proto(outcome.responses[0].digest) == digest
        assert seeded.running.client.get_manifest(digest) == request.manifest
        if request.ref:
            assert seeded.current(request.ref) == digest
    else:  # ABORTED too: the compare-and-swap is tried before the manifest is written
        assert after == before


# --- GetManifest, Verify ----------------------------------------------------------------

manifest_digests = st.one_of(targets, random_digests(), present_chunks)
"""Stored manifests, digests of nothing, and chunks (which are not manifests)."""
NO_MANIFEST = refused("manifest", codes={Code.NOT_FOUND})


@fuzz_settings(80)
@given(field=digest_fields(manifest_digests, "digest"))
def test_get_manifest(seeded: Seeded, field: Faulty[common_pb2.Digest]) -> None:
    proto, faults = field
    request = store_pb2.GetManifestRequest(digest=proto)
    outcome = seeded.unchanged(lambda: seeded.unary("GetManifest", request))
    expect(faults, lambda: NO_MANIFEST if well_formed(proto) not in TARGETS else accepted()).check(
        outcome
    )
    if outcome.code is OK:
        assert outcome.responses[0].manifest == TARGETS[Digest.from_proto(proto)]


@fuzz_settings(40)
@given(field=optional_digest_fields(manifest_digests, "manifest"))
def test_verify(seeded: Seeded, field: Faulty[common_pb2.Digest | None]) -> None:
    proto, faults = field
    request = store_pb2.VerifyRequest()
    if proto is not None:
        request.manifest.CopyFrom(proto)
    outcome = seeded.unchanged(lambda: seeded.unary("Verify", request))
    known = proto is None or well_formed(proto) in TARGETS
    expect(faults, lambda: accepted() if known else NO_MANIFEST).check(outcome)
    if outcome.code is OK:
        assert list(outcome.responses[0].damaged) == []
        assert outcome.responses[0].chunks_checked > 0


# --- refs: UpdateRef, DeleteRef, ResolveRef, ListRefs -------------------------------------

optional_targets = st.one_of(targets, random_digests())


@st.composite
def ref_updates(draw: st.DrawFn) -> Faulty[store_pb2.UpdateRefRequest]:
    ref, ref_faults = draw(ref_fields())
    target, target_faults = draw(digest_fields(manifest_digests, "target"))
    expected, expected_faults = draw(optional_digest_fields(optional_targets, "expected"))
    request = store_pb2.UpdateRefRequest(ref=ref, target=target, force=draw(st.booleans()))
    if expected is not None:
        request.expected.CopyFrom(expected)
    return request, (*ref_faults, *target_faults, *expected_faults)


def ref_update_expectation(seeded: Seeded, request: store_pb2.UpdateRefRequest) -> Expected:
    if Digest.from_proto(request.target) not in TARGETS:
        return refused("manifest", codes={Code.FAILED_PRECONDITION})
    return compare_and_swap(seeded, request.ref, optional(request, "expected"), request.force)


@fuzz_settings(120)
@given(case=ref_updates())
def test_update_ref(seeded: Seeded, case: Faulty[store_pb2.UpdateRefRequest]) -> None:
    request, faults = case
    expected = expect(faults, lambda: ref_update_expectation(seeded, request))
    current = None if faults else seeded.current(request.ref)
    before = stored(seeded.backend)
    outcome = seeded.unary("UpdateRef", request)
    expected.check(outcome)
    if outcome.code is not OK:
        assert stored(seeded.backend) == before
        return
    response = outcome.responses[0]
    assert (Digest.from_proto(response.previous) if response.HasField("previous") else None) == (
        current
    )
    assert seeded.current(request.ref) == Digest.from_proto(request.target)


@st.composite
def ref_deletes(draw: st.DrawFn) -> Faulty[store_pb2.DeleteRefRequest]:
    ref, ref_faults = draw(ref_fields())
    expected, expected_faults = draw(optional_digest_fields(optional_targets, "expected"))
    request = store_pb2.DeleteRefRequest(ref=ref)
    if expected is not None:
        request.expected.CopyFrom(expected)
    return request, (*ref_faults, *expected_faults)


def ref_delete_expectation(seeded: Seeded, request: store_pb2.DeleteRefRequest) -> Expected:
    """NOT_FOUND for an absent ref, ABORTED when it is not where ``expected`` says."""
    current = seeded.current(request.ref)
    wanted = optional(request, "expected")
    if current is None and wanted is None:
        return refused("ref", codes={Code.NOT_FOUND})
    if current is None or (wanted is not None and Digest.from_proto(wanted) != current):
        return refused("ref", codes={Code.ABORTED})
    return accepted()


@fuzz_settings(100)
@given(case=ref_deletes())
def test_delete_ref(seeded: Seeded, case: Faulty[store_pb2.DeleteRefRequest]) -> None:
    request, faults = case
    expected = expect(faults, lambda: ref_delete_expectation(seeded, request))
    current = None if faults else seeded.current(request.ref)
    before = stored(seeded.backend)
    outcome = seeded.unary("DeleteRef", request)
    expected.check(outcome)
    if outcome.code is not OK:
        assert stored(seeded.backend) == before
        return
    assert Digest.from_proto(outcome.responses[0].previous) == current
    assert seeded.current(request.ref) is None


@fuzz_settings(60)
@given(field=st.one_of(ref_fields(), st.sampled_from(sorted(SEED_REFS)).map(lambda r: (r, ()))))
@example(field=("seed/blake3\n", (refused("ref"),)))  # once resolved as "seed/blake3"
def test_resolve_ref(seeded: Seeded, field: Faulty[str]) -> None:
    ref, faults = field
    outcome = seeded.unchanged(
        lambda: seeded.unary("ResolveRef", store_pb2.ResolveRefRequest(ref=ref))
    )
    expect(faults, lambda: accepted(refused("ref", codes={Code.NOT_FOUND}))).check(outcome)
    if outcome.code is OK:  # a stored manifest (a seed, or one a fuzzed commit moved it to)
        target = Digest.from_proto(outcome.responses[0].target)
        assert seeded.backend.exists(manifest_key(target))


_PREFIX_RULE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9._-]{0,128})?)?")
"""The documented rule for a ListRefs prefix (``fullmatch``): empty, part of a namespace,
a namespace and ``/``, or that and part of a name."""
NASTY_PREFIXES = ("/", "../", "..", "fz/../", "fz//", "fz/a/", "fz\n", "fz/a\n", "\x00", "é", "*")

prefixes: st.SearchStrategy[Faulty[str]] = st.one_of(
    st.sampled_from(["", "f", "fz", "fz/", "fz/a", "fz/m-1.", "seed/", "s"]).map(lambda p: (p, ())),
    st.sampled_from(NASTY_PREFIXES).map(lambda p: (p, (refused("prefix"),))),
    st.text(max_size=20).map(
        lambda p: (p, () if _PREFIX_RULE.fullmatch(p) else (refused("prefix"),))
    ),
)
page_tokens: st.SearchStrategy[Faulty[str]] = st.one_of(
    st.just(("", ())),
    valid_refs().map(lambda token: (token, ())),
    # The message quotes the token (but calls it a ref: see the report of issue 7).
    st.sampled_from([r for r in NASTY_REFS if r]).map(
        lambda token: (token, (refused("page_token"),))
    ),
)


@fuzz_settings(80)
@given(prefix=prefixes, page_size=st.integers(0, 2**32 - 1), token=page_tokens)
@example(prefix=("seed\n", (refused("prefix"),)), page_size=0, token=("", ()))  # once listed
def test_list_refs(seeded: Seeded, prefix: Faulty[str], page_size: int, token: Faulty[str]) -> None:
    request = store_pb2.ListRefsRequest(prefix=prefix[0], page_size=page_size, page_token=token[0])
    outcome = seeded.unchanged(lambda: seeded.unary("ListRefs", request))
    expect([*prefix[1], *token[1]], accepted).check(outcome)
    if outcome.code is not OK:
        return
    everything = sorted(ref for ref, _ in seeded.running.client.list_refs())
    after = [
        ref for ref in everything if ref.startswith(request.prefix) and ref > request.page_token
    ]
    limit = min(page_size or 1000, 1000)
    response = outcome.responses[0]
    assert [info.ref for info in response.refs] == after[:limit]
    assert response.next_page_token == (after[limit - 1] if len(after) > limit else "")


# --- raw bytes through the server's deserializers ---------------------------------------

M = store_pb2
RAW_METHODS: dict[str, tuple[str, Message]] = {
    "MissingChunks": (
        "unary",
        M.MissingChunksRequest(digests=[d.to_proto() for d in sorted(CHUNKS, key=str)[:2]]),
    ),
    "PutChunks": ("client stream", frames_of(Digest.of(b"raw").to_proto(), b"raw", [1])[0]),
    "GetChunks": (
        "server stream",
        M.GetChunksRequest(
            ranges=[M.ChunkRange(digest=sorted(CHUNKS, key=str)[2].to_proto(), offset=1)]
        ),
    ),
    "CommitManifest": ("unary", M.CommitManifestRequest(manifest=SEED_REFS["seed/other"])),
    "GetManifest": ("unary", M.GetManifestRequest(digest=sorted(TARGETS, key=str)[0].to_proto())),
    "UpdateRef": (
        "unary",
        M.UpdateRefRequest(ref="fz/raw", target=sorted(TARGETS, key=str)[0].to_proto(), force=True),
    ),
    "ResolveRef": ("unary", M.ResolveRefRequest(ref="seed/blake3")),
    "ListRefs": ("unary", M.ListRefsRequest(prefix="seed/", page_size=2, page_token="seed/a")),
    "DeleteRef": ("unary", M.DeleteRefRequest(ref="fz/raw")),
    "CollectGarbage": ("unary", M.CollectGarbageRequest(dry_run=True, grace_period_seconds=60)),
    "Verify": ("unary", M.VerifyRequest(manifest=sorted(TARGETS, key=str)[1].to_proto())),
}
"""Each DeltaStore method: how it streams, and a well-formed request to mutate."""
ANY_ANSWER = Expected(
    frozenset({OK, *INVALID, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.ABORTED, DATA_LOSS})
)
"""What a request that parses may get (whatever is wrong with it): never INTERNAL."""


def parses(method: str, raw: bytes) -> bool:
    """Whether the store's deserializer for ``method`` accepts ``raw``."""
    request_type = type(RAW_METHODS[method][1])
    try:
        if method == "PutChunks":  # frames are parsed around their data (clients.wire)
            parse_with_bytes(raw, store_pb2.PutChunksRequest, "data")
        else:
            request_type.FromString(raw)
    except DecodeError:
        return False
    return True


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A method and bytes for it: random, or its well-formed request truncated, with a
    byte flipped, or with bytes appended."""
    method = draw(st.sampled_from(sorted(RAW_METHODS)))
    raw = damaged(draw, RAW_METHODS[method][1].SerializeToString())
    return method, raw


def raw_call(seeded: Seeded, method: str, raw: bytes) -> Outcome[bytes]:
    """``raw`` as the request of ``method``, sent as it is (no serializer on this side)."""
    path = method_path(store_pb2, "DeltaStore", method)
    match RAW_METHODS[method][0]:
        case "unary":
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = seeded.channel.unary_unary(path)
            return run_call(lambda: [unary(raw, timeout=DEADLINE_SECONDS)])
        case "client stream":
            upload: grpc.StreamUnaryMultiCallable[bytes, bytes] = seeded.channel.stream_unary(path)
            return run_call(lambda: [upload(iter([raw]), timeout=DEADLINE_SECONDS)])
        case _:
            download: grpc.UnaryStreamMultiCallable[bytes, bytes] = seeded.channel.unary_stream(
                path
            )
            return run_call(lambda: download(raw, timeout=DEADLINE_SECONDS))


@fuzz_settings(150)
@given(case=raw_requests())
def test_raw_bytes_that_parse(seeded: Seeded, case: tuple[str, bytes]) -> None:
    method, raw = case
    assume(parses(method, raw))
    before = stored(seeded.backend)
    outcome = raw_call(seeded, method, raw)
    ANY_ANSWER.check(outcome)
    if outcome.code is not OK:
        assert stored(seeded.backend) == before


@fuzz_settings(60)
@given(case=raw_requests())
@example(case=("MissingChunks", b"\xff"))  # once answered by gRPC itself, with INTERNAL
def test_raw_bytes_that_do_not_parse_are_invalid_argument(
    seeded: Seeded, case: tuple[str, bytes]
) -> None:
    method, raw = case
    assume(not parses(method, raw))
    outcome = seeded.unchanged(lambda: raw_call(seeded, method, raw))
    refused(type(RAW_METHODS[method][1]).__name__, codes={Code.INVALID_ARGUMENT}).check(outcome)


# --- garbage collection (last: it sweeps what earlier cases left unreferenced) ---------


def check_refs_intact(seeded: Seeded) -> None:
    """Every ref points at a stored manifest whose chunks are all stored."""
    client = seeded.running.client
    for ref, manifest in SEED_REFS.items():
        assert seeded.current(ref) == manifest_digest(manifest)
    for _, target in client.list_refs():
        assert (
            client.missing_chunks(sorted(named_chunks(client.get_manifest(target)), key=str)) == []
        )


@fuzz_settings(25)
@given(dry_run=st.booleans(), grace=st.one_of(st.just(0), st.integers(1, 5), UINT64))
def test_collect_garbage(seeded: Seeded, dry_run: bool, grace: int) -> None:
    request = store_pb2.CollectGarbageRequest(dry_run=dry_run, grace_period_seconds=grace)
    before = stored(seeded.backend)
    outcome = seeded.unary("CollectGarbage", request)
    accepted().check(outcome)
    after = stored(seeded.backend)
    assert after == before if dry_run else after.keys() <= before.keys()
    assert outcome.responses[0].dry_run == dry_run
    check_refs_intact(seeded)


# --- afterwards ---------------------------------------------------------------------------


def test_a_lost_compare_and_swap_commits_no_manifest(seeded: Seeded) -> None:
    manifest = _seed_manifest(Algorithm.BLAKE3, "lost compare-and-swap")
    before = stored(seeded.backend)
    with pytest.raises(ConflictError):  # the seed ref exists; absent was expected
        seeded.running.client.commit_manifest(manifest, ref="seed/blake3")
    assert stored(seeded.backend) == before


def test_the_store_still_serves_after_the_fuzzing(seeded: Seeded) -> None:
    health = health_pb2_grpc.HealthStub(seeded.channel)
    request = health_pb2.HealthCheckRequest(service="deltavault.store.v1.DeltaStore")
    assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    client = seeded.running.client
    payload = os.urandom(3 * SMALL_CHUNK + 5)
    chunks, _ = client.upload(payload)
    manifest = _seed_manifest(Algorithm.BLAKE3, "after")
    manifest.tensors[0].parts[0].chunks.extend(chunks)
    manifest.tensors[0].parts[0].byte_length += len(payload)
    info = client.commit_manifest(manifest, ref="fz/after-the-fuzzing", force=True)
    assert client.resolve_ref("fz/after-the-fuzzing") == info.digest
    assert client.read(client.get_manifest(info.digest).tensors[0].parts[0].chunks[-4:]) == payload
    assert list(client.verify().damaged) == []
    check_refs_intact(seeded)
