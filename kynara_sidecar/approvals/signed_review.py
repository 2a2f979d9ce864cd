"""A review made in the fleet inbox, signed so the daemon can believe it.

The collector's fleet inbox authenticates a reviewer, checks them against
the approval exactly as the daemon will (``eligibility``), and then has
to tell the daemon that asked. It can only do so through the central
store, which anyone with write access to it can write. So the inbox signs
each review with its own Ed25519 key (collector ``inbox.signing_key``), and
a daemon applies a review from the store only when:

1. it decodes as a ``SignedReviewV1`` of this version (``malformed``);
2. its ``key_id`` names one of the daemon's ``approvals.inbox_keys`` and
   the signature verifies under that key (``unknown_key``,
   ``bad_signature``);
3. it is for this daemon, and for the approval and review id the store
   filed it under (``wrong_daemon``, ``wrong_key``): a signed review
   cannot be refiled under another approval;
4. it names one of this daemon's approvals, for the very request that
   approval binds (``unknown_approval``, ``digest_mismatch``): the
   approval id is random, the digest pins the request, so a review
   cannot be carried over to a different request;
5. it was made within that approval's life, ``created_at <= at <=
   expires_at`` (``stale``);
6. what the reviewer was shown is what the daemon asked
   (``view_mismatch``): ``view`` is ``view_digest`` of the approval as the
   page displayed it (the page puts it in its form, and the inbox signs
   exactly that, not the digest of whatever its copy holds when the form
   comes back), so a store writer who alters a published approval (a
   smaller amount, another user) while the reviewer reads gets a review
   that the daemon refuses, rather than one that approves the real request
   unseen.

What it says about the reviewer (principal id, roles, how they signed in)
is the inbox's word, trusted because the inbox's key signed it; the daemon
then checks eligibility itself, as for a review made on its own page. A
replayed review changes nothing: an approval takes one review per
reviewer and only while pending.

The signature covers canonical JSON (sorted keys, no whitespace, UTF-8, as
the audit chain encodes) of every field but ``signature``. This module is
pure: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import msgspec

from kynara_sidecar.approvals.model import Approval, Reviewer, Verdict, random_id
from kynara_sidecar.audit.keys import (
    PublicKey,
    SigningKey,
    decode_base64url,
    encode_base64url,
)
from kynara_sidecar.audit.record import parse_timestamp
from kynara_sidecar.errors import KynaraError

__all__ = [
    "REVIEW_ID_PREFIX",
    "SIGNED_REVIEW_VERSION",
    "RefusalReason",
    "ReviewRefused",
    "SignedReviewV1",
    "check_signed_review",
    "decode_signed_review",
    "encode_signed_review",
    "new_review_id",
    "sign_review",
    "signed_bytes",
    "view_digest",
]

# What a reviewer is shown and what never changes once an approval is
# opened: its state, reviews and URL are left out.
_VIEW_FIELDS = (
    "id",
    "daemon_id",
    "agent_id",
    "digest",
    "decision_id",
    "chain",
    "action",
    "resource_kind",
    "resource_id",
    "attributes",
    "context",
    "request_id",
    "rules",
    "requirement",
    "risk",
    "policy_revision",
    "directory_revision",
    "created_at",
    "expires_at",
)

SIGNED_REVIEW_VERSION = 1
REVIEW_ID_PREFIX = "rev_"
# 16 random bytes, as approval ids: no two reviews ever share an id.
_REVIEW_ID_BYTES = 16

RefusalReason = Literal[
    "malformed",
    "unknown_key",
    "bad_signature",
    "wrong_daemon",
    "wrong_key",
    "unknown_approval",
    "digest_mismatch",
    "stale",
    "view_mismatch",
]


class ReviewRefused(KynaraError):
    """A review from the store that the daemon does not apply; ``reason``
    is one of ``RefusalReason`` (see the module doc)."""

    def __init__(self, reason: RefusalReason, message: str):
        super().__init__(message)
        self.reason = reason


class SignedReviewV1(msgspec.Struct, frozen=True, kw_only=True):
    """One review as the fleet inbox signs it (a versioned wire record)."""

    version: int = SIGNED_REVIEW_VERSION
    # "rev_" and 26 lowercase base32 characters; its store key.
    review_id: str
    # The inbox's name: the Review's ``via`` once recorded.
    inbox: str
    daemon_id: str
    approval_id: str
    # The approval's binding digest: the exact request reviewed.
    digest: str
    # ``view_digest`` of the approval as the inbox showed it.
    view: str
    # The reviewer's principal id, roles and how they signed in.
    reviewer: str
    roles: tuple[str, ...]
    credential: str = ""
    verdict: Verdict
    comment: str = ""
    # When the inbox took it, RFC 3339 UTC.
    at: str
    # The signing key's id (``audit.keys.key_id_of``).
    key_id: str
    # Ed25519 over ``signed_bytes``, unpadded base64url.
    signature: str = ""

    def as_reviewer(self) -> Reviewer:
        """The reviewer the inbox vouches for."""
        return Reviewer(
            id=self.reviewer, roles=frozenset(self.roles), credential=self.credential
        )


_DECODER = msgspec.json.Decoder(SignedReviewV1)


def new_review_id() -> str:
    """A new review id: ``rev_`` and 26 lowercase base32 characters."""
    return random_id(REVIEW_ID_PREFIX, _REVIEW_ID_BYTES)


def view_digest(approval: Approval) -> str:
    """``sha256:`` and the hex SHA-256 of the canonical JSON of what a
    reviewer is shown of ``approval`` (its fixed fields, ``_VIEW_FIELDS``)."""
    fields = msgspec.to_builtins(approval)
    shown = {name: fields.get(name) for name in _VIEW_FIELDS}
    return (
        "sha256:"
        + hashlib.sha256(msgspec.json.encode(shown, order="sorted")).hexdigest()
    )


def signed_bytes(review: SignedReviewV1) -> bytes:
    """The bytes the signature covers: every other field, canonical JSON."""
    fields = msgspec.to_builtins(review)
    del fields["signature"]
    return msgspec.json.encode(fields, order="sorted")


def sign_review(
    key: SigningKey,
    *,
    inbox: str,
    approval: Approval,
    reviewer: Reviewer,
    verdict: Verdict,
    comment: str,
    at: str,
    review_id: str | None = None,
    view: str = "",
) -> SignedReviewV1:
    """The review of ``approval`` by ``reviewer``, signed with ``key``;
    ``view``: the view digest of what the reviewer was shown (default: that
    of ``approval``)."""
    unsigned = SignedReviewV1(
        review_id=review_id or new_review_id(),
        inbox=inbox,
        daemon_id=approval.daemon_id,
        approval_id=approval.id,
        digest=approval.digest,
        view=view or view_digest(approval),
        reviewer=reviewer.id,
        roles=tuple(sorted(reviewer.roles)),
        credential=reviewer.credential,
        verdict=verdict,
        comment=comment,
        at=at,
        key_id=key.key_id,
    )
    signature = encode_base64url(key.sign(signed_bytes(unsigned)))
    return msgspec.structs.replace(unsigned, signature=signature)


def encode_signed_review(review: SignedReviewV1) -> bytes:
    """The review as the store holds it (JSON)."""
    return msgspec.json.encode(review, order="sorted")


def decode_signed_review(data: bytes) -> SignedReviewV1:
    """Decode a review from the store.

    Raises:
        ReviewRefused: ``malformed``: not JSON, not this shape, or another
            version.
    """
    try:
        review = _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise ReviewRefused("malformed", f"not a signed review: {err}") from None
    if review.version != SIGNED_REVIEW_VERSION:
        raise ReviewRefused(
            "malformed",
            f"version: expected {SIGNED_REVIEW_VERSION}, got {review.version}",
        )
    return review


def check_signed_review(
    review: SignedReviewV1,
    *,
    trusted: dict[str, PublicKey],
    daemon_id: str,
    approval_id: str,
    review_id: str,
    approval: Approval | None,
) -> Reviewer:
    """The reviewer of ``review`` when the daemon may apply it.

    Args:
        trusted: the inbox keys by key id (``approvals.inbox_keys``).
        daemon_id: this daemon's id.
        approval_id, review_id: the ids the store filed it under.
        approval: this daemon's approval named ``approval_id``, or None.

    Raises:
        ReviewRefused: why not (the module doc lists the checks in order).
    """
    key = trusted.get(review.key_id)
    if key is None:
        raise ReviewRefused(
            "unknown_key",
            f"signed by {review.key_id[:40]!r}, expected one of approvals."
            f"inbox_keys ({', '.join(sorted(trusted)) or 'none configured'})",
        )
    try:
        signature = decode_base64url(review.signature)
    except ValueError:
        signature = b""
    if not key.verify(signed_bytes(review), signature):
        raise ReviewRefused(
            "bad_signature", f"the signature does not verify under {key.key_id}"
        )
    if review.daemon_id != daemon_id:
        raise ReviewRefused(
            "wrong_daemon",
            f"for daemon {review.daemon_id[:80]!r}, expected {daemon_id!r}",
        )
    if (review.approval_id, review.review_id) != (approval_id, review_id):
        raise ReviewRefused(
            "wrong_key",
            f"signed for approval {review.approval_id[:40]!r} review "
            f"{review.review_id[:40]!r}, filed under {approval_id!r} {review_id!r}",
        )
    if approval is None:
        raise ReviewRefused(
            "unknown_approval", f"this daemon has no approval {approval_id!r}"
        )
    if review.digest != approval.digest:
        raise ReviewRefused(
            "digest_mismatch",
            f"reviewed request {review.digest[:80]!r}, approval {approval.id} "
            f"binds {approval.digest}",
        )
    try:
        at = _instant(review.at)
        fresh = _instant(approval.created_at) <= at <= _instant(approval.expires_at)
    except ValueError as err:
        raise ReviewRefused("malformed", f"at: {err}") from None
    if not fresh:
        raise ReviewRefused(
            "stale",
            f"made at {review.at}, outside approval {approval.id}'s life "
            f"({approval.created_at} .. {approval.expires_at})",
        )
    shown = view_digest(approval)
    if review.view != shown:
        raise ReviewRefused(
            "view_mismatch",
            f"the reviewer was shown {review.view[:80]!r}, approval "
            f"{approval.id} is {shown}: the published approval was altered",
        )
    return review.as_reviewer()


def _instant(text: str) -> tuple[int, int]:
    moment = parse_timestamp(text)
    return moment.seconds, moment.nanos
