"""``CompressorServicer``: proto ⇄ domain only; the work is in pipeline, plan, reconstruct."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
import torch

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.store_client import StoreClient
from clients.wire import WithBytes, bytes_field_parser
from compressor_svc.config import CompressorConfig
from compressor_svc.errors import InvalidInput
from compressor_svc.metrics import CompressorMetrics
from compressor_svc.pipeline import CompressSession, InputPairer
from compressor_svc.plan import plan_tensor
from compressor_svc.reconstruct import (
    check_header,
    opening_store,
    resolve_base,
    resolve_manifest,
    selected_entries,
    stream_deltas,
    stream_rebuilt,
    stream_rebuilt_from,
)
from compressor_svc.requests import CompressSpec, PlanSpec
from store_svc.limits import current_lease
from store_svc.serving import add_service
from store_svc.signatures import Signer

log = logging.getLogger(__name__)
R = TypeVar("R", compressor_pb2.CompressRequest, compressor_pb2.PlanRequest)
Frame = tuple[compressor_pb2.TensorFrame, memoryview]
"""A received frame and, apart from it, its bytes."""


def _header(requests: Iterator[WithBytes[R]], rpc: str) -> R:
    first = next(requests, None)
    if first is None or not first.message.HasField("header"):
        raise InvalidInput(f"{rpc}: the first message must be a header")
    return first.message


class CompressorServicer:
    """The three streaming methods, over requests parsed by :func:`add_to_server`'s
    deserializers (so not the generated servicer base class, whose types they differ from)."""

    def __init__(
        self,
        config: CompressorConfig,
        store_factory: Callable[[], StoreClient],
        metrics: CompressorMetrics,
        device: torch.device,
    ) -> None:
        self._config = config
        self._signer = Signer.from_file(config.signing_key) if config.signing_key else None
        self._store = store_factory()
        self._metrics = metrics
        self._device = device

    def close(self) -> None:
        self._store.close()

    @contextmanager
    def _tracked(self) -> Iterator[None]:
        self._metrics.inflight_streams.inc()
        try:
            yield
        finally:
            self._metrics.inflight_streams.dec()

    def _pairer(self) -> InputPairer:
        return InputPairer(
            self._config.max_tensor_bytes, self._config.max_inflight_bytes, current_lease()
        )

    def _frames(self, requests: Iterator[WithBytes[R]], rpc: str) -> Iterator[Frame]:
        """Frames until End; InvalidInput if the stream stops without one."""
        for request, data in requests:
            if request.HasField("end"):
                return
            if not request.HasField("frame"):
                raise InvalidInput(f"{rpc}: only frames and one End may follow the header")
            self._metrics.received_bytes.inc(len(data))
            yield request.frame, data
        raise InvalidInput(f"{rpc}: the stream ended without End; nothing was committed")

    def Compress(
        self,
        requests: Iterator[WithBytes[compressor_pb2.CompressRequest]],
        context: grpc.ServicerContext,
    ) -> Iterator[compressor_pb2.CompressResponse]:
        with self._tracked():
            header = _header(requests, "Compress")
            spec = CompressSpec.from_proto(header.header)
            session = CompressSession(
                spec,
                self._store,
                self._metrics,
                device=self._device,
                spill_dir=self._config.spill_dir,
                signer=self._signer,
            )
            pairer = self._pairer()
            try:
                for frame, data in self._frames(requests, "Compress"):
                    item = pairer.add(frame, data)
                    if item is None:
                        continue
                    encoding = session.encode(item)
                    del item  # free the weights before the upload
                    if encoding is None:
                        continue
                    event = session.upload(encoding)
                    del encoding  # and the encoding before the next tensor's frames arrive
                    log.debug(
                        "compress %s: %s as %s, %.1fx, %d new bytes, %.2fs",
                        spec.ref or "(no ref)",
                        event.name,
                        event.method,
                        event.ratio,
                        event.new_chunk_bytes,
                        event.seconds,
                    )
                    yield compressor_pb2.CompressResponse(tensor=event)
                pairer.finish()
                yield from session.finish()
            finally:
                session.close()

    def Plan(
        self,
        requests: Iterator[WithBytes[compressor_pb2.PlanRequest]],
        context: grpc.ServicerContext,
    ) -> Iterator[compressor_pb2.PlanResponse]:
        with self._tracked():
            header = _header(requests, "Plan")
            spec = PlanSpec.from_proto(header.header)
            pairer = self._pairer()
            for frame, data in self._frames(requests, "Plan"):
                item = pairer.add(frame, data)
                if item is not None:
                    response = plan_tensor(item, spec)
                    if response is not None:
                        yield response
            pairer.finish()

    def Reconstruct(
        self,
        requests: Iterator[WithBytes[compressor_pb2.ReconstructRequest]],
        context: grpc.ServicerContext,
    ) -> Iterator[bytes]:
        with self._tracked():
            first = next(requests, None)
            if first is None or not first.message.HasField("header"):
                raise InvalidInput("Reconstruct: the first message must be a header")
            header = first.message.header
            check_header(header)
            manifest = resolve_manifest(self._store, header)
            store = opening_store(self._store, header, manifest)
            entries = selected_entries(manifest, list(header.names))
            frame_bytes = self._config.reply_frame_bytes
            stored_base = resolve_base(store, header, manifest)
            if stored_base is not None:
                yield from stream_rebuilt_from(
                    store,
                    entries,
                    stored_base,
                    header.out_dtype,
                    frame_bytes=frame_bytes,
                    max_tensor_bytes=self._config.max_tensor_bytes,
                    pass_through=not header.names,
                )
                return
            if not header.add_base:
                yield from stream_deltas(
                    store,
                    entries,
                    header.out_dtype,
                    frame_bytes=frame_bytes,
                    max_tensor_bytes=self._config.max_tensor_bytes,
                )
                return
            yield from stream_rebuilt(
                store,
                entries,
                requests,
                header.out_dtype,
                frame_bytes=frame_bytes,
                max_tensor_bytes=self._config.max_tensor_bytes,
                pass_through=not header.names,
            )


def add_to_server(servicer: CompressorServicer, server: grpc.Server) -> None:
    """Register the Compressor service: request frames arrive with their bytes apart
    (``WithBytes``; ``add_service`` makes the parsers lenient and the ``CallInterceptor``
    refuses what does not parse), Reconstruct sends its frames already serialized."""
    pb = compressor_pb2
    add_service(
        server,
        servicer,
        pb,
        "Compressor",
        {
            "Compress": (
                bytes_field_parser(pb.CompressRequest, "frame", "data"),
                pb.CompressResponse.SerializeToString,
            ),
            "Plan": (
                bytes_field_parser(pb.PlanRequest, "frame", "data"),
                pb.PlanResponse.SerializeToString,
            ),
            "Reconstruct": (bytes_field_parser(pb.ReconstructRequest, "base", "data"), None),
        },
    )
