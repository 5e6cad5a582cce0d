"""The application's smart client: finds the primary, retries safely, follows redirects.

Every call gets a request id (a session id and a sequence number) that stays the same
across retries and reroutes, so the replicated state applies it at most once and a retry
gets the recorded reply (docs/design.md, invariant 5).

Sessions (docs/design.md, invariant 11; `failover.core.sessions`). A service remembers a bounded
number of sessions and only a request that says so may open one, so that a retry whose session
was evicted is refused (`SessionExpired`) rather than applied again. Per service, this client's
first session id is its `client_id` and later ones are ``client_id/N``. Before its first call
to a service the client opens its session with a logged request that does nothing else
(Raft's RegisterClient); no real request ever opens one, so none can fail for a lost open.
The open's attempts carry `opens_session` only until one of them may have reached the log, so
a session id is opened at most once (an open left without an answer retires the id). A retry is
recognised as long as its session is among the SESSION_CLIENTS_MAX (10,000) sessions of the
service applied most recently and its seq among the session's newest
SESSION_REPLIES_PER_CLIENT_MAX (256); there is no time limit. Past that, the call raises
`SessionExpired` (it may or may not have been applied before: read the state to check), and
later calls go under a new session.

    async with Client(agents="127.0.0.1:7101,127.0.0.1:7102") as client:
        await client.call("accounts", {"op": "transfer", "from": "a", "to": "b", "amount": 5})
"""

from __future__ import annotations

import failover.net.grpc_experiments  # noqa: F401  (sets GRPC_EXPERIMENTS before gRPC)

# isort: split

import asyncio
import contextlib
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import msgpack

from failover import defaults
from failover.client_stream import Answer, CallRefusal, CallStream
from failover.core.state_machine import SESSION_OPEN_PAYLOAD
from failover.errors import (
    ConfigError,
    DiskFullError,
    FailoverError,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RequestRejected,
    SessionExpired,
    Unavailable,
)
from failover.net import channels
from failover.net.address import parse_address_list
from failover.net.leader import LeaderFollower
from failover.net.tls import TlsFiles, TlsMaterial
from failover.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, data_pb2, data_pb2_grpc

log = logging.getLogger(__name__)


class _RoutesGap(Exception):
    """A routes delta after a version the client never saw: it needs the whole table."""


# Answers after which the request may or may not be in the primary's log.
_AMBIGUOUS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED}
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.NOT_FOUND,  # this host does not hold the service: try another
    grpc.StatusCode.FAILED_PRECONDITION,  # not the primary: follow the hint
    grpc.StatusCode.UNKNOWN,
}
# Refusals given before anything is logged: an attempt that got one surely did not apply.
_NOT_LOGGED = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
# A later session's id is the client id, "/" and a number of up to 20 digits.
_SESSION_SUFFIX_BYTES_MAX = 21


def _addresses(value: str | Sequence[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    text = value if isinstance(value, str) else ",".join(value)
    return [str(a) for a in parse_address_list(text, what=what)]


class Client:
    """Calls services by name; `call` retries until the deadline without applying twice.

    With `coordinator` (a comma list of coordinators) the client subscribes to the pushed
    routes table of the leader among them and follows it (a follower names the leader).
    `agents` (agent addresses) is the other way to find primaries: by asking, a non-primary
    answers with a redirect hint. Either or both.

    With `tls` (`TlsFiles(ca, cert, key)`, checked when the client is made: ConfigError names
    a bad file) every call to an agent and the routes watch are mutual TLS; a call the
    certificate's role does not allow raises `PermissionDenied`.

    `services` (names) limits the routes watch to those services: the coordinator then sends
    this client only their routes and only the pushes that change them, which is what a
    client of a few services among thousands wants. A call to another service raises
    ConfigError.

    Calls go on one long-lived ExecuteStream per primary (`failover.client_stream`): the
    calls that are ready when the stream is free travel as one message, and the primary
    logs their writes as one append and ships them as one batch. Each keeps its own request
    id, deadline, retries and exactly-once, as with one Execute per call (`stream=False`).
    """

    def __init__(
        self,
        coordinator: str | Sequence[str] | None = None,
        *,
        agents: str | Sequence[str] | None = None,
        client_id: str | None = None,
        deadline_ms: int = defaults.CALL_DEADLINE_MS,
        tls: TlsFiles | TlsMaterial | None = None,
        services: Sequence[str] | None = None,
        stream: bool = True,
    ) -> None:
        self._tls = tls.load() if isinstance(tls, TlsFiles) else tls
        if isinstance(services, str):
            raise ConfigError("services is a list of service names, not one string")
        self._watched = frozenset(services or ())
        if len(self._watched) > defaults.ROUTE_WATCH_SERVICES_MAX:
            raise ConfigError(f"services names {len(self._watched)} services, over "
                              f"route_watch_services_max ({defaults.ROUTE_WATCH_SERVICES_MAX}): "
                              "name none to follow every route")
        self._seeds = _addresses(agents, "agents")
        self._coordinators = _addresses(coordinator, "coordinator")
        # Which coordinator to watch: the leader once known (issue 15). Each client starts
        # at a random one, so that many clients spread their first subscriptions.
        self._coordinator_follower = LeaderFollower(
            self._coordinators, backoff_min_ms=defaults.CLIENT_BACKOFF_MIN_MS,
            backoff_max_ms=defaults.CLIENT_ROUTES_BACKOFF_MAX_MS,
            shuffle=True) if self._coordinators else None
        if not self._seeds and not self._coordinators:
            raise ConfigError("Client needs coordinator=HOST:PORT[,...] or agents=HOST:PORT[,...]")
        if deadline_ms <= 0:
            raise ConfigError(f"deadline_ms must be > 0, not {deadline_ms}")
        self.client_id = client_id or uuid.uuid4().hex
        id_bytes_max = defaults.CLIENT_ID_BYTES_MAX - _SESSION_SUFFIX_BYTES_MAX
        if not 0 < len(self.client_id.encode()) <= id_bytes_max or "\x00" in self.client_id:
            raise ConfigError(f"client_id must be 1-{id_bytes_max} bytes, no NUL (a session "
                              f"id adds up to {_SESSION_SUFFIX_BYTES_MAX} to it)")
        self.deadline_ms = deadline_ms
        self._seq = itertools.count(1)
        self._sessions: dict[str, _Session] = {}  # service -> the session requests go under
        self._session_numbers = itertools.count(1)
        self._routes: dict[str, tuple[str, int]] = {}  # service -> (primary address, epoch)
        # The version of the routes table followed: None until a stream's whole table comes.
        self._routes_version: int | None = None
        self._stubs: dict[str, data_pb2_grpc.DataStub] = {}
        # Calls go on one long-lived ExecuteStream per primary (issue 16), or with `stream`
        # False one unary Execute each.
        self.stream = stream
        self._streams: dict[str, CallStream] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Future[None]] = set()  # channels replaced, being closed
        self._seed_cursor = random.randrange(len(self._seeds)) if self._seeds else 0
        self.retries = 0  # attempts beyond the first, over the client's life (for reports)
        self._watcher: asyncio.Task[None] | None = None
        # Attempts in flight per service, and those cancelled because the routes moved the
        # service elsewhere: an attempt to a partitioned primary would otherwise wait out
        # its whole deadline before the client tried the new one.
        self._attempts: dict[
            str, set[tuple[str, grpc.aio.UnaryUnaryCall | asyncio.Future[Answer]]]] = {}
        self._rerouted: set[int] = set()
        self._routes_changed = asyncio.Event()
        # The coordinators refused this client's certificate the routes watch: waiting for
        # a route raises it rather than waiting out the deadline.
        self._denied: PermissionDenied | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops following routes and closes every channel."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            await stream.close()
        channels_ = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in channels_:
            await channel.close()
        for closing in list(self._closing):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await closing

    def _stub(self, address: str) -> data_pb2_grpc.DataStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = data_pb2_grpc.DataStub(self._new_channel(address))
        return stub

    def _reconnect_if_failing(self, address: str) -> None:
        """A route moved to `address`: a channel to it that is waiting out its reconnect
        backoff (the host was down a while ago, as a crashed agent's is while its supervisor
        restarts it) fails every call at once until that backoff ends, up to a second after
        the host came back. Such a channel is replaced by one with a connection of its own,
        which connects at the first call: the coordinator just said the host serves. (Crash
        failovers took 35 ms, and 100-900 ms whenever the new primary's host had itself been
        restarted within the last second or so.)"""
        channel = self._channels.get(address)
        if channel is None or (channel.get_state(try_to_connect=False)
                               != grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            return
        stream = self._streams.pop(address, None)
        self._stubs[address] = data_pb2_grpc.DataStub(self._new_channel(address, True))
        log.debug("routes moved to %s, whose channel waited out a reconnect backoff: a new "
                  "channel connects now", address)

        async def close_old() -> None:
            if stream is not None:
                await stream.close()
            await channel.close()

        task = asyncio.ensure_future(close_old())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _new_channel(self, address: str, own_connection: bool = False) -> grpc.aio.Channel:
        channel = channels.channel(address, self._tls, own_connection=own_connection)
        self._channels[address] = channel
        return channel

    def _call_stream(self, address: str) -> CallStream:
        """The stream calls to `address` go on: the open one, or a new one once it broke."""
        stream = self._streams.get(address)
        if stream is None or stream.broken:
            stream = self._streams[address] = CallStream(self._stub(address), address)
        return stream

    def _channel(self, address: str) -> grpc.aio.Channel:
        self._stub(address)
        return self._channels[address]

    async def _watch_routes(self) -> None:
        """Follows the routes push of the leader coordinator: a follower refuses the watch
        naming the leader (issue 15), which is subscribed to at once; a stream that ends or
        fails moves to the next coordinator after a bounded backoff."""
        coordinators = self._coordinator_follower
        assert coordinators is not None  # started only with coordinators
        while True:
            address = coordinators.current
            stream = None
            try:
                stub = coordinator_pb2_grpc.CoordinatorStub(self._channel(address))
                stream = stub.WatchRoutes(coordinator_pb2.WatchRoutesRequest(
                    services=sorted(self._watched)))
                self._routes_version = None  # a new stream starts with the whole table
                async for update in stream:
                    self._apply_routes(update)
                    coordinators.answered()
                wait_s = coordinators.failed()  # the leader ended the stream: it stepped down
            except _RoutesGap as gap:
                # A delta this client cannot apply: subscribe again (to the same
                # coordinator, at once) for the whole table.
                log.info("routes from coordinator %s: %s; subscribing again", address, gap)
                if stream is not None:
                    stream.cancel()
                await asyncio.sleep(defaults.CLIENT_BACKOFF_MIN_MS / 1000)
                continue
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    self._denied = PermissionDenied.from_status(exc.details() or "")
                    self._routes_changed.set()
                wait_s = coordinators.failed(exc)
            except Exception:
                # The watcher is the client's only news of a failover: whatever went wrong
                # with this stream, say so and subscribe again. Were it to end here, the
                # client would call a dead primary until its process restarts.
                log.warning("routes from coordinator %s: handling the stream failed; "
                            "subscribing again", address, exc_info=True)
                if stream is not None:
                    stream.cancel()
                wait_s = coordinators.failed()
            await asyncio.sleep(wait_s)

    @property
    def coordinator_leader(self) -> str | None:
        """The coordinator whose routes push this client follows now (None: none yet)."""
        follower = self._coordinator_follower
        return follower.leader if follower is not None else None

    def _apply_routes(self, update: coordinator_pb2.RoutesUpdate) -> None:
        """Applies a routes update: the whole table, or the delta that follows the version
        this client holds. A delta it already holds is skipped; one after a version it never
        saw raises `_RoutesGap` (the watcher subscribes again for the whole table)."""
        if not update.full:
            # A watch of some services gets only the pushes that change them: each delta says
            # which version it follows.
            base = update.base_version or update.version - 1
            if self._routes_version is None or base > self._routes_version:
                raise _RoutesGap(f"routes version {update.version} (after {base}) after "
                                 f"{self._routes_version}")
            if update.version <= self._routes_version:
                return
            for service in update.deleted:
                self._routes.pop(service, None)
        self._routes_version = update.version
        for route in update.routes:
            known = self._routes.get(route.service)
            # Epochs only grow: an older table (another coordinator, a reordering) never
            # replaces a newer route, e.g. one learnt from a redirect.
            if route.primary_address and (known is None or route.epoch >= known[1]):
                if known is not None and known[0] != route.primary_address:
                    self._reconnect_if_failing(route.primary_address)
                self._routes[route.service] = (route.primary_address, route.epoch)
                for address, call in list(self._attempts.get(route.service, ())):
                    if address != route.primary_address and not call.done():
                        self._rerouted.add(id(call))
                        call.cancel()
        event, self._routes_changed = self._routes_changed, asyncio.Event()
        event.set()

    async def _target(self, service: str, deadline: float) -> tuple[str, int]:
        if self._watched and service not in self._watched:
            raise ConfigError(f"service {service!r} is not among the services this client "
                              f"watches ({len(self._watched)} given to Client(services=...)):"
                              " add it there")
        if self._coordinators and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_routes())
        route = self._routes.get(service)
        if route is not None:
            return route
        if self._seeds:
            self._seed_cursor = (self._seed_cursor + 1) % len(self._seeds)
            return self._seeds[self._seed_cursor], 0
        # Only a coordinator to ask: wait for a routes table that names the service.
        while (route := self._routes.get(service)) is None:
            if self._denied is not None:
                raise self._denied
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"{service}: no route from the coordinators "
                                  f"{', '.join(self._coordinators)} before the deadline; is "
                                  "the service created?")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._routes_changed.wait()
        return route

    async def call(self, service: str, request: dict[str, Any], *,
                   deadline_ms: int | None = None) -> dict[str, Any]:
        """Runs one request on the service's primary and returns its result.

        Raises `RequestRejected` when the service refuses it, `InvalidRequest` when it is
        malformed (or too large or too deeply nested to log), and `Unavailable` when no
        primary answered before the deadline (then the request may or may not have been
        applied). `SessionExpired` (a `RequestRejected`) means the call's session was evicted
        while it was being retried: this attempt changed nothing, but an earlier one may have
        been applied, so read the state to check; later calls go under a new session. A
        primary with too many writes in flight refuses them before logging (RESOURCE_EXHAUSTED):
        the call retries with backoff, and raises `Overloaded` at its deadline if every
        attempt was refused so (nothing was applied).
        """
        return (await self.call_detailed(service, request, deadline_ms=deadline_ms)).result

    async def call_detailed(self, service: str, request: dict[str, Any], *,
                            deadline_ms: int | None = None) -> CallResult:
        """`call`, also returning where and when the request was applied (for checkers)."""
        if not isinstance(request, dict):
            raise InvalidRequest(f"a request is a dict, not {type(request).__name__}")
        payload = msgpack.packb(request, use_bin_type=True)
        if len(payload) > defaults.REQUEST_BYTES_MAX:
            raise InvalidRequest(f"request of {len(payload)} bytes is over request_bytes_max "
                                 f"({defaults.REQUEST_BYTES_MAX})")
        seq = next(self._seq)
        budget_ms = deadline_ms or self.deadline_ms
        deadline = time.monotonic() + budget_ms / 1000
        session = await self._session(service, budget_ms, deadline)
        try:
            reply, address, attempt = await self._attempt_until_answered(
                service, payload, seq, session, False, budget_ms, deadline)
        except SessionExpired:
            self._retire(service, session)  # the service forgot the session: a new one
            raise
        return CallResult(_result(reply), reply.epoch, reply.index, address, reply.duplicate,
                          attempt)

    async def call_many(self, service: str, requests: Sequence[dict[str, Any]], *,
                        deadline_ms: int | None = None,
                        return_exceptions: bool = False) -> list[Any]:
        """Runs many requests on the service's primary at once; their results, in order.

        Each request is a call of its own (its own request id, applied exactly once, retried
        on its own), all started together so that they share stream messages, log appends
        and shipped batches; no order among them is promised, as among concurrent calls. A
        failed request raises its error (as `call` would) once every request has ended,
        the first in order; with `return_exceptions` its error takes its place in the list
        instead. At most CALL_MANY_REQUESTS_MAX requests."""
        if isinstance(requests, dict):
            raise InvalidRequest("call_many takes a list of requests, not one request")
        if len(requests) > defaults.CALL_MANY_REQUESTS_MAX:
            raise InvalidRequest(f"call_many of {len(requests)} requests is over "
                                 f"call_many_requests_max ({defaults.CALL_MANY_REQUESTS_MAX}):"
                                 " split them")
        outcomes = await asyncio.gather(
            *(self.call(service, request, deadline_ms=deadline_ms) for request in requests),
            return_exceptions=True)
        if not return_exceptions:
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        return outcomes

    async def _attempt_until_answered(
        self, service: str, payload: bytes, seq: int, session: _Session, opener: bool,
        budget_ms: int, deadline: float,
    ) -> tuple[Answer, str, int]:
        """Attempts a request until a primary answers it (a result or a refusal applied from
        the log); returns the reply, who answered and the number of attempts."""
        backoff_ms = float(defaults.CLIENT_BACKOFF_MIN_MS)
        backoff_address = ""  # the address the backoff was earned at
        last_error = "no attempt made"
        attempt = 0
        # A full disk or an overloaded primary is retried (the coordinator moves a full
        # primary off; an overload drains); it is a definite refusal only if no attempt may
        # have reached the log.
        refusal: FailoverError | None = None
        ambiguous = False
        may_have_logged = False  # some attempt may be in the log: none may open the session
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if refusal is not None and not ambiguous:
                    raise type(refusal)(f"{service}: {refusal} (refused for {budget_ms} ms "
                                        f"over {attempt} attempts; nothing was applied)")
                raise Unavailable(f"{service}: no answer within {budget_ms} ms "
                                  f"({attempt} attempts); last error: {last_error}")
            address, epoch = await self._target(service, deadline)
            if address != backoff_address:
                # A new primary starts with the shortest backoff: the long one was earned by
                # the old one, and, carried over, it held a write for up to two of its
                # periods after the new primary's promotion landed (storm: p99 1.9 s).
                backoff_address = address
                backoff_ms = float(defaults.CLIENT_BACKOFF_MIN_MS)
            attempt += 1
            if attempt > 1:
                self.retries += 1
            opens = opener and not may_have_logged
            call: asyncio.Future[Answer] | grpc.aio.UnaryUnaryCall
            stream: CallStream | None = None
            if self.stream:
                stream = self._call_stream(address)
                call = stream.submit(service, epoch, session.client_id, seq, payload, deadline,
                                     opens)
            else:
                call = self._stub(address).Execute(data_pb2.ExecuteRequest(
                    service=service, epoch_seen=epoch,
                    request_id=common_pb2.RequestId(client_id=session.client_id, seq=seq),
                    payload=payload, deadline_ms=int(remaining * 1000),
                    opens_session=opens), timeout=remaining)
            in_flight = (address, call)
            attempts = self._attempts.setdefault(service, set())
            attempts.add(in_flight)
            try:
                answered = await call
                reply = (answered if isinstance(answered, Answer)
                         else Answer.of_reply(answered))
            except asyncio.CancelledError:
                if id(call) not in self._rerouted:
                    raise  # the caller cancelled this call
                self._rerouted.discard(id(call))
                last_error = f"{address}: rerouted by the coordinator"
                ambiguous = may_have_logged = True
                continue  # same request id at the new primary: applied at most once
            except (grpc.aio.AioRpcError, CallRefusal) as exc:
                refused = exc if isinstance(exc, CallRefusal) else CallRefusal.of_rpc_error(exc)
                code = refused.code
                last_error = f"{address}: {code.name}: {refused.details}"
                error_type = refused.error_type
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequest(refused.details or "invalid request") from None
                if code == grpc.StatusCode.PERMISSION_DENIED:
                    raise PermissionDenied.from_status(refused.details) from None
                if error_type == SessionExpired.__name__:
                    raise SessionExpired(f"{service}: {refused.details}") from None
                if code not in _NOT_LOGGED:
                    may_have_logged = True
                overloaded = error_type == Overloaded.__name__
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    details = refused.details or "the primary's disk is full"
                    refusal = Overloaded(details) if overloaded else DiskFullError(details)
                elif code not in _RETRYABLE:
                    raise Unavailable(f"{service}: {last_error}") from None
                elif code in _AMBIGUOUS:
                    ambiguous = True  # it may have reached the primary's log
                if overloaded:
                    pass  # the primary is right, only busy: back off, then ask it again
                elif self._follow_redirect(service, address, refused):
                    continue  # a fresh hint: go there at once
                elif self._seeds:
                    self._routes.pop(service, None)  # ask the seeds around
                elif self._routes.get(service, ("", 0))[0] == address:
                    # The backoff is spent waiting for a newer routes table rather than
                    # hammering this one (and only once: a sleep after it doubled the wait).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.001, min(
                                backoff_ms / 1000, deadline - time.monotonic()))):
                            await self._routes_changed.wait()
                    backoff_ms = min(backoff_ms * 2, defaults.CLIENT_BACKOFF_MAX_MS)
                    continue
                await asyncio.sleep(min(backoff_ms / 1000, max(0.0, deadline - time.monotonic())))
                backoff_ms = min(backoff_ms * 2, defaults.CLIENT_BACKOFF_MAX_MS)
                continue
            finally:
                attempts.discard(in_flight)
                if stream is not None:
                    stream.forget(seq, call)  # type: ignore[arg-type]
            # What answered is the route, unless a newer one came meanwhile (an answer from
            # the old primary, just before a failover's route arrived): routes are pushed
            # once, as deltas, so one overwritten here would not come again.
            epoch = max(epoch, reply.epoch)
            known = self._routes.get(service)
            if known is None or epoch >= known[1]:
                self._routes[service] = (address, epoch)
            return reply, address, attempt

    async def _session(self, service: str, budget_ms: int, deadline: float) -> _Session:
        """The session a call to `service` goes under, opened first if the service does not
        know it yet (Raft's RegisterClient: a logged request that only opens the session).
        One call at a time opens it; the others wait for it, and then all run at once."""
        while True:
            session = self._sessions.get(service)
            if session is None:
                session = self._sessions[service] = _Session(self.client_id)
            if session.known:
                return session
            if session.opening is None:
                session.opening = asyncio.get_running_loop().create_future()
                try:
                    await self._open(service, session, budget_ms, deadline)
                finally:
                    opening, session.opening = session.opening, None
                    if opening is not None and not opening.done():
                        opening.set_result(None)
                continue  # opened, or a fresh session id to open
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"{service}: no answer before the deadline to the request "
                                  "that opens this client's session")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await asyncio.shield(session.opening)

    async def _open(self, service: str, session: _Session, budget_ms: int,
                    deadline: float) -> None:
        """Opens `session` on `service`. Only the first attempt that may reach the log carries
        the open flag: a session id is opened at most once, so a retry whose session was
        evicted can never find it re-opened and be applied again. An open that ends without
        an answer, or whose unflagged retry finds the session unknown, retires the id (the
        open itself changes nothing else, so a fresh id costs nothing)."""
        try:
            reply, _address, _attempts = await self._attempt_until_answered(
                service, SESSION_OPEN_PAYLOAD, next(self._seq), session, True, budget_ms,
                deadline)
        except SessionExpired:
            self._retire(service, session)  # the flagged attempt never landed: try a new id
            return
        except BaseException:
            self._retire(service, session)  # it may have opened the id unseen
            raise
        if reply.outcome:
            self._retire(service, session)
            raise InvalidRequest(f"{service}: the service refused to open a session: "
                                 f"{reply.data.decode(errors='replace')}")
        session.known = True

    def _retire(self, service: str, session: _Session) -> None:
        """Later calls to `service` go under a new session id (this one expired, or may
        have been opened unseen)."""
        if self._sessions.get(service) is session:
            self._sessions[service] = _Session(
                f"{self.client_id}/{next(self._session_numbers)}")

    def _follow_redirect(self, service: str, address: str, refused: CallRefusal) -> bool:
        """Takes a redirect hint from a non-primary; True if it names a new address."""
        redirect = refused.redirect
        if refused.code != grpc.StatusCode.FAILED_PRECONDITION or redirect is None:
            return False
        known = self._routes.get(service)
        if known is not None and redirect.epoch < known[1]:
            return False  # a stale hint: the routes already name a newer primary
        if redirect.primary_address and redirect.primary_address != address:
            self._routes[service] = (redirect.primary_address, redirect.epoch)
            return True
        return False


class _Session:
    """A session of this client with one service."""

    __slots__ = ("client_id", "known", "opening")

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id  # the session id sent as the request id's client_id
        self.known = False  # the service said it holds the session: no request opens it
        self.opening: asyncio.Future[None] | None = None  # set while a call opens it


@dataclass(frozen=True, slots=True)
class CallResult:
    """A request's result and where it was applied."""

    result: dict[str, Any]
    epoch: int  # the primary's epoch when it answered
    index: int  # the log index it was applied at (0 for reads)
    address: str  # the primary that answered
    duplicate: bool  # the recorded reply of an earlier attempt with the same request id
    attempts: int


def _result(reply: Answer) -> dict[str, Any]:
    if reply.outcome:
        message = reply.data.decode(errors="replace")
        if reply.outcome == 1:
            raise RequestRejected(message)
        raise InvalidRequest(message)
    result = msgpack.unpackb(reply.data, raw=False)
    assert isinstance(result, dict), result
    return result


class SyncClient:
    """A blocking wrapper of `Client` for scripts: runs the client's loop on its own thread."""

    def __init__(self, coordinator: str | Sequence[str] | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="failover-client",
                                        daemon=True)
        self._thread.start()
        self._client: Client = self._run(self._make(coordinator, kwargs))

    async def _make(self, coordinator: str | Sequence[str] | None,
                    kwargs: dict[str, Any]) -> Client:
        return Client(coordinator, **kwargs)

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    @property
    def client_id(self) -> str:
        return self._client.client_id

    def call(self, service: str, request: dict[str, Any], *,
             deadline_ms: int | None = None) -> dict[str, Any]:
        """Blocking `Client.call`."""
        return self._run(self._client.call(service, request, deadline_ms=deadline_ms))

    def call_many(self, service: str, requests: Sequence[dict[str, Any]], *,
                  deadline_ms: int | None = None,
                  return_exceptions: bool = False) -> list[Any]:
        """Blocking `Client.call_many`."""
        return self._run(self._client.call_many(service, requests, deadline_ms=deadline_ms,
                                                return_exceptions=return_exceptions))

    def close(self) -> None:
        """Closes the client and stops its thread."""
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
