"""The escape rule and tool naming (gateway/names.py), by its documented
examples."""

from __future__ import annotations

import pytest

from kynara_sidecar.gateway.names import RESOURCE_KIND, escape, tool_name


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("read", "read"),
        ("get-file_2", "get-file_2"),
        ("get.file", "get_2Efile"),
        ("café", "caf_C3_A9"),
        ("a b/c", "a_20b_2Fc"),
        ("", ""),
    ],
)
def test_escape_replaces_each_other_character_by_its_utf8_bytes(name, escaped):
    assert escape(name) == escaped


def test_escape_is_readable_not_reversible():
    # The documented reason the catalog refuses collisions.
    assert escape("get.file") == escape("get_2Efile")


def test_tool_name_gives_action_resource_and_exposed_name():
    name = tool_name("files.v2", "get.file")

    assert name.server == "files.v2"
    assert name.tool == "get.file"
    assert name.action == "mcp.files_2Ev2.get_2Efile"
    assert name.resource_id == "files_2Ev2.get_2Efile"
    assert name.exposed == "files_2Ev2__get_2Efile"
    assert RESOURCE_KIND == "mcp.tool"


def test_configured_action_replaces_the_default_for_that_tool_only():
    actions = {"refund": "payments.refund.issue"}

    assert tool_name("pay", "refund", actions).action == "payments.refund.issue"
    assert tool_name("pay", "refund", actions).resource_id == "pay.refund"
    assert tool_name("pay", "lookup", actions).action == "mcp.pay.lookup"
