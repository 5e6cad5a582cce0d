from failover.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PageEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAGE_ENCODING_UNSPECIFIED: _ClassVar[PageEncoding]
    PAGE_ENCODING_RAW: _ClassVar[PageEncoding]
    PAGE_ENCODING_ZERO: _ClassVar[PageEncoding]
    PAGE_ENCODING_XOR_DELTA: _ClassVar[PageEncoding]
PAGE_ENCODING_UNSPECIFIED: PageEncoding
PAGE_ENCODING_RAW: PageEncoding
PAGE_ENCODING_ZERO: PageEncoding
PAGE_ENCODING_XOR_DELTA: PageEncoding

class PageBatch(_message.Message):
    __slots__ = ("migration_id", "service", "epoch", "round", "page_numbers", "encodings", "pages_lz4", "page_bytes", "arena_pages", "final", "applied", "digest", "setup", "final_state", "epoch_history")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAGE_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    PAGES_LZ4_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARENA_PAGES_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SETUP_FIELD_NUMBER: _ClassVar[int]
    FINAL_STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_HISTORY_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    service: str
    epoch: int
    round: int
    page_numbers: _containers.RepeatedScalarFieldContainer[int]
    encodings: _containers.RepeatedScalarFieldContainer[PageEncoding]
    pages_lz4: bytes
    page_bytes: int
    arena_pages: int
    final: bool
    applied: _common_pb2.LogPosition
    digest: bytes
    setup: bytes
    final_state: bytes
    epoch_history: _containers.RepeatedCompositeFieldContainer[_common_pb2.EpochStart]
    def __init__(self, migration_id: _Optional[str] = ..., service: _Optional[str] = ..., epoch: _Optional[int] = ..., round: _Optional[int] = ..., page_numbers: _Optional[_Iterable[int]] = ..., encodings: _Optional[_Iterable[_Union[PageEncoding, str]]] = ..., pages_lz4: _Optional[bytes] = ..., page_bytes: _Optional[int] = ..., arena_pages: _Optional[int] = ..., final: _Optional[bool] = ..., applied: _Optional[_Union[_common_pb2.LogPosition, _Mapping]] = ..., digest: _Optional[bytes] = ..., setup: _Optional[bytes] = ..., final_state: _Optional[bytes] = ..., epoch_history: _Optional[_Iterable[_Union[_common_pb2.EpochStart, _Mapping]]] = ...) -> None: ...

class MigrationResult(_message.Message):
    __slots__ = ("migration_id", "ok", "digest", "pages_received", "wire_bytes", "message", "stage")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PAGES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    ok: bool
    digest: bytes
    pages_received: int
    wire_bytes: int
    message: str
    stage: str
    def __init__(self, migration_id: _Optional[str] = ..., ok: _Optional[bool] = ..., digest: _Optional[bytes] = ..., pages_received: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., message: _Optional[str] = ..., stage: _Optional[str] = ...) -> None: ...
