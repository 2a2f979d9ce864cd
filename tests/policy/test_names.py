"""Names and patterns of actions and resource kinds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kynara_sidecar.policy.names import (
    candidate_patterns,
    is_valid_name,
    is_valid_pattern,
    pattern_matches,
)

SEGMENTS = st.text("abcxyz09_-AZ", min_size=1, max_size=4)
NAMES = st.lists(SEGMENTS, min_size=1, max_size=4).map(".".join)
PATTERNS = st.one_of(NAMES, NAMES.map(lambda name: name + ".*"), st.just("*"))


@pytest.mark.parametrize(
    "name", ["a", "payments.refund.issue", "crm.contact", "tool-x.run_1", "A.9"]
)
def test_valid_names(name):
    assert is_valid_name(name)
    assert is_valid_pattern(name)


@pytest.mark.parametrize(
    "name",
    ["", ".", "a.", ".a", "a..b", "a b", "a/b", "a.*", "*", "é", "a\n", "a\x00"],
)
def test_invalid_names(name):
    assert not is_valid_name(name)


def test_a_name_that_is_not_a_string_is_invalid():
    assert not is_valid_name(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", ["*", "a.*", "tool.process.*", "a.b"])
def test_valid_patterns(pattern):
    assert is_valid_pattern(pattern)


@pytest.mark.parametrize(
    "pattern", ["", "a*", "*.b", "a.*.c", "**", "a.**", ".*", "a.b*", "* ", "a.*.*"]
)
def test_invalid_patterns(pattern):
    assert not is_valid_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("tool.process.*", "tool.process.cancel", True),
        ("tool.process.*", "tool.process.cancel.now", True),
        ("tool.process.*", "tool.process", False),
        ("tool.process.*", "tool.processx", False),
        ("tool.process.*", "tool.processx.cancel", False),
        ("tool.process", "tool.process", True),
        ("tool.process", "tool.process.cancel", False),
        ("*", "anything.at.all", True),
        ("*", "a", True),
    ],
)
def test_pattern_matches(pattern, name, expected):
    assert pattern_matches(pattern, name) is expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.b.c", ("a.b.c", "a.b.*", "a.*", "*")),
        ("a", ("a", "*")),
        ("crm.contact", ("crm.contact", "crm.*", "*")),
    ],
)
def test_candidate_patterns_most_specific_first(name, expected):
    assert candidate_patterns(name) == expected


@given(pattern=PATTERNS, name=NAMES)
def test_a_pattern_matches_exactly_when_it_is_a_candidate(pattern, name):
    assert is_valid_pattern(pattern)
    assert pattern_matches(pattern, name) == (pattern in candidate_patterns(name))


@given(name=NAMES)
def test_every_candidate_is_a_valid_pattern_that_matches(name):
    assert all(
        is_valid_pattern(pattern) and pattern_matches(pattern, name)
        for pattern in candidate_patterns(name)
    )
