"""One rule for names, at load and at request time; role files in any order."""

from __future__ import annotations

import re
import unicodedata

import grpc
import pytest
from support import small_refund

from kynara_sidecar.decision import DecisionRequest, Effect, Env, Resource, Timestamp
from kynara_sidecar.engine import evaluate
from kynara_sidecar.errors import InvalidRequest, PolicyError
from kynara_sidecar.pipeline import IncomingRequest, validate_request
from kynara_sidecar.policy.loader import compile_documents, decode_document
from kynara_sidecar.policy.names import canonical_name

COMPOSED = "zo\u00eb"  # ë as one code point
DECOMPOSED = "zoe\u0308"  # e followed by a combining diaeresis


# --- the rule itself -----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "alice",
        "alice@example.com",
        "svc-42_bot.eu",
        COMPOSED,
        "山田",
        "Tanakaたなか山田",
        "Ωμέγα",
        "Иван",
    ],
)
def test_safe_names_are_accepted_in_nfc(name):
    assert canonical_name(name) == unicodedata.normalize("NFC", name)


def test_composed_and_decomposed_names_are_one_name():
    assert canonical_name(DECOMPOSED) == canonical_name(COMPOSED) == COMPOSED


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "expected a non-empty name, got ''"),
        (
            "al\u200bice",
            "a zero-width or format character (U+200B) at position 2",
        ),
        ("al\u200dice", "a zero-width or format character (U+200D) at position 2"),
        ("\ufeffalice", "a zero-width or format character (U+FEFF) at position 0"),
        ("alice\u202e", "a zero-width or format character (U+202E) at position 5"),
        ("al\x07ice", "a control character (U+0007) at position 2"),
        ("alice\n", "a control character (U+000A) at position 5"),
        ("alice ", "a space (U+0020) at position 5"),
        ("ali\u00a0ce", "a space (U+00A0) at position 3"),
        ("ali\u2028ce", "a line separator (U+2028) at position 3"),
        ("al\u034fice", "an invisible character (U+034F) at position 2"),
        ("alice\ufe0f", "an invisible character (U+FE0F) at position 5"),
        ("\u3164", "an invisible character (U+3164) at position 0"),
        ("al\ue000", "a private-use character (U+E000) at position 2"),
        ("al\U000e0001", "a zero-width or format character (U+E0001) at position 2"),
        ("alice\u2800", "an invisible character (U+2800) at position 5"),
        ("\uff41lice", "a compatibility character (U+FF41) at position 0"),
        ("adm\u2170n", "a compatibility character (U+2170) at position 3"),
    ],
)
def test_invisible_and_control_characters_are_refused(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        canonical_name(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "p\u0430ypal",
            "expected letters of one script, got Latin (U+0070 at position 0) "
            "and Cyrillic (U+0430 at position 1)",
        ),
        (
            "\u0430dmin",
            "expected letters of one script, got Cyrillic (U+0430 at position 0) "
            "and Latin (U+0064 at position 1)",
        ),
        (
            "ad\u03bfmin",
            "expected letters of one script, got Latin (U+0061 at position 0) "
            "and Greek (U+03BF at position 2)",
        ),
        (
            "al\u0456ce",
            "expected letters of one script, got Latin (U+0061 at position 0) "
            "and Cyrillic (U+0456 at position 2)",
        ),
    ],
)
def test_confusable_mixed_scripts_are_refused(name, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        canonical_name(name)


# --- at load -------------------------------------------------------------------

ROLES = "format_version: 1\nkind: policy\nname: roles\nroles: {r: {}}\n"
ALLOW = (
    "format_version: 1\nkind: policy\nname: p\nrules:\n"
    "  - {id: q, effect: allow, actions: [x.do], resources: [x], roles: [r]}\n"
)


def directory(*ids: str) -> str:
    entries = "".join(
        f'  - {{id: "{principal}", kind: {kind}, roles: [r]}}\n'
        for principal, kind in zip(ids, ("user", "agent", "agent"), strict=False)
    )
    return f"format_version: 1\nkind: directory\nprincipals:\n{entries}"


def load(files: dict[str, str]):
    sources = [decode_document(name, text.encode()) for name, text in files.items()]
    return compile_documents(sources)


@pytest.mark.parametrize(
    ("principal", "message"),
    [
        (
            "al\\u200bice",
            "dir.yaml:$.principals[0].id: principal id 'al\\u200bice': expected a "
            "name without spaces, control or invisible characters, got a zero-width "
            "or format character (U+200B) at position 2",
        ),
        (
            "p\\u0430ypal",
            "dir.yaml:$.principals[0].id: principal id 'pаypal': expected letters "
            "of one script, got Latin (U+0070 at position 0) and Cyrillic (U+0430 "
            "at position 1)",
        ),
    ],
)
def test_unsafe_principal_id_is_a_load_error(principal, message):
    files = {"roles.yaml": ROLES, "dir.yaml": directory(principal)}

    with pytest.raises(PolicyError, match="^" + re.escape(message) + "$"):
        load(files)


def test_ids_equal_after_nfc_are_duplicates_at_load():
    files = {"roles.yaml": ROLES, "dir.yaml": directory(COMPOSED, DECOMPOSED)}

    with pytest.raises(
        PolicyError,
        match=re.escape(
            "dir.yaml:$.principals[1].id: expected unique principal ids, got "
            f"{DECOMPOSED!r} again"
        ),
    ):
        load(files)


@pytest.mark.parametrize("written", [COMPOSED, DECOMPOSED])
@pytest.mark.parametrize("asked", [COMPOSED, DECOMPOSED])
def test_a_principal_is_found_by_either_normal_form(written, asked):
    loaded = load(
        {"roles.yaml": ROLES, "p.yaml": ALLOW, "dir.yaml": directory(written, "bot")}
    )
    request = DecisionRequest(
        chain=(asked, "bot"), action="x.do", resource=Resource(kind="x")
    )

    decision = evaluate(
        loaded.policy_set, loaded.directory, request, Env(now=Timestamp(0, 0))
    )

    assert decision.effect is Effect.ALLOW
    assert decision.chain[0].id == COMPOSED


@pytest.mark.parametrize("role", ["\u0430dmin", "ad min", "r\u200b"])
def test_role_names_are_dotted_ascii_names(role):
    roles = f'roles: {{"{role}": {{}}}}\n'
    files = {
        "roles.yaml": "format_version: 1\nkind: policy\nname: roles\n" + roles,
        "dir.yaml": directory("u"),
    }

    with pytest.raises(
        PolicyError,
        match=re.escape(
            f"roles.yaml:$.roles.{role}: expected a role name of dot-separated "
            f"[A-Za-z0-9_-] segments, got {role!r}"
        ),
    ):
        load(files)


# --- at request time ----------------------------------------------------------


def incoming(**fields) -> IncomingRequest:
    values = {
        "action": "x.do",
        "resource": Resource(kind="x"),
        "asserted_chain": ("alice",),
        **fields,
    }
    return IncomingRequest(**values)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        (
            {"asserted_chain": ("alice", "bo\u200bb")},
            "asserted_chain[1]",
            "expected a name without spaces, control or invisible characters, got "
            "a zero-width or format character (U+200B) at position 2",
        ),
        (
            {"asserted_chain": ("\u0430lice",)},
            "asserted_chain[0]",
            "expected letters of one script, got Cyrillic (U+0430 at position 0) "
            "and Latin (U+006C at position 1)",
        ),
        (
            {"asserted_chain": ("alice\x00",)},
            "asserted_chain[0]",
            "expected a name without spaces, control or invisible characters, got "
            "a control character (U+0000) at position 5",
        ),
        (
            {"action": "x.d\u043e"},
            "action",
            "expected a dotted name of letters, digits, '_' and '-' (at most 256 "
            "characters), got 'x.dо'",
        ),
        (
            {"resource": Resource(kind="x\u200b")},
            "resource.kind",
            "expected a dotted name of letters, digits, '_' and '-' (at most 256 "
            "characters), got 'x\\u200b'",
        ),
    ],
)
def test_unsafe_names_in_a_request_are_invalid_request(fields, field, message):
    with pytest.raises(InvalidRequest, match="^" + re.escape(message) + "$") as info:
        validate_request(incoming(**fields))

    assert info.value.field == field


def test_a_decomposed_principal_id_is_a_valid_request():
    validate_request(incoming(asserted_chain=(DECOMPOSED,)))


def test_unsafe_principal_id_over_grpc_names_the_field(daemon):
    request = small_refund()
    request.asserted_chain[:] = ["al\u200bice"]

    with pytest.raises(grpc.RpcError) as info:
        daemon.stub().Decide(request)

    metadata = dict(info.value.trailing_metadata() or ())
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert metadata["kynara-error-code"] == "invalid_request"
    assert metadata["kynara-error-field"] == "asserted_chain[0]"


# --- role files ------------------------------------------------------------------

SUPPORT_ROLES = (
    "format_version: 1\nkind: policy\nname: support-roles\n"
    "roles: {support: {inherits: [employee]}}\n"
)
STAFF_ROLES = (
    "format_version: 1\nkind: policy\nname: staff-roles\nroles: {employee: {}}\n"
)
USES_BOTH = (
    "format_version: 1\nkind: policy\nname: p\nrules:\n"
    "  - {id: q, effect: allow, actions: [x.do], resources: [x], "
    "roles: [support, employee]}\n"
)


@pytest.mark.parametrize(
    ("first", "second"),
    [("a.yaml", "b.yaml"), ("b.yaml", "a.yaml")],
    ids=["support-first", "staff-first"],
)
def test_two_role_files_are_both_active_in_either_order(first, second):
    files = {
        first: SUPPORT_ROLES,
        second: STAFF_ROLES,
        "p.yaml": USES_BOTH,
        "dir.yaml": directory("u").replace("[r]", "[support]"),
    }

    roles = load(files).policy_set.roles

    assert roles["support"] == frozenset({"support", "employee"})
    assert roles["employee"] == frozenset({"employee"})


@pytest.mark.parametrize(
    ("first", "second"), [("a.yaml", "b.yaml"), ("b.yaml", "a.yaml")]
)
def test_one_role_defined_differently_in_two_files_is_a_load_error(first, second):
    files = {
        first: STAFF_ROLES,
        second: STAFF_ROLES.replace("staff-roles", "other").replace(
            "{employee: {}}", "{employee: {inherits: [employee2]}, employee2: {}}"
        ),
        "dir.yaml": directory("u"),
    }
    later, earlier = sorted((first, second))[::-1]

    with pytest.raises(
        PolicyError,
        match="^"
        + re.escape(
            f"{later}:$.roles.employee: expected role 'employee' to match its "
            f"definition in {earlier}, got a different definition"
        ),
    ):
        load(files)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (
            "roles: {r: {}}\nrules:\n  - {id: q, effect: allow, actions: [x.do], "
            "resources: [x], roles: [r, ghost]}\n",
            "p.yaml:$.rules[0].roles[1]: rule 'q' roles: expected a role defined "
            "in a policy file, got 'ghost'",
        ),
        (
            "roles: {r: {}}\nrules:\n  - {id: q, effect: allow, actions: ['x.*.y'], "
            "resources: [x], roles: [r]}\n",
            "p.yaml:$.rules[0].actions[0]: rule 'q' actions: expected an action "
            "name, 'name.*' or '*', got 'x.*.y'",
        ),
        (
            "roles: {r: {}}\nrules:\n  - {id: q, effect: allow, actions: [x.do], "
            "resources: ['x*'], roles: [r]}\n",
            "p.yaml:$.rules[0].resources[0]: rule 'q' resources: expected a "
            "resource kind name, 'name.*' or '*', got 'x*'",
        ),
        (
            "roles: {r: {}}\nrules:\n  - {id: q, effect: allow, actions: [x.do], "
            "resources: [x], roles: [r], condition: 'lookup(action)'}\n",
            "p.yaml:$.rules[0].condition: rule 'q' condition: expected a valid CEL "
            "expression, got undeclared reference to 'lookup' (in container '') "
            "at line 1 column 7",
        ),
        (
            "roles: {r: {inherits: [s]}, s: {inherits: [r]}}\n",
            "p.yaml:$.roles.r.inherits: expected role inheritance without cycles, "
            "got r -> s -> r",
        ),
    ],
    ids=["unknown-role", "bad-action", "bad-kind", "unknown-function", "cycle"],
)
def test_load_errors_name_file_rule_and_position(policy, message):
    files = {
        "p.yaml": f"format_version: 1\nkind: policy\nname: p\n{policy}",
        "dir.yaml": directory("u"),
    }

    with pytest.raises(PolicyError, match="^" + re.escape(message) + "$"):
        load(files)
