"""The binding digest: what an approval authorizes, as one hash.

An approval authorizes one request and nothing else. The request is reduced
to the parts that say what would happen, and hashed:

    {"chain": [principal ids, user first, this agent last],
     "action": "...",
     "resource": {"kind": "...", "id": "...", "attributes": {...}},
     "context": {...}}

Values are in the audit record's typed JSON form
(``audit.record.encode_value``), so an amount of ``60000`` and one of
``60000.0`` differ, as they do to a policy. The JSON is canonical the way
the audit chain encodes records (sorted keys, no spaces, UTF-8), so any
implementation that reads the record format can recompute a digest.

The chain holds verified principal ids, never token bytes: a retry with a
freshly minted delegation token for the same user binds the same. Context
entries named in ``approvals.volatile_context`` (a trace id, an attempt
counter) are left out, so they may differ between the request that asked
and the retry that uses the grant. Everything else must match exactly: a
changed amount, resource id or user is another request.

The digest is computed on the unredacted request (redaction hides values
from the log, not from the binding); a hash reveals no more than the audit
record's redacted form would.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from kynara_sidecar.audit.record import document_digest, encode_value
from kynara_sidecar.decision import Resource

__all__ = ["binding_digest", "binding_document", "encoded_binding_digest"]


def binding_document(
    chain_ids: Sequence[str],
    action: str,
    resource: Resource,
    context: Mapping[str, Any],
    volatile: Collection[str] = (),
) -> dict[str, Any]:
    """The document the digest hashes (see the module doc).

    Raises:
        TypeError: a value cannot be encoded (``encode_value``).
    """
    return {
        "chain": list(chain_ids),
        "action": action,
        "resource": {
            "kind": resource.kind,
            "id": resource.id,
            "attributes": encode_value(dict(resource.attributes))["map"],
        },
        "context": encode_value(
            {key: value for key, value in context.items() if key not in volatile}
        )["map"],
    }


def binding_digest(
    chain_ids: Sequence[str],
    action: str,
    resource: Resource,
    context: Mapping[str, Any],
    volatile: Collection[str] = (),
) -> str:
    """``"sha256:<hex>"`` of the canonical JSON of ``binding_document``.

    Args:
        chain_ids: the established chain's principal ids, user first.
        action: the request's action.
        resource: the resource, attributes unredacted.
        context: the caller's context, unredacted.
        volatile: top-level context keys left out
            (``approvals.volatile_context``).

    Raises:
        TypeError: a value cannot be encoded (``encode_value``).
    """
    return document_digest(
        binding_document(chain_ids, action, resource, context, volatile)
    )


def encoded_binding_digest(
    chain_ids: Sequence[str],
    action: str,
    resource_kind: str,
    resource_id: str,
    attributes: Mapping[str, Any],
    context: Mapping[str, Any],
    volatile: Collection[str] = (),
) -> str:
    """``binding_digest`` of a request whose attributes and context are
    already in the typed JSON form (``encode_value``'s map, as an
    unredacted audit record holds them): the same digest without encoding
    the values a second time.

    Only for values that were not redacted: a redacted record's values are
    not the request's, and their digest binds something else.
    """
    if volatile:
        context = {key: value for key, value in context.items() if key not in volatile}
    return document_digest(
        {
            "chain": list(chain_ids),
            "action": action,
            "resource": {
                "kind": resource_kind,
                "id": resource_id,
                "attributes": attributes,
            },
            "context": context,
        }
    )
