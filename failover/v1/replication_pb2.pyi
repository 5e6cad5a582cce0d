from failover.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_STATUS_UNSPECIFIED: _ClassVar[AckStatus]
    ACK_STATUS_OK: _ClassVar[AckStatus]
    ACK_STATUS_STALE_EPOCH: _ClassVar[AckStatus]
    ACK_STATUS_MISMATCH: _ClassVar[AckStatus]
    ACK_STATUS_UNKNOWN_SERVICE: _ClassVar[AckStatus]
    ACK_STATUS_CORRUPT: _ClassVar[AckStatus]
    ACK_STATUS_STORAGE_ERROR: _ClassVar[AckStatus]
    ACK_STATUS_NOT_PRIMARY: _ClassVar[AckStatus]
ACK_STATUS_UNSPECIFIED: AckStatus
ACK_STATUS_OK: AckStatus
ACK_STATUS_STALE_EPOCH: AckStatus
ACK_STATUS_MISMATCH: AckStatus
ACK_STATUS_UNKNOWN_SERVICE: AckStatus
ACK_STATUS_CORRUPT: AckStatus
ACK_STATUS_STORAGE_ERROR: AckStatus
ACK_STATUS_NOT_PRIMARY: AckStatus

class ShipMessage(_message.Message):
    __slots__ = ("source_host_id", "batches", "probes", "truncates")
    SOURCE_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATES_FIELD_NUMBER: _ClassVar[int]
    source_host_id: str
    batches: _containers.RepeatedCompositeFieldContainer[ShipBatch]
    probes: _containers.RepeatedCompositeFieldContainer[Probe]
    truncates: _containers.RepeatedCompositeFieldContainer[Truncate]
    def __init__(self, source_host_id: _Optional[str] = ..., batches: _Optional[_Iterable[_Union[ShipBatch, _Mapping]]] = ..., probes: _Optional[_Iterable[_Union[Probe, _Mapping]]] = ..., truncates: _Optional[_Iterable[_Union[Truncate, _Mapping]]] = ...) -> None: ...

class ShipBatch(_message.Message):
    __slots__ = ("service", "epoch", "batch_id", "prev", "first_index", "last_index", "records", "commit_index", "lease_ms")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PREV_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_INDEX_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch: int
    batch_id: int
    prev: _common_pb2.LogPosition
    first_index: int
    last_index: int
    records: bytes
    commit_index: int
    lease_ms: int
    def __init__(self, service: _Optional[str] = ..., epoch: _Optional[int] = ..., batch_id: _Optional[int] = ..., prev: _Optional[_Union[_common_pb2.LogPosition, _Mapping]] = ..., first_index: _Optional[int] = ..., last_index: _Optional[int] = ..., records: _Optional[bytes] = ..., commit_index: _Optional[int] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class Probe(_message.Message):
    __slots__ = ("service", "epoch")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch: int
    def __init__(self, service: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class Truncate(_message.Message):
    __slots__ = ("service", "epoch", "after_index")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    AFTER_INDEX_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch: int
    after_index: int
    def __init__(self, service: _Optional[str] = ..., epoch: _Optional[int] = ..., after_index: _Optional[int] = ...) -> None: ...

class ReplicaAck(_message.Message):
    __slots__ = ("service", "epoch", "status", "batch_id", "durable_index", "applied_index", "last", "epoch_history", "truncated_entries", "first_index", "message")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    DURABLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_HISTORY_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch: int
    status: AckStatus
    batch_id: int
    durable_index: int
    applied_index: int
    last: _common_pb2.LogPosition
    epoch_history: _containers.RepeatedCompositeFieldContainer[_common_pb2.EpochStart]
    truncated_entries: int
    first_index: int
    message: str
    def __init__(self, service: _Optional[str] = ..., epoch: _Optional[int] = ..., status: _Optional[_Union[AckStatus, str]] = ..., batch_id: _Optional[int] = ..., durable_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., last: _Optional[_Union[_common_pb2.LogPosition, _Mapping]] = ..., epoch_history: _Optional[_Iterable[_Union[_common_pb2.EpochStart, _Mapping]]] = ..., truncated_entries: _Optional[int] = ..., first_index: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ShipReply(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[ReplicaAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[ReplicaAck, _Mapping]]] = ...) -> None: ...

class SnapshotHeader(_message.Message):
    __slots__ = ("kind", "kind_version", "applied_index", "epoch", "digest", "raw_bytes", "epoch_history")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KIND_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_HISTORY_FIELD_NUMBER: _ClassVar[int]
    kind: str
    kind_version: int
    applied_index: int
    epoch: int
    digest: bytes
    raw_bytes: int
    epoch_history: _containers.RepeatedCompositeFieldContainer[_common_pb2.EpochStart]
    def __init__(self, kind: _Optional[str] = ..., kind_version: _Optional[int] = ..., applied_index: _Optional[int] = ..., epoch: _Optional[int] = ..., digest: _Optional[bytes] = ..., raw_bytes: _Optional[int] = ..., epoch_history: _Optional[_Iterable[_Union[_common_pb2.EpochStart, _Mapping]]] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("service", "epoch", "header", "data", "last")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch: int
    header: SnapshotHeader
    data: bytes
    last: bool
    def __init__(self, service: _Optional[str] = ..., epoch: _Optional[int] = ..., header: _Optional[_Union[SnapshotHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class SnapshotInstalled(_message.Message):
    __slots__ = ("service", "applied_index", "digest", "bytes_received")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    service: str
    applied_index: int
    digest: bytes
    bytes_received: int
    def __init__(self, service: _Optional[str] = ..., applied_index: _Optional[int] = ..., digest: _Optional[bytes] = ..., bytes_received: _Optional[int] = ...) -> None: ...
