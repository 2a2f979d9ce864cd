from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOW: _ClassVar[Decision]
    DECISION_DENY: _ClassVar[Decision]
    DECISION_REQUIRE_APPROVAL: _ClassVar[Decision]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_HELD: _ClassVar[Verdict]
    VERDICT_NOT_HELD: _ClassVar[Verdict]
    VERDICT_ERRORED: _ClassVar[Verdict]
    VERDICT_NOT_EVALUATED: _ClassVar[Verdict]

class ReasonCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_CODE_UNSPECIFIED: _ClassVar[ReasonCode]
    REASON_CODE_RULE_ALLOWED: _ClassVar[ReasonCode]
    REASON_CODE_APPROVAL_REQUIRED: _ClassVar[ReasonCode]
    REASON_CODE_NO_RULE_ALLOWS: _ClassVar[ReasonCode]
    REASON_CODE_RULE_DENIED: _ClassVar[ReasonCode]
    REASON_CODE_CONDITION_ERROR: _ClassVar[ReasonCode]
    REASON_CODE_UNKNOWN_PRINCIPAL: _ClassVar[ReasonCode]
    REASON_CODE_INACTIVE_PRINCIPAL: _ClassVar[ReasonCode]
    REASON_CODE_INVALID_CHAIN: _ClassVar[ReasonCode]
    REASON_CODE_APPROVAL_GRANTED: _ClassVar[ReasonCode]
    REASON_CODE_APPROVAL_NOT_FOUND: _ClassVar[ReasonCode]
    REASON_CODE_APPROVAL_REJECTED: _ClassVar[ReasonCode]
    REASON_CODE_APPROVAL_EXPIRED: _ClassVar[ReasonCode]
    REASON_CODE_APPROVAL_USED: _ClassVar[ReasonCode]
    REASON_CODE_APPROVAL_MISMATCH: _ClassVar[ReasonCode]
    REASON_CODE_APPROVAL_INSUFFICIENT: _ClassVar[ReasonCode]
    REASON_CODE_APPROVAL_RATE_LIMITED: _ClassVar[ReasonCode]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_REQUEST: _ClassVar[ErrorCode]
    ERROR_CODE_POLICY_NOT_READY: _ClassVar[ErrorCode]
    ERROR_CODE_AUDIT_UNAVAILABLE: _ClassVar[ErrorCode]
    ERROR_CODE_IDENTITY_INVALID: _ClassVar[ErrorCode]
    ERROR_CODE_REQUEST_TOO_LARGE: _ClassVar[ErrorCode]
    ERROR_CODE_SHUTTING_DOWN: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
    ERROR_CODE_ROLE_MISSING: _ClassVar[ErrorCode]
    ERROR_CODE_NOT_FOUND: _ClassVar[ErrorCode]
    ERROR_CODE_NOT_CHECKPOINTED: _ClassVar[ErrorCode]
    ERROR_CODE_PRUNED: _ClassVar[ErrorCode]
    ERROR_CODE_SELF_APPROVAL: _ClassVar[ErrorCode]
    ERROR_CODE_APPROVAL_CLOSED: _ClassVar[ErrorCode]
DECISION_UNSPECIFIED: Decision
DECISION_ALLOW: Decision
DECISION_DENY: Decision
DECISION_REQUIRE_APPROVAL: Decision
VERDICT_UNSPECIFIED: Verdict
VERDICT_HELD: Verdict
VERDICT_NOT_HELD: Verdict
VERDICT_ERRORED: Verdict
VERDICT_NOT_EVALUATED: Verdict
REASON_CODE_UNSPECIFIED: ReasonCode
REASON_CODE_RULE_ALLOWED: ReasonCode
REASON_CODE_APPROVAL_REQUIRED: ReasonCode
REASON_CODE_NO_RULE_ALLOWS: ReasonCode
REASON_CODE_RULE_DENIED: ReasonCode
REASON_CODE_CONDITION_ERROR: ReasonCode
REASON_CODE_UNKNOWN_PRINCIPAL: ReasonCode
REASON_CODE_INACTIVE_PRINCIPAL: ReasonCode
REASON_CODE_INVALID_CHAIN: ReasonCode
REASON_CODE_APPROVAL_GRANTED: ReasonCode
REASON_CODE_APPROVAL_NOT_FOUND: ReasonCode
REASON_CODE_APPROVAL_REJECTED: ReasonCode
REASON_CODE_APPROVAL_EXPIRED: ReasonCode
REASON_CODE_APPROVAL_USED: ReasonCode
REASON_CODE_APPROVAL_MISMATCH: ReasonCode
REASON_CODE_APPROVAL_INSUFFICIENT: ReasonCode
REASON_CODE_APPROVAL_RATE_LIMITED: ReasonCode
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_INVALID_REQUEST: ErrorCode
ERROR_CODE_POLICY_NOT_READY: ErrorCode
ERROR_CODE_AUDIT_UNAVAILABLE: ErrorCode
ERROR_CODE_IDENTITY_INVALID: ErrorCode
ERROR_CODE_REQUEST_TOO_LARGE: ErrorCode
ERROR_CODE_SHUTTING_DOWN: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode
ERROR_CODE_ROLE_MISSING: ErrorCode
ERROR_CODE_NOT_FOUND: ErrorCode
ERROR_CODE_NOT_CHECKPOINTED: ErrorCode
ERROR_CODE_PRUNED: ErrorCode
ERROR_CODE_SELF_APPROVAL: ErrorCode
ERROR_CODE_APPROVAL_CLOSED: ErrorCode

class Value(_message.Message):
    __slots__ = ("int_value", "uint_value", "double_value", "string_value", "bool_value", "bytes_value", "timestamp_value", "duration_value", "list_value", "map_value")
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    UINT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    BYTES_VALUE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_VALUE_FIELD_NUMBER: _ClassVar[int]
    DURATION_VALUE_FIELD_NUMBER: _ClassVar[int]
    LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAP_VALUE_FIELD_NUMBER: _ClassVar[int]
    int_value: int
    uint_value: int
    double_value: float
    string_value: str
    bool_value: bool
    bytes_value: bytes
    timestamp_value: _timestamp_pb2.Timestamp
    duration_value: _duration_pb2.Duration
    list_value: ListValue
    map_value: MapValue
    def __init__(self, int_value: _Optional[int] = ..., uint_value: _Optional[int] = ..., double_value: _Optional[float] = ..., string_value: _Optional[str] = ..., bool_value: bool = ..., bytes_value: _Optional[bytes] = ..., timestamp_value: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., duration_value: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., list_value: _Optional[_Union[ListValue, _Mapping]] = ..., map_value: _Optional[_Union[MapValue, _Mapping]] = ...) -> None: ...

class ListValue(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class MapValue(_message.Message):
    __slots__ = ("entries",)
    class EntriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.MessageMap[str, Value]
    def __init__(self, entries: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("kind", "id", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    id: str
    attributes: _containers.MessageMap[str, Value]
    def __init__(self, kind: _Optional[str] = ..., id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("request_id", "delegation_token", "asserted_chain", "action", "resource", "context", "explain", "approval_id")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DELEGATION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ASSERTED_CHAIN_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    delegation_token: str
    asserted_chain: _containers.RepeatedScalarFieldContainer[str]
    action: str
    resource: Resource
    context: _containers.MessageMap[str, Value]
    explain: bool
    approval_id: str
    def __init__(self, request_id: _Optional[str] = ..., delegation_token: _Optional[str] = ..., asserted_chain: _Optional[_Iterable[str]] = ..., action: _Optional[str] = ..., resource: _Optional[_Union[Resource, _Mapping]] = ..., context: _Optional[_Mapping[str, Value]] = ..., explain: bool = ..., approval_id: _Optional[str] = ...) -> None: ...

class MatchedRule(_message.Message):
    __slots__ = ("policy", "rule", "effect", "principal", "shadow")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    policy: str
    rule: str
    effect: Decision
    principal: str
    shadow: bool
    def __init__(self, policy: _Optional[str] = ..., rule: _Optional[str] = ..., effect: _Optional[_Union[Decision, str]] = ..., principal: _Optional[str] = ..., shadow: bool = ...) -> None: ...

class ConditionError(_message.Message):
    __slots__ = ("policy", "rule", "principal", "message")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    policy: str
    rule: str
    principal: str
    message: str
    def __init__(self, policy: _Optional[str] = ..., rule: _Optional[str] = ..., principal: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("id", "url", "expires_at", "state", "reviewers", "risk_score")
    ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REVIEWERS_FIELD_NUMBER: _ClassVar[int]
    RISK_SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    url: str
    expires_at: _timestamp_pb2.Timestamp
    state: str
    reviewers: _containers.RepeatedScalarFieldContainer[str]
    risk_score: int
    def __init__(self, id: _Optional[str] = ..., url: _Optional[str] = ..., expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[str] = ..., reviewers: _Optional[_Iterable[str]] = ..., risk_score: _Optional[int] = ...) -> None: ...

class WaitApprovalRequest(_message.Message):
    __slots__ = ("approval_id",)
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    def __init__(self, approval_id: _Optional[str] = ...) -> None: ...

class ApprovalUpdate(_message.Message):
    __slots__ = ("approval_id", "state", "approvals", "approvals_needed", "expires_at", "reviewers", "comment")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVIEWERS_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    state: str
    approvals: int
    approvals_needed: int
    expires_at: _timestamp_pb2.Timestamp
    reviewers: _containers.RepeatedScalarFieldContainer[str]
    comment: str
    def __init__(self, approval_id: _Optional[str] = ..., state: _Optional[str] = ..., approvals: _Optional[int] = ..., approvals_needed: _Optional[int] = ..., expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., reviewers: _Optional[_Iterable[str]] = ..., comment: _Optional[str] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("decision", "decision_id", "matched_rules", "reason_code", "reason", "policy_revision", "directory_revision", "audit_sequence", "record_hash", "approval", "condition_errors", "chain", "request_id", "explanation", "limits")
    class LimitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: LimitSeen
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[LimitSeen, _Mapping]] = ...) -> None: ...
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    MATCHED_RULES_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_REVISION_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    CONDITION_ERRORS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    decision_id: str
    matched_rules: _containers.RepeatedCompositeFieldContainer[MatchedRule]
    reason_code: str
    reason: str
    policy_revision: str
    directory_revision: str
    audit_sequence: int
    record_hash: str
    approval: Approval
    condition_errors: _containers.RepeatedCompositeFieldContainer[ConditionError]
    chain: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    explanation: Explanation
    limits: _containers.MessageMap[str, LimitSeen]
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., decision_id: _Optional[str] = ..., matched_rules: _Optional[_Iterable[_Union[MatchedRule, _Mapping]]] = ..., reason_code: _Optional[str] = ..., reason: _Optional[str] = ..., policy_revision: _Optional[str] = ..., directory_revision: _Optional[str] = ..., audit_sequence: _Optional[int] = ..., record_hash: _Optional[str] = ..., approval: _Optional[_Union[Approval, _Mapping]] = ..., condition_errors: _Optional[_Iterable[_Union[ConditionError, _Mapping]]] = ..., chain: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ..., limits: _Optional[_Mapping[str, LimitSeen]] = ...) -> None: ...

class LimitSeen(_message.Message):
    __slots__ = ("count", "sum", "ceiling", "remote_count", "remote_sum", "counted", "amount", "window_start", "key", "scope", "error")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    CEILING_FIELD_NUMBER: _ClassVar[int]
    REMOTE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_SUM_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    count: int
    sum: Value
    ceiling: Value
    remote_count: int
    remote_sum: Value
    counted: bool
    amount: Value
    window_start: _timestamp_pb2.Timestamp
    key: str
    scope: str
    error: str
    def __init__(self, count: _Optional[int] = ..., sum: _Optional[_Union[Value, _Mapping]] = ..., ceiling: _Optional[_Union[Value, _Mapping]] = ..., remote_count: _Optional[int] = ..., remote_sum: _Optional[_Union[Value, _Mapping]] = ..., counted: bool = ..., amount: _Optional[_Union[Value, _Mapping]] = ..., window_start: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., key: _Optional[str] = ..., scope: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class RuleTrace(_message.Message):
    __slots__ = ("policy", "rule", "effect", "action_matched", "resource_matched", "roles_matched", "verdict", "shadow", "condition", "error")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    ACTION_MATCHED_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_MATCHED_FIELD_NUMBER: _ClassVar[int]
    ROLES_MATCHED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    policy: str
    rule: str
    effect: Decision
    action_matched: bool
    resource_matched: bool
    roles_matched: bool
    verdict: Verdict
    shadow: bool
    condition: str
    error: str
    def __init__(self, policy: _Optional[str] = ..., rule: _Optional[str] = ..., effect: _Optional[_Union[Decision, str]] = ..., action_matched: bool = ..., resource_matched: bool = ..., roles_matched: bool = ..., verdict: _Optional[_Union[Verdict, str]] = ..., shadow: bool = ..., condition: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class PrincipalExplanation(_message.Message):
    __slots__ = ("principal", "roles", "decision", "reason_code", "decided_by", "rules")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    principal: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    decision: Decision
    reason_code: str
    decided_by: str
    rules: _containers.RepeatedCompositeFieldContainer[RuleTrace]
    def __init__(self, principal: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., decision: _Optional[_Union[Decision, str]] = ..., reason_code: _Optional[str] = ..., decided_by: _Optional[str] = ..., rules: _Optional[_Iterable[_Union[RuleTrace, _Mapping]]] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("summary", "principals")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    summary: str
    principals: _containers.RepeatedCompositeFieldContainer[PrincipalExplanation]
    def __init__(self, summary: _Optional[str] = ..., principals: _Optional[_Iterable[_Union[PrincipalExplanation, _Mapping]]] = ...) -> None: ...

class DecideBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DecideRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[DecideRequest, _Mapping]]] = ...) -> None: ...

class DecideBatchRequestFrames(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, items: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DecideBatchItem(_message.Message):
    __slots__ = ("decision", "error")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    decision: DecideResponse
    error: Error
    def __init__(self, decision: _Optional[_Union[DecideResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class DecideBatchResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DecideBatchItem]
    def __init__(self, items: _Optional[_Iterable[_Union[DecideBatchItem, _Mapping]]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    field: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...
