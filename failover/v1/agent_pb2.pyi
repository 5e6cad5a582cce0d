from failover.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaPeer(_message.Message):
    __slots__ = ("host_id", "address")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    address: str
    def __init__(self, host_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class AssignRoleRequest(_message.Message):
    __slots__ = ("service", "kind", "role", "epoch", "mode", "primary", "duplicas", "in_sync", "lease_ms", "in_sync_generation", "reason")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    DUPLICAS_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_GENERATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    service: str
    kind: str
    role: _common_pb2.Role
    epoch: int
    mode: _common_pb2.ReplicationMode
    primary: ReplicaPeer
    duplicas: _containers.RepeatedCompositeFieldContainer[ReplicaPeer]
    in_sync: _containers.RepeatedScalarFieldContainer[str]
    lease_ms: int
    in_sync_generation: int
    reason: str
    def __init__(self, service: _Optional[str] = ..., kind: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., epoch: _Optional[int] = ..., mode: _Optional[_Union[_common_pb2.ReplicationMode, str]] = ..., primary: _Optional[_Union[ReplicaPeer, _Mapping]] = ..., duplicas: _Optional[_Iterable[_Union[ReplicaPeer, _Mapping]]] = ..., in_sync: _Optional[_Iterable[str]] = ..., lease_ms: _Optional[int] = ..., in_sync_generation: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AssignRoleReply(_message.Message):
    __slots__ = ("service", "role", "epoch", "indexes", "last")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    service: str
    role: _common_pb2.Role
    epoch: int
    indexes: _common_pb2.ReplicaIndexes
    last: _common_pb2.LogPosition
    def __init__(self, service: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., epoch: _Optional[int] = ..., indexes: _Optional[_Union[_common_pb2.ReplicaIndexes, _Mapping]] = ..., last: _Optional[_Union[_common_pb2.LogPosition, _Mapping]] = ...) -> None: ...

class StepDownRequest(_message.Message):
    __slots__ = ("service", "epoch")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch: int
    def __init__(self, service: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class StepDownReply(_message.Message):
    __slots__ = ("service", "epoch", "indexes")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch: int
    indexes: _common_pb2.ReplicaIndexes
    def __init__(self, service: _Optional[str] = ..., epoch: _Optional[int] = ..., indexes: _Optional[_Union[_common_pb2.ReplicaIndexes, _Mapping]] = ...) -> None: ...

class DropReplicaRequest(_message.Message):
    __slots__ = ("service", "epoch", "delete_data")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DELETE_DATA_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch: int
    delete_data: bool
    def __init__(self, service: _Optional[str] = ..., epoch: _Optional[int] = ..., delete_data: _Optional[bool] = ...) -> None: ...

class DropReplicaReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("service", "kind", "role", "epoch", "indexes", "lag_entries", "mode", "truncated_entries", "last_error", "matched_index", "in_sync", "disk_full", "in_sync_generation", "in_sync_lag_ms", "broken", "primary_host_id", "duplicas")
    class InSyncLagMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    LAG_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    MATCHED_INDEX_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    DISK_FULL_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_GENERATION_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_LAG_MS_FIELD_NUMBER: _ClassVar[int]
    BROKEN_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICAS_FIELD_NUMBER: _ClassVar[int]
    service: str
    kind: str
    role: _common_pb2.Role
    epoch: int
    indexes: _common_pb2.ReplicaIndexes
    lag_entries: int
    mode: _common_pb2.ReplicationMode
    truncated_entries: int
    last_error: str
    matched_index: int
    in_sync: _containers.RepeatedScalarFieldContainer[str]
    disk_full: bool
    in_sync_generation: int
    in_sync_lag_ms: _containers.ScalarMap[str, int]
    broken: bool
    primary_host_id: str
    duplicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, service: _Optional[str] = ..., kind: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., epoch: _Optional[int] = ..., indexes: _Optional[_Union[_common_pb2.ReplicaIndexes, _Mapping]] = ..., lag_entries: _Optional[int] = ..., mode: _Optional[_Union[_common_pb2.ReplicationMode, str]] = ..., truncated_entries: _Optional[int] = ..., last_error: _Optional[str] = ..., matched_index: _Optional[int] = ..., in_sync: _Optional[_Iterable[str]] = ..., disk_full: _Optional[bool] = ..., in_sync_generation: _Optional[int] = ..., in_sync_lag_ms: _Optional[_Mapping[str, int]] = ..., broken: _Optional[bool] = ..., primary_host_id: _Optional[str] = ..., duplicas: _Optional[_Iterable[str]] = ...) -> None: ...

class HostMetrics(_message.Message):
    __slots__ = ("cpu_percent", "memory_percent", "disk_free_bytes", "memory_total_bytes", "cpu_count", "disk_total_bytes")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    DISK_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    memory_percent: float
    disk_free_bytes: int
    memory_total_bytes: int
    cpu_count: int
    disk_total_bytes: int
    def __init__(self, cpu_percent: _Optional[float] = ..., memory_percent: _Optional[float] = ..., disk_free_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., cpu_count: _Optional[int] = ..., disk_total_bytes: _Optional[int] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("host_id", "address", "zone", "version", "started_at", "metrics", "replicas")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    address: str
    zone: str
    version: str
    started_at: float
    metrics: HostMetrics
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    def __init__(self, host_id: _Optional[str] = ..., address: _Optional[str] = ..., zone: _Optional[str] = ..., version: _Optional[str] = ..., started_at: _Optional[float] = ..., metrics: _Optional[_Union[HostMetrics, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ...) -> None: ...

class HearsPrimaryRequest(_message.Message):
    __slots__ = ("service", "services")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    service: str
    services: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, service: _Optional[str] = ..., services: _Optional[_Iterable[str]] = ...) -> None: ...

class HearsPrimaryReply(_message.Message):
    __slots__ = ("hears", "silent_ms", "epoch", "answers")
    HEARS_FIELD_NUMBER: _ClassVar[int]
    SILENT_MS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    hears: bool
    silent_ms: int
    epoch: int
    answers: _containers.RepeatedCompositeFieldContainer[HearsPrimaryAnswer]
    def __init__(self, hears: _Optional[bool] = ..., silent_ms: _Optional[int] = ..., epoch: _Optional[int] = ..., answers: _Optional[_Iterable[_Union[HearsPrimaryAnswer, _Mapping]]] = ...) -> None: ...

class HearsPrimaryAnswer(_message.Message):
    __slots__ = ("service", "held", "hears", "silent_ms", "epoch", "matched_index")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    HEARS_FIELD_NUMBER: _ClassVar[int]
    SILENT_MS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MATCHED_INDEX_FIELD_NUMBER: _ClassVar[int]
    service: str
    held: bool
    hears: bool
    silent_ms: int
    epoch: int
    matched_index: int
    def __init__(self, service: _Optional[str] = ..., held: _Optional[bool] = ..., hears: _Optional[bool] = ..., silent_ms: _Optional[int] = ..., epoch: _Optional[int] = ..., matched_index: _Optional[int] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ("service", "retain_entries")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    RETAIN_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    service: str
    retain_entries: int
    def __init__(self, service: _Optional[str] = ..., retain_entries: _Optional[int] = ...) -> None: ...

class CompactReply(_message.Message):
    __slots__ = ("snapshot_index", "first_index")
    SNAPSHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    snapshot_index: int
    first_index: int
    def __init__(self, snapshot_index: _Optional[int] = ..., first_index: _Optional[int] = ...) -> None: ...

class GetDigestRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class GetDigestReply(_message.Message):
    __slots__ = ("digest", "applied_index", "epoch", "epoch_history")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_HISTORY_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    applied_index: int
    epoch: int
    epoch_history: _containers.RepeatedCompositeFieldContainer[_common_pb2.EpochStart]
    def __init__(self, digest: _Optional[bytes] = ..., applied_index: _Optional[int] = ..., epoch: _Optional[int] = ..., epoch_history: _Optional[_Iterable[_Union[_common_pb2.EpochStart, _Mapping]]] = ...) -> None: ...

class RestartRequest(_message.Message):
    __slots__ = ("command", "command_timeout_ms")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    COMMAND_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    command: str
    command_timeout_ms: int
    def __init__(self, command: _Optional[str] = ..., command_timeout_ms: _Optional[int] = ...) -> None: ...

class RestartReply(_message.Message):
    __slots__ = ("exit_code", "output", "version")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    output: str
    version: str
    def __init__(self, exit_code: _Optional[int] = ..., output: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class MigrateOutRequest(_message.Message):
    __slots__ = ("service", "epoch", "migration_id", "target_host_id", "target_address", "max_downtime_ms", "method", "max_bandwidth_bytes_s")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MAX_BANDWIDTH_BYTES_S_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch: int
    migration_id: str
    target_host_id: str
    target_address: str
    max_downtime_ms: int
    method: str
    max_bandwidth_bytes_s: int
    def __init__(self, service: _Optional[str] = ..., epoch: _Optional[int] = ..., migration_id: _Optional[str] = ..., target_host_id: _Optional[str] = ..., target_address: _Optional[str] = ..., max_downtime_ms: _Optional[int] = ..., method: _Optional[str] = ..., max_bandwidth_bytes_s: _Optional[int] = ...) -> None: ...

class MigrationProgress(_message.Message):
    __slots__ = ("migration_id", "phase", "round", "pages", "raw_bytes", "wire_bytes", "dirty_pages", "dirty_pages_s", "throttle_ms", "state_bytes", "message", "stats_json", "applied_index")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIRTY_PAGES_FIELD_NUMBER: _ClassVar[int]
    DIRTY_PAGES_S_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATS_JSON_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    phase: str
    round: int
    pages: int
    raw_bytes: int
    wire_bytes: int
    dirty_pages: int
    dirty_pages_s: float
    throttle_ms: int
    state_bytes: int
    message: str
    stats_json: bytes
    applied_index: int
    def __init__(self, migration_id: _Optional[str] = ..., phase: _Optional[str] = ..., round: _Optional[int] = ..., pages: _Optional[int] = ..., raw_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., dirty_pages: _Optional[int] = ..., dirty_pages_s: _Optional[float] = ..., throttle_ms: _Optional[int] = ..., state_bytes: _Optional[int] = ..., message: _Optional[str] = ..., stats_json: _Optional[bytes] = ..., applied_index: _Optional[int] = ...) -> None: ...

class PrepareSwitchoverRequest(_message.Message):
    __slots__ = ("service", "epoch", "target_host_id", "timeout_ms", "release", "switchover_id")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TARGET_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    SWITCHOVER_ID_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch: int
    target_host_id: str
    timeout_ms: int
    release: bool
    switchover_id: str
    def __init__(self, service: _Optional[str] = ..., epoch: _Optional[int] = ..., target_host_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., release: _Optional[bool] = ..., switchover_id: _Optional[str] = ...) -> None: ...

class PrepareSwitchoverReply(_message.Message):
    __slots__ = ("last_index", "target_durable_index")
    LAST_INDEX_FIELD_NUMBER: _ClassVar[int]
    TARGET_DURABLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    last_index: int
    target_durable_index: int
    def __init__(self, last_index: _Optional[int] = ..., target_durable_index: _Optional[int] = ...) -> None: ...
