"""Redaction of context and resource attributes in audit records."""

from __future__ import annotations

import hashlib
import hmac
import io
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import SHIPPED_CONFIG, SHIPPED_POLICIES

from kynara_sidecar import engine
from kynara_sidecar.audit.chain import encode_record
from kynara_sidecar.audit.record import (
    decode_value,
    encode_value,
    record_from_decision,
    request_from_record,
)
from kynara_sidecar.audit.redact import Redactor, keyed_hash, lookup
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.config import load_config
from kynara_sidecar.decision import DecisionRequest, Env, Resource, Timestamp
from kynara_sidecar.errors import ConfigError
from kynara_sidecar.policy.loader import load_policies
from kynara_sidecar.replay import replay_main

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
CARD = "4111-1111-1111-1111"
EMAIL = "carol.private@example.org"


def expected_hash(key: bytes, value) -> str:
    """The HMAC as an auditor computes it, without the daemon's code."""
    canonical = json.dumps(
        encode_value(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    key_id = hmac.new(key, b"kynara redaction key id", hashlib.sha256).hexdigest()
    digest = hmac.new(key, canonical, hashlib.sha256).hexdigest()
    return f"hmac-sha256:{key_id[:16]}:{digest}"


def context_of(**values) -> dict:
    return {name: encode_value(value) for name, value in values.items()}


# ------------------------------------------------------------- the redactor


def test_hashed_value_is_the_hmac_of_its_canonical_typed_json():
    redactor = Redactor({"context": {"card": "hash", "profile": "hash"}}, KEY)
    profile = {"zip": "10115", "age": 41, "tags": ["a", "ü"]}
    context = context_of(card=CARD, profile=profile, region="DE")

    got, _, redactions = redactor.apply(context, {})

    assert got == {
        "card": {"redacted": expected_hash(KEY, CARD)},
        "profile": {"redacted": expected_hash(KEY, profile)},
        "region": {"string": "DE"},
    }
    assert redactions == ["$.context.card", "$.context.profile"]


def test_equal_values_hash_equal_and_the_key_matters():
    ours = Redactor({"context": {"card": "hash"}}, KEY)
    theirs = Redactor({"context": {"card": "hash"}}, OTHER_KEY)

    first = ours.apply(context_of(card=CARD), {})[0]["card"]
    again = ours.apply(context_of(card=CARD), {})[0]["card"]
    other_card = ours.apply(context_of(card=CARD + "2"), {})[0]["card"]
    other_key = theirs.apply(context_of(card=CARD), {})[0]["card"]

    assert first == again
    assert first != other_card
    assert first != other_key


def test_typed_values_of_different_types_hash_differently():
    redactor = Redactor({"context": {"n": "hash"}}, KEY)

    as_int = redactor.apply(context_of(n=5), {})[0]["n"]
    as_string = redactor.apply(context_of(n="5"), {})[0]["n"]

    assert as_int != as_string


def test_a_guess_is_checked_with_the_key():
    redactor = Redactor({"context": {"pin": "hash"}}, KEY)
    stored = redactor.apply(context_of(pin="4711"), {})[0]["pin"]["redacted"]

    matches = [
        guess
        for guess in (f"{n:04d}" for n in range(10_000))
        if keyed_hash(KEY, encode_value(guess)) == stored
    ]

    assert matches == ["4711"]


def test_drop_removes_the_entry_and_lists_its_path():
    redactor = Redactor({"context": {"email": "drop"}}, None)
    context = context_of(email=EMAIL, region="DE")

    got, attrs, redactions = redactor.apply(context, {"amount": {"int": "5"}})

    assert got == {"region": {"string": "DE"}}
    assert attrs == {"amount": {"int": "5"}}
    assert redactions == ["$.context.email"]


def test_dotted_paths_reach_into_maps_and_leave_the_rest():
    redactor = Redactor(
        {"context": {"customer.email": "drop", "customer.card": "hash"}}, KEY
    )
    context = context_of(customer={"email": EMAIL, "card": CARD, "tier": "gold"})

    got, _, redactions = redactor.apply(context, {})

    assert got == {
        "customer": {
            "map": {
                "card": {"redacted": expected_hash(KEY, CARD)},
                "tier": {"string": "gold"},
            }
        }
    }
    assert redactions == ["$.context.customer.card", "$.context.customer.email"]


def test_a_top_level_key_with_a_dot_is_taken_whole():
    redactor = Redactor({"context": {"a.b": "drop"}}, None)
    context = {"a.b": {"string": "x"}, "a": {"map": {"b": {"string": "y"}}}}

    got, _, redactions = redactor.apply(context, {})

    assert got == {"a": {"map": {"b": {"string": "y"}}}}
    assert redactions == ["$.context.a.b"]


@pytest.mark.parametrize(
    "context",
    [{}, context_of(customer="not a map"), context_of(customer={"tier": "gold"})],
    ids=["absent", "parent-not-a-map", "key-absent"],
)
def test_an_absent_entry_redacts_nothing_and_is_not_listed(context):
    redactor = Redactor({"context": {"customer.email": "drop", "card": "hash"}}, KEY)

    got, _, redactions = redactor.apply(context, {})

    assert got == context
    assert redactions == []


def test_a_rule_on_a_map_runs_before_rules_inside_it():
    redactor = Redactor(
        {"context": {"customer": "hash", "customer.email": "drop"}}, KEY
    )
    customer = {"email": EMAIL}

    got, _, redactions = redactor.apply(context_of(customer=customer), {})

    assert got == {"customer": {"redacted": expected_hash(KEY, customer)}}
    assert redactions == ["$.context.customer"]


def test_resource_attributes_are_redacted_and_listed_after_the_context():
    redactor = Redactor(
        {"resource_attributes": {"owner": "hash"}, "context": {"email": "drop"}}, KEY
    )

    context, attrs, redactions = redactor.apply(
        context_of(email=EMAIL), context_of(owner=EMAIL, amount=5)
    )

    assert context == {}
    assert attrs == {
        "owner": {"redacted": expected_hash(KEY, EMAIL)},
        "amount": {"int": "5"},
    }
    assert redactions == ["$.context.email", "$.resource.attributes.owner"]


def test_the_inputs_are_left_unchanged():
    redactor = Redactor({"context": {"customer.email": "drop"}}, None)
    context = context_of(customer={"email": EMAIL})
    before = msgspec.json.encode(context)

    redactor.apply(context, {})

    assert msgspec.json.encode(context) == before


def test_lookup_finds_top_level_and_dotted_entries():
    context = context_of(card=CARD, customer={"email": EMAIL})

    assert lookup(context, "card") == {"string": CARD}
    assert lookup(context, "customer.email") == {"string": EMAIL}
    assert lookup(context, "customer.phone") is None
    assert lookup(context, "card.x") is None


def test_no_rules_redact_nothing():
    redactor = Redactor.nop()
    context = context_of(card=CARD)

    assert not redactor
    assert redactor.apply(context, {}) == (context, {}, [])


@pytest.mark.parametrize(
    ("rules", "key", "message"),
    [
        ({"context": {"card": "mask"}}, KEY, r"context\.card: expected one of hash, "),
        ({"context": {"": "drop"}}, KEY, r"expected an entry name or a dotted path"),
        ({"context": {"a..b": "drop"}}, KEY, r"expected an entry name or a dotted"),
        ({"ctx": {"card": "drop"}}, KEY, r"section 'ctx': expected one of context"),
        ({"context": {"card": "hash"}}, None, r"at least 32 bytes, got none"),
        ({"context": {"card": "hash"}}, b"short", r"at least 32 bytes, got 5 bytes"),
    ],
)
def test_bad_rules_are_refused_naming_the_rule(rules, key, message):
    with pytest.raises(ValueError, match=message):
        Redactor(rules, key)


@given(st.text(min_size=1))
def test_any_hashed_text_leaves_only_its_hmac(text):
    redactor = Redactor({"context": {"secret": "hash"}}, KEY)

    got, _, _ = redactor.apply(context_of(secret=text), {})

    assert got == {"secret": {"redacted": expected_hash(KEY, text)}}


# --------------------------------------------------- records and replay


def redacted_record(redactor: Redactor, **context):
    loaded = load_policies(SHIPPED_POLICIES)
    request = DecisionRequest(
        chain=("alice", "support-bot"),
        action="payments.refund.issue",
        resource=Resource(kind="payments.refund", id="rf", attributes={"amount": 1200}),
        context=context,
    )
    env = Env(now=Timestamp(1_796_374_800), agent_id="support-bot")
    decision = engine.evaluate(loaded.policy_set, loaded.directory, request, env)
    return record_from_decision(
        request=request, env=env, decision=decision, decision_id="x", redactor=redactor
    )


RULES = {
    "context": {"card": "hash", "customer.email": "drop"},
    "resource_attributes": {"amount": "hash"},
}


def test_record_from_decision_redacts_only_the_record():
    record = redacted_record(
        Redactor(RULES, KEY), card=CARD, customer={"email": EMAIL, "tier": "gold"}
    )

    data = encode_record(record)

    assert CARD.encode() not in data and EMAIL.encode() not in data
    assert record.context == {
        "card": {"redacted": expected_hash(KEY, CARD)},
        "customer": {"map": {"tier": {"string": "gold"}}},
    }
    assert record.resource.attributes == {
        "amount": {"redacted": expected_hash(KEY, 1200)}
    }
    assert record.redactions == [
        "$.context.card",
        "$.context.customer.email",
        "$.resource.attributes.amount",
    ]


def test_a_redacted_value_does_not_decode():
    with pytest.raises(ValueError, match=r"the value at \$ was redacted before"):
        decode_value({"redacted": expected_hash(KEY, CARD)})


def test_a_redacted_record_is_not_rebuilt_for_replay_and_says_what_is_missing():
    record = redacted_record(Redactor(RULES, KEY), card=CARD, customer={"email": EMAIL})

    with pytest.raises(ValueError) as info:
        request_from_record(record)

    assert str(info.value) == (
        "decision record 0 was redacted before writing, so it cannot be "
        "replayed without deciding on other input: $.context.card (hashed), "
        "$.context.customer.email (dropped), $.resource.attributes.amount (hashed)"
    )


def test_replay_names_the_fields_of_redacted_records_and_replays_the_rest(tmp_path):
    redacted = redacted_record(Redactor(RULES, KEY), card=CARD)
    plain = redacted_record(Redactor.nop(), card=CARD)
    store = AuditStore.open(tmp_path / "audit")
    store.append_batch([redacted, plain])
    store.close()
    out = io.StringIO()

    code = replay_main(SHIPPED_POLICIES, tmp_path / "audit", out=out)

    lines = out.getvalue().splitlines()
    assert code == 0
    assert lines[-2] == (
        "seq 1: not replayed: decision record 1 was redacted before writing, so "
        "it cannot be replayed without deciding on other input: $.context.card "
        "(hashed), $.resource.attributes.amount (hashed)"
    )
    assert lines[-1] == "1 records replayed, 0 would change"


# ------------------------------------------------------------------ config


def config_with(*overrides: str):
    return load_config(SHIPPED_CONFIG, list(overrides))


def test_config_builds_the_redactor_with_the_key_file(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    config = config_with(
        "audit.redact={context: {card: hash}, resource_attributes: {owner: drop}}",
        f"audit.redaction_key={key_file}",
    )

    redactor = config.audit.load_redactor()

    got, attrs, _ = redactor.apply(context_of(card=CARD), context_of(owner=EMAIL))
    assert got == {"card": {"redacted": expected_hash(KEY, CARD)}}
    assert attrs == {}


def test_drop_rules_need_no_key():
    config = config_with("audit.redact={context: {email: drop}}")

    assert config.audit.load_redactor()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["audit.redact={context: {card: mask}}"],
            r"audit\.redact\.context\.card: expected one of hash, drop, got 'mask'",
        ),
        (
            ["audit.redact={resource_attributes: {'a..b': drop}}"],
            r"audit\.redact\.resource_attributes\.a\.\.b: expected an entry name",
        ),
        (
            ["audit.redact={context: {card: hash}}"],
            r"audit\.redaction_key: expected a key file when "
            r"audit\.redact\.context\.card is 'hash', got none",
        ),
        (
            ["audit.redact={context: {card: hash}}", "audit.redaction_key=/nonexist"],
            r"audit\.redaction_key: cannot read the key: .*/nonexist",
        ),
        (
            ["audit.redact={contxt: {card: drop}}"],
            r"unknown field `contxt`.*\$\.audit\.redact",
        ),
    ],
    ids=["unknown-action", "empty-part", "no-key", "unreadable-key", "unknown-section"],
)
def test_bad_redaction_settings_name_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_with(*overrides)


def test_a_short_key_is_refused_naming_the_setting(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(b"x" * 31)

    with pytest.raises(
        ConfigError,
        match=r"audit\.redaction_key: expected at least 32 bytes in .*"
        r"got 31",
    ):
        config_with(
            "audit.redact={context: {card: hash}}", f"audit.redaction_key={key_file}"
        )
