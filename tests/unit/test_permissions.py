"""The role table (issue 13, item 2): who may call what, as data, and the refusals' words."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from failover.core import permissions as p
from failover.core.permissions import Identity
from failover.errors import InvalidRequest, PermissionDenied
from failover.v1 import agent_pb2, coordinator_pb2, data_pb2, migration_pb2, replication_pb2

# The issue's table, written out once more by hand: a change to permissions.py that moves a
# boundary fails here.
# Health (issue 17) is every role's: it changes nothing and says what routes say.
EXPECTED = {
    p.CLIENT: {p.EXECUTE, p.QUERY, p.WATCH_ROUTES, p.HEALTH},
    p.OPERATOR: {p.EXECUTE, p.QUERY, p.WATCH_ROUTES, p.HEALTH, p.READ_STATUS, p.SWITCHOVER,
                 p.DRAIN, p.MIGRATE},
    p.ADMIN: {p.EXECUTE, p.QUERY, p.WATCH_ROUTES, p.HEALTH, p.READ_STATUS, p.SWITCHOVER,
              p.DRAIN, p.MIGRATE, p.CREATE, p.DELETE, p.PATCH, p.CHAOS, p.COMPACT,
              p.READ_AGENT},
    p.AGENT: {p.REGISTER, p.HEARTBEAT, p.SHIP, p.INSTALL_SNAPSHOT, p.SEND_PAGES, p.HEALTH,
              p.REPORT_EXIT},  # issue 16: a host reports its own agent process's exit
    p.COORDINATOR: {p.CONTROL, p.READ_AGENT, p.COMPACT, p.HEALTH},
}
ALL = set().union(*EXPECTED.values())


def test_the_table_is_the_issues() -> None:
    assert {role: set(perms) for role, perms in p.ROLE_PERMISSIONS.items()} == EXPECTED
    assert set(p.ROLES) == set(EXPECTED)


def test_client_operator_admin_each_allow_more() -> None:
    client, operator, admin = (p.ROLE_PERMISSIONS[r] for r in (p.CLIENT, p.OPERATOR, p.ADMIN))
    assert client < operator < admin


@pytest.mark.parametrize("role", p.ROLES)
@pytest.mark.parametrize("permission", sorted(ALL))
def test_every_boundary(role: str, permission: str) -> None:
    identity = Identity(role, "x1")
    if permission in EXPECTED[role]:
        p.require(identity, permission)
        assert p.allowed(identity, permission)
        return
    with pytest.raises(PermissionDenied) as caught:
        p.require(identity, permission)
    message = str(caught.value)
    assert f"{role} 'x1'" in message
    assert f"may not {permission}" in message
    for needed in p.roles_with(permission):
        assert needed in message.split("needs", 1)[1]
    assert "\n" not in message


def test_refusal_names_the_identity_and_the_role_it_lacks() -> None:
    with pytest.raises(PermissionDenied) as caught:
        p.require(Identity(p.CLIENT, "web-1"), p.SWITCHOVER)
    assert str(caught.value).startswith(
        "permission denied: client 'web-1' may not switchover: it needs role operator or admin")
    assert caught.value.caller == "client 'web-1'"
    assert caught.value.action == p.SWITCHOVER


def test_no_certificate_is_refused_everything() -> None:
    for permission in ALL:
        assert not p.allowed(None, permission)
        with pytest.raises(PermissionDenied, match="without a certificate"):
            p.require(None, permission)


def _rpc_methods() -> set[str]:
    return {
        f"/{service.full_name}/{method.name}"
        for module in (agent_pb2, coordinator_pb2, data_pb2, migration_pb2, replication_pb2,
                       health_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def test_every_rpc_needs_a_permission_some_role_has() -> None:
    assert set(p.METHOD_PERMISSIONS) == _rpc_methods()
    for method, permission in p.METHOD_PERMISSIONS.items():
        assert p.roles_with(permission), method


def test_require_method() -> None:
    p.require_method(Identity(p.COORDINATOR, "c"), "/failover.v1.AgentControl/AssignRole")
    p.require_method(Identity(p.CLIENT, "c"), "/failover.v1.Data/Execute")
    with pytest.raises(PermissionDenied, match="agent 'h1' may not control an agent"):
        p.require_method(Identity(p.AGENT, "h1"), "/failover.v1.AgentControl/AssignRole")
    with pytest.raises(PermissionDenied, match="needs role admin"):
        p.require_method(Identity(p.OPERATOR, "o"), "/failover.v1.Coordinator/Patch")
    with pytest.raises(PermissionDenied, match="a method the servers know"):
        p.require_method(Identity(p.ADMIN, "a"), "/failover.v1.Coordinator/Unknown")


def test_an_agent_acts_only_as_its_own_host() -> None:
    p.require_host(Identity(p.AGENT, "h1"), "h1")
    for identity in (Identity(p.AGENT, "h2"), Identity(p.ADMIN, "h1"),
                     Identity(p.COORDINATOR, "h1"), None):
        with pytest.raises(PermissionDenied, match="act as host 'h1'"):
            p.require_host(identity, "h1")


def test_identity_uri_round_trip() -> None:
    for role in p.ROLES:
        identity = Identity(role, "h-1.a_b")
        assert p.identity_uri(identity) == f"failover://{role}/h-1.a_b"
        assert p.parse_identity_uri(p.identity_uri(identity)) == identity


@pytest.mark.parametrize("uri", [
    "", "failover://", "failover://agent/", "failover://root/h1", "failover://agent/../x",
    "failover://agent/h1/extra", "spiffe://agent/h1", "failover://agent/h1\x00",
    "failover://agent/" + "x" * 65, "failover://agent/ca", "failover://Agent/h1",
    "failover://agent/h1\n", "failover://agent\n/h1",
])
def test_a_malformed_identity_uri_is_no_identity(uri: str) -> None:
    assert p.parse_identity_uri(uri) is None


@pytest.mark.parametrize("role, name", [
    ("root", "h1"), ("agent", ""), ("agent", "../h1"), ("agent", "a/b"), ("agent", ".h"),
    ("agent", "x" * 65), ("agent", "ca"), ("agent", "h 1"), ("agent", "h\x001"),
    ("agent", "h1\n"),
])
def test_a_bad_identity_is_refused(role: str, name: str) -> None:
    with pytest.raises(InvalidRequest):
        Identity(role, name)
