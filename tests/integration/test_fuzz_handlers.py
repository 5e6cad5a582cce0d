"""Random and mutated messages at every gRPC handler of a live agent and a live coordinator
(issue 13): real processes with mutual TLS, started once for the module, called with a valid
certificate of each role in turn.

The handlers come from the service descriptors of the generated stubs (`failover.v1`), so a new
RPC is fuzzed without touching this file. Each call carries raw bytes: a mutation of a valid
request (some fields replaced by random values of their type), a random message of the
request's type, or bytes that need not parse at all. Values favour the dangerous ones: epochs
near 2^63, names with ``..``, ``/`` and NUL, paths aimed outside the data dir, other hosts' ids.

For every (daemon, role, handler):

* no hang: every call has a deadline, and only a server-streaming call may run into it;
* no crash: no call ends UNKNOWN (an exception escaping a handler) but for bytes that do not
  parse (grpc's own deserializer answers those UNKNOWN, naming the DecodeError, before any
  code of ours runs), and afterwards every process is alive and answers a status call;
* a role without the handler's permission is refused: PERMISSION_DENIED for any message that
  parses;
* no state change beyond what the role allows: while the roles that may not move epochs,
  roles, routes or host addresses are fuzzed (client, operator and admin on the agent, an
  agent identity the cluster lacks anywhere, the agent's own duplica host on the agent,
  client and coordinator on the coordinator), the services' epochs
  and replica roles at the coordinator and at every agent, and every host's address, stay
  as they were; operator and admin on the coordinator and the coordinator identity on the
  agent, who may change them, come last and are held to the other checks only;
* nothing is created outside the data dirs: no new path in the module's temp dir outside
  them, and none of the paths the messages aim at outside it.

Bounded: a fixed number of examples per handler (`EXAMPLES`), derandomized, no database.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from failover.client import Client
from failover.core import permissions
from failover.core.permissions import ADMIN, AGENT, CLIENT, COORDINATOR, OPERATOR
from failover.localcluster import HARNESS_NAME, LocalCluster, sync_channel, wait_for
from failover.v1 import (
    agent_pb2,
    common_pb2,
    coordinator_pb2,
    data_pb2,
    migration_pb2,
    replication_pb2,
)

pytestmark = pytest.mark.timeout(300)

# Examples per (daemon, role, handler): more where the role may call the handler (its code
# runs), fewer where the role check refuses it before any handler code.
EXAMPLES_ALLOWED = 50
EXAMPLES_REFUSED = 10
EXAMPLES_STREAMING = 15  # a server-streaming call may wait out its deadline: fewer of them
CALL_DEADLINE_S = 5.0  # a unary or client-streaming call: well above any honest answer
STREAM_DEADLINE_S = 0.5  # a server-streaming call: watches and operations run on, by design
STREAM_READ_MAX = 1  # a server stream that answered has run its handler: cancel it there
ALIVE_TIMEOUT_S = 30.0  # an agent restarted by Restart or Patch (exec, same pid) serves again

FOREIGN_AGENT = "fuzz-agent"  # an agent certificate of the CA for a host the cluster lacks
ESCAPE = f"failover-fuzz-escape-{os.getpid()}"
ESCAPE_PATHS = (f"../../../../../../../../../../tmp/{ESCAPE}", f"/tmp/{ESCAPE}",
                f"../{ESCAPE}", f"../../{ESCAPE}", f"kv/../../../{ESCAPE}")

# Which daemon serves which services (the agent serves everything but the coordinator's).
AGENT_SERVICES = (agent_pb2, data_pb2, replication_pb2, migration_pb2)
COORDINATOR_SERVICES = (coordinator_pb2,)

# Who may change what: on these (daemon, role) pairs the services' epochs, roles and host
# addresses must not move, whatever the messages.
# MEMBER is the agent role again, as the cluster's other host (the fuzzed agent's duplica):
# not the primary of anything it could ship or send a snapshot for.
MEMBER = "member"
FROZEN = {("agent", CLIENT), ("agent", OPERATOR), ("agent", ADMIN), ("agent", AGENT),
          ("agent", MEMBER),
          ("coordinator", CLIENT), ("coordinator", AGENT), ("coordinator", COORDINATOR)}


def methods(modules: Sequence[Any]) -> list[MethodDescriptor]:
    return [m for module in modules for service in module.DESCRIPTOR.services_by_name.values()
            for m in service.methods]


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def allowed(role: str, method: MethodDescriptor) -> bool:
    permission = permissions.METHOD_PERMISSIONS.get(path_of(method))
    grants = permissions.ROLE_PERMISSIONS[AGENT if role == MEMBER else role]
    return permission is not None and permission in grants


# Least privileged first; who may move epochs and roles last (see FROZEN).
CASES = [(daemon, role, m)
         for daemon, role in (
             ("agent", CLIENT), ("agent", OPERATOR), ("agent", ADMIN), ("agent", AGENT),
             ("agent", MEMBER), ("coordinator", CLIENT), ("coordinator", AGENT),
             ("coordinator", COORDINATOR), ("coordinator", OPERATOR), ("coordinator", ADMIN),
             ("agent", COORDINATOR))
         for m in methods(AGENT_SERVICES if daemon == "agent" else COORDINATOR_SERVICES)]


# --- strategies from descriptors ------------------------------------------------------------

NAMES = ("", "kv", "host1", "host2", "host3", "coordinator", FOREIGN_AGENT, "..", ".", "/",
         "kv/..", "a\x00b", "x" * 300, "127.0.0.1:1", "[::1]:0", "nosuch", "restart",
         *ESCAPE_PATHS)
TEXT = st.one_of(st.sampled_from(NAMES), st.text(max_size=24))

_B = {  # (min, max) of each integer type
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (low, high, 0, 1, 2, 3, 50, 2**31 - 1, 2**32 - 1, 2**53,
                                2**60, 2**63 - 1, high - 1) if low <= v <= high})
    return st.one_of(st.sampled_from(edges), st.integers(0, 64), st.integers(low, high))


PAYLOADS = st.one_of(
    st.binary(max_size=48),
    st.dictionaries(st.sampled_from(["op", "key", "value", "account", "from", "to", "amount",
                                     "balance", "expect"]),
                    st.one_of(st.sampled_from(["put", "get", "cas", "delete", "open",
                                               "transfer", "total", "kv"]),
                              st.integers(-(2**63), 2**63 - 1), st.binary(max_size=16),
                              TEXT, st.none()), max_size=4).map(msgpack.packb),
)


def scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.type in _B:
        return integers(*_B[f.type])
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if f.type == FieldDescriptor.TYPE_FLOAT else 64)
    if f.type == FieldDescriptor.TYPE_STRING:
        return TEXT
    if f.type == FieldDescriptor.TYPE_BYTES:
        return PAYLOADS
    if f.type == FieldDescriptor.TYPE_ENUM:  # open enums: unknown numbers too
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]),
                         st.integers(-1, 1000))
    raise AssertionError(f"no strategy for field {f.full_name} of type {f.type}")


_MESSAGES: dict[str, st.SearchStrategy[Message]] = {}


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Random messages of type `desc`: any subset of fields, each a value of its type."""
    key = f"{desc.full_name}/{depth}"
    if key in _MESSAGES:
        return _MESSAGES[key]
    cls = message_factory.GetMessageClass(desc)
    values: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            values[f.name] = st.dictionaries(scalar(k), scalar(v), max_size=3)
        elif f.message_type is not None:
            if depth >= 3:
                continue
            one = messages(f.message_type, depth + 1)
            values[f.name] = st.lists(one, max_size=3) if f.is_repeated else one
        else:
            values[f.name] = st.lists(scalar(f), max_size=4) if f.is_repeated else scalar(f)

    def build(drawn: dict[str, Any]) -> Message:
        msg = cls()
        for name, value in drawn.items():
            f = desc.fields_by_name[name]
            target = getattr(msg, name)
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                target.update(value)
            elif f.is_repeated:
                target.extend(value)
            elif f.message_type is not None:
                target.CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    strategy = st.fixed_dictionaries({}, optional=values).map(build)
    _MESSAGES[key] = strategy
    return strategy


def mutated(seed: Message) -> st.SearchStrategy[Message]:
    """`seed` with some of its fields (maybe none) replaced by random values of their type
    (or cleared)."""
    desc = seed.DESCRIPTOR
    names = [f.name for f in desc.fields]

    def mutate(args: tuple[frozenset[str], Message]) -> Message:
        chosen, other = args
        out = type(seed)()
        out.CopyFrom(seed)
        donor = type(seed)()
        donor.CopyFrom(other)
        for name in names:
            if name in chosen:
                out.ClearField(name)
            else:
                donor.ClearField(name)
        out.MergeFrom(donor)
        return out

    # No field chosen: the valid seed itself, so that the handler's full path runs too.
    return st.tuples(st.frozensets(st.sampled_from(names)) if names
                     else st.just(frozenset()), messages(desc)).map(mutate)


def requests(method: MethodDescriptor, seed: Message) -> st.SearchStrategy[list[bytes]]:
    """What one call sends: serialized mutations and random messages, or unparsable bytes
    (one message for a unary request, 0 to 3 for a client stream)."""
    one = st.one_of(mutated(seed), mutated(seed), messages(method.input_type)).map(
        lambda m: m.SerializeToString())
    one = st.one_of(one, one, one, st.binary(min_size=1, max_size=64))
    if method.client_streaming:
        return st.lists(one, max_size=3)
    return one.map(lambda b: [b])


# --- the cluster ----------------------------------------------------------------------------


@dataclass
class Fuzzed:
    cluster: LocalCluster
    root: Path
    target: str  # the agent fuzzed: the primary of kv at the start
    other: str
    epoch: int
    channels: dict[tuple[str, str], grpc.Channel] = field(default_factory=dict)
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)

    def channel(self, daemon: str, role: str) -> grpc.Channel:
        key = (daemon, role)
        if key not in self.channels:
            pki = self.cluster.pki
            assert pki is not None and self.cluster.coordinator is not None
            name = {CLIENT: "client", OPERATOR: "operator", ADMIN: "admin",
                    AGENT: FOREIGN_AGENT, MEMBER: self.other,
                    COORDINATOR: HARNESS_NAME}[role]
            address = (self.cluster[self.target].address if daemon == "agent"
                       else self.cluster.coordinator.address)
            self.channels[key] = sync_channel(address, pki.files(name))
        return self.channels[key]

    def seed(self, method: MethodDescriptor) -> Message:
        """A valid request of `method` aimed at the cluster's real service and hosts."""
        other, target = self.other, self.target
        address = self.cluster[other].address
        e = self.epoch
        put = msgpack.packb({"op": "put", "key": "k1", "value": "fuzz"})
        seeds: dict[str, Message] = {
            "AssignRole": agent_pb2.AssignRoleRequest(
                service="kv", kind="kv", role=common_pb2.ROLE_DUPLICA, epoch=e + 1,
                primary=agent_pb2.ReplicaPeer(host_id=other, address=address)),
            "StepDown": agent_pb2.StepDownRequest(service="kv", epoch=e + 1),
            "DropReplica": agent_pb2.DropReplicaRequest(service="kv", epoch=e),
            "HearsPrimary": agent_pb2.HearsPrimaryRequest(service="kv"),
            "Compact": agent_pb2.CompactRequest(service="kv"),
            "GetDigest": agent_pb2.GetDigestRequest(service="kv"),
            "Restart": agent_pb2.RestartRequest(command="no-such-command"),
            "PrepareSwitchover": agent_pb2.PrepareSwitchoverRequest(
                service="kv", epoch=e, target_host_id=other, timeout_ms=200),
            "MigrateOut": agent_pb2.MigrateOutRequest(
                service="kv", epoch=e, target_host_id=other, target_address=address,
                migration_id="m1"),
            "Register": coordinator_pb2.RegisterRequest(host_id=target, address=address),
            "Heartbeat": coordinator_pb2.HeartbeatRequest(host_id=target, replicas=[
                agent_pb2.ReplicaStatus(service="kv", kind="kv", role=common_pb2.ROLE_PRIMARY,
                                        epoch=e + 1, matched_index=10**9)]),
            "WatchRoutes": coordinator_pb2.WatchRoutesRequest(),
            "CreateService": coordinator_pb2.CreateServiceRequest(name="fz", kind="kv",
                                                                  replicas=2),
            "DeleteService": coordinator_pb2.DeleteServiceRequest(name="fz"),
            "Switchover": coordinator_pb2.SwitchoverRequest(service="kv", to_host_id=other),
            "GetHistory": coordinator_pb2.HistoryRequest(service="kv", limit=5),
            "WatchHistory": coordinator_pb2.WatchHistoryRequest(service="kv", last=5,
                                                                follow=True),
            "DrainHost": coordinator_pb2.DrainHostRequest(host_id=other, draining=False),
            "Migrate": coordinator_pb2.MigrateRequest(service="kv", to_host_id=other),
            "Patch": coordinator_pb2.PatchRequest(host_ids=[other], command="no-such-command"),
            "Execute": data_pb2.ExecuteRequest(
                service="kv", payload=put, opens_session=True,
                request_id=common_pb2.RequestId(client_id="fuzz", seq=1)),
            "Query": data_pb2.QueryRequest(service="kv", payload=msgpack.packb(
                {"op": "get", "key": "k1"})),
            "MigratePages": migration_pb2.PageBatch(service="kv", epoch=e, migration_id="m1",
                                                    final=True),
            "Ship": replication_pb2.ShipMessage(batches=[  # as the caller's own host id
                replication_pb2.ShipBatch(service="kv", epoch=e, batch_id=1,
                                          first_index=1, last_index=1, records=b"\x90")]),
            "InstallSnapshot": replication_pb2.SnapshotChunk(
                service="kv", epoch=e, header=replication_pb2.SnapshotHeader(kind="kv"),
                last=True),
        }
        seed = seeds.get(method.name)
        if seed is None or seed.DESCRIPTOR is not method.input_type:
            seed = message_factory.GetMessageClass(method.input_type)()  # a new RPC: empty
        return seed

    def pinned(self, method: MethodDescriptor) -> list[Message]:
        """Requests tried on every run besides the generated ones: the attacks of issue 13
        and what the suite once found, so that they never depend on the draw."""
        e, other = self.epoch, self.other
        address = self.cluster[other].address
        top = 2**63 - 1
        escape = ESCAPE_PATHS[0]
        pins: dict[str, list[Message]] = {
            "AssignRole": [
                agent_pb2.AssignRoleRequest(
                    service="kv", kind="kv", role=common_pb2.ROLE_PRIMARY, epoch=50),
                agent_pb2.AssignRoleRequest(
                    service="fz", kind="nosuchkind", role=common_pb2.ROLE_DUPLICA, epoch=1,
                    primary=agent_pb2.ReplicaPeer(host_id=other, address=address)),
                agent_pb2.AssignRoleRequest(service=escape, kind="kv",
                                            role=common_pb2.ROLE_PRIMARY, epoch=1)],
            "StepDown": [agent_pb2.StepDownRequest(service="kv", epoch=top)],
            "DropReplica": [agent_pb2.DropReplicaRequest(service="kv", epoch=e,
                                                         delete_data=True)],
            "Restart": [agent_pb2.RestartRequest(command="head /etc/shadow")],
            "PrepareSwitchover": [agent_pb2.PrepareSwitchoverRequest(
                service="kv", epoch=e, target_host_id=other, timeout_ms=2**32 - 1)],
            "Ship": [replication_pb2.ShipMessage(batches=[replication_pb2.ShipBatch(
                service="kv", epoch=top, batch_id=1, first_index=1, last_index=1,
                records=b"\x90")])],
            "InstallSnapshot": [replication_pb2.SnapshotChunk(
                service="kv", epoch=e, header=replication_pb2.SnapshotHeader(kind="kv"),
                data=b"x", last=True)],
            "MigratePages": [migration_pb2.PageBatch(service=escape, epoch=1,
                                                     migration_id="m1", final=True)],
            "Register": [coordinator_pb2.RegisterRequest(host_id=other, address="127.0.0.1:1"),
                         coordinator_pb2.RegisterRequest(host_id="h3", address="127.0.0.1:1",
                                                         metrics=agent_pb2.HostMetrics(
                                                             disk_free_bytes=2**60))],
            "Heartbeat": [coordinator_pb2.HeartbeatRequest(host_id=other, replicas=[
                agent_pb2.ReplicaStatus(service=f"ghost{i}", epoch=1) for i in range(3000)])],
            "CreateService": [coordinator_pb2.CreateServiceRequest(name=escape, kind="kv",
                                                                   replicas=1)],
            "Patch": [coordinator_pb2.PatchRequest(host_ids=[other],
                                                   command="head /etc/shadow")],
        }
        return pins.get(method.name, [])

    def state(self) -> Any:
        """What the frozen roles may not move: each service's epoch and replica roles at the
        coordinator, each host's address there, and each agent's replicas' roles and
        epochs."""
        coordinator = self.cluster.coordinator
        assert coordinator is not None
        status = coordinator.status()
        services = sorted((s.name, s.epoch, tuple(sorted((r.host_id, r.role)
                                                         for r in s.replicas)))
                          for s in status.services)
        hosts = sorted((h.host_id, h.address) for h in status.hosts
                       if h.host_id in self.cluster.agents)
        agents = {a.host_id: sorted((r.service, r.role, r.epoch) for r in a.status().replicas)
                  for a in self.cluster}
        return services, hosts, agents

    def strays(self) -> list[str]:
        """Paths outside every daemon's own dirs and files, and escapes to /tmp."""
        own = {self.root / "cluster" / name for name in ("pki", "coordinator")}
        own |= {self.root / "cluster" / h for h in self.cluster.agents}
        found = []
        for path in self.root.rglob("*"):
            if any(p in own for p in (path, *path.parents)):
                continue
            if path.parent == self.root / "cluster" and path.suffix == ".log":
                continue
            if path == self.root / "cluster":
                continue
            found.append(str(path))
        found += [str(p) for p in Path("/tmp").glob(f"{ESCAPE}*")]
        return found

    def alive(self) -> None:
        """Every process runs and answers a status call (an agent restarted by a Restart or a
        Patch execs itself: same process, serving again within a bound)."""
        coordinator = self.cluster.coordinator
        assert coordinator is not None
        for process in (coordinator, *self.cluster):
            assert process.alive, f"{process.what} died; log tail:\n{process.log_tail()}"
        wait_for(lambda: coordinator.status() is not None, ALIVE_TIMEOUT_S,
                 "the coordinator to answer a status call")
        for agent in self.cluster:
            wait_for(lambda a=agent: a.status() is not None, ALIVE_TIMEOUT_S,  # type: ignore
                     f"{agent.what} to answer a status call")
            assert agent.alive, f"{agent.what} died; log tail:\n{agent.log_tail()}"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    root = tmp_path_factory.mktemp("fuzz")
    with LocalCluster(root / "cluster", hosts=2, coordinator=True) as cluster:
        assert cluster.pki is not None and cluster.coordinator is not None
        cluster.pki.issue(AGENT, FOREIGN_AGENT, sans=["127.0.0.1"])
        cluster.start()
        cluster.create("kv", "kv", replicas=2)

        async def writes() -> None:
            async with Client(coordinator=cluster.coordinator.address,  # type: ignore
                              tls=cluster.tls_client, deadline_ms=10_000) as client:
                for i in range(20):
                    await client.call("kv", {"op": "put", "key": f"k{i}", "value": "v"})

        asyncio.run(writes())
        target = cluster.primary_of("kv")
        assert target is not None
        other = next(h for h in cluster.agents if h != target)
        cluster.wait_converged("kv", [target, other])
        epoch = next(s.epoch for s in cluster.coordinator.status().services if s.name == "kv")
        f = Fuzzed(cluster, root, target, other, epoch)
        try:
            yield f
        finally:
            for channel in f.channels.values():
                channel.close()
            # What the handlers answered, per (daemon, role, handler): for a look with -s.
            print(json.dumps(f.outcomes, sort_keys=True))


def call(channel: grpc.Channel, method: MethodDescriptor, payload: list[bytes]
         ) -> tuple[grpc.StatusCode, str]:
    """One call of `method` with raw request bytes, under a deadline; its status and
    details."""
    path = path_of(method)
    try:
        if method.server_streaming:
            if method.client_streaming:
                responses = channel.stream_stream(path)(iter(payload), timeout=STREAM_DEADLINE_S)
            else:
                responses = channel.unary_stream(path)(payload[0], timeout=STREAM_DEADLINE_S)
            for n, _ in enumerate(responses):
                if n + 1 >= STREAM_READ_MAX:
                    responses.cancel()
                    return grpc.StatusCode.OK, ""
        elif method.client_streaming:
            channel.stream_unary(path)(iter(payload), timeout=CALL_DEADLINE_S)
        else:
            channel.unary_unary(path)(payload[0], timeout=CALL_DEADLINE_S)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""  # type: ignore[return-value]
    return grpc.StatusCode.OK, ""


def unreachable(code: grpc.StatusCode, details: str) -> bool:
    """The call did not reach the daemon (not an answer of it)."""
    return code == grpc.StatusCode.UNAVAILABLE and "connect" in details


def parses(method: MethodDescriptor, payload: list[bytes]) -> bool:
    cls = message_factory.GetMessageClass(method.input_type)
    try:
        for data in payload:
            cls.FromString(data)
    except DecodeError:
        return False
    return True


# What the suite found and is not fixed yet: each such case is expected to fail (strictly:
# once fixed it passes, fails as an xfail, and its entry goes).
KNOWN_FINDINGS: dict[str, str] = {}


def case_id(daemon: str, role: str, method: MethodDescriptor) -> str:
    return f"{daemon}-{role}-{method.containing_service.name}.{method.name}"


@pytest.mark.parametrize(("daemon", "role", "method"), [
    pytest.param(d, r, m, id=case_id(d, r, m), marks=[
        pytest.mark.xfail(strict=True, reason=KNOWN_FINDINGS[case_id(d, r, m)])]
        if case_id(d, r, m) in KNOWN_FINDINGS else [])
    for d, r, m in CASES])
def test_fuzz_handler(fuzzed: Fuzzed, daemon: str, role: str, method: MethodDescriptor) -> None:
    may = allowed(role, method)
    channel = fuzzed.channel(daemon, role)
    seed = fuzzed.seed(method)
    frozen = (daemon, role) in FROZEN
    before = fuzzed.state() if frozen else None
    strays_before = set(fuzzed.strays())
    codes: dict[str, int] = {}
    examples = (EXAMPLES_REFUSED if not may else EXAMPLES_STREAMING if method.server_streaming
                else EXAMPLES_ALLOWED)

    def one(payload: list[bytes]) -> None:
        started = time.monotonic()
        code, details = call(channel, method, payload)
        if unreachable(code, details):
            # The daemon is not there: an agent execs itself after a Restart it answered
            # (the coordinator may call Restart). It must be back, and then answer (once this
            # channel's reconnect backoff has run out).
            fuzzed.alive()
            code, details = wait_for(
                lambda: (r := call(channel, method, payload)) and not unreachable(*r) and r,
                ALIVE_TIMEOUT_S, f"{path_of(method)} to reach the daemon again")
        codes[code.name] = codes.get(code.name, 0) + 1
        took = time.monotonic() - started
        # Bytes that do not parse end in grpc's own deserializer, before any interceptor or
        # handler of ours: UNKNOWN naming the DecodeError. Any other UNKNOWN is a handler
        # that raised.
        undecodable = (not parses(method, payload) and code == grpc.StatusCode.UNKNOWN
                       and "DecodeError" in details)
        assert code != grpc.StatusCode.UNKNOWN or undecodable, (
            f"a handler raised: {details} for {payload!r}")
        if not may and not undecodable:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details, payload)
        if not method.server_streaming:
            assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"hung: {payload!r}"
            assert took < CALL_DEADLINE_S + 1, (took, payload)

    fuzz = given(payload=requests(method, seed))(one)
    for pin in fuzzed.pinned(method):
        fuzz = example(payload=[pin.SerializeToString()])(fuzz)
    settings(max_examples=examples, derandomize=True, database=None, deadline=None,
             suppress_health_check=list(HealthCheck))(fuzz)()
    fuzzed.outcomes[f"{daemon}/{role}/{method.name}"] = codes
    fuzzed.alive()
    if frozen:
        assert fuzzed.state() == before, f"{role} moved state through {method.name}: {codes}"
    new_strays = sorted(set(fuzzed.strays()) - strays_before)
    assert not new_strays, new_strays
