"""Agent configuration: command-line flags or a TOML file, validated before any I/O."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from failover import defaults
from failover.errors import ConfigError
from failover.net.address import Address, parse_address, parse_address_list

_KEYS = {
    "host_id", "listen", "advertise", "data_dir", "coordinator", "zone", "fsync_policy",
    "heartbeat_ms", "batch_entries_max", "batch_bytes_max", "inflight_batches_max",
    "snapshot_every_entries", "log_retain_entries",
}


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent needs to start. Build it with `AgentConfig.from_mapping`."""

    host_id: str
    listen: Address
    data_dir: Path
    coordinators: list[Address] = field(default_factory=list)
    advertise: Address | None = None  # the address others dial; defaults to `listen`
    zone: str = ""
    fsync_policy: str = defaults.WAL_FSYNC_POLICY
    heartbeat_ms: int = defaults.HEARTBEAT_MS
    batch_entries_max: int = defaults.BATCH_ENTRIES_MAX
    batch_bytes_max: int = defaults.BATCH_BYTES_MAX
    inflight_batches_max: int = defaults.INFLIGHT_BATCHES_MAX
    snapshot_every_entries: int = defaults.SNAPSHOT_EVERY_ENTRIES
    log_retain_entries: int = defaults.LOG_RETAIN_ENTRIES

    @property
    def address(self) -> str:
        """The address peers and clients dial."""
        return str(self.advertise or self.listen)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> AgentConfig:
        """Validates a dict of config keys (from flags and/or TOML) with plain messages."""
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise ConfigError(f"unknown agent config key(s): {', '.join(unknown)}; "
                              f"known keys: {', '.join(sorted(_KEYS))}")
        for key in ("host_id", "listen", "data_dir"):
            if not raw.get(key):
                raise ConfigError(f"agent config: {key} is required")
        host_id = str(raw["host_id"])
        if not host_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"host_id {host_id!r}: use letters, digits, '-', '_' or '.'")
        coordinators = raw.get("coordinator") or []
        if isinstance(coordinators, str):
            coordinators = parse_address_list(coordinators, what="coordinator")
        else:
            coordinators = [parse_address(str(c), what="coordinator") for c in coordinators]
        policy = str(raw.get("fsync_policy", defaults.WAL_FSYNC_POLICY))
        if policy not in defaults.WAL_FSYNC_POLICIES:
            raise ConfigError(f"fsync_policy {policy!r}: choose one of "
                              f"{', '.join(defaults.WAL_FSYNC_POLICIES)}")
        ints: dict[str, int] = {}
        for key, low, high in (
            ("heartbeat_ms", 10, 60_000),
            ("batch_entries_max", 1, 1_000_000),
            ("batch_bytes_max", 4096, 64 << 20),
            ("inflight_batches_max", 1, 1024),
            ("snapshot_every_entries", 0, 1 << 40),
            ("log_retain_entries", 0, 1 << 40),
        ):
            if key in raw:
                value = raw[key]
                is_int = isinstance(value, int) and not isinstance(value, bool)
                if not is_int or not low <= value <= high:
                    raise ConfigError(f"{key} must be a whole number in {low}..{high}, "
                                      f"not {value!r}")
                ints[key] = value
        advertise = raw.get("advertise")
        return cls(
            host_id=host_id,
            listen=parse_address(str(raw["listen"]), what="listen", allow_port_zero=False),
            data_dir=Path(str(raw["data_dir"])),
            coordinators=coordinators,
            advertise=parse_address(str(advertise), what="advertise") if advertise else None,
            zone=str(raw.get("zone", "")),
            fsync_policy=policy,
            **ints,
        )


def load_toml(path: str | Path) -> dict[str, Any]:
    """Reads a TOML config file; dashes in keys are accepted as underscores."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}
