"""Delegation tokens, per-agent credentials and the identity config."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re

import jwt
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
from support import SHIPPED_CONFIG

from kynara_sidecar.config import IdentityMode, load_config
from kynara_sidecar.errors import ConfigError, IdentityInvalid
from kynara_sidecar.identity import (
    SUPPORTED_ALGORITHMS,
    AgentCredentials,
    Issuer,
    TokenVerifier,
    parse_jwks,
    place_agent,
)

SKEW = 30


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {alg: SigningKey(alg, f"key-{alg}") for alg in SUPPORTED_ALGORITHMS}


@pytest.fixture(scope="module")
def verifier(keys) -> TokenVerifier:
    issuer = Issuer(
        ISSUER,
        AUDIENCE,
        parse_jwks(jwks(*keys.values()), SUPPORTED_ALGORITHMS, "jwks"),
        frozenset(SUPPORTED_ALGORITHMS),
    )
    return TokenVerifier([issuer], SKEW)


def _hs256(payload: dict) -> str:
    def part(value: bytes) -> str:
        return base64.urlsafe_b64encode(value).rstrip(b"=").decode()

    signing_input = (
        part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + "."
        + part(json.dumps(payload).encode())
    )
    mac = hmac.new(b"guessable", signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{part(mac)}"


# --- tokens ------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", SUPPORTED_ALGORITHMS)
def test_valid_token_yields_its_user(verifier, keys, algorithm):
    token = keys[algorithm].sign(claims("alice"))

    assert verifier.verify(token, NOW) == ("alice",)


def test_nested_act_claims_give_the_chain_earliest_actor_first(verifier, keys):
    token = keys["EdDSA"].sign(
        {
            **claims("alice"),
            "act": {"sub": "sub-agent", "act": {"sub": "orchestrator"}},
        }
    )

    assert verifier.verify(token, NOW) == ("alice", "orchestrator", "sub-agent")


@pytest.mark.parametrize(
    ("offset", "field"),
    [(-SKEW + 1, "exp"), (SKEW - 1, "nbf"), (SKEW - 1, "iat")],
    ids=["expired_within_skew", "not_yet_valid_within_skew", "issued_within_skew"],
)
def test_clock_skew_within_the_bound_is_tolerated(verifier, keys, offset, field):
    token = keys["ES256"].sign(claims("alice", **{field: NOW + offset}))

    assert verifier.verify(token, NOW) == ("alice",)


def _bad_tokens(keys: dict[str, SigningKey]) -> dict[str, str]:
    other = SigningKey("EdDSA", "key-EdDSA")
    ed = keys["EdDSA"]
    return {
        "expired": ed.sign(claims("alice", exp=NOW - SKEW)),
        "not_yet_valid": ed.sign(claims("alice", nbf=NOW + SKEW + 1)),
        "issued_in_the_future": ed.sign(claims("alice", iat=NOW + SKEW + 1)),
        "wrong_audience": ed.sign(claims("alice", aud="kynara:other-bot")),
        "wrong_issuer": ed.sign(claims("alice", iss="https://evil.example")),
        "wrong_key": other.sign(claims("alice")),
        "unknown_kid": ed.sign(claims("alice"), kid="retired"),
        "alg_none": unsigned(claims("alice")),
        "alg_hs256": _hs256(claims("alice")),
        "malformed": "not-a-jwt",
        "malformed_segments": "a.b.c",
        "empty": "",
        "missing_exp": ed.sign(
            {k: v for k, v in claims("alice").items() if k != "exp"}
        ),
        "exp_not_a_number": ed.sign(claims("alice", exp="tomorrow")),
        "act_not_an_object": ed.sign(claims("alice", act="orchestrator")),
        "act_without_sub": ed.sign(claims("alice", act={"act": {"sub": "x"}})),
        "too_many_hops": ed.sign(claims("alice", *[f"a{i}" for i in range(15)])),
    }


BAD_TOKEN_MESSAGES = {
    "expired": r"expired: exp 1796633970 is not after now 1796634000 within "
    r"the allowed clock skew of 30 s",
    "not_yet_valid": r"not yet valid: nbf 1796634031 is after now 1796634000 "
    r"beyond the allowed clock skew of 30 s",
    "issued_in_the_future": r"issued in the future: iat 1796634031 is after now "
    r"1796634000 beyond the allowed clock skew of 30 s",
    "wrong_audience": r"audience: expected 'kynara:support-bot', "
    r"got 'kynara:other-bot'",
    "wrong_issuer": r"issuer: expected one of \['https://idp.example.test'\], "
    r"got 'https://evil.example'",
    "wrong_key": r"signature: does not verify with any EdDSA key with kid "
    r"'key-EdDSA' of issuer 'https://idp.example.test'",
    "unknown_kid": r"signature: does not verify with any EdDSA key with kid "
    r"'retired'",
    "alg_none": r"algorithm: 'none' is refused; tokens must be signed",
    "alg_hs256": r"algorithm: expected one of \['ES256', 'EdDSA', 'RS256'\] for "
    r"issuer 'https://idp.example.test', got 'HS256'",
    "malformed": r"malformed: expected a compact JWT: Not enough segments",
    "malformed_segments": r"malformed: expected a compact JWT: Invalid header",
    "empty": r"malformed: expected a delegation token \(a signed JWT\) in "
    r"identity.mode=verified, got none",
    "missing_exp": r"claims: missing required claim 'exp'",
    "exp_not_a_number": r"claims: ",
    "act_not_an_object": r"chain: expected act to be an object with a sub",
    "act_without_sub": r"chain: expected act.sub to be a principal id of "
    r"1..256 characters, got 'None'",
    "too_many_hops": r"chain: expected at most 14 nested act claims",
}


@pytest.mark.parametrize("case", sorted(BAD_TOKEN_MESSAGES))
def test_bad_token_is_identity_invalid_naming_the_check(verifier, keys, case):
    token = _bad_tokens(keys)[case]

    with pytest.raises(IdentityInvalid, match="^" + BAD_TOKEN_MESSAGES[case]) as info:
        verifier.verify(token, NOW)

    assert info.value.field == "delegation_token"
    assert info.value.code == "identity_invalid"


def test_algorithm_not_configured_for_the_issuer_is_refused(keys):
    rs_only = Issuer(
        ISSUER,
        AUDIENCE,
        parse_jwks(jwks(keys["RS256"]), ["RS256"], "jwks"),
        frozenset({"RS256"}),
    )
    token = keys["EdDSA"].sign(claims("alice"))

    with pytest.raises(
        IdentityInvalid, match=r"algorithm: expected one of \['RS256'\]"
    ):
        TokenVerifier([rs_only], SKEW).verify(token, NOW)


def test_token_without_kid_is_tried_against_every_key_of_its_algorithm(keys):
    first, second = SigningKey("EdDSA", "a"), SigningKey("EdDSA", "b")
    issuer = Issuer(
        ISSUER,
        AUDIENCE,
        parse_jwks(jwks(first, second), ["EdDSA"], "jwks"),
        frozenset({"EdDSA"}),
    )
    header = {"alg": "EdDSA", "typ": "JWT"}
    token = second.sign(claims("alice"))
    token_without_kid = jwt.encode(
        claims("alice"), second.private, algorithm="EdDSA", headers=header
    )

    assert TokenVerifier([issuer], SKEW).verify(token_without_kid, NOW) == ("alice",)
    assert TokenVerifier([issuer], SKEW).verify(token, NOW) == ("alice",)


# --- placing this daemon's agent --------------------------------------------


@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        (("alice",), ("alice", "support-bot")),
        (("alice", "orchestrator"), ("alice", "orchestrator", "support-bot")),
        (("alice", "support-bot"), ("alice", "support-bot")),
    ],
    ids=["user_only", "other_last_actor", "already_last"],
)
def test_single_agent_mode_appends_the_agent_unless_already_last(chain, expected):
    assert place_agent(chain, "support-bot", must_be_last=False) == expected


@pytest.mark.parametrize(
    ("chain", "got"),
    [(("alice", "readonly-bot"), "'readonly-bot'"), (("alice",), "None")],
    ids=["other_agent", "no_actor"],
)
def test_multi_agent_mode_needs_the_caller_as_last_actor(chain, got):
    with pytest.raises(
        IdentityInvalid,
        match=f"chain: expected the token's latest actor to be the calling "
        f"agent 'support-bot', got {got}",
    ):
        place_agent(chain, "support-bot", must_be_last=True)


# --- per-agent credentials --------------------------------------------------

SECRETS = {"support-bot": b"s" * 32, "readonly-bot": b"r" * 32}


@pytest.mark.parametrize("agent", sorted(SECRETS))
def test_bearer_secret_names_its_agent(agent):
    credentials = AgentCredentials(SECRETS)

    assert credentials.authenticate(f"Bearer {SECRETS[agent].decode()}") == agent


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        ("", r"expected 'authorization: Bearer <secret>' metadata naming the "
         r"calling agent, got none"),
        ("Basic abc", r"got another scheme$"),
        ("Bearer ", r"got an empty bearer secret$"),
        ("s3cret-without-scheme", r"got a value without the 'Bearer ' scheme$"),
        ("Bearer " + "x" * 32, r"expected the bearer secret of a configured agent "
         r"\(identity.agents\), got an unknown one"),
    ],
    ids=["missing", "other_scheme", "empty_secret", "no_scheme", "unknown_secret"],
)  # fmt: skip
def test_bad_credential_is_identity_invalid(authorization, message):
    with pytest.raises(IdentityInvalid, match=message) as info:
        AgentCredentials(SECRETS).authenticate(authorization)

    assert info.value.field == "authorization"
    # The value itself is never echoed: without its scheme it may be a secret.
    assert "abc" not in str(info.value)
    assert "s3cret" not in str(info.value)


# --- configuration ----------------------------------------------------------


def _write_jwks(tmp_path, document) -> str:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(document))
    return str(path)


def _issuer_setting(**fields) -> str:
    entry = {"issuer": ISSUER, "audience": AUDIENCE, **fields}
    return f"identity.issuers=[{json.dumps(entry)}]"


def test_verified_is_the_default_mode(tmp_path, keys):
    path = tmp_path / "kynara.yaml"
    jwks_file = _write_jwks(tmp_path, jwks(keys["EdDSA"]))
    path.write_text(
        "identity:\n  agent_id: support-bot\n  issuers:\n"
        f"    - {{issuer: {ISSUER}, audience: '{AUDIENCE}', jwks_file: {jwks_file}}}\n"
    )

    config = load_config(path)

    assert config.identity.mode is IdentityMode.VERIFIED
    assert config.identity.max_clock_skew_seconds == 30
    (issuer,) = config.identity.load_issuers()
    assert issuer.algorithms == frozenset(SUPPORTED_ALGORITHMS)
    assert [key.key_id for key in issuer.keys] == ["key-EdDSA"]


def test_inline_jwks_is_accepted(keys):
    config = load_config(
        SHIPPED_CONFIG,
        ["identity.mode=verified", _issuer_setting(jwks=jwks(keys["ES256"]))],
    )

    (issuer,) = config.identity.load_issuers()
    assert issuer.keys[0].algorithm_name == "ES256"


def _config_cases(tmp_path, keys) -> dict[str, tuple[list[str], str]]:
    ed = jwks(keys["EdDSA"])
    private = {"keys": [{**keys["EdDSA"].jwk, "d": "AAAA"}]}
    secret = tmp_path / "secret"
    secret.write_text("s" * 32 + "\n")
    short = tmp_path / "short"
    short.write_text("abc")
    verified = "identity.mode=verified"
    return {
        "no_issuers": (
            [verified],
            r"identity.issuers: expected at least one issuer",
        ),
        "unknown_algorithm": (
            [verified, _issuer_setting(jwks=ed, algorithms=["HS256"])],
            r"identity.issuers\[0\].algorithms: expected a non-empty subset of "
            r"\['RS256', 'ES256', 'EdDSA'\], got \['HS256'\]",
        ),
        "both_jwks": (
            [verified, _issuer_setting(jwks=ed, jwks_file="x.json")],
            r"identity.issuers\[0\]: expected exactly one of jwks_file and jwks, "
            "got both",
        ),
        "no_jwks": (
            [verified, _issuer_setting()],
            r"identity.issuers\[0\]: expected exactly one of jwks_file and jwks, "
            "got neither",
        ),
        "no_audience": (
            [verified, _issuer_setting(jwks=ed, audience="")],
            r"identity.issuers\[0\].audience: expected a string, got none",
        ),
        "missing_jwks_file": (
            [verified, _issuer_setting(jwks_file=str(tmp_path / "absent.json"))],
            r"identity.issuers\[0\].jwks_file \(.*absent.json\): cannot read a JWKS",
        ),
        "not_a_jwks": (
            [verified, _issuer_setting(jwks={"kty": "OKP"})],
            r'identity.issuers\[0\].jwks: expected a JWKS object \{"keys": \[...\]\}',
        ),
        "private_key": (
            [verified, _issuer_setting(jwks=private)],
            r"identity.issuers\[0\].jwks.keys\[0\]: expected a public key, got "
            r"private members \['d'\]",
        ),
        "key_for_other_algorithm": (
            [verified, _issuer_setting(jwks=ed, algorithms=["RS256"])],
            r"identity.issuers\[0\].jwks.keys\[0\]: expected a key for one of "
            r"\['RS256'\], got one for 'EdDSA'",
        ),
        "broken_key": (
            [verified, _issuer_setting(jwks={"keys": [{"kty": "OKP"}]})],
            r"identity.issuers\[0\].jwks.keys\[0\]: cannot load key: crv is not found",
        ),
        "duplicate_issuer": (
            [
                verified,
                "identity.issuers="
                + json.dumps([{"issuer": ISSUER, "audience": "a", "jwks": ed}] * 2),
            ],
            r"identity.issuers\[1\].issuer: expected each issuer once",
        ),  # fmt: skip
        "skew_too_large": (
            [verified, _issuer_setting(jwks=ed), "identity.max_clock_skew_seconds=301"],
            r"identity.max_clock_skew_seconds: expected 0..300, got 301",
        ),
        "agents_with_agent_id": (
            [verified, _issuer_setting(jwks=ed), f"identity.agents={{a: {secret}}}"],
            r"identity.agent_id: expected none when identity.agents is set",
        ),
        "agents_in_development": (
            ["identity.agent_id=", f"identity.agents={{a: {secret}}}"],
            r"identity.agents: expected identity.mode 'verified' for per-agent "
            r"credentials, got 'development'",
        ),
        "short_secret": (
            [
                verified,
                _issuer_setting(jwks=ed),
                "identity.agent_id=",
                f"identity.agents={{a: {short}}}",
            ],
            r"identity.agents.a: expected a secret of at least 16 bytes in .*short, "
            r"got 3",
        ),
        "shared_secret": (
            [
                verified,
                _issuer_setting(jwks=ed),
                "identity.agent_id=",
                f"identity.agents={{a: {secret}, b: {secret}}}",
            ],
            r"identity.agents.b: expected its own secret, got a shared one",
        ),
        "missing_secret": (
            [
                verified,
                _issuer_setting(jwks=ed),
                "identity.agent_id=",
                f"identity.agents={{a: {tmp_path / 'nope'}}}",
            ],
            r"identity.agents.a: cannot read the secret",
        ),
    }


CONFIG_CASES = [
    "no_issuers", "unknown_algorithm", "both_jwks", "no_jwks", "no_audience",
    "missing_jwks_file", "not_a_jwks", "private_key", "key_for_other_algorithm",
    "broken_key", "duplicate_issuer", "skew_too_large", "agents_with_agent_id",
    "agents_in_development", "short_secret", "shared_secret", "missing_secret",
]  # fmt: skip


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_identity_config_is_refused_naming_the_key(tmp_path, keys, case):
    overrides, message = _config_cases(tmp_path, keys)[case]

    with pytest.raises(ConfigError, match=message):
        load_config(SHIPPED_CONFIG, overrides)


def test_agent_secrets_are_read_without_surrounding_whitespace(tmp_path, keys):
    secret = tmp_path / "secret"
    secret.write_text("  " + "s" * 32 + "\n")
    config = load_config(
        SHIPPED_CONFIG,
        [
            "identity.mode=verified",
            _issuer_setting(jwks=jwks(keys["EdDSA"])),
            "identity.agent_id=",
            f"identity.agents={{support-bot: {secret}}}",
        ],
    )

    assert config.identity.load_agent_secrets() == {"support-bot": b"s" * 32}


def test_error_messages_do_not_contain_the_secret(tmp_path):
    credentials = AgentCredentials(SECRETS)

    with pytest.raises(IdentityInvalid) as info:
        credentials.authenticate("Bearer " + "r" * 31)

    assert not re.search("r{31}", str(info.value))


@pytest.mark.parametrize("field", ["exp", "nbf", "iat"])
def test_numeric_date_past_year_9999_is_identity_invalid(verifier, keys, field):
    token = keys["RS256"].sign({**claims("alice"), field: 10**400})

    with pytest.raises(IdentityInvalid, match="^claims: expected exp, nbf and iat"):
        verifier.verify(token, NOW)
