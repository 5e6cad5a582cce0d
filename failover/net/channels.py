"""gRPC channel and server options, in one place, so every hop has the same bounds; and
whether a hop is TLS (`failover.net.tls`) or in the clear.

Channels: `insecure_channel`, `secure_channel`, or `channel` choosing by whether TLS material
is given. Servers: `server`, then `add_port` (TLS or not), after `check_listen` refused to
serve in the clear beyond loopback unless told to.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Sequence

import grpc
import grpc.aio

from failover import defaults
from failover.errors import ConfigError
from failover.net.address import parse_address
from failover.net.tls import TlsMaterial, channel_credentials, server_credentials

# A shipped batch or a snapshot chunk may be near batch_bytes_max plus framing; a client
# request up to request_bytes_max. Leave headroom for protobuf and metadata.
MESSAGE_BYTES_MAX = max(defaults.BATCH_BYTES_MAX * 8, defaults.REQUEST_BYTES_MAX) + (1 << 20)

_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
    # Detect a dead peer on an idle stream well within a failover timeout's order.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect fast after a peer restarts (the default backoff starts at 1 s).
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # One connection per target, not one per channel object.
    ("grpc.use_local_subchannel_pool", 0),
]

_SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
]


def _channel_options(own_connection: bool) -> list[tuple[str, int | str]]:
    if not own_connection:
        return _OPTIONS
    options = [o for o in _OPTIONS if o[0] != "grpc.use_local_subchannel_pool"]
    return [*options, ("grpc.use_local_subchannel_pool", 1)]


def insecure_channel(address: str, *, own_connection: bool = False) -> grpc.aio.Channel:
    """An asyncio channel to `address` with the project's bounds.

    With `own_connection` the channel does not share the process-wide connection to the
    address: a new channel then really connects anew, where a shared connection still
    waiting out its reconnect backoff (the peer was down) fails every call at once."""
    return grpc.aio.insecure_channel(address, options=_channel_options(own_connection))


def secure_channel(address: str, tls: TlsMaterial, *, server_name: str | None = None,
                   own_connection: bool = False) -> grpc.aio.Channel:
    """`insecure_channel`, but mutual TLS: the channel presents `tls`'s certificate and
    accepts only a server whose certificate the CA signed and that names the host of
    `address` (an IP or DNS subject alternative name), or `server_name` when given (an
    identity's name: every certificate carries its name as a DNS name too)."""
    options = _channel_options(own_connection)
    if server_name is not None:
        options = [*options, ("grpc.ssl_target_name_override", server_name)]
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=options)


def channel(address: str, tls: TlsMaterial | None = None, *, server_name: str | None = None,
            own_connection: bool = False) -> grpc.aio.Channel:
    """`secure_channel` with `tls`, `insecure_channel` without."""
    if tls is None:
        return insecure_channel(address, own_connection=own_connection)
    return secure_channel(address, tls, server_name=server_name, own_connection=own_connection)


def blocking_channel(address: str, tls: TlsMaterial | None = None) -> grpc.Channel:
    """A blocking (not asyncio) channel to `address` with the project's bounds: mutual TLS
    with `tls`, in the clear without. For a process with no event loop (the agent's
    supervisor, `failover.agent.supervisor`)."""
    options = _channel_options(own_connection=True)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(tls), options=options)


def server(*, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """An asyncio server with the project's bounds (and `interceptors`, such as
    `failover.net.authorization.RoleCheck` on a TLS server)."""
    return grpc.aio.server(options=_SERVER_OPTIONS, interceptors=list(interceptors) or None)


def add_port(server: grpc.aio.Server, address: str, tls: TlsMaterial | None = None) -> int:
    """Binds `address` on `server`, with mutual TLS if `tls` is given (clients must present a
    certificate of the CA); returns the port bound (0 if binding failed)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def is_loopback(address: str) -> bool:
    """Whether `address` (HOST:PORT) is reachable only from this host."""
    host = parse_address(address, allow_port_zero=True).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(address: str, *, tls: bool, insecure: bool) -> None:
    """Raises ConfigError if a server would listen on `address` in the clear where other
    hosts can reach it, unless `insecure` says to."""
    if tls or insecure or is_loopback(address):
        return
    raise ConfigError(
        f"refusing to listen on {address} without TLS: anyone who reaches it could drive the "
        "cluster; give --tls-ca, --tls-cert and --tls-key, or --insecure to serve in the clear")


def check_listen_free(address: str) -> None:
    """Raises ConfigError when another process listens on `address` already (an agent
    started twice, a port taken), before anything starts: under its supervisor, an agent
    whose child could not bind was started again five times, then gave up with exit 1 some
    seconds later, and the one line saying why was lost among their logs. A port taken in
    between is still found by the daemon's own bind."""
    parsed = parse_address(address, what="listen", allow_port_zero=True)
    if parsed.port == 0:
        return
    try:
        found = socket.getaddrinfo(parsed.host or None, parsed.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError:
        return  # a host that does not resolve: the daemon's bind says so
    for family, kind, proto, _name, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            # As the daemon binds: an old connection's TIME_WAIT does not block it, a
            # listener does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"cannot listen on {address}: another process listens there (is "
                        "this daemon running already?); stop it or choose another port"
                    ) from None
                return  # not this check's to judge (an address of another host...)


REDIRECT_METADATA_KEY = "failover-redirect-bin"
# Trailing metadata naming the typed error (failover.errors) behind a status code that
# several errors share: SessionExpired (FAILED_PRECONDITION), Overloaded (RESOURCE_EXHAUSTED).
ERROR_TYPE_METADATA_KEY = "failover-error-type"
# Issue 15, several coordinators. Invocation metadata on every coordinator->agent control call:
# the sending coordinator's term (decimal); an agent refuses a term older than one it has seen.
COORDINATOR_TERM_METADATA_KEY = "failover-coordinator-term"
# Trailing metadata of a follower coordinator's UNAVAILABLE: the leader's HOST:PORT.
LEADER_METADATA_KEY = "failover-leader"
