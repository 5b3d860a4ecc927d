"""The one wrapper every RPC runs in: it authenticates and authorizes the caller
(:mod:`store_svc.auth`), admits streams within the limits (:mod:`store_svc.limits`), turns
exceptions into gRPC statuses and records per-RPC metrics.

Streaming handlers are wrapped *while they are iterated*, so an error raised mid-stream
is mapped like any other. Domain errors carry their status code and structured details;
backend errors become UNAVAILABLE (transient) or INTERNAL; anything else is logged with
its traceback and answered with a generic INTERNAL that reveals nothing. The compressor
runs behind the same interceptor; a status the store returned to it passes through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from clients.channel import forwarded_authorization
from clients.errors import DeltaVaultError
from clients.wire import Malformed
from store_svc.auth import TokenTable
from store_svc.backends.base import BackendError, BackendUnavailable, ObjectNotFound
from store_svc.errors import InvalidArgument, StoreError
from store_svc.identity import ANONYMOUS_CALLER, Caller, current_caller
from store_svc.limits import Admission, client_of, leasing

log = logging.getLogger(__name__)

Observer = Callable[[str, grpc.StatusCode, float], None]
"""Called once per RPC with (method name, final status code, seconds)."""
V = TypeVar("V")


@contextmanager
def _bound(var: ContextVar[V], value: V) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def _parsed(request: Any) -> Any:
    """The request (or request stream) the handler gets: a request that did not parse
    (``clients.wire.Malformed``, from the lenient deserializers of
    ``store_svc.serving.add_service``) is INVALID_ARGUMENT, where gRPC would answer a
    deserializer's exception with INTERNAL."""
    if isinstance(request, Malformed):
        raise _malformed(request, 1)
    if isinstance(request, Iterator):
        return _parsed_stream(request)
    return request


def _parsed_stream(requests: Iterator[Any]) -> Iterator[Any]:
    for number, request in enumerate(requests, 1):
        if isinstance(request, Malformed):
            raise _malformed(request, number)
        yield request


def _malformed(request: Malformed, number: int) -> InvalidArgument:
    return InvalidArgument(
        f"request {number} is not a valid {request.message_type}: {request.error}"
    )


def _authorization(context: grpc.ServicerContext) -> str | None:
    header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
    return header.decode(errors="replace") if isinstance(header, bytes) else header


_STATUS_BY_TYPE: tuple[tuple[type[BaseException], grpc.StatusCode, str], ...] = (
    (ObjectNotFound, grpc.StatusCode.NOT_FOUND, "{exc}"),
    (BackendUnavailable, grpc.StatusCode.UNAVAILABLE, "object store unavailable: {exc}"),
    (BackendError, grpc.StatusCode.INTERNAL, "object store error: {exc}"),
    # Raised while reading the request stream: the client went away.
    (grpc.RpcError, grpc.StatusCode.CANCELLED, "the client cancelled the call"),
)
"""Errors from below the domain layer, first match wins (subclasses before their bases)."""


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, list[Any]]:
    if isinstance(exc, StoreError):
        return exc.code, str(exc), list(exc.details())
    if isinstance(exc, DeltaVaultError):  # a downstream deltavault service's status, kept
        return exc.code, str(exc), []
    for kind, code, message in _STATUS_BY_TYPE:
        if isinstance(exc, kind):
            return code, message.format(exc=exc), []
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details", []


def _to_status(code: grpc.StatusCode, message: str, details: list[Any]) -> grpc.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def _fail(context: grpc.ServicerContext, exc: Exception) -> grpc.StatusCode:
    """Set the status for ``exc`` on the call (handlers never set one themselves)."""
    code, message, details = _status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("RPC failed: %s", message, exc_info=exc)
    context.set_code(code)
    context.set_details(message)
    context.set_trailing_metadata(_to_status(code, message, details).trailing_metadata)
    return code


class CallInterceptor(grpc.ServerInterceptor):
    """Wraps each handler: the caller is authenticated and authorized (with ``tokens``;
    without, everyone is the anonymous caller) and ``current_caller`` set for the handler's
    duration; a streaming call holds a slot and a byte lease of ``admission``; with
    ``forward_caller`` the caller's ``authorization`` is what this service's own calls
    send on its behalf (``clients.channel.forwarded_authorization``); errors are mapped to
    statuses, and ``observe`` sees the outcome."""

    def __init__(
        self,
        observe: Observer,
        tokens: TokenTable | None = None,
        *,
        admission: Admission | None = None,
        forward_caller: bool = False,
    ) -> None:
        self._observe = observe
        self._tokens = tokens
        self._admission = admission
        self._forward_caller = forward_caller

    def _caller(self, full_method: str, context: grpc.ServicerContext) -> Caller:
        if self._tokens is None:
            return ANONYMOUS_CALLER
        principal = self._tokens.authorize(full_method, context.invocation_metadata())
        return ANONYMOUS_CALLER if principal is None else Caller(principal.name, principal.tenant)

    @contextmanager
    def _handling(
        self, full_method: str, context: grpc.ServicerContext, streaming: bool
    ) -> Iterator[None]:
        """The call's surroundings: its caller, its forwarded credentials, its stream slot."""
        caller = self._caller(full_method, context)
        with ExitStack() as stack:
            stack.enter_context(_bound(current_caller, caller))
            if self._forward_caller:
                stack.enter_context(_bound(forwarded_authorization, _authorization(context)))
            if streaming and self._admission is not None:
                principal = None if caller is ANONYMOUS_CALLER else caller.principal
                client = client_of(principal, context.peer())
                stack.enter_context(leasing(stack.enter_context(self._admission.stream(client))))
            yield

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_call(full_method, handler.unary_unary, streaming=False), **kwargs
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_call(full_method, handler.stream_unary, streaming=True), **kwargs
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(full_method, handler.unary_stream), **kwargs
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(full_method, handler.stream_stream), **kwargs
        )

    def _wrap_call(
        self, full_method: str, behavior: Callable[..., Any], *, streaming: bool
    ) -> Callable[..., Any]:
        method = full_method.rsplit("/", 1)[-1]

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                with self._handling(full_method, context, streaming):
                    return behavior(_parsed(request), context)
            except Exception as exc:
                code = _fail(context, exc)
                # Abort rather than return None, which gRPC would try to serialize.
                context.abort(code, _status_for(exc)[1])
            finally:
                self._observe(method, code, time.perf_counter() - start)

        return wrapped

    def _wrap_stream(self, full_method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        method = full_method.rsplit("/", 1)[-1]

        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                with self._handling(full_method, context, streaming=True):
                    yield from behavior(_parsed(request), context)
            except GeneratorExit:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code = _fail(context, exc)
            finally:
                self._observe(method, code, time.perf_counter() - start)

        return wrapped
