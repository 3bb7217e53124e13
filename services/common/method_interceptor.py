"""The base of the server interceptors that wrap GenerateService's methods:
each method's handler is wrapped once (a handler never changes), its
behaviour replaced by the subclass's unary or streaming wrapper."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from services.common.servicer import SERVICE_NAME

_PREFIX = f"/{SERVICE_NAME}/"


class MethodInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the behaviour of every GenerateService method with `_wrap_unary`
    or `_wrap_stream` (given the method's name); other services pass through."""

    def __init__(self) -> None:
        # Wrapped handlers by method path: wrapped once, not on every call.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def _wrap_unary(self, method: str, behavior: Any) -> Any:
        raise NotImplementedError

    def _wrap_stream(self, method: str, behavior: Any) -> Any:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        path: str = details.method
        cached = self._wrapped.get(path)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or not path.startswith(_PREFIX):
            return handler
        self._wrapped[path] = self._wrap(path.removeprefix(_PREFIX), handler)
        return self._wrapped[path]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
