"""Load the decision cases under ``tests/cases/`` for any evaluator path.

Each ``*.yaml`` file is one case against the shipped ``config/policies``:

.. code-block:: yaml

    description: one line
    now: "2026-12-07T08:59:00+01:00"     # env.now, RFC 3339, any offset
    request:
      chain: [alice, support-bot]         # user first, agent last
      action: crm.contact.read
      resource: {kind: crm.contact, id: c-1, attributes: {}}
      context: {region: "DE"}
    expect:
      decision: deny                      # allow | deny | require_approval
      reason_code: no_rule_allows
      matched_rules: [...]                # optional, compared exactly
      condition_errors: [...]             # optional: {policy, rule, principal}

Values keep their YAML types (ints stay int64). ``!uint 5`` makes a
``UInt64``; ``!timestamp "2026-01-01T00:00:00Z"`` (or an unquoted YAML
timestamp) makes a ``Timestamp``.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
from typing import Any

import yaml

from kynara_sidecar.decision import DecisionRequest, Resource, Timestamp, UInt64

__all__ = ["CASES_DIR", "POLICIES_DIR", "Case", "load_cases", "parse_instant"]

CASES_DIR = pathlib.Path(__file__).parent / "cases"
POLICIES_DIR = pathlib.Path(__file__).parent.parent / "config" / "policies"


@dataclasses.dataclass(frozen=True)
class Case:
    """One decision case; ``name`` is the file name without ``.yaml``."""

    name: str
    description: str
    now: Timestamp
    request: DecisionRequest
    expect: dict[str, Any]


class _CaseLoader(yaml.SafeLoader):
    """YAML with ``!uint`` and ``!timestamp`` tags for typed values."""


_CaseLoader.add_constructor(
    "!uint", lambda loader, node: UInt64(int(loader.construct_scalar(node)))
)
_CaseLoader.add_constructor(
    "!timestamp", lambda loader, node: parse_instant(loader.construct_scalar(node))
)


def parse_instant(text: str | datetime.datetime) -> Timestamp:
    """Parse an RFC 3339 instant with any offset (or ``Z``) into a Timestamp.

    Raises:
        ValueError: The text has no offset, or is not RFC 3339.
    """
    value = (
        text
        if isinstance(text, datetime.datetime)
        else datetime.datetime.fromisoformat(text)
    )
    if value.tzinfo is None:
        raise ValueError(f"expected an instant with an offset, got {text!r}")
    return Timestamp.from_datetime(value)


def load_cases(directory: pathlib.Path = CASES_DIR) -> list[Case]:
    """Every case under ``directory``, sorted by file name.

    Raises:
        ValueError: A case file lacks a key or has a malformed value.
    """
    return [_load_case(path) for path in sorted(directory.glob("*.yaml"))]


CASE_KEYS = frozenset({"description", "now", "request", "expect"})
EXPECT_KEYS = frozenset(
    {"decision", "reason_code", "matched_rules", "condition_errors"}
)


def _load_case(path: pathlib.Path) -> Case:
    raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_CaseLoader)  # noqa: S506
    # A misplaced expectation would be silently unchecked: refuse it.
    unknown = (set(raw) - CASE_KEYS) | (set(raw.get("expect") or {}) - EXPECT_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    try:
        request = raw["request"]
        resource = request["resource"]
        return Case(
            name=path.stem,
            description=raw["description"],
            now=parse_instant(raw["now"]),
            request=DecisionRequest(
                chain=tuple(request["chain"]),
                action=request["action"],
                resource=Resource(
                    kind=resource["kind"],
                    id=resource.get("id", ""),
                    attributes=_typed(resource.get("attributes") or {}),
                ),
                context=_typed(request.get("context") or {}),
                request_id=request.get("request_id", ""),
            ),
            expect=raw["expect"],
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected a case with {err}") from err


def _typed(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return parse_instant(value)
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    return value
