"""Declared limits at load: every bad field refused naming file, place and
what was expected; names unique across the set; conditions read only
declared limits, only as ``limits.<name>`` and only their fields; fields of
``sum`` and ``key`` without blanks or operators; calendar windows only in
zones of the IANA database; a name YAML reads as no text named as written."""

from __future__ import annotations

import textwrap

import pytest

from kynara_sidecar.decision import Effect, Timestamp
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy.conditions import to_cel_value
from kynara_sidecar.policy.limits import CalendarUnit, KeyPart, Window
from kynara_sidecar.policy.loader import compile_documents, decode_document

NANOS_PER_HOUR = 3_600 * 10**9


def policy(name: str, body: str) -> str:
    return f"format_version: 1\nkind: policy\nname: {name}\n" + textwrap.dedent(body)


def compile_texts(files: dict[str, str]):
    sources = [decode_document(name, text.encode()) for name, text in files.items()]
    return compile_documents(sources, directory="ignored").policy_set


def limit(name: str = "cap", **fields: str) -> str:
    body = {
        "actions": "[pay.refund]",
        "key": "[user]",
        "window": "{rolling: 24h}",
        "ceiling": "5",
    }
    body.update(fields)
    lines = "".join(f"    {field}: {value}\n" for field, value in body.items())
    return f"  {name}:\n{lines}"


def one_limit(**fields: str) -> dict[str, str]:
    return {"a.yaml": policy("p", "limits:\n" + limit(**fields))}


def test_a_full_limit_compiles_to_what_it_declares():
    text = policy(
        "p",
        """
        limits:
          refunds_today:
            description: five a day
            actions: [payments.refund.issue]
            resources: [payments.*]
            decisions: [allow, require_approval]
            key: [user, context.shop, agent.attr.team]
            window: {calendar: day, time_zone: Europe/Berlin}
            ceiling: 5
            scope: fleet
          total:
            actions: [payments.refund.issue]
            sum: resource.attr.amount
            key: [agent]
            window: {rolling: 1w1d1h30m5s}
            ceiling: 10000.5
        """,
    )
    limits = compile_texts({"a.yaml": text}).limits
    assert list(limits) == ["refunds_today", "total"]
    today = limits["refunds_today"]
    assert today.policy == "p"
    assert today.decisions == frozenset({Effect.ALLOW, Effect.REQUIRE_APPROVAL})
    assert today.key == (
        KeyPart("user"),
        KeyPart("context", "shop"),
        KeyPart("agent.attr", "team"),
    )
    assert today.window == Window(calendar=CalendarUnit.DAY, time_zone="Europe/Berlin")
    assert today.scope == "fleet" and today.ceiling == 5 and not today.sums
    assert today.counts("payments.refund", "payments.refund.issue")
    assert not today.counts("crm.contact", "payments.refund.issue")
    assert not today.counts("payments.refund", "payments.refund.read")
    total = limits["total"]
    assert total.sums and (total.sum_source, total.sum_field) == (
        "resource.attr",
        "amount",
    )
    seconds = 8 * 86_400 + 3_600 + 1_800 + 5
    assert total.window.rolling_nanos == seconds * 10**9
    assert total.decisions == frozenset({Effect.ALLOW}) and total.resources == ("*",)
    assert isinstance(total.ceiling, float) and total.scope == "daemon"


@pytest.mark.parametrize(
    ("fields", "location", "expected"),
    [
        ({"actions": "[pay*]"}, "actions[0]", "expected an action name"),
        ({"actions": "[]"}, "actions", "expected a non-empty array"),
        ({"resources": "[x, '*.y']"}, "resources[1]", "expected a resource kind name"),
        (
            {"decisions": "[allow, maybe]"},
            "decisions[1]",
            "'require_approval', got 'maybe'",
        ),
        ({"key": "[user, owner]"}, "key[1]", "context.<field>"),
        ({"key": "[context.]"}, "key[0]", "got 'context.'"),
        ({"key": "[user, user]"}, "key[1]", "expected each part once"),
        ({"key": "[]"}, "key", "expected a non-empty array"),
        (
            {"sum": "user.attr.level"},
            "sum",
            "expected context.<field> or resource.attr",
        ),
        ({"window": "{rolling: 24h, calendar: day}"}, "window", "exactly one of"),
        ({"window": "{}"}, "window", "exactly one of"),
        ({"window": "{rolling: 0s}"}, "window.rolling", "1s..366d"),
        ({"window": "{rolling: 367d}"}, "window.rolling", "1s..366d"),
        ({"window": "{rolling: 30m1h}"}, "window.rolling", "largest first"),
        ({"window": "{rolling: 1y}"}, "window.rolling", "got '1y'"),
        (
            {"window": "{rolling: 1h, time_zone: Europe/Berlin}"},
            "window.time_zone",
            "only with a calendar window",
        ),
        ({"window": "{calendar: year}"}, "window.calendar", "got 'year'"),
        (
            {"window": "{calendar: day, time_zone: Mars/Olympus}"},
            "window.time_zone",
            "expected an IANA time zone",
        ),
        (
            {"window": "{calendar: day, time_zone: '+02:00'}"},
            "window.time_zone",
            "expected an IANA time zone",
        ),
        ({"window": "{calendar: day, zone: UTC}"}, "window", "unknown field 'zone'"),
        ({"ceiling": "0"}, "ceiling", "above 0"),
        ({"ceiling": "-3"}, "ceiling", "above 0"),
        ({"ceiling": "5.0"}, "ceiling", "expected an int for a limit that counts"),
        ({"ceiling": "true"}, "ceiling", "expected int | float, got bool"),
        ({"ceiling": "'5'"}, "ceiling", "expected int | float, got str"),
        ({"ceiling": "9223372036854775808"}, "ceiling", "2**63-1"),
        ({"sum": "context.amount", "ceiling": ".nan"}, "ceiling", "finite number"),
        ({"sum": "context.amount", "ceiling": ".inf"}, "ceiling", "finite number"),
        ({"scope": "world"}, "scope", "expected one of 'daemon', 'fleet'"),
        ({"colour": "red"}, "", "unknown field 'colour'"),
    ],
)
def test_every_bad_field_is_refused_naming_file_place_and_expectation(
    fields, location, expected
):
    with pytest.raises(PolicyError) as caught:
        compile_texts(one_limit(**fields))
    where = "$.limits.cap" + (f".{location}" if location else "")
    assert caught.value.path == "a.yaml"
    assert caught.value.location == where
    assert expected in str(caught.value)


def test_a_missing_field_is_refused_naming_the_limit():
    text = policy("p", "limits:\n  cap: {actions: [a.b], key: [user], ceiling: 1}\n")
    with pytest.raises(
        PolicyError, match=r"a\.yaml:\$\.limits\.cap: expected field 'window'"
    ):
        compile_texts({"a.yaml": text})


@pytest.mark.parametrize("name", ["Cap", "9cap", "cap-x", "a" * 64, "in", "true"])
def test_a_limit_name_that_cel_cannot_select_is_refused(name):
    text = policy("p", "limits:\n" + limit(name=f"'{name}'"))
    with pytest.raises(PolicyError) as caught:
        compile_texts({"a.yaml": text})
    assert caught.value.location == f"$.limits.{name}"
    assert "limit name" in str(caught.value)


def test_limit_names_are_unique_across_files():
    files = {
        "a.yaml": policy("p", "limits:\n" + limit()),
        "b.yaml": policy("q", "limits:\n" + limit(ceiling="6")),
    }
    with pytest.raises(PolicyError) as caught:
        compile_texts(files)
    assert str(caught.value) == (
        "b.yaml:$.limits.cap: expected limit names unique across the set, "
        "got 'cap', also declared in a.yaml"
    )


RULES = """
roles: {r: {}}
rules:
  - id: ok
    effect: allow
    actions: [pay.refund]
    resources: ["*"]
    roles: [r]
  - id: capped
    effect: deny
    actions: [pay.refund]
    resources: ["*"]
    roles: [r]
    condition: {condition}
"""


def with_condition(condition: str) -> dict[str, str]:
    body = RULES.replace("{condition}", condition)
    return {
        "a.yaml": policy("p", "limits:\n" + limit()),
        "b.yaml": policy("q", body),
    }


def test_a_condition_reads_a_limit_declared_in_another_file():
    rules = compile_texts(with_condition("limits.cap.exceeded")).rules
    assert rules[1].condition.limits == frozenset({"cap"})
    assert "limits" in rules[1].condition.variables
    assert rules[0].condition is None


def test_a_condition_naming_an_undeclared_limit_is_refused():
    with pytest.raises(PolicyError) as caught:
        compile_texts(with_condition("limits.cap.exceeded || limits.caps.exceeded"))
    assert str(caught.value) == (
        "b.yaml:$.rules[1].condition: rule 'capped' condition: expected a limit "
        "declared in a policy file of the set, got limits.caps"
    )


def test_has_on_a_limit_is_a_read():
    rules = compile_texts(with_condition("'has(limits.cap) && limits.cap.count > 1'"))
    assert rules.rules[1].condition.limits == frozenset({"cap"})


@pytest.mark.parametrize(
    ("condition", "column"),
    [
        ("'limits[\"cap\"].exceeded'", 1),
        ("'size(limits) > 0'", 6),
        ("'\"cap\" in limits'", 10),
        ("'limits.cap.exceeded || limits.all(n, n == \"x\")'", 24),
    ],
)
def test_any_other_use_of_limits_is_refused_with_line_and_column(condition, column):
    with pytest.raises(PolicyError) as caught:
        compile_texts(with_condition(condition))
    assert caught.value.location == "$.rules[1].condition"
    assert (
        f"expected limits read as limits.<name>, got another use of limits at "
        f"line 1 column {column}" in str(caught.value)
    )


def test_a_set_without_limits_has_none():
    assert dict(compile_texts({"a.yaml": policy("p", "")}).limits) == {}


@pytest.mark.parametrize(
    ("decisions", "plain_allow", "granted_allow", "approval_asked"),
    [
        ("[approved]", False, True, False),
        ("[allow, approved]", True, True, False),
        ("[allow]", True, True, False),
        ("[approved, require_approval]", False, True, True),
    ],
)
def test_approved_counts_only_allows_an_approval_granted(
    decisions, plain_allow, granted_allow, approval_asked
):
    (compiled,) = compile_texts(one_limit(decisions=decisions)).limits.values()

    assert compiled.counts_decision(Effect.ALLOW, approved=False) is plain_allow
    assert compiled.counts_decision(Effect.ALLOW, approved=True) is granted_allow
    assert compiled.counts_decision(Effect.REQUIRE_APPROVAL, False) is approval_asked
    assert compiled.counts_decision(Effect.DENY, approved=False) is False


# --- what a condition may read of a limit ----------------------------------------

FIELDS = "(count, sum, ceiling, remaining, exceeded or window_start) or none"


@pytest.mark.parametrize(
    ("condition", "column", "expected"),
    [
        (
            "limits.cap.exceded",
            11,
            f"expected a field of limits.cap {FIELDS}, got limits.cap.exceded",
        ),
        (
            "has(limits.cap.exceded)",
            4,
            f"expected a field of limits.cap {FIELDS}, got limits.cap.exceded",
        ),
        (
            "'dyn(limits.cap).exceded'",
            16,
            f"expected a field of limits.cap {FIELDS}, got limits.cap.exceded",
        ),
        (
            "'limits.cap.exceeded || limits.cap.Exceeded'",
            34,
            f"expected a field of limits.cap {FIELDS}, got limits.cap.Exceeded",
        ),
        (
            "'limits.cap[\"exceeded\"]'",
            11,
            "expected limits.cap read by field (limits.cap.exceeded), got an "
            "index on limits.cap",
        ),
        (
            "limits.cap.exceeded.exceeded",
            20,
            "expected nothing selected from limits.cap.exceeded (a value, not a "
            "map), got .exceeded after it",
        ),
        (
            "has(limits.cap.count.x)",
            4,
            "expected nothing selected from limits.cap.count (a value, not a "
            "map), got .x after it",
        ),
        (
            "'limits.cap.count[0] > 1'",
            17,
            "expected no index on limits.cap.count (a value, not a map), got one",
        ),
    ],
)
def test_a_field_a_limit_does_not_have_is_refused_at_load(condition, column, expected):
    # Each of these loaded before and then failed every request it met.
    with pytest.raises(PolicyError) as caught:
        compile_texts(with_condition(condition))
    assert str(caught.value) == (
        f"b.yaml:$.rules[1].condition: rule 'capped' condition: {expected} at "
        f"line 1 column {column}"
    )


def test_sum_of_a_limit_that_counts_decisions_is_refused():
    with pytest.raises(PolicyError) as caught:
        compile_texts(with_condition("'limits.cap.sum > 3'"))
    assert str(caught.value) == (
        "b.yaml:$.rules[1].condition: rule 'capped' condition: expected .sum only "
        "on a limit that declares sum, got limits.cap.sum on limit 'cap', which "
        "counts decisions (read limits.cap.count)"
    )


def test_sum_of_a_summing_limit_is_read():
    files = with_condition("'limits.cap.sum > 3 && !limits.cap.exceeded'")
    files["a.yaml"] = policy("p", "limits:\n" + limit(sum="context.amount"))
    condition = compile_texts(files).rules[1].condition
    assert condition.limits == frozenset({"cap"})
    assert condition.limit_fields == frozenset({("cap", "sum"), ("cap", "exceeded")})


def test_known_fields_and_the_whole_limit_are_recorded_as_read():
    source = (
        "'has(limits.cap) && has(limits.cap.count) && limits.cap.count < 5"
        " && limits.cap.remaining > 0 && limits.cap.ceiling == 5"
        " && limits.cap.window_start <= env.now && !dyn(limits.cap).exceeded'"
    )
    condition = compile_texts(with_condition(source)).rules[1].condition
    assert condition.limit_fields == frozenset(
        {
            ("cap", ""),
            ("cap", "count"),
            ("cap", "remaining"),
            ("cap", "ceiling"),
            ("cap", "window_start"),
            ("cap", "exceeded"),
        }
    )
    value = {
        "count": 2,
        "ceiling": 5,
        "remaining": 3,
        "exceeded": False,
        "window_start": Timestamp(0, 0),
    }
    data = {"limits": {"cap": value}, "env": {"now": Timestamp(100, 0)}}
    assert condition.evaluate({k: to_cel_value(v) for k, v in data.items()}) is True
    # A request that cannot form the limit: has() says so, nothing errors.
    data["limits"] = {}
    assert condition.evaluate({k: to_cel_value(v) for k, v in data.items()}) is False


# --- what a field of sum and key may hold ----------------------------------------


@pytest.mark.parametrize(
    ("fields", "location", "got"),
    [
        ({"sum": "'resource.attr.amount * 2'"}, "sum", "'resource.attr.amount * 2'"),
        ({"sum": "'resource.attr.amount '"}, "sum", "'resource.attr.amount '"),
        ({"sum": "'context.a+b'"}, "sum", "'context.a+b'"),
        ({"sum": '"context.amount\\t"'}, "sum", "'context.amount\\t'"),
        ({"key": "[user, 'context.a b']"}, "key[1]", "'context.a b'"),
        ({"key": "['user.attr.team)']"}, "key[0]", "'user.attr.team)'"),
        ({"key": "['agent.attr.größe']"}, "key[0]", "'agent.attr.größe'"),
        ({"key": f"[context.{'a' * 129}]"}, "key[0]", f"'context.{'a' * 129}'"),
    ],
)
def test_a_field_with_blanks_or_operators_is_refused(fields, location, got):
    with pytest.raises(PolicyError) as caught:
        compile_texts(one_limit(**fields))
    assert caught.value.location == f"$.limits.cap.{location}"
    message = str(caught.value)
    assert (
        "a field being 1..128 ASCII letters, digits, '_', '-', '.' or ':' (no "
        "blank, control or operator character)" in message
    )
    assert message.endswith(f"got {got}")


def test_a_field_of_letters_digits_and_marks_is_one_entry():
    (compiled,) = compile_texts(
        one_limit(
            sum="context.order-total:EUR",
            key=f"[resource.attr.a.b_9, user.attr.{'x' * 128}]",
        )
    ).limits.values()
    assert (compiled.sum_source, compiled.sum_field) == ("context", "order-total:EUR")
    assert compiled.key == (
        KeyPart("resource.attr", "a.b_9"),
        KeyPart("user.attr", "x" * 128),
    )


# --- time zones of calendar windows --------------------------------------------


@pytest.mark.parametrize(
    "zone",
    [
        "localtime",
        "posixrules",
        "Factory",
        "right/UTC",
        "posix/Europe/Berlin",
        "europe/berlin",
        "/etc/localtime",
        "../zoneinfo/UTC",
        "",
    ],
)
def test_a_zone_not_of_the_database_or_following_the_host_is_refused(zone):
    with pytest.raises(PolicyError) as caught:
        compile_texts(one_limit(window=f"{{calendar: day, time_zone: '{zone}'}}"))
    assert str(caught.value) == (
        "a.yaml:$.limits.cap.window.time_zone: limit 'cap' window.time_zone: "
        "expected an IANA time zone of the database such as 'Europe/Berlin' "
        "(default 'UTC'), not 'localtime', 'posixrules' or 'Factory', which "
        f"follow the host's clock or mean none, got {zone!r}"
    )


@pytest.mark.parametrize(
    ("window", "zone"),
    [
        ("{calendar: day}", "UTC"),
        ("{calendar: week, time_zone: Europe/Berlin}", "Europe/Berlin"),
        ("{calendar: hour, time_zone: US/Eastern}", "US/Eastern"),
        ("{calendar: month, time_zone: Etc/GMT-14}", "Etc/GMT-14"),
    ],
)
def test_a_calendar_window_takes_a_database_zone_and_defaults_to_utc(window, zone):
    (compiled,) = compile_texts(one_limit(window=window)).limits.values()
    assert compiled.window.time_zone == zone


# --- limit names YAML reads as no text ---------------------------------------------


@pytest.mark.parametrize(
    ("written", "kind", "line"),
    [
        ("true", "bool", 5),
        ("yes", "bool", 5),
        ("null", "null", 5),
        ("~", "null", 5),
        ("5", "int", 5),
        ("2026-01-01", "date", 5),
    ],
)
def test_a_limit_name_yaml_reads_as_no_text_is_named_as_written(written, kind, line):
    text = policy("p", "limits:\n" + limit(name=written))
    with pytest.raises(PolicyError) as caught:
        compile_texts({"a.yaml": text})
    assert str(caught.value) == (
        f"a.yaml:$.limits.{written}: expected a limit name (a CEL identifier "
        f"such as refunds_today) as text, got {kind} {written!r} on line {line} "
        "(YAML reads an unquoted true, false, yes, no, on, off, null, ~, number "
        "or date as no text)"
    )


def test_the_first_name_not_text_is_named_after_good_ones():
    text = policy("p", "limits:\n" + limit() + limit(name="'on'") + limit(name="off"))
    with pytest.raises(PolicyError) as caught:
        compile_texts({"a.yaml": text})
    assert caught.value.location == "$.limits.off"
    assert "got bool 'off' on line 15" in str(caught.value)


def test_a_definition_changes_with_what_is_counted_not_with_window_or_ceiling():
    def definition(**fields: str) -> str:
        base = {"sum": "resource.attr.amount", "ceiling": "1000"}
        (compiled,) = compile_texts(one_limit(**(base | fields))).limits.values()
        return compiled.definition

    same = definition()
    assert definition(ceiling="5000") == same
    assert definition(window="{calendar: day}") == same
    assert definition(scope="fleet") == same
    # Adding up doubles instead of ints is another sum.
    assert definition(ceiling="1000.0") != same
    assert definition(key="[agent]") != same
    assert definition(sum="context.amount") != same
    assert definition(decisions="[allow, deny]") != same
