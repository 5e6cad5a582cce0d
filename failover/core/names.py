"""What a service, a host or a patch command may be called: the one name rule.

Every name that reaches a path, or names something on another host, is checked here, by the
agent and the coordinator alike, at every entry point (issue 13, item 5): service names
become directory names; host ids are an agent's name in its certificate and key its records;
a patch command names an entry of a host's allowlist. One safe alphabet for all: letters,
digits, '_', '.', '-', the first a letter or digit (so no NUL, no '/', no '..' at the start
and no hidden or parent directory).
"""

from __future__ import annotations

import re

from failover.errors import InvalidRequest

SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# A host id is also the name in its agent's certificate (a common name: 64 characters).
HOST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
COMMAND_NAME_RE = HOST_ID_RE


def _check(pattern: re.Pattern[str], name: str, what: str, chars: int) -> None:
    if not isinstance(name, str) or not pattern.fullmatch(name) or ".." in name:
        raise InvalidRequest(
            f"{what} {name!r}: use 1-{chars} letters, digits, '_', '.', '-' (first a letter "
            "or digit, no '..')")


def check_service_name(name: str) -> None:
    """Service names become directory names: keep them to a safe alphabet."""
    _check(SERVICE_NAME_RE, name, "service name", 128)


def check_host_id(host_id: str, what: str = "host id") -> None:
    """Host ids key the coordinator's records and name an agent's certificate."""
    _check(HOST_ID_RE, host_id, what, 64)


def check_command_name(name: str) -> None:
    """A patch command is the name of an entry of the host's allowlist, never a command."""
    _check(COMMAND_NAME_RE, name, "patch command name", 64)
