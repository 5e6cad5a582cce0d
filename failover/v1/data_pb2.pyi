from failover.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CallBatch(_message.Message):
    __slots__ = ("service", "epoch_seen", "client_id", "seq", "payload", "deadline_ms", "opens_session")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    OPENS_SESSION_FIELD_NUMBER: _ClassVar[int]
    service: _containers.RepeatedScalarFieldContainer[str]
    epoch_seen: _containers.RepeatedScalarFieldContainer[int]
    client_id: _containers.RepeatedScalarFieldContainer[str]
    seq: _containers.RepeatedScalarFieldContainer[int]
    payload: _containers.RepeatedScalarFieldContainer[bytes]
    deadline_ms: _containers.RepeatedScalarFieldContainer[int]
    opens_session: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, service: _Optional[_Iterable[str]] = ..., epoch_seen: _Optional[_Iterable[int]] = ..., client_id: _Optional[_Iterable[str]] = ..., seq: _Optional[_Iterable[int]] = ..., payload: _Optional[_Iterable[bytes]] = ..., deadline_ms: _Optional[_Iterable[int]] = ..., opens_session: _Optional[_Iterable[bool]] = ...) -> None: ...

class AnswerBatch(_message.Message):
    __slots__ = ("seq", "data", "outcome", "index", "commit_index", "epoch", "duplicate", "session_known", "refused")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    SESSION_KNOWN_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    seq: _containers.RepeatedScalarFieldContainer[int]
    data: _containers.RepeatedScalarFieldContainer[bytes]
    outcome: _containers.RepeatedScalarFieldContainer[int]
    index: _containers.RepeatedScalarFieldContainer[int]
    commit_index: _containers.RepeatedScalarFieldContainer[int]
    epoch: _containers.RepeatedScalarFieldContainer[int]
    duplicate: _containers.RepeatedScalarFieldContainer[bool]
    session_known: _containers.RepeatedScalarFieldContainer[bool]
    refused: _containers.RepeatedCompositeFieldContainer[CallRefused]
    def __init__(self, seq: _Optional[_Iterable[int]] = ..., data: _Optional[_Iterable[bytes]] = ..., outcome: _Optional[_Iterable[int]] = ..., index: _Optional[_Iterable[int]] = ..., commit_index: _Optional[_Iterable[int]] = ..., epoch: _Optional[_Iterable[int]] = ..., duplicate: _Optional[_Iterable[bool]] = ..., session_known: _Optional[_Iterable[bool]] = ..., refused: _Optional[_Iterable[_Union[CallRefused, _Mapping]]] = ...) -> None: ...

class CallRefused(_message.Message):
    __slots__ = ("seq", "code", "message", "error_type", "redirect")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    code: int
    message: str
    error_type: str
    redirect: _common_pb2.Redirect
    def __init__(self, seq: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., error_type: _Optional[str] = ..., redirect: _Optional[_Union[_common_pb2.Redirect, _Mapping]] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("service", "epoch_seen", "request_id", "payload", "deadline_ms", "opens_session")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    OPENS_SESSION_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch_seen: int
    request_id: _common_pb2.RequestId
    payload: bytes
    deadline_ms: int
    opens_session: bool
    def __init__(self, service: _Optional[str] = ..., epoch_seen: _Optional[int] = ..., request_id: _Optional[_Union[_common_pb2.RequestId, _Mapping]] = ..., payload: _Optional[bytes] = ..., deadline_ms: _Optional[int] = ..., opens_session: _Optional[bool] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("error_type", "message")
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    error_type: str
    message: str
    def __init__(self, error_type: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ExecuteReply(_message.Message):
    __slots__ = ("result", "rejected", "index", "commit_index", "epoch", "duplicate", "session_known")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    SESSION_KNOWN_FIELD_NUMBER: _ClassVar[int]
    result: bytes
    rejected: Rejection
    index: int
    commit_index: int
    epoch: int
    duplicate: bool
    session_known: bool
    def __init__(self, result: _Optional[bytes] = ..., rejected: _Optional[_Union[Rejection, _Mapping]] = ..., index: _Optional[int] = ..., commit_index: _Optional[int] = ..., epoch: _Optional[int] = ..., duplicate: _Optional[bool] = ..., session_known: _Optional[bool] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("service", "epoch_seen", "payload", "deadline_ms")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SEEN_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    service: str
    epoch_seen: int
    payload: bytes
    deadline_ms: int
    def __init__(self, service: _Optional[str] = ..., epoch_seen: _Optional[int] = ..., payload: _Optional[bytes] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class QueryReply(_message.Message):
    __slots__ = ("result", "rejected", "applied_index", "epoch")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    result: bytes
    rejected: Rejection
    applied_index: int
    epoch: int
    def __init__(self, result: _Optional[bytes] = ..., rejected: _Optional[_Union[Rejection, _Mapping]] = ..., applied_index: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...
