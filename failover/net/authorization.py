"""The role check in front of every handler of a TLS server: a call whose caller's certificate
does not grant the method's permission (`failover.core.permissions.METHOD_PERMISSIONS`) ends
with PERMISSION_DENIED before its handler runs, the message naming the caller and the role it
lacks.

Install it on a server that listens with TLS (`channels.server(interceptors=[RoleCheck()])`
and `channels.add_port(..., tls)`): without TLS no caller has an identity, so every call would
be refused. What depends on the request (an agent reports only as its own host id, a duplica
takes batches only from the primary it was told about) stays with the handler
(`permissions.require_host`, `peer_identity`).

`TermFence` (issue 15) goes after it on an agent's server, TLS or not: a control call from a
coordinator whose term is older than one the agent has seen (a deposed leader) ends with
FAILED_PRECONDITION before its handler runs, so it changes nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio

from failover.core.permissions import CONTROL, METHOD_PERMISSIONS, allowed, require_method
from failover.errors import (
    InvalidRequest,
    PermissionDenied,
    StaleCoordinatorTermError,
    StorageError,
)
from failover.net.channels import COORDINATOR_TERM_METADATA_KEY, ERROR_TYPE_METADATA_KEY
from failover.net.tls import peer_identity

# A check run before a handler: given the request (None for a client-streaming call) and the
# call's context, it returns to let the handler run or aborts the call.
Check = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


def _unary_response(behavior: Callable[..., Awaitable[Any]], check: Check,
                    streaming_request: bool) -> Callable[..., Awaitable[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(None if streaming_request else request, context)
        return await behavior(request, context)

    return checked


def _stream_response(behavior: Callable[..., Any], check: Check,
                     streaming_request: bool) -> Callable[..., AsyncIterator[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await check(None if streaming_request else request, context)
        result = behavior(request, context)
        if inspect.isasyncgen(result):
            async for reply in result:
                yield reply
        else:  # a handler that writes with context.write and returns
            await result

    return checked


def _checked_handler(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """`handler` with `check` run before its behavior, whatever its streaming shape."""
    options = {"request_deserializer": handler.request_deserializer,
               "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _unary_response(handler.unary_unary, check, False), **options)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _unary_response(handler.stream_unary, check, True), **options)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _stream_response(handler.unary_stream, check, False), **options)
    return grpc.stream_stream_rpc_method_handler(
        _stream_response(handler.stream_stream, check, True), **options)


class CheckFirst(grpc.aio.ServerInterceptor):
    """An interceptor that runs a check before the handler of each call it applies to
    (`check_for`), whatever the call's streaming shape; the check aborts the call or lets
    the handler run."""

    def check_for(self, details: grpc.HandlerCallDetails) -> Check | None:
        """The check for a call to `details.method` (None: the handler runs unchecked)."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        check = self.check_for(handler_call_details)
        return handler if check is None else _checked_handler(handler, check)


# Told of each call the role check refused: (full method name, its request or None for a
# client-streaming call), before the call is aborted. The agent counts them in its metrics.
Refused = Callable[[str, Any], None]


class RoleCheck(CheckFirst):
    """Refuses each call the caller's role does not allow (`methods`: full method name to
    permission; a method not in it is refused to everyone), telling `refused` first."""

    def __init__(self, methods: Mapping[str, str] = METHOD_PERMISSIONS,
                 refused: Refused | None = None) -> None:
        self._methods = methods
        self._refused = refused

    def check_for(self, details: grpc.HandlerCallDetails) -> Check:
        method = details.method

        async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
            try:
                require_method(peer_identity(context), method, self._methods)
            except PermissionDenied as exc:
                if self._refused is not None:
                    self._refused(method, request)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))

        return check


# --- the coordinator term fence (issue 15) --------------------------------------------------

_CONTROL_PREFIX = "/failover.v1.AgentControl/"
# The control calls that change a replica's role, data or the agent's process: a coordinator
# older than the term the agent has seen (deposed) may not make them. The reads (GetStatus,
# HearsPrimary, GetDigest) change nothing; Compact only snapshots and trims a log behind what
# every replica has (an admin may call it too, with no term): neither is fenced.
FENCED_METHODS = frozenset(f"{_CONTROL_PREFIX}{m}" for m in (
    "AssignRole", "StepDown", "DropReplica", "PrepareSwitchover", "MigrateOut", "Restart"))
_TERM_TEXT_MAX = 20  # digits of a uint64


class TermKeeper(Protocol):
    """The highest coordinator term seen (`failover.agent.term.CoordinatorTerm`)."""

    def check(self, term: int) -> None: ...
    def observe(self, term: int) -> bool: ...


# A request check the fence runs first (full method name -> check raising InvalidRequest):
# a malformed request is INVALID_ARGUMENT whatever its term, as it is without a coordinator.
RequestChecks = Mapping[str, Callable[[Any], None]]


def coordinator_term(metadata: Sequence[tuple[str, str | bytes]] | None) -> int:
    """The term a call's invocation metadata carries (`COORDINATOR_TERM_METADATA_KEY`); 0
    without it. Raises InvalidRequest for a malformed or repeated one."""
    values = [v for k, v in metadata or () if k == COORDINATOR_TERM_METADATA_KEY]
    if not values:
        return 0
    text = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
    if len(values) > 1 or not (text.isascii() and text.isdigit()) or len(text) > _TERM_TEXT_MAX \
            or int(text) >= 1 << 64:
        raise InvalidRequest(f"{COORDINATOR_TERM_METADATA_KEY} must be one whole number "
                             f"(the coordinator's term), not {values[:2]!r:.80}")
    return int(text)


class TermFence(CheckFirst):
    """Refuses, before its handler runs, a control call (`FENCED_METHODS`) stamped with a
    coordinator term older than the highest `keeper` has seen: FAILED_PRECONDITION naming
    `StaleCoordinatorTermError` in trailing metadata. A call without the stamp is term 0,
    accepted while no higher term was seen (tools and tests that drive an agent alone). A
    control call with a higher term raises the keeper's term (durably) before it runs.

    Install it after `RoleCheck` (`interceptors=[RoleCheck(), TermFence(...)]`): a caller
    without the role is refused as such whatever term it claims."""

    def __init__(self, keeper: TermKeeper, request_checks: RequestChecks | None = None) -> None:
        self._keeper = keeper
        self._request_checks = request_checks or {}

    def check_for(self, details: grpc.HandlerCallDetails) -> Check | None:
        method = details.method
        if not method.startswith(_CONTROL_PREFIX):
            return None
        metadata = details.invocation_metadata
        fenced = method in FENCED_METHODS
        request_check = self._request_checks.get(method)

        async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
            try:
                term = coordinator_term(metadata)
                if request_check is not None and request is not None:
                    request_check(request)
                # Synchronous from the check on: no other call can slip in between.
                if fenced:
                    self._keeper.check(term)
                # Only a coordinator teaches a term (with TLS, its certificate says so): a
                # reader claiming a huge one would otherwise fence the real leader out.
                identity = peer_identity(context)
                if identity is None or allowed(identity, CONTROL):
                    self._keeper.observe(term)
            except InvalidRequest as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except StaleCoordinatorTermError as exc:
                context.set_trailing_metadata(
                    ((ERROR_TYPE_METADATA_KEY, type(exc).__name__),))
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            except StorageError as exc:  # the raised term could not be made durable
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

        return check
