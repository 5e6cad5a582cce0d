"""Host:port addresses as given on command lines and in config files."""

from __future__ import annotations

from dataclasses import dataclass

from failover.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint; `str()` gives the form gRPC dials (`host:port`, IPv6 in brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str, *, what: str = "address", allow_port_zero: bool = False) -> Address:
    """Parses `HOST:PORT` (`[::1]:PORT` for IPv6); raises ConfigError saying what is wrong."""
    value = text.strip()
    if value.startswith("["):
        close = value.find("]")
        if close < 0 or not value[close + 1 :].startswith(":"):
            raise ConfigError(f"{what} {text!r} is not [IPV6]:PORT")
        host, port_text = value[1:close], value[close + 2 :]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"{what} {text!r} is not HOST:PORT (for example 127.0.0.1:7100)")
        if ":" in host:
            raise ConfigError(f"{what} {text!r}: write an IPv6 host in brackets, [::1]:PORT")
    if not port_text.isdigit():
        raise ConfigError(f"{what} {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{what} {text!r}: port must be in {low}..65535")
    return Address(host, port)


def parse_address_list(text: str, *, what: str = "address list") -> list[Address]:
    """Parses a comma-separated list of `HOST:PORT`; at least one is required."""
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    if not parts:
        raise ConfigError(f"{what} is empty: give at least one HOST:PORT")
    return [parse_address(p, what=what) for p in parts]
