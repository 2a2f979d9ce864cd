from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Checkpoint(_message.Message):
    __slots__ = ("json", "kind", "origin", "tree_size", "root", "chain_hash", "time", "key_id", "log_id")
    JSON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    json: bytes
    kind: str
    origin: str
    tree_size: int
    root: bytes
    chain_hash: bytes
    time: str
    key_id: str
    log_id: str
    def __init__(self, json: _Optional[bytes] = ..., kind: _Optional[str] = ..., origin: _Optional[str] = ..., tree_size: _Optional[int] = ..., root: _Optional[bytes] = ..., chain_hash: _Optional[bytes] = ..., time: _Optional[str] = ..., key_id: _Optional[str] = ..., log_id: _Optional[str] = ...) -> None: ...

class GetHeadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetHeadResponse(_message.Message):
    __slots__ = ("checkpoint", "tree_size", "log_id", "seam")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    SEAM_FIELD_NUMBER: _ClassVar[int]
    checkpoint: Checkpoint
    tree_size: int
    log_id: str
    seam: int
    def __init__(self, checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., tree_size: _Optional[int] = ..., log_id: _Optional[str] = ..., seam: _Optional[int] = ...) -> None: ...

class GetRecordRequest(_message.Message):
    __slots__ = ("seq", "decision_id", "tree_size")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    decision_id: str
    tree_size: int
    def __init__(self, seq: _Optional[int] = ..., decision_id: _Optional[str] = ..., tree_size: _Optional[int] = ...) -> None: ...

class GetRecordResponse(_message.Message):
    __slots__ = ("record", "seq", "leaf_index", "inclusion_proof", "checkpoint")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    INCLUSION_PROOF_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    record: bytes
    seq: int
    leaf_index: int
    inclusion_proof: _containers.RepeatedScalarFieldContainer[bytes]
    checkpoint: Checkpoint
    def __init__(self, record: _Optional[bytes] = ..., seq: _Optional[int] = ..., leaf_index: _Optional[int] = ..., inclusion_proof: _Optional[_Iterable[bytes]] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ...) -> None: ...

class GetConsistencyProofRequest(_message.Message):
    __slots__ = ("old_size", "new_size")
    OLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEW_SIZE_FIELD_NUMBER: _ClassVar[int]
    old_size: int
    new_size: int
    def __init__(self, old_size: _Optional[int] = ..., new_size: _Optional[int] = ...) -> None: ...

class GetConsistencyProofResponse(_message.Message):
    __slots__ = ("old_checkpoint", "new_checkpoint", "consistency_proof")
    OLD_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    NEW_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_PROOF_FIELD_NUMBER: _ClassVar[int]
    old_checkpoint: Checkpoint
    new_checkpoint: Checkpoint
    consistency_proof: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, old_checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., new_checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., consistency_proof: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StreamSegmentsRequest(_message.Message):
    __slots__ = ("after_tree_size",)
    AFTER_TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    after_tree_size: int
    def __init__(self, after_tree_size: _Optional[int] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("checkpoint", "previous_tree_size", "first_seq", "records")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    checkpoint: Checkpoint
    previous_tree_size: int
    first_seq: int
    records: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., previous_tree_size: _Optional[int] = ..., first_seq: _Optional[int] = ..., records: _Optional[_Iterable[bytes]] = ...) -> None: ...
