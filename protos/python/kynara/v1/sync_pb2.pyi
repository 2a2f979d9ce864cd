from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShipNowRequest(_message.Message):
    __slots__ = ("wait_seconds",)
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    wait_seconds: float
    def __init__(self, wait_seconds: _Optional[float] = ...) -> None: ...

class ShipNowResponse(_message.Message):
    __slots__ = ("sealed_tree_size", "shipped_segments", "backlog_records", "shipped_tree_size")
    SEALED_TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHIPPED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_RECORDS_FIELD_NUMBER: _ClassVar[int]
    SHIPPED_TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    sealed_tree_size: int
    shipped_segments: int
    backlog_records: int
    shipped_tree_size: int
    def __init__(self, sealed_tree_size: _Optional[int] = ..., shipped_segments: _Optional[int] = ..., backlog_records: _Optional[int] = ..., shipped_tree_size: _Optional[int] = ...) -> None: ...

class SyncNowRequest(_message.Message):
    __slots__ = ("force",)
    FORCE_FIELD_NUMBER: _ClassVar[int]
    force: bool
    def __init__(self, force: bool = ...) -> None: ...

class SyncNowResponse(_message.Message):
    __slots__ = ("outcome", "revision", "previous_revision", "error", "digest", "directory")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_REVISION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    revision: str
    previous_revision: str
    error: str
    digest: str
    directory: DirectorySync
    def __init__(self, outcome: _Optional[str] = ..., revision: _Optional[str] = ..., previous_revision: _Optional[str] = ..., error: _Optional[str] = ..., digest: _Optional[str] = ..., directory: _Optional[_Union[DirectorySync, _Mapping]] = ...) -> None: ...

class DirectorySync(_message.Message):
    __slots__ = ("configured", "outcome", "revision", "previous_revision", "error", "digest")
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_REVISION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    configured: bool
    outcome: str
    revision: str
    previous_revision: str
    error: str
    digest: str
    def __init__(self, configured: bool = ..., outcome: _Optional[str] = ..., revision: _Optional[str] = ..., previous_revision: _Optional[str] = ..., error: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...
