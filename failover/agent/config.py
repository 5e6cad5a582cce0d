"""Agent configuration: command-line flags or a TOML file, validated before any I/O (the TLS
files are read and checked at start, `AgentConfig.load_tls`)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from failover import defaults
from failover.core.names import check_command_name, check_host_id
from failover.core.permissions import AGENT
from failover.core.roles import HOOK_EVENTS
from failover.errors import ConfigError, InvalidRequest
from failover.net.address import Address, parse_address, parse_address_list
from failover.net.tls import TlsFiles, TlsMaterial
from failover.observe.endpoint import check_metrics_listen
from failover.observe.logs import check_log_format, check_log_level

_KEYS = {
    "host_id", "listen", "advertise", "data_dir", "coordinator", "zone", "fsync_policy",
    "heartbeat_ms", "batch_entries_max", "batch_bytes_max", "inflight_batches_max",
    "snapshot_every_entries", "log_retain_entries",
    "tls_ca", "tls_cert", "tls_key", "insecure", "patch", "hooks",
    "metrics_listen", "log_format", "log_level",
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
    # Mutual TLS (all three files, or none) and whether to serve in the clear beyond loopback.
    tls: TlsFiles | None = None
    insecure: bool = False
    # The patch commands this host runs on Restart: name -> argv, run without a shell
    # (`[patch.commands]` in the TOML; docs/operations.md, Patching).
    patch_commands: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Hooks (issue 17, `[hooks]` in the TOML): event -> names of `patch_commands` entries,
    # run in the background after the event with the service, role and epoch as arguments.
    hooks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hook_timeout_ms: int = defaults.HOOK_TIMEOUT_MS
    hook_output_bytes_max: int = defaults.HOOK_OUTPUT_BYTES_MAX
    # Observability (issue 17): where Prometheus metrics and the health paths are served
    # (None: nowhere), and the log records' format and level.
    metrics_listen: str | None = None
    log_format: str = defaults.LOG_FORMAT
    log_level: str = defaults.LOG_LEVEL

    @property
    def address(self) -> str:
        """The address peers and clients dial."""
        return str(self.advertise or self.listen)

    def load_tls(self) -> TlsMaterial | None:
        """Reads and checks the TLS files (None without TLS): they must hold an agent
        certificate whose name is this host id, since peers and the coordinator check that
        name. Raises ConfigError saying what is wrong."""
        if self.tls is None:
            return None
        material = self.tls.load()
        identity = material.identity
        if identity.role != AGENT or identity.name != self.host_id:
            raise ConfigError(
                f"TLS certificate {self.tls.cert} is for {identity}, but this agent is host "
                f"{self.host_id!r}: issue it one with failoverctl certs issue DIR --role agent "
                f"--name {self.host_id}")
        return material

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
        try:
            check_host_id(host_id, "host_id")
        except InvalidRequest as exc:
            raise ConfigError(str(exc)) from None
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
        insecure = raw.get("insecure", False)
        if not isinstance(insecure, bool):
            raise ConfigError(f"insecure must be true or false, not {insecure!r}")
        tls = TlsFiles.from_options(raw.get("tls_ca"), raw.get("tls_cert"), raw.get("tls_key"))
        patch_commands = _patch_commands(raw.get("patch"))
        hooks, hook_limits = _hooks(raw.get("hooks"), patch_commands)
        metrics_listen = raw.get("metrics_listen")
        if metrics_listen is not None:
            metrics_listen = check_metrics_listen(str(metrics_listen), tls=tls is not None,
                                                  insecure=insecure)
        return cls(
            metrics_listen=metrics_listen,
            log_format=check_log_format(str(raw.get("log_format", defaults.LOG_FORMAT))),
            log_level=check_log_level(str(raw.get("log_level", defaults.LOG_LEVEL))),
            tls=tls,
            insecure=insecure,
            patch_commands=patch_commands,
            hooks=hooks,
            **hook_limits,
            host_id=host_id,
            listen=parse_address(str(raw["listen"]), what="listen", allow_port_zero=False),
            data_dir=Path(str(raw["data_dir"])),
            coordinators=coordinators,
            advertise=parse_address(str(advertise), what="advertise") if advertise else None,
            zone=str(raw.get("zone", "")),
            fsync_policy=policy,
            **ints,
        )


def _patch_commands(patch: Any) -> dict[str, tuple[str, ...]]:
    """`[patch.commands]`: each a name (the one name rule) -> a non-empty list of strings."""
    if patch is None:
        return {}
    if not isinstance(patch, dict) or set(patch) - {"commands"}:
        raise ConfigError("patch: only the table [patch.commands] (name = [argv...]) is known")
    commands = patch.get("commands", {})
    if not isinstance(commands, dict):
        raise ConfigError("[patch.commands] must be a table of name = [\"program\", \"arg\", ...]")
    out: dict[str, tuple[str, ...]] = {}
    for name, argv in commands.items():
        try:
            check_command_name(name)
        except InvalidRequest as exc:
            raise ConfigError(f"[patch.commands]: {exc}") from None
        if (not isinstance(argv, list) or not argv
                or not all(isinstance(a, str) and a and "\x00" not in a for a in argv)):
            raise ConfigError(
                f"[patch.commands] {name}: give the program and its arguments as a list of "
                f"strings (run without a shell), such as [\"/usr/bin/apt-get\", \"-y\", "
                f"\"upgrade\"], not {argv!r}")
        out[name] = tuple(argv)
    return out


def _hooks(table: Any, allowlist: dict[str, tuple[str, ...]],
           ) -> tuple[dict[str, tuple[str, ...]], dict[str, int]]:
    """`[hooks]`: each event of `HOOK_EVENTS` -> a name or a list of names of the host's
    allowlist (`[patch.commands]`), and optionally `timeout_ms` and `output_bytes_max`. A name
    not in the allowlist is refused here, at load, never at the first failover."""
    if table is None:
        return {}, {}
    if not isinstance(table, dict):
        raise ConfigError("hooks: give a table [hooks] of event = [\"name\", ...]")
    known = (*HOOK_EVENTS, "timeout_ms", "output_bytes_max")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"[hooks]: unknown key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(known)}")
    limits: dict[str, int] = {}
    for key, field_name, low, high in (
            ("timeout_ms", "hook_timeout_ms", 1, defaults.PATCH_COMMAND_TIMEOUT_MS),
            ("output_bytes_max", "hook_output_bytes_max", 0, defaults.HOOK_OUTPUT_BYTES_MAX)):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"[hooks] {key} must be a whole number in {low}..{high}, "
                                  f"not {value!r}")
            limits[field_name] = value
    hooks: dict[str, tuple[str, ...]] = {}
    for event in HOOK_EVENTS:
        names = table.get(event)
        if names is None:
            continue
        if isinstance(names, str):
            names = [names]
        if (not isinstance(names, list) or not names
                or len(names) > defaults.HOOKS_PER_EVENT_MAX
                or not all(isinstance(n, str) for n in names)):
            raise ConfigError(f"[hooks] {event}: give 1 to {defaults.HOOKS_PER_EVENT_MAX} names "
                              f"of [patch.commands] entries, such as [\"notify\"], not "
                              f"{names!r}")
        for name in names:
            if name not in allowlist:
                have = ", ".join(sorted(allowlist)) or "none"
                raise ConfigError(
                    f"[hooks] {event}: {name!r} is not in this host's allowlist "
                    f"[patch.commands] (it has: {have}); a hook runs only a command listed "
                    f"there: add {name} = [\"/path/to/program\", \"arg\"] to it")
        hooks[event] = tuple(names)
    return hooks, limits


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
