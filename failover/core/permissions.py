"""Who may call what: the roles a certificate grants, and the permission each RPC needs.

Pure data and checks, no I/O. A caller's `Identity` (role and name) comes from its
certificate: `failoverctl certs issue` writes it as the URI subject alternative name
``failover://ROLE/NAME`` (`identity_uri`), and the servers read it back from the TLS peer
(`failover.net.tls.peer_identity`). A server then calls `require(identity, permission)`, and an
agent's own reports `require_host(identity, host_id)`.

Roles: ``client`` may execute, query and watch routes; ``operator`` adds reading the cluster's
status and history, switchover, drain and migrate; ``admin`` adds create, delete, patch, chaos
and manual compaction. ``agent`` may register, heartbeat, ship, install snapshots and send
migrated pages (as its own host id only); ``coordinator`` may drive the agents (the control
RPCs) and read their status.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from failover.errors import InvalidRequest, PermissionDenied

CLIENT, OPERATOR, ADMIN = "client", "operator", "admin"
AGENT, COORDINATOR = "agent", "coordinator"
ROLES = (AGENT, COORDINATOR, CLIENT, OPERATOR, ADMIN)

# An identity's name is a certificate's common name (at most 64 characters in X.509), a host
# id for an agent, and a file name in the certificates' directory: a safe alphabet.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_URI_RE = re.compile(r"failover://([a-z]+)/([^/]+)")

# --- permissions ---------------------------------------------------------------------------

EXECUTE, QUERY, WATCH_ROUTES = "execute", "query", "watch routes"
READ_STATUS, SWITCHOVER, DRAIN, MIGRATE = "read status", "switchover", "drain", "migrate"
CREATE, DELETE, PATCH, CHAOS, COMPACT = "create", "delete", "patch", "chaos", "compact"
REGISTER, HEARTBEAT, SHIP, INSTALL_SNAPSHOT, SEND_PAGES = (
    "register", "heartbeat", "ship", "install snapshot", "send migrated pages")
CONTROL, READ_AGENT = "control an agent", "read an agent's status"
# The standard gRPC health service (issue 17): every role may ask whether a daemon serves,
# as anyone who reaches the metrics port may (it changes nothing; routes say as much).
HEALTH = "read health"
REPORT_EXIT = "report its agent process's exit"

_CLIENT = frozenset({EXECUTE, QUERY, WATCH_ROUTES, HEALTH})
_OPERATOR = _CLIENT | {READ_STATUS, SWITCHOVER, DRAIN, MIGRATE}
_ADMIN = _OPERATOR | {CREATE, DELETE, PATCH, CHAOS, COMPACT, READ_AGENT}

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    CLIENT: _CLIENT,
    OPERATOR: _OPERATOR,
    ADMIN: _ADMIN,
    AGENT: frozenset({REGISTER, HEARTBEAT, SHIP, INSTALL_SNAPSHOT, SEND_PAGES, HEALTH,
                       REPORT_EXIT}),
    COORDINATOR: frozenset({CONTROL, READ_AGENT, COMPACT, HEALTH}),
}

# The permission each RPC needs, by its full gRPC method name (the servers check these; a
# method missing here is refused). Finer checks stay with the handler: the host id an agent
# reports as (`require_host`), the primary a duplica takes batches from, the epoch.
_PACKAGE = "/failover.v1."
METHOD_PERMISSIONS: dict[str, str] = {
    f"{_PACKAGE}{method}": permission
    for method, permission in {
        "Data/Execute": EXECUTE,
        "Data/Query": QUERY,
        "Data/ExecuteStream": EXECUTE,
        "Coordinator/Register": REGISTER,
        "Coordinator/Heartbeat": HEARTBEAT,
        "Coordinator/WatchRoutes": WATCH_ROUTES,
        "Coordinator/GetClusterStatus": READ_STATUS,
        "Coordinator/GetHistory": READ_STATUS,
        "Coordinator/WatchHistory": READ_STATUS,
        "Coordinator/Switchover": SWITCHOVER,
        "Coordinator/DrainHost": DRAIN,
        "Coordinator/Migrate": MIGRATE,
        "Coordinator/CreateService": CREATE,
        "Coordinator/DeleteService": DELETE,
        "Coordinator/Patch": PATCH,
        "Coordinator/ProcessExited": REPORT_EXIT,
        "AgentControl/AssignRole": CONTROL,
        "AgentControl/StepDown": CONTROL,
        "AgentControl/DropReplica": CONTROL,
        "AgentControl/PrepareSwitchover": CONTROL,
        "AgentControl/MigrateOut": CONTROL,
        "AgentControl/Restart": CONTROL,
        "AgentControl/GetStatus": READ_AGENT,
        "AgentControl/HearsPrimary": READ_AGENT,
        "AgentControl/GetDigest": READ_AGENT,
        "AgentControl/Compact": COMPACT,
        "Replication/Ship": SHIP,
        "Replication/InstallSnapshot": INSTALL_SNAPSHOT,
        "Migration/MigratePages": SEND_PAGES,
    }.items()
}
HEALTH_METHODS = tuple(f"/grpc.health.v1.Health/{m}" for m in ("Check", "List", "Watch"))
METHOD_PERMISSIONS.update(dict.fromkeys(HEALTH_METHODS, HEALTH))


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a certificate says its holder is: a role of `ROLES` and a name (a host id for an
    agent)."""

    role: str
    name: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidRequest(f"role {self.role!r} is not one of {', '.join(ROLES)}")
        check_identity_name(self.name)

    def __str__(self) -> str:
        return f"{self.role} {self.name!r}"


def check_identity_name(name: str) -> None:
    """Raises InvalidRequest unless `name` may name an identity (and its certificate files)."""
    if not NAME_RE.fullmatch(name) or name == "ca":
        raise InvalidRequest(
            f"identity name {name!r}: use 1-64 letters, digits, '_', '.', '-' (first a letter "
            "or digit), and not 'ca' (the CA's own files)")


def identity_uri(identity: Identity) -> str:
    """The URI subject alternative name a certificate carries its identity in."""
    return f"failover://{identity.role}/{identity.name}"


def parse_identity_uri(uri: str) -> Identity | None:
    """The identity in a ``failover://ROLE/NAME`` URI; None for any other URI or a malformed
    one (never an exception: the text comes from a peer's certificate)."""
    match = _URI_RE.fullmatch(uri)
    if match is None:
        return None
    try:
        return Identity(match.group(1), match.group(2))
    except InvalidRequest:
        return None


def roles_with(permission: str) -> tuple[str, ...]:
    """The roles that grant `permission`, in `ROLES` order."""
    return tuple(role for role in ROLES if permission in ROLE_PERMISSIONS[role])


def allowed(identity: Identity | None, permission: str) -> bool:
    """Whether `identity` (None: no certificate) holds `permission`."""
    return identity is not None and permission in ROLE_PERMISSIONS[identity.role]


def require(identity: Identity | None, permission: str) -> None:
    """Raises PermissionDenied naming the caller and the roles that would do, unless
    `identity` holds `permission`."""
    if allowed(identity, permission):
        return
    roles = roles_with(permission)
    needed = ("role " + " or ".join(roles)) if roles else "a permission no role grants"
    caller = str(identity) if identity is not None else "a caller without a certificate"
    raise PermissionDenied(caller, permission, needed)


def require_method(identity: Identity | None, method: str,
                   methods: Mapping[str, str] = METHOD_PERMISSIONS) -> None:
    """`require` for a full gRPC method name; a method not in `methods` is refused to
    everyone."""
    permission = methods.get(method)
    if permission is None:
        caller = str(identity) if identity is not None else "a caller without a certificate"
        raise PermissionDenied(caller, f"call {method}", "a method the servers know")
    require(identity, permission)


def require_host(identity: Identity | None, host_id: str) -> None:
    """Raises PermissionDenied unless `identity` is the agent `host_id`: an agent registers,
    heartbeats and ships only as the host id in its certificate."""
    if identity is not None and identity.role == AGENT and identity.name == host_id:
        return
    caller = str(identity) if identity is not None else "a caller without a certificate"
    raise PermissionDenied(caller, f"act as host {host_id!r}",
                           f"role agent with the name {host_id!r}")
