"""ReviewerAuth: who may review, and how everyone else is refused."""

from __future__ import annotations

import json
import logging

import msgspec
import pytest
from identity_support import (
    AUDIENCE,
    ISSUER,
    NOW,
    SigningKey,
    claims,
    jwks,
    unsigned,
)
from support import daemon_config

from kynara_sidecar.errors import ConfigError, IdentityInvalid, RoleMissing
from kynara_sidecar.identity import Issuer, parse_jwks
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.server.reviewers import (
    AdminReviewer,
    ReviewerAuth,
    ReviewerIssuer,
    token_of,
)

CAROL_SECRET = b"carol-reviewer-secret-0123456789"
OPS_SECRET = b"operator-only-secret-0123456789"
AGENT_SECRET = b"support-bot-agent-secret-012345"
REVIEWER_AUDIENCE = "kynara:reviewers"
NOW_NANOS = NOW * 1_000_000_000


@pytest.fixture(scope="module")
def idp_key() -> SigningKey:
    return SigningKey("ES256", "idp-1")


def issuer(key: SigningKey, audience: str) -> Issuer:
    keys = parse_jwks(jwks(key), ["ES256"], "test")
    return Issuer(ISSUER, audience, keys, frozenset({"ES256"}))


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def auth(idp_key, metrics) -> ReviewerAuth:
    return ReviewerAuth(
        {
            "carol": AdminReviewer(
                CAROL_SECRET,
                frozenset({"reviewer"}),
                principal="carol@example.com",
                reviewer_roles=frozenset({"finance_lead"}),
            ),
            "ops": AdminReviewer(OPS_SECRET, frozenset({"operator"}), principal="ops"),
        },
        [ReviewerIssuer(issuer(idp_key, REVIEWER_AUDIENCE), roles_claim="groups")],
        agent_secrets={"support-bot": AGENT_SECRET},
        delegation_issuers=[issuer(idp_key, AUDIENCE)],
        max_clock_skew_seconds=30,
        clock=lambda: NOW_NANOS,
        metrics=metrics,
    )


def reviewer_token(key: SigningKey, sub: str = "dana", **extra) -> str:
    return key.sign(claims(sub, aud=REVIEWER_AUDIENCE, **extra))


def test_an_admin_reviewer_is_its_principal_with_its_reviewer_roles(auth):
    reviewer = auth.authenticate(CAROL_SECRET.decode())

    assert reviewer.id == "carol@example.com"
    assert reviewer.roles == {"reviewer", "finance_lead"}
    assert reviewer.credential == "carol"


def test_an_admin_credential_without_the_reviewer_role_is_refused(auth):
    with pytest.raises(RoleMissing, match=r"admin.credentials.ops.roles"):
        auth.authenticate(OPS_SECRET.decode())


def test_an_agents_bearer_secret_cannot_review(auth):
    with pytest.raises(RoleMissing, match="agent credentials cannot review"):
        auth.authenticate(AGENT_SECRET.decode())


def test_an_agents_delegation_token_cannot_review(auth, idp_key):
    token = idp_key.sign(claims("alice", "support-bot"))

    with pytest.raises(RoleMissing, match="got a delegation token"):
        auth.authenticate(token)


def test_a_token_for_both_audiences_cannot_review(auth, idp_key):
    # It would pass as the agent's delegation token on Decide, so it never
    # signs a reviewer in, whatever else it says.
    token = idp_key.sign(
        claims(
            "bob",
            "support-bot",
            aud=[AUDIENCE, REVIEWER_AUDIENCE],
            groups=["reviewer"],
        )
    )

    with pytest.raises(RoleMissing, match="got a delegation token"):
        auth.authenticate(token)


def test_a_reviewer_jwt_naming_an_actor_cannot_review(auth, idp_key):
    token = idp_key.sign(
        claims("bob", "support-bot", aud=REVIEWER_AUDIENCE, groups=["reviewer"])
    )

    with pytest.raises(RoleMissing, match="naming an actor"):
        auth.authenticate(token)


def test_a_forged_delegation_token_is_no_identity(auth):
    forger = SigningKey("ES256", "idp-1")
    token = forger.sign(claims("alice", "support-bot"))

    with pytest.raises(IdentityInvalid, match="delegation token: signature"):
        auth.authenticate(token)


@pytest.mark.parametrize("token", ["", "   ", "not-a-known-secret-0123456789"])
def test_no_token_or_an_unknown_one_is_no_identity(auth, token):
    with pytest.raises(IdentityInvalid) as info:
        auth.authenticate(token)

    assert info.value.field == "authorization"


def test_a_reviewer_jwt_signs_its_subject_in_with_its_roles(auth, idp_key):
    token = reviewer_token(idp_key, groups=["reviewer", "finance_lead"])

    reviewer = auth.authenticate(token)

    assert reviewer.id == "dana"
    assert reviewer.roles == {"reviewer", "finance_lead"}
    assert reviewer.credential == ISSUER


def test_a_single_role_as_a_string_is_read_as_one_role(auth, idp_key):
    assert auth.authenticate(reviewer_token(idp_key, groups="reviewer")).roles == {
        "reviewer"
    }


@pytest.mark.parametrize("groups", [[], ["finance_lead"], None])
def test_a_reviewer_jwt_without_the_reviewer_role_is_refused(auth, idp_key, groups):
    extra = {} if groups is None else {"groups": groups}

    with pytest.raises(RoleMissing, match="'groups' claim holds 'reviewer'"):
        auth.authenticate(reviewer_token(idp_key, **extra))


@pytest.mark.parametrize(
    ("token_of_key", "message"),
    [
        (
            lambda key: reviewer_token(key, exp=NOW - 60, groups=["reviewer"]),
            "reviewer token: expired",
        ),
        (
            lambda key: unsigned(claims("dana", aud=REVIEWER_AUDIENCE)),
            "reviewer token: algorithm: 'none' is refused",
        ),
        (
            lambda key: SigningKey("ES256", "idp-1").sign(
                claims("dana", aud=REVIEWER_AUDIENCE, groups=["reviewer"])
            ),
            "reviewer token: signature",
        ),
        (
            lambda key: key.sign(claims("dana", aud="elsewhere", groups=["reviewer"])),
            "audience: expected",
        ),
        (
            lambda key: key.sign(
                claims("dana", iss="https://other.test", aud=REVIEWER_AUDIENCE)
            ),
            "issuer: expected a reviewer JWT",
        ),
        (
            lambda key: reviewer_token(key, groups=[7]),
            "expected 'groups' to hold role names",
        ),
    ],
    ids=["expired", "alg-none", "forged", "other-audience", "other-issuer", "bad-role"],
)
def test_a_reviewer_jwt_failing_a_check_is_no_identity(
    auth, idp_key, token_of_key, message
):
    with pytest.raises(IdentityInvalid, match=message) as info:
        auth.authenticate(token_of_key(idp_key))

    assert info.value.field == "authorization"


def test_authorize_reads_the_bearer_scheme(auth):
    reviewer = auth.authorize(f"Bearer {CAROL_SECRET.decode()}", "test")

    assert reviewer.id == "carol@example.com"


@pytest.mark.parametrize("value", ["", CAROL_SECRET.decode(), "Basic abc"])
def test_metadata_without_a_bearer_token_is_refused_without_echoing_it(value):
    with pytest.raises(IdentityInvalid) as info:
        token_of(value)

    assert CAROL_SECRET.decode() not in str(info.value)


def test_a_refusal_is_logged_and_counted(auth, metrics, caplog):
    caplog.set_level(logging.WARNING, logger="kynara.server")

    with pytest.raises(RoleMissing):
        auth.authorize(f"Bearer {AGENT_SECRET.decode()}", "ApprovalService.Approve")

    assert metrics.admin_refusals.labels("role_missing")._value.get() == 1
    (record,) = [r for r in caplog.records if r.message == "admin call refused"]
    assert record.fields["call"] == "ApprovalService.Approve"
    assert AGENT_SECRET.decode() not in record.fields["error"]


def test_from_config_knows_admin_reviewers_issuers_and_agents(tmp_path, idp_key):
    secrets = {}
    for name, secret in [("carol", CAROL_SECRET), ("bot", AGENT_SECRET)]:
        secrets[name] = tmp_path / f"{name}.secret"
        secrets[name].write_bytes(secret + b"\n")
    credentials = {
        "carol": {
            "secret_file": str(secrets["carol"]),
            "roles": ["reviewer"],
            "reviewer_roles": ["finance_lead"],
        }
    }
    reviewer_issuers = [
        {
            "issuer": ISSUER,
            "audience": REVIEWER_AUDIENCE,
            "jwks": jwks(idp_key),
            "algorithms": ["ES256"],
        }
    ]
    config = daemon_config(
        tmp_path,
        f"admin.credentials={json.dumps(credentials)}",
        f"approvals.reviewer_issuers={json.dumps(reviewer_issuers)}",
        "identity.agent_id=",
        f"identity.agents={json.dumps({'support-bot': str(secrets['bot'])})}",
        "identity.mode=verified",
        "identity.issuers="
        + json.dumps(
            [
                {
                    "issuer": ISSUER,
                    "audience": AUDIENCE,
                    "jwks": jwks(idp_key),
                    "algorithms": ["ES256"],
                }
            ]
        ),
    )

    auth = ReviewerAuth.from_config(config, clock=lambda: NOW_NANOS)

    carol = auth.authenticate(CAROL_SECRET.decode())
    assert (carol.id, carol.roles) == ("carol", {"reviewer", "finance_lead"})
    dana = auth.authenticate(reviewer_token(idp_key, roles=["reviewer"]))
    assert dana.id == "dana"
    with pytest.raises(RoleMissing, match="agent credentials cannot review"):
        auth.authenticate(AGENT_SECRET.decode())
    with pytest.raises(RoleMissing, match="delegation token"):
        auth.authenticate(idp_key.sign(claims("alice", "support-bot")))


# ------------------------------------------- principal ids and audiences


@pytest.mark.parametrize(
    ("sub", "why"),
    [
        ("alice\u200b", "U\\+200B"),
        ("carol ", "a space"),
        ("\u0430lice", "letters of one script"),
        ("al\u202eice", "U\\+202E"),
        ("dana\x00", "a control character"),
    ],
    ids=["zero-width", "trailing-space", "cyrillic-a", "rtl-override", "nul"],
)
def test_a_reviewer_jwt_whose_sub_is_no_principal_id_is_refused(
    auth, idp_key, sub, why
):
    token = reviewer_token(idp_key, sub=sub, groups=["reviewer"])

    with pytest.raises(IdentityInvalid, match=f"claims: sub .*{why}") as info:
        auth.authenticate(token)

    assert info.value.field == "authorization"


def test_a_reviewer_jwt_sub_is_compared_in_its_nfc_form(auth, idp_key):
    decomposed = "zoe\u0308"  # e + combining diaeresis: NFC is one code point

    reviewer = auth.authenticate(
        reviewer_token(idp_key, sub=decomposed, groups=["reviewer"])
    )

    assert reviewer.id == "zo\u00eb"


def test_a_reviewer_jwt_of_the_requests_user_in_another_form_is_self_approval(
    auth, idp_key
):
    from review_support import sample_approvals

    from kynara_sidecar.approvals.eligibility import check_review
    from kynara_sidecar.approvals.model import ChainPrincipal
    from kynara_sidecar.errors import SelfApproval

    approval = sample_approvals()[1]
    approval = msgspec.structs.replace(
        approval,
        chain=(ChainPrincipal(id="zo\u00eb", kind="user"), *approval.chain[1:]),
    )
    reviewer = auth.authenticate(
        reviewer_token(idp_key, sub="zoe\u0308", groups=["reviewer"])
    )

    with pytest.raises(SelfApproval):
        check_review(approval, reviewer)


@pytest.mark.parametrize("principal", ["carol ", "c\u0430rol", "carol\u200d"])
def test_an_admin_reviewer_whose_principal_is_no_principal_id_is_refused(
    principal,
):
    with pytest.raises(ConfigError, match=r"credentials\.carol\.principal"):
        ReviewerAuth(
            {
                "carol": AdminReviewer(
                    CAROL_SECRET, frozenset({"reviewer"}), principal=principal
                )
            }
        )


@pytest.mark.parametrize(
    ("credential", "key"),
    [
        ({"principal": "alice\u200b"}, r"admin\.credentials\.carol\.principal:"),
        ({"principal": "p\u0430ypal"}, r"admin\.credentials\.carol\.principal:"),
        ({"name": "carol "}, r"admin\.credentials\.carol \.principal \(default"),
    ],
    ids=["zero-width", "mixed-scripts", "default-name-with-space"],
)
def test_config_refuses_an_admin_principal_that_is_no_principal_id(
    tmp_path, credential, key
):
    secret = tmp_path / "carol.secret"
    secret.write_bytes(CAROL_SECRET)
    name = credential.pop("name", "carol")
    entry = {"secret_file": str(secret), "roles": ["reviewer"], **credential}

    with pytest.raises(ConfigError, match=key):
        daemon_config(tmp_path, f"admin.credentials={json.dumps({name: entry})}")


def test_a_reviewer_jwt_for_another_audience_names_the_audience(idp_key):
    only_reviewers = ReviewerAuth(
        {},
        [ReviewerIssuer(issuer(idp_key, REVIEWER_AUDIENCE), roles_claim="groups")],
        clock=lambda: NOW_NANOS,
    )
    token = idp_key.sign(claims("dana", aud="kynara:elsewhere", groups=["reviewer"]))

    with pytest.raises(IdentityInvalid) as info:
        only_reviewers.authenticate(token)

    assert "audience: expected 'kynara:reviewers', got 'kynara:elsewhere'" in str(
        info.value
    )
    assert "issuer" not in str(info.value)
