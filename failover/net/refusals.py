"""How a typed error of the data path goes on the wire, one way for every call shape.

A unary Execute or Query ends with the status code and details (and the trailing metadata:
a redirect hint, the error type) that `refusal_of` gives; an ExecuteStream call gets the same
four things in its `CallRefused`. The client turns either back into the same typed error.
"""

from __future__ import annotations

from typing import NamedTuple

import grpc

from failover.errors import (
    DiskFullError,
    InvalidRequest,
    NotPrimaryError,
    Overloaded,
    PermissionDenied,
    SessionExpired,
    StaleEpochError,
    Unavailable,
    UnknownKindError,
)
from failover.v1 import common_pb2


class Refusal(NamedTuple):
    """What a refused call is told: a status code, its details, the typed error it stands
    for when several share the code ("" otherwise), and a non-primary's redirect hint."""

    code: grpc.StatusCode
    message: str
    error_type: str = ""
    redirect: common_pb2.Redirect | None = None


# The errors a data-path handler turns into a refusal; anything else is a bug and raises.
HANDLED = (NotPrimaryError, InvalidRequest, StaleEpochError, DiskFullError, Unavailable,
           Overloaded, SessionExpired, KeyError, PermissionDenied, UnknownKindError)


def refusal_of(exc: BaseException) -> Refusal | None:
    """The refusal a typed error stands for (None: not one of `HANDLED`): a malformed request
    is INVALID_ARGUMENT, a non-primary FAILED_PRECONDITION with a redirect hint, an expired
    session FAILED_PRECONDITION naming SessionExpired, an unknown outcome UNAVAILABLE, a full
    disk and too many writes in flight (Overloaded) RESOURCE_EXHAUSTED."""
    if isinstance(exc, NotPrimaryError):
        redirect = common_pb2.Redirect(service=exc.service, primary_address=exc.primary_address,
                                       epoch=exc.epoch)
        return Refusal(grpc.StatusCode.FAILED_PRECONDITION, str(exc), "", redirect)
    if isinstance(exc, InvalidRequest | UnknownKindError):
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, PermissionDenied):
        return Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    if isinstance(exc, SessionExpired):
        return Refusal(grpc.StatusCode.FAILED_PRECONDITION, str(exc), SessionExpired.__name__)
    if isinstance(exc, Overloaded):
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), Overloaded.__name__)
    if isinstance(exc, StaleEpochError):
        return Refusal(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, DiskFullError):
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, Unavailable):
        return Refusal(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, KeyError):
        return Refusal(grpc.StatusCode.NOT_FOUND,
                       f"this host holds no replica of {exc.args[0]!r}")
    return None
