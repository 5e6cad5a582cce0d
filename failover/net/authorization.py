"""The role check in front of every handler of a TLS server: a call whose caller's certificate
does not grant the method's permission (`failover.core.permissions.METHOD_PERMISSIONS`) ends
with PERMISSION_DENIED before its handler runs, the message naming the caller and the role it
lacks.

Install it on a server that listens with TLS (`channels.server(interceptors=[RoleCheck()])`
and `channels.add_port(..., tls)`): without TLS no caller has an identity, so every call would
be refused. What depends on the request (an agent reports only as its own host id, a duplica
takes batches only from the primary it was told about) stays with the handler
(`permissions.require_host`, `peer_identity`).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
import grpc.aio

from failover.core.permissions import METHOD_PERMISSIONS, require_method
from failover.errors import PermissionDenied
from failover.net.tls import peer_identity


async def _check(method: str, context: grpc.aio.ServicerContext,
                 methods: Mapping[str, str]) -> None:
    try:
        require_method(peer_identity(context), method, methods)
    except PermissionDenied as exc:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))


def _unary_response(behavior: Callable[..., Awaitable[Any]], method: str,
                    methods: Mapping[str, str]) -> Callable[..., Awaitable[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _check(method, context, methods)
        return await behavior(request, context)

    return checked


def _stream_response(behavior: Callable[..., Any], method: str,
                     methods: Mapping[str, str]) -> Callable[..., AsyncIterator[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _check(method, context, methods)
        result = behavior(request, context)
        if inspect.isasyncgen(result):
            async for reply in result:
                yield reply
        else:  # a handler that writes with context.write and returns
            await result

    return checked


class RoleCheck(grpc.aio.ServerInterceptor):
    """Refuses each call the caller's role does not allow (`methods`: full method name to
    permission; a method not in it is refused to everyone)."""

    def __init__(self, methods: Mapping[str, str] = METHOD_PERMISSIONS) -> None:
        self._methods = methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        options = {"request_deserializer": handler.request_deserializer,
                   "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary_response(handler.unary_unary, method, self._methods), **options)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _unary_response(handler.stream_unary, method, self._methods), **options)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _stream_response(handler.unary_stream, method, self._methods), **options)
        return grpc.stream_stream_rpc_method_handler(
            _stream_response(handler.stream_stream, method, self._methods), **options)
