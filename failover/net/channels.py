"""gRPC channel and server options, in one place, so every hop has the same bounds."""

from __future__ import annotations

import grpc
import grpc.aio

from failover import defaults

# A shipped batch or a snapshot chunk may be near batch_bytes_max plus framing; a client
# request up to request_bytes_max. Leave headroom for protobuf and metadata.
MESSAGE_BYTES_MAX = max(defaults.BATCH_BYTES_MAX * 8, defaults.REQUEST_BYTES_MAX) + (1 << 20)

_OPTIONS: list[tuple[str, int]] = [
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


def insecure_channel(address: str, *, own_connection: bool = False) -> grpc.aio.Channel:
    """An asyncio channel to `address` with the project's bounds.

    With `own_connection` the channel does not share the process-wide connection to the
    address: a new channel then really connects anew, where a shared connection still
    waiting out its reconnect backoff (the peer was down) fails every call at once."""
    if not own_connection:
        return grpc.aio.insecure_channel(address, options=_OPTIONS)
    options = [o for o in _OPTIONS if o[0] != "grpc.use_local_subchannel_pool"]
    return grpc.aio.insecure_channel(
        address, options=[*options, ("grpc.use_local_subchannel_pool", 1)])


def server() -> grpc.aio.Server:
    """An asyncio server with the project's bounds."""
    return grpc.aio.server(options=_SERVER_OPTIONS)


REDIRECT_METADATA_KEY = "failover-redirect-bin"
# Trailing metadata naming the typed error (failover.errors) behind a status code that
# several errors share: SessionExpired (FAILED_PRECONDITION), Overloaded (RESOURCE_EXHAUSTED).
ERROR_TYPE_METADATA_KEY = "failover-error-type"
