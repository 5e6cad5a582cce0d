"""Bounds what gRPC logs about requests that do not parse.

grpc.aio logs every request whose bytes do not decode as its message type at ERROR, with a
full traceback, before any interceptor runs: any caller that reaches the port (with a valid
certificate of any role) could fill a daemon's log. The caller gets UNKNOWN either way; the
log keeps one line per `DECODE_ERROR_LOG_INTERVAL_MS` saying how many were dropped.
"""

from __future__ import annotations

import logging
import time

from failover import defaults

_GRPC_LOGGER = "grpc._cython.cygrpc"


class DecodeErrorLimit(logging.Filter):
    """Passes one undecodable-request record per interval, without its traceback."""

    def __init__(self, interval_ms: int = defaults.DECODE_ERROR_LOG_INTERVAL_MS) -> None:
        super().__init__()
        self.interval_ms = interval_ms
        self._next_ms = 0.0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if "DecodeError" not in record.getMessage() and type(exc).__name__ != "DecodeError":
            return True
        now_ms = time.monotonic() * 1000
        if now_ms < self._next_ms:
            self._dropped += 1
            return False
        self._next_ms = now_ms + self.interval_ms
        dropped, self._dropped = self._dropped, 0
        record.msg = (f"a request that does not parse was refused: {record.getMessage()}"
                      + (f" ({dropped} more since the last such line)" if dropped else ""))
        record.args = ()
        record.exc_info = record.exc_text = None
        return True


def limit_decode_error_logs() -> None:
    """Installs `DecodeErrorLimit` on gRPC's server logger (once per process)."""
    logger = logging.getLogger(_GRPC_LOGGER)
    if not any(isinstance(f, DecodeErrorLimit) for f in logger.filters):
        logger.addFilter(DecodeErrorLimit())
