"""Signed reviews: what the fleet inbox signs and what a daemon accepts."""

from __future__ import annotations

import msgspec
import pytest

from kynara_sidecar.approvals.fleet import (
    ApprovalUnverified,
    decode_approval,
    encode_approval,
)
from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    ChainPrincipal,
    Reviewer,
    Verdict,
)
from kynara_sidecar.approvals.signed_review import (
    REVIEW_ID_PREFIX,
    ReviewRefused,
    check_signed_review,
    decode_signed_review,
    encode_signed_review,
    new_review_id,
    sign_review,
    view_digest,
)
from kynara_sidecar.audit.keys import encode_base64url, generate_key

INBOX_KEY = generate_key()
OTHER_KEY = generate_key()
TRUSTED = {INBOX_KEY.key_id: INBOX_KEY.public()}
CAROL = Reviewer(id="carol", roles=frozenset({"reviewer", "finance"}), credential="c")

APPROVAL = Approval(
    id="apr_" + "a" * 26,
    state=ApprovalState.PENDING,
    daemon_id="support-bot-1",
    agent_id="support-bot",
    digest="sha256:" + "1" * 64,
    decision_id="dec_1",
    chain=(ChainPrincipal("alice"), ChainPrincipal("support-bot")),
    action="payments.refund.issue",
    resource_kind="payments.refund",
    resource_id="rf_1",
    created_at="2026-12-07T09:00:00Z",
    expires_at="2026-12-07T10:00:00Z",
)


def signed(key=INBOX_KEY, approval=APPROVAL, at="2026-12-07T09:30:00Z", **kw):
    return sign_review(
        key,
        inbox="fleet",
        approval=approval,
        reviewer=CAROL,
        verdict=Verdict.APPROVE,
        comment="ok",
        at=at,
        **kw,
    )


def check(review, *, approval=APPROVAL, daemon_id="support-bot-1", filed=None):
    approval_id, review_id = filed or (APPROVAL.id, review.review_id)
    return check_signed_review(
        review,
        trusted=TRUSTED,
        daemon_id=daemon_id,
        approval_id=approval_id,
        review_id=review_id,
        approval=approval,
    )


def test_a_review_signed_by_the_inbox_key_names_its_reviewer():
    review = decode_signed_review(encode_signed_review(signed()))

    reviewer = check(review)

    assert reviewer == CAROL
    assert (review.inbox, review.verdict, review.comment) == ("fleet", "approve", "ok")


def test_review_ids_are_random_store_keys():
    ids = {new_review_id() for _ in range(100)}

    assert len(ids) == 100
    assert all(i.startswith(REVIEW_ID_PREFIX) and len(i) == 30 for i in ids)
    assert all(i[4:].isalnum() and i[4:].islower() for i in ids)


def _tampered(**changes):
    return msgspec.structs.replace(signed(), **changes)


@pytest.mark.parametrize(
    "review, reason",
    [
        (signed(key=OTHER_KEY), "unknown_key"),
        (_tampered(verdict=Verdict.REJECT), "bad_signature"),
        (_tampered(roles=("reviewer", "finance", "admin")), "bad_signature"),
        (_tampered(reviewer="mallory"), "bad_signature"),
        (_tampered(signature=""), "bad_signature"),
        (_tampered(signature="!!"), "bad_signature"),
        (
            _tampered(
                signature=encode_base64url(OTHER_KEY.sign(b"x")),
            ),
            "bad_signature",
        ),
        (
            signed(approval=msgspec.structs.replace(APPROVAL, daemon_id="other")),
            "wrong_daemon",
        ),
        (
            signed(
                approval=msgspec.structs.replace(APPROVAL, digest="sha256:" + "2" * 64)
            ),
            "digest_mismatch",
        ),
        (signed(at="2026-12-07T08:59:59Z"), "stale"),
        (signed(at="2026-12-07T10:00:00.000000001Z"), "stale"),
        (signed(at="yesterday"), "malformed"),
        (
            signed(
                approval=msgspec.structs.replace(
                    APPROVAL, attributes={"amount": {"int": "500"}}
                )
            ),
            "view_mismatch",
        ),
    ],
    ids=[
        "other-key",
        "verdict-changed",
        "roles-added",
        "reviewer-changed",
        "unsigned",
        "signature-not-base64url",
        "signature-over-other-bytes",
        "other-daemon",
        "other-request",
        "before-the-approval",
        "after-expiry",
        "time-unreadable",
        "shown-another-amount",
    ],
)
def test_a_review_the_daemon_must_not_apply_is_refused(review, reason):
    with pytest.raises(ReviewRefused) as caught:
        check(review)

    assert caught.value.reason == reason


def test_a_review_refiled_under_another_approval_is_refused():
    review = signed()

    with pytest.raises(ReviewRefused, match="filed under") as caught:
        check(review, filed=("apr_" + "b" * 26, review.review_id))

    assert caught.value.reason == "wrong_key"


def test_a_review_of_an_approval_the_daemon_lacks_is_refused():
    with pytest.raises(ReviewRefused, match="has no approval") as caught:
        check(signed(), approval=None)

    assert caught.value.reason == "unknown_approval"


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[]", b'{"version": 1}', encode_signed_review(signed())[:-5]],
)
def test_bytes_that_are_no_signed_review_are_malformed(data):
    with pytest.raises(ReviewRefused) as caught:
        decode_signed_review(data)

    assert caught.value.reason == "malformed"


def test_another_version_is_malformed():
    data = encode_signed_review(msgspec.structs.replace(signed(), version=2))

    with pytest.raises(ReviewRefused, match="version: expected 1, got 2"):
        decode_signed_review(data)


# -- approvals as a daemon publishes them

DAEMON_KEY = generate_key()
DAEMON_KEYS = {DAEMON_KEY.key_id: DAEMON_KEY.public()}


def test_a_published_approval_verifies_under_its_daemons_key():
    data = encode_approval(APPROVAL, DAEMON_KEY, ("rev_x",))

    state = decode_approval(data, DAEMON_KEYS)

    assert state.approval == APPROVAL
    assert state.taken == frozenset({"rev_x"})


def _resigned_fields(**changes) -> bytes:
    envelope = msgspec.json.decode(encode_approval(APPROVAL, DAEMON_KEY))
    for name, value in changes.items():
        if name == "taken":
            envelope["taken"] = value
        else:
            envelope["approval"][name] = value
    return msgspec.json.encode(envelope)


@pytest.mark.parametrize(
    "data, keys, reason",
    [
        (_resigned_fields(state="approved"), DAEMON_KEYS, "bad_signature"),
        (
            _resigned_fields(
                reviews=[
                    {
                        "reviewer": "mallory",
                        "roles": ["reviewer"],
                        "verdict": "approve",
                        "at": "2026-12-07T09:01:00Z",
                    }
                ]
            ),
            DAEMON_KEYS,
            "bad_signature",
        ),
        (_resigned_fields(taken=["rev_other"]), DAEMON_KEYS, "bad_signature"),
        (encode_approval(APPROVAL, generate_key()), DAEMON_KEYS, "unknown_key"),
        (encode_approval(APPROVAL, DAEMON_KEY), {}, "unknown_key"),
        (msgspec.json.encode(APPROVAL), DAEMON_KEYS, "malformed"),
        (b"not json", DAEMON_KEYS, "malformed"),
    ],
)
def test_a_published_approval_its_daemon_did_not_sign_is_refused(data, keys, reason):
    with pytest.raises(ApprovalUnverified) as refused:
        decode_approval(data, keys)

    assert refused.value.reason == reason


def test_a_review_signs_the_view_the_page_showed():
    shown = msgspec.structs.replace(APPROVAL, attributes={"amount": {"int": "5"}})

    review = signed(view=view_digest(shown))

    assert review.view == view_digest(shown) != view_digest(APPROVAL)
    with pytest.raises(ReviewRefused) as refused:
        check(review)
    assert refused.value.reason == "view_mismatch"
