"""The README's limits examples are policy files the daemon loads as they
are written (the second one is a fragment: it gets the file header)."""

from __future__ import annotations

import re

from support import REPO_ROOT, SHIPPED_POLICIES

from kynara_sidecar.policy.loader import compile_documents, decode_document

HEADER = "format_version: 1\nkind: policy\nname: example\n"


def limits_examples() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("### Limits: counts and running totals across decisions")
    end = text.index("\n### ", start + 1)
    blocks = re.findall(r"```yaml\n(.*?)```", text[start:end], re.S)
    return [block for block in blocks if "limits:" in block]


def test_every_limits_example_of_the_readme_compiles_with_the_shipped_set():
    examples = limits_examples()
    assert len(examples) >= 2
    shipped = [
        decode_document(str(path), path.read_bytes())
        for path in sorted(SHIPPED_POLICIES.glob("*.yaml"))
    ]
    for number, example in enumerate(examples):
        body = example if example.startswith("format_version") else HEADER + example
        name = f"example{number}.yaml"
        document = decode_document(name, body.encode())
        loaded = compile_documents([*shipped, document], root="policies")
        declared = set(loaded.policy_set.limits)
        assert declared, f"README limits example {number} declares no limit"
        read = {
            limit
            for rule in loaded.policy_set.rules
            if rule.condition is not None
            for limit in rule.condition.limits
        }
        unread = sorted(declared - read)
        assert read == declared, f"README limits example {number}: unread {unread}"
