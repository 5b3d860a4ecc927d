"""``CompressorServicer``: proto ⇄ domain only; the work is in pipeline, plan, reconstruct."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import torch

from clients._generated.deltavault.compressor.v1 import compressor_pb2, compressor_pb2_grpc
from clients.store_client import StoreClient
from compressor_svc.config import CompressorConfig
from compressor_svc.errors import InvalidInput
from compressor_svc.metrics import CompressorMetrics
from compressor_svc.pipeline import CompressSession, InputPairer
from compressor_svc.plan import plan_tensor
from compressor_svc.reconstruct import (
    resolve_base,
    resolve_manifest,
    selected_entries,
    stream_deltas,
    stream_rebuilt,
    stream_rebuilt_from,
)
from compressor_svc.requests import CompressSpec, PlanSpec

Request = compressor_pb2.CompressRequest | compressor_pb2.PlanRequest


def _header(requests: Iterator[Request], rpc: str) -> Request:
    first = next(requests, None)
    if first is None or not first.HasField("header"):
        raise InvalidInput(f"{rpc}: the first message must be a header")
    return first


class CompressorServicer(compressor_pb2_grpc.CompressorServicer):
    def __init__(
        self,
        config: CompressorConfig,
        store_factory: Callable[[], StoreClient],
        metrics: CompressorMetrics,
        device: torch.device,
    ) -> None:
        self._config = config
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
        return InputPairer(self._config.max_tensor_bytes, self._config.max_inflight_bytes)

    def _frames(
        self, requests: Iterator[Request], rpc: str
    ) -> Iterator[compressor_pb2.TensorFrame]:
        """Frames until End; InvalidInput if the stream stops without one."""
        for request in requests:
            if request.HasField("end"):
                return
            if not request.HasField("frame"):
                raise InvalidInput(f"{rpc}: only frames and one End may follow the header")
            self._metrics.received_bytes.inc(len(request.frame.data))
            yield request.frame
        raise InvalidInput(f"{rpc}: the stream ended without End; nothing was committed")

    def Compress(
        self,
        request_iterator: Iterator[compressor_pb2.CompressRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[compressor_pb2.CompressResponse]:
        with self._tracked():
            header = _header(request_iterator, "Compress")
            assert isinstance(header, compressor_pb2.CompressRequest)
            spec = CompressSpec.from_proto(header.header)
            session = CompressSession(
                spec,
                self._store,
                self._metrics,
                device=self._device,
                spill_dir=self._config.spill_dir,
            )
            pairer = self._pairer()
            try:
                for frame in self._frames(request_iterator, "Compress"):
                    item = pairer.add(frame)
                    if item is None:
                        continue
                    encoding = session.encode(item)
                    del item  # free the weights before the upload
                    if encoding is None:
                        continue
                    event = session.upload(encoding)
                    del encoding  # and the encoding before the next tensor's frames arrive
                    yield compressor_pb2.CompressResponse(tensor=event)
                pairer.finish()
                yield from session.finish()
            finally:
                session.close()

    def Plan(
        self, request_iterator: Iterator[compressor_pb2.PlanRequest], context: grpc.ServicerContext
    ) -> Iterator[compressor_pb2.PlanResponse]:
        with self._tracked():
            header = _header(request_iterator, "Plan")
            assert isinstance(header, compressor_pb2.PlanRequest)
            spec = PlanSpec.from_proto(header.header)
            pairer = self._pairer()
            for frame in self._frames(request_iterator, "Plan"):
                item = pairer.add(frame)
                if item is not None:
                    response = plan_tensor(item, spec)
                    if response is not None:
                        yield response
            pairer.finish()

    def Reconstruct(
        self,
        request_iterator: Iterator[compressor_pb2.ReconstructRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[compressor_pb2.ReconstructResponse]:
        with self._tracked():
            first = next(request_iterator, None)
            if first is None or not first.HasField("header"):
                raise InvalidInput("Reconstruct: the first message must be a header")
            header = first.header
            manifest = resolve_manifest(self._store, header)
            entries = selected_entries(manifest, list(header.names))
            frame_bytes = self._config.max_frame_bytes
            stored_base = resolve_base(self._store, header, manifest)
            if stored_base is not None:
                yield from stream_rebuilt_from(
                    self._store,
                    entries,
                    stored_base,
                    header.out_dtype,
                    frame_bytes=frame_bytes,
                    pass_through=not header.names,
                )
                return
            if not header.add_base:
                yield from stream_deltas(self._store, entries, header.out_dtype, frame_bytes)
                return
            yield from stream_rebuilt(
                self._store,
                entries,
                request_iterator,
                header.out_dtype,
                frame_bytes=frame_bytes,
                max_tensor_bytes=self._config.max_tensor_bytes,
                pass_through=not header.names,
            )
