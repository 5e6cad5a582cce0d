from failover.v1 import agent_pb2 as _agent_pb2
from failover.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("host_id", "address", "zone", "version", "started_at", "metrics", "incarnation")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    address: str
    zone: str
    version: str
    started_at: float
    metrics: _agent_pb2.HostMetrics
    incarnation: int
    def __init__(self, host_id: _Optional[str] = ..., address: _Optional[str] = ..., zone: _Optional[str] = ..., version: _Optional[str] = ..., started_at: _Optional[float] = ..., metrics: _Optional[_Union[_agent_pb2.HostMetrics, _Mapping]] = ..., incarnation: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("heartbeat_ms", "lease_ms", "coordinator_term")
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_TERM_FIELD_NUMBER: _ClassVar[int]
    heartbeat_ms: int
    lease_ms: int
    coordinator_term: int
    def __init__(self, heartbeat_ms: _Optional[int] = ..., lease_ms: _Optional[int] = ..., coordinator_term: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("host_id", "metrics", "replicas", "hook_results", "incarnation")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    HOOK_RESULTS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    metrics: _agent_pb2.HostMetrics
    replicas: _containers.RepeatedCompositeFieldContainer[_agent_pb2.ReplicaStatus]
    hook_results: _containers.RepeatedCompositeFieldContainer[HookResult]
    incarnation: int
    def __init__(self, host_id: _Optional[str] = ..., metrics: _Optional[_Union[_agent_pb2.HostMetrics, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[_agent_pb2.ReplicaStatus, _Mapping]]] = ..., hook_results: _Optional[_Iterable[_Union[HookResult, _Mapping]]] = ..., incarnation: _Optional[int] = ...) -> None: ...

class HookResult(_message.Message):
    __slots__ = ("seq", "service", "event", "command", "role", "epoch", "exit_code", "output", "duration_ms", "timed_out", "skipped")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    service: str
    event: str
    command: str
    role: str
    epoch: int
    exit_code: int
    output: str
    duration_ms: int
    timed_out: bool
    skipped: bool
    def __init__(self, seq: _Optional[int] = ..., service: _Optional[str] = ..., event: _Optional[str] = ..., command: _Optional[str] = ..., role: _Optional[str] = ..., epoch: _Optional[int] = ..., exit_code: _Optional[int] = ..., output: _Optional[str] = ..., duration_ms: _Optional[int] = ..., timed_out: _Optional[bool] = ..., skipped: _Optional[bool] = ...) -> None: ...

class ProcessExitedRequest(_message.Message):
    __slots__ = ("host_id", "incarnation", "exit_code", "exited_at")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    EXITED_AT_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    incarnation: int
    exit_code: int
    exited_at: float
    def __init__(self, host_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., exit_code: _Optional[int] = ..., exited_at: _Optional[float] = ...) -> None: ...

class ProcessExitedReply(_message.Message):
    __slots__ = ("coordinator_term",)
    COORDINATOR_TERM_FIELD_NUMBER: _ClassVar[int]
    coordinator_term: int
    def __init__(self, coordinator_term: _Optional[int] = ...) -> None: ...

class LeaseGrant(_message.Message):
    __slots__ = ("service", "epoch", "lease_ms")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch: int
    lease_ms: int
    def __init__(self, service: _Optional[str] = ..., epoch: _Optional[int] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("leases", "assignments", "coordinator_term")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_TERM_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseGrant]
    assignments: _containers.RepeatedCompositeFieldContainer[_agent_pb2.AssignRoleRequest]
    coordinator_term: int
    def __init__(self, leases: _Optional[_Iterable[_Union[LeaseGrant, _Mapping]]] = ..., assignments: _Optional[_Iterable[_Union[_agent_pb2.AssignRoleRequest, _Mapping]]] = ..., coordinator_term: _Optional[int] = ...) -> None: ...

class WatchRoutesRequest(_message.Message):
    __slots__ = ("known_version", "services")
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    known_version: int
    services: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, known_version: _Optional[int] = ..., services: _Optional[_Iterable[str]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("service", "kind", "primary_address", "primary_host_id", "epoch")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    service: str
    kind: str
    primary_address: str
    primary_host_id: str
    epoch: int
    def __init__(self, service: _Optional[str] = ..., kind: _Optional[str] = ..., primary_address: _Optional[str] = ..., primary_host_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class RoutesUpdate(_message.Message):
    __slots__ = ("version", "routes", "full", "deleted", "base_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    full: bool
    deleted: _containers.RepeatedScalarFieldContainer[str]
    base_version: int
    def __init__(self, version: _Optional[int] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., full: _Optional[bool] = ..., deleted: _Optional[_Iterable[str]] = ..., base_version: _Optional[int] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostStatus(_message.Message):
    __slots__ = ("host_id", "address", "zone", "draining", "alive", "version", "started_at", "metrics", "heartbeat_age_ms", "dead", "incarnation", "exited_incarnation")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    EXITED_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    address: str
    zone: str
    draining: bool
    alive: bool
    version: str
    started_at: float
    metrics: _agent_pb2.HostMetrics
    heartbeat_age_ms: int
    dead: bool
    incarnation: int
    exited_incarnation: int
    def __init__(self, host_id: _Optional[str] = ..., address: _Optional[str] = ..., zone: _Optional[str] = ..., draining: _Optional[bool] = ..., alive: _Optional[bool] = ..., version: _Optional[str] = ..., started_at: _Optional[float] = ..., metrics: _Optional[_Union[_agent_pb2.HostMetrics, _Mapping]] = ..., heartbeat_age_ms: _Optional[int] = ..., dead: _Optional[bool] = ..., incarnation: _Optional[int] = ..., exited_incarnation: _Optional[int] = ...) -> None: ...

class ReplicaView(_message.Message):
    __slots__ = ("host_id", "role", "indexes", "lag_entries", "in_sync", "promotable")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    LAG_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    PROMOTABLE_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    role: _common_pb2.Role
    indexes: _common_pb2.ReplicaIndexes
    lag_entries: int
    in_sync: bool
    promotable: bool
    def __init__(self, host_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., indexes: _Optional[_Union[_common_pb2.ReplicaIndexes, _Mapping]] = ..., lag_entries: _Optional[int] = ..., in_sync: _Optional[bool] = ..., promotable: _Optional[bool] = ...) -> None: ...

class ServiceStatus(_message.Message):
    __slots__ = ("name", "kind", "mode", "epoch", "desired_replicas", "replicas", "placement", "unplaced")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    UNPLACED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    mode: _common_pb2.ReplicationMode
    epoch: int
    desired_replicas: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaView]
    placement: str
    unplaced: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., mode: _Optional[_Union[_common_pb2.ReplicationMode, str]] = ..., epoch: _Optional[int] = ..., desired_replicas: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaView, _Mapping]]] = ..., placement: _Optional[str] = ..., unplaced: _Optional[str] = ...) -> None: ...

class CoordinatorStatus(_message.Message):
    __slots__ = ("address", "leader", "term")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    address: str
    leader: bool
    term: int
    def __init__(self, address: _Optional[str] = ..., leader: _Optional[bool] = ..., term: _Optional[int] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("hosts", "services", "coordinators")
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    COORDINATORS_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[HostStatus]
    services: _containers.RepeatedCompositeFieldContainer[ServiceStatus]
    coordinators: _containers.RepeatedCompositeFieldContainer[CoordinatorStatus]
    def __init__(self, hosts: _Optional[_Iterable[_Union[HostStatus, _Mapping]]] = ..., services: _Optional[_Iterable[_Union[ServiceStatus, _Mapping]]] = ..., coordinators: _Optional[_Iterable[_Union[CoordinatorStatus, _Mapping]]] = ...) -> None: ...

class CreateServiceRequest(_message.Message):
    __slots__ = ("name", "kind", "replicas", "mode", "placement")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    replicas: int
    mode: _common_pb2.ReplicationMode
    placement: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., replicas: _Optional[int] = ..., mode: _Optional[_Union[_common_pb2.ReplicationMode, str]] = ..., placement: _Optional[str] = ...) -> None: ...

class CreateServiceReply(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: ServiceStatus
    def __init__(self, service: _Optional[_Union[ServiceStatus, _Mapping]] = ...) -> None: ...

class DeleteServiceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteServiceReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SwitchoverRequest(_message.Message):
    __slots__ = ("service", "to_host_id")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    TO_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    service: str
    to_host_id: str
    def __init__(self, service: _Optional[str] = ..., to_host_id: _Optional[str] = ...) -> None: ...

class SwitchoverReply(_message.Message):
    __slots__ = ("epoch", "primary_host_id", "stall_ms")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    STALL_MS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    primary_host_id: str
    stall_ms: int
    def __init__(self, epoch: _Optional[int] = ..., primary_host_id: _Optional[str] = ..., stall_ms: _Optional[int] = ...) -> None: ...

class DrainHostRequest(_message.Message):
    __slots__ = ("host_id", "draining", "must_finish")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MUST_FINISH_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    draining: bool
    must_finish: bool
    def __init__(self, host_id: _Optional[str] = ..., draining: _Optional[bool] = ..., must_finish: _Optional[bool] = ...) -> None: ...

class DrainHostReply(_message.Message):
    __slots__ = ("host", "cannot_finish")
    HOST_FIELD_NUMBER: _ClassVar[int]
    CANNOT_FINISH_FIELD_NUMBER: _ClassVar[int]
    host: HostStatus
    cannot_finish: str
    def __init__(self, host: _Optional[_Union[HostStatus, _Mapping]] = ..., cannot_finish: _Optional[str] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("service", "to_host_id", "replica", "max_downtime_ms", "method", "from_host_id", "max_bandwidth_bytes_s")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    TO_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MAX_DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FROM_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BANDWIDTH_BYTES_S_FIELD_NUMBER: _ClassVar[int]
    service: str
    to_host_id: str
    replica: str
    max_downtime_ms: int
    method: str
    from_host_id: str
    max_bandwidth_bytes_s: int
    def __init__(self, service: _Optional[str] = ..., to_host_id: _Optional[str] = ..., replica: _Optional[str] = ..., max_downtime_ms: _Optional[int] = ..., method: _Optional[str] = ..., from_host_id: _Optional[str] = ..., max_bandwidth_bytes_s: _Optional[int] = ...) -> None: ...

class PatchRequest(_message.Message):
    __slots__ = ("host_ids", "all", "command", "failback", "method", "command_timeout_ms")
    HOST_IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    FAILBACK_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    COMMAND_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    host_ids: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    command: str
    failback: bool
    method: str
    command_timeout_ms: int
    def __init__(self, host_ids: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ..., command: _Optional[str] = ..., failback: _Optional[bool] = ..., method: _Optional[str] = ..., command_timeout_ms: _Optional[int] = ...) -> None: ...

class PatchProgress(_message.Message):
    __slots__ = ("host_id", "step", "message", "ok")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    step: str
    message: str
    ok: bool
    def __init__(self, host_id: _Optional[str] = ..., step: _Optional[str] = ..., message: _Optional[str] = ..., ok: _Optional[bool] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("service", "limit")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    service: str
    limit: int
    def __init__(self, service: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class HistoryEvent(_message.Message):
    __slots__ = ("seq", "at", "service", "kind", "message", "details")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    at: float
    service: str
    kind: str
    message: str
    details: bytes
    def __init__(self, seq: _Optional[int] = ..., at: _Optional[float] = ..., service: _Optional[str] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., details: _Optional[bytes] = ...) -> None: ...

class HistoryReply(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[HistoryEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[HistoryEvent, _Mapping]]] = ...) -> None: ...

class WatchHistoryRequest(_message.Message):
    __slots__ = ("service", "after_seq", "last", "follow")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    service: str
    after_seq: int
    last: int
    follow: bool
    def __init__(self, service: _Optional[str] = ..., after_seq: _Optional[int] = ..., last: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...
