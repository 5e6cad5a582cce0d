"""What a service may be called: the agent and the coordinator check names alike."""

from __future__ import annotations

import re

from failover.errors import InvalidRequest

SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_service_name(name: str) -> None:
    """Service names become directory names: keep them to a safe alphabet."""
    if not SERVICE_NAME_RE.match(name):
        raise InvalidRequest(
            f"service name {name!r}: use 1-128 letters, digits, '_', '.', '-' (first a letter "
            "or digit)")
