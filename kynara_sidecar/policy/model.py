"""The policy and directory file formats, as msgspec types.

Every file carries ``format_version: 1`` and a ``kind`` (``policy`` or
``directory``). Unknown keys are errors everywhere, so a misspelt field is
refused rather than silently ignored. These types describe the documents as
written; ``compiler`` turns them into the immutable policy set and directory.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec

from kynara_sidecar.decision import Effect

__all__ = [
    "ApprovalDocument",
    "FORMAT_VERSION",
    "DirectoryDocument",
    "DocumentHeader",
    "DocumentKind",
    "LimitDocument",
    "LimitScope",
    "Mode",
    "PolicyDocument",
    "PrincipalDocument",
    "PrincipalKind",
    "RoleDocument",
    "RuleDocument",
    "SourceDocument",
    "WindowDocument",
]

# The only format this daemon reads; a new version gets a new number.
FORMAT_VERSION = 1

NonEmpty = Annotated[tuple[str, ...], msgspec.Meta(min_length=1)]
Text = Annotated[str, msgspec.Meta(min_length=1)]


class DocumentKind(enum.StrEnum):
    POLICY = "policy"
    DIRECTORY = "directory"


class Mode(enum.StrEnum):
    """Whether a rule decides (``enforce``) or is only recorded (``shadow``)."""

    ENFORCE = "enforce"
    SHADOW = "shadow"


class PrincipalKind(enum.StrEnum):
    USER = "user"
    AGENT = "agent"


class DocumentHeader(msgspec.Struct, frozen=True):
    """The two keys read first, to pick the document type."""

    format_version: Any = None
    kind: Any = None


class RoleDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A role; it holds every permission of the roles it inherits."""

    inherits: tuple[str, ...] = ()
    description: str = ""


class ApprovalDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a require_approval rule's approvals are reviewed.

    ``expires_in_seconds`` 0 takes the daemon's
    ``approvals.default_expiry_seconds``; ``reviewer_roles`` empty lets any
    reviewer decide; ``risk`` is the rule's base risk, 0..100.
    """

    expires_in_seconds: Annotated[int, msgspec.Meta(ge=0, le=90 * 86_400)] = 0
    approvers: Annotated[int, msgspec.Meta(ge=1, le=10)] = 1
    reviewer_roles: tuple[str, ...] = ()
    allow_self_approval: bool = False
    risk: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0


class LimitScope(enum.StrEnum):
    """Whose decisions a limit counts: this daemon's (exact), or every
    daemon's sharing the central store (see ``limits.fleet``)."""

    DAEMON = "daemon"
    FLEET = "fleet"


class WindowDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which decisions a limit's value covers: those of the last
    ``rolling`` (a duration such as ``"24h"``, ``"7d"``), or those since the
    start of the current ``calendar`` period (``hour``, ``day``, ``week``
    from Monday, ``month``) in ``time_zone``. Exactly one of the two."""

    rolling: str = ""
    calendar: str = ""
    time_zone: str = "UTC"


class LimitDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A limit that remembers decisions: conditions read it as
    ``limits.<name>``.

    It counts the decisions of ``actions`` on ``resources`` (patterns as a
    rule's) whose final effect is among ``decisions``, and with ``sum`` adds
    up that request value (``context.<field>`` or ``resource.attr.<field>``)
    over them; ``key`` says whose (``user``, ``agent``, ``chain``,
    ``resource.id``, ``resource.kind``, ``context.<field>``,
    ``resource.attr.<field>``, ``user.attr.<field>``,
    ``agent.attr.<field>``), every part together. ``ceiling`` is the most
    the window may hold: an int, or a float for a sum of doubles.
    """

    actions: NonEmpty
    key: NonEmpty
    window: WindowDocument
    ceiling: int | float
    resources: NonEmpty = ("*",)
    decisions: NonEmpty = ("allow",)
    sum: str = ""
    scope: LimitScope = LimitScope.DAEMON
    description: str = ""


class RuleDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: Text
    effect: Effect
    actions: NonEmpty
    resources: NonEmpty
    roles: NonEmpty
    condition: str = ""
    mode: Mode | None = None
    description: str = ""
    # Only on require_approval rules.
    approval: ApprovalDocument | None = None


class PolicyDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format_version: Literal[1]
    kind: Literal["policy"]
    name: Text
    mode: Mode = Mode.ENFORCE
    description: str = ""
    roles: dict[str, RoleDocument] = {}
    rules: tuple[RuleDocument, ...] = ()
    # Limit name -> limit; names are unique across the policy set.
    limits: dict[str, LimitDocument] = {}


class PrincipalDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: Text
    kind: PrincipalKind
    roles: tuple[str, ...] = ()
    attributes: dict[str, Any] = {}
    active: bool = True
    description: str = ""


class DirectoryDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format_version: Literal[1]
    kind: Literal["directory"]
    principals: tuple[PrincipalDocument, ...] = ()
    description: str = ""


class SourceDocument(msgspec.Struct, frozen=True):
    """A decoded file: ``path`` is cited in errors, ``name`` (the path below
    the policy root, with ``/``) and ``content`` go into the revision."""

    path: str
    name: str
    content: bytes
    document: PolicyDocument | DirectoryDocument
