"""DeltaStore servicer: translates between protobuf messages and the ``Repository``."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from typing import TypeVar

import grpc

from clients._generated.deltavault.common.v1 import common_pb2
from clients._generated.deltavault.store.v1 import store_pb2
from clients.wire import WithBytes, bytes_field_parser, serialize_with_bytes
from store_svc.config import StoreConfig
from store_svc.digest import Digest
from store_svc.errors import InvalidArgument, NotFound, PermissionDenied
from store_svc.identity import Tenant, current_caller
from store_svc.limits import current_lease
from store_svc.metrics import StoreMetrics
from store_svc.refs import RefName
from store_svc.repository import RefMove, Repository
from store_svc.serving import add_service
from store_svc.uploads import ChunkAssembler

T = TypeVar("T")
R = TypeVar("R")


def prefetch(
    executor: Executor, fetch: Callable[[T], R], keys: Sequence[T], window: int
) -> Iterator[R]:
    """``fetch(key)`` for each key, in order, running up to ``window`` fetches ahead."""
    pending: deque[Future[R]] = deque()
    for key in keys:
        pending.append(executor.submit(fetch, key))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _digest(message: common_pb2.Digest, what: str) -> Digest:
    try:
        return Digest.from_proto(message)
    except ValueError as exc:
        raise InvalidArgument(f"{what}: {exc}") from None


def _optional_digest(present: bool, message: common_pb2.Digest, what: str) -> Digest | None:
    """A digest field that may be unset (meaning "absent", e.g. an expected ref target)."""
    return _digest(message, what) if present else None


def _tenant() -> Tenant | None:
    """The tenant the caller is confined to, if any."""
    return current_caller.get().tenant


def _ref(text: str) -> RefName:
    """A ref name the caller may use."""
    ref = RefName.parse(text)
    caller = current_caller.get()
    if not caller.may_use(ref.namespace):
        raise PermissionDenied(f"{caller.principal} may not use namespace {ref.namespace!r}")
    return ref


def _list_prefix(prefix: str) -> str:
    """The ref prefix to list: a tenant's empty prefix is its own namespace; a prefix
    outside it is refused."""
    caller = current_caller.get()
    if caller.tenant is None:
        return prefix
    own = f"{caller.tenant.name}/"
    if not prefix:
        return own
    if not prefix.startswith(own):
        raise PermissionDenied(f"{caller.principal} may list only refs under {own!r}")
    return prefix


def _page_token(text: str) -> RefName | None:
    """The ref a ListRefs page starts after (its token is the last ref of the page before)."""
    try:
        return RefName.parse(text) if text else None
    except InvalidArgument as exc:
        raise InvalidArgument(f"page_token: {exc}") from None


class DeltaStoreServicer:
    """The store's methods; :func:`add_to_server` registers them with the frame-aware wire
    code of :mod:`clients.wire` for the two chunk streams."""

    def __init__(
        self, repo: Repository, config: StoreConfig, metrics: StoreMetrics, io: Executor
    ) -> None:
        self._repo = repo
        self._config = config
        self._metrics = metrics
        self._io = io

    def MissingChunks(
        self, request: store_pb2.MissingChunksRequest, context: grpc.ServicerContext
    ) -> store_pb2.MissingChunksResponse:
        digests = [_digest(d, "digests") for d in request.digests]
        missing = self._repo.missing_chunks(digests, _tenant())
        return store_pb2.MissingChunksResponse(missing=[d.to_proto() for d in missing])

    def PutChunks(
        self,
        request_iterator: Iterable[WithBytes[store_pb2.PutChunksRequest]],
        context: grpc.ServicerContext,
    ) -> store_pb2.PutChunksResponse:
        assembler = ChunkAssembler(
            self._repo.chunk_sink(_tenant()),
            self._config.max_frame_bytes,
            self._io,
            self._config.stream_window,
            current_lease(),
        )
        for frame, data in request_iterator:
            self._metrics.received_bytes.inc(len(data))
            assembler.feed(_digest(frame.digest, "digest"), frame.total_size, frame.offset, data)
        stats = assembler.close()
        self._metrics.chunks_written.inc(stats.chunks_written)
        self._metrics.chunks_deduplicated.inc(stats.chunks_deduplicated)
        return store_pb2.PutChunksResponse(
            chunks_written=stats.chunks_written,
            chunks_deduplicated=stats.chunks_deduplicated,
            bytes_written=stats.bytes_written,
            bytes_received=stats.bytes_received,
        )

    def GetChunks(
        self, request: store_pb2.GetChunksRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Frames serialized around their data (:mod:`clients.wire`)."""
        ranges = [(_digest(r.digest, "ranges.digest"), r.offset, r.length) for r in request.ranges]
        tenant, lease = _tenant(), current_lease()
        fetched = prefetch(
            self._io,
            lambda digest: self._repo.get_chunk(digest, tenant),
            [d for d, _, _ in ranges],
            self._config.stream_window,
        )
        for (digest, offset, length), data in zip(ranges, fetched, strict=True):
            # get_chunk verified the bytes before any of them is sent
            lease.acquire(len(data))
            yield from self._range_frames(digest, data, offset, length)
            lease.release(len(data))

    def _range_frames(
        self, digest: Digest, data: memoryview, offset: int, length: int
    ) -> Iterator[bytes]:
        """The frames of ``data[offset:offset + length]`` (length 0: to the end)."""
        end = len(data) if length == 0 else offset + length
        if offset > len(data) or end > len(data):
            raise InvalidArgument(
                f"range [{offset}, {end}) is outside chunk {digest} of {len(data)} bytes"
            )
        start = offset
        while True:
            stop = min(start + self._config.reply_frame_bytes, end)
            self._metrics.sent_bytes.inc(stop - start)
            head = store_pb2.GetChunksResponse(
                digest=digest.to_proto(), offset=start, last=stop == end
            )
            yield serialize_with_bytes(head, "data", data[start:stop])
            if stop == end:
                return
            start = stop

    def CommitManifest(
        self, request: store_pb2.CommitManifestRequest, context: grpc.ServicerContext
    ) -> store_pb2.CommitManifestResponse:
        move = None
        if request.ref:
            expected = _optional_digest(
                request.HasField("expected_ref_target"),
                request.expected_ref_target,
                "expected_ref_target",
            )
            move = RefMove(_ref(request.ref), expected, request.force_ref)
        result, _ = self._repo.commit(
            request.manifest, move, _tenant(), signatures=list(request.signatures)
        )
        return store_pb2.CommitManifestResponse(
            digest=result.digest.to_proto(),
            already_present=result.already_present,
            chunk_count=result.chunk_count,
            total_bytes=result.total_bytes,
        )

    def GetManifest(
        self, request: store_pb2.GetManifestRequest, context: grpc.ServicerContext
    ) -> store_pb2.GetManifestResponse:
        digest = _digest(request.digest, "digest")
        manifest, signatures = self._repo.get_signed_manifest(digest, _tenant())
        return store_pb2.GetManifestResponse(
            manifest=manifest, digest=digest.to_proto(), signatures=signatures
        )

    def UpdateRef(
        self, request: store_pb2.UpdateRefRequest, context: grpc.ServicerContext
    ) -> store_pb2.UpdateRefResponse:
        ref = _ref(request.ref)
        target = _digest(request.target, "target")
        expected = _optional_digest(request.HasField("expected"), request.expected, "expected")
        previous = self._repo.update_ref(target, RefMove(ref, expected, request.force), _tenant())
        response = store_pb2.UpdateRefResponse()
        if previous is not None:
            response.previous.CopyFrom(previous.to_proto())
        return response

    def ResolveRef(
        self, request: store_pb2.ResolveRefRequest, context: grpc.ServicerContext
    ) -> store_pb2.ResolveRefResponse:
        ref = _ref(request.ref)
        target = self._repo.refs.resolve(ref)
        if target is None:
            raise NotFound(f"no ref {ref}")
        return store_pb2.ResolveRefResponse(target=target.to_proto())

    def ListRefs(
        self, request: store_pb2.ListRefsRequest, context: grpc.ServicerContext
    ) -> store_pb2.ListRefsResponse:
        prefix = _list_prefix(request.prefix)
        limit = min(request.page_size or self._config.list_page_size, self._config.list_page_size)
        after = _page_token(request.page_token)
        response = store_pb2.ListRefsResponse()
        for ref, target in self._repo.refs.list(prefix, start_after=after):
            if len(response.refs) == limit:
                response.next_page_token = response.refs[-1].ref
                break
            response.refs.add(ref=str(ref), target=target.to_proto())
        return response

    def DeleteRef(
        self, request: store_pb2.DeleteRefRequest, context: grpc.ServicerContext
    ) -> store_pb2.DeleteRefResponse:
        ref = _ref(request.ref)
        expected = _optional_digest(request.HasField("expected"), request.expected, "expected")
        previous = self._repo.refs.delete(ref, expected)
        return store_pb2.DeleteRefResponse(previous=previous.to_proto())

    def CollectGarbage(
        self, request: store_pb2.CollectGarbageRequest, context: grpc.ServicerContext
    ) -> store_pb2.CollectGarbageResponse:
        tenant = _tenant()
        if tenant is not None:
            raise PermissionDenied(
                f"garbage collection spans every tenant; tenant {tenant.name!r} may not run it"
            )
        grace = request.grace_period_seconds or self._config.gc_grace_seconds
        stats = self._repo.collect_garbage(grace_seconds=grace, dry_run=request.dry_run)
        self._metrics.gc_runs.labels("dry_run" if stats.dry_run else "sweep").inc()
        if not stats.dry_run:
            self._metrics.gc_freed_bytes.inc(stats.bytes_freed)
        return store_pb2.CollectGarbageResponse(**vars(stats))

    def Verify(
        self, request: store_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> store_pb2.VerifyResponse:
        manifest = _optional_digest(request.HasField("manifest"), request.manifest, "manifest")
        report = self._repo.verify(manifest, _tenant())
        return store_pb2.VerifyResponse(
            chunks_checked=report.chunks_checked,
            manifests_checked=report.manifests_checked,
            bytes_checked=report.bytes_checked,
            damaged=[
                store_pb2.DamagedObject(key=d.key, digest=d.digest.to_proto(), problem=d.problem)
                for d in report.damaged
            ],
        )


def add_to_server(servicer: DeltaStoreServicer, server: grpc.Server) -> None:
    """Register the DeltaStore service: PutChunks frames arrive with their bytes apart
    (``WithBytes``), GetChunks sends its frames already serialized."""
    pb = store_pb2
    add_service(
        server,
        servicer,
        pb,
        "DeltaStore",
        {
            "PutChunks": (
                bytes_field_parser(pb.PutChunksRequest, "data"),
                pb.PutChunksResponse.SerializeToString,
            ),
            "GetChunks": (pb.GetChunksRequest.FromString, None),
        },
    )
