from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListApprovalsRequest(_message.Message):
    __slots__ = ("state", "agent_id", "action", "min_risk", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MIN_RISK_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: str
    agent_id: str
    action: str
    min_risk: int
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[str] = ..., agent_id: _Optional[str] = ..., action: _Optional[str] = ..., min_risk: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApprovalsResponse(_message.Message):
    __slots__ = ("approvals", "next_page_token")
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[ApprovalDetail]
    next_page_token: str
    def __init__(self, approvals: _Optional[_Iterable[_Union[ApprovalDetail, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetApprovalRequest(_message.Message):
    __slots__ = ("approval_id",)
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    def __init__(self, approval_id: _Optional[str] = ...) -> None: ...

class ReviewRequest(_message.Message):
    __slots__ = ("approval_id", "comment")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    comment: str
    def __init__(self, approval_id: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...

class ChainPrincipal(_message.Message):
    __slots__ = ("id", "kind", "roles")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class AskingRule(_message.Message):
    __slots__ = ("policy", "rule", "principal", "description", "condition")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    policy: str
    rule: str
    principal: str
    description: str
    condition: str
    def __init__(self, policy: _Optional[str] = ..., rule: _Optional[str] = ..., principal: _Optional[str] = ..., description: _Optional[str] = ..., condition: _Optional[str] = ...) -> None: ...

class RiskFactor(_message.Message):
    __slots__ = ("name", "weight", "fraction", "points", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    fraction: float
    points: float
    detail: str
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., fraction: _Optional[float] = ..., points: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class Risk(_message.Message):
    __slots__ = ("score", "factors")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    score: int
    factors: _containers.RepeatedCompositeFieldContainer[RiskFactor]
    def __init__(self, score: _Optional[int] = ..., factors: _Optional[_Iterable[_Union[RiskFactor, _Mapping]]] = ...) -> None: ...

class Review(_message.Message):
    __slots__ = ("reviewer", "roles", "verdict", "comment", "at", "via")
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    reviewer: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    verdict: str
    comment: str
    at: _timestamp_pb2.Timestamp
    via: str
    def __init__(self, reviewer: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., verdict: _Optional[str] = ..., comment: _Optional[str] = ..., at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., via: _Optional[str] = ...) -> None: ...

class ApprovalDetail(_message.Message):
    __slots__ = ("id", "state", "daemon_id", "agent_id", "chain", "action", "resource_kind", "resource_id", "attributes_json", "context_json", "rules", "risk", "policy_revision", "directory_revision", "created_at", "expires_at", "resolved_at", "reviews", "approvals_needed", "reviewer_roles", "allow_self_approval", "binding_digest", "decision_id", "used_by_decision_id", "url", "previous")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DAEMON_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_KIND_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_JSON_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_AT_FIELD_NUMBER: _ClassVar[int]
    REVIEWS_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_ROLES_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SELF_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    BINDING_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    USED_BY_DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    daemon_id: str
    agent_id: str
    chain: _containers.RepeatedCompositeFieldContainer[ChainPrincipal]
    action: str
    resource_kind: str
    resource_id: str
    attributes_json: str
    context_json: str
    rules: _containers.RepeatedCompositeFieldContainer[AskingRule]
    risk: Risk
    policy_revision: str
    directory_revision: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    resolved_at: _timestamp_pb2.Timestamp
    reviews: _containers.RepeatedCompositeFieldContainer[Review]
    approvals_needed: int
    reviewer_roles: _containers.RepeatedScalarFieldContainer[str]
    allow_self_approval: bool
    binding_digest: str
    decision_id: str
    used_by_decision_id: str
    url: str
    previous: _containers.RepeatedCompositeFieldContainer[EarlierApproval]
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., daemon_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., chain: _Optional[_Iterable[_Union[ChainPrincipal, _Mapping]]] = ..., action: _Optional[str] = ..., resource_kind: _Optional[str] = ..., resource_id: _Optional[str] = ..., attributes_json: _Optional[str] = ..., context_json: _Optional[str] = ..., rules: _Optional[_Iterable[_Union[AskingRule, _Mapping]]] = ..., risk: _Optional[_Union[Risk, _Mapping]] = ..., policy_revision: _Optional[str] = ..., directory_revision: _Optional[str] = ..., created_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., resolved_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., reviews: _Optional[_Iterable[_Union[Review, _Mapping]]] = ..., approvals_needed: _Optional[int] = ..., reviewer_roles: _Optional[_Iterable[str]] = ..., allow_self_approval: bool = ..., binding_digest: _Optional[str] = ..., decision_id: _Optional[str] = ..., used_by_decision_id: _Optional[str] = ..., url: _Optional[str] = ..., previous: _Optional[_Iterable[_Union[EarlierApproval, _Mapping]]] = ...) -> None: ...

class EarlierApproval(_message.Message):
    __slots__ = ("id", "state", "reviewer", "comment", "resolved_at", "url")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_AT_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    reviewer: str
    comment: str
    resolved_at: _timestamp_pb2.Timestamp
    url: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., reviewer: _Optional[str] = ..., comment: _Optional[str] = ..., resolved_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., url: _Optional[str] = ...) -> None: ...
