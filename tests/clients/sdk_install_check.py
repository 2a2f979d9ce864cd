"""Run by tests/clients/test_sdk_installs.py with another venv's Python: the
installed SDK decides against a real daemon and prints what it saw as JSON.

Usage: python sdk_install_check.py TARGET TRANSPORT...
Imports only the standard library and kynara_sdk, as an agent would.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import kynara_sdk

REFUND = {"action": "payments.refund.issue", "resource_kind": "payments.refund"}


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def check(target: str, transport: str) -> dict:
    with kynara_sdk.Client(target, transport=transport) as client:
        allow = client.decide(**REFUND, user="alice", attributes={"amount": 1200})
        deny = client.decide(**REFUND, user="mallory", attributes={"amount": 1})
        held = client.decide(**REFUND, user="alice", attributes={"amount": 250_000})
        try:
            client.decide(**REFUND, user="alice", resource_id="x", context={"": 1})
            error = None
        except kynara_sdk.KynaraError as err:
            error = err.code
        batch = client.decide_batch(
            [
                {**REFUND, "user": "alice", "attributes": {"amount": 5}},
                {**REFUND, "user": "alice", "resource_kind": "a..b"},
            ]
        )
        return {
            "transport": client.transport,
            "decisions": [allow.decision, deny.decision, held.decision],
            "error": error,
            "batch": [
                item.decision if isinstance(item, kynara_sdk.Decision) else item.code
                for item in batch
            ],
        }


def main() -> None:
    target, transports = sys.argv[1], sys.argv[2:]
    out: dict = {
        "importable": {
            name: importable(name) for name in ("google.protobuf", "grpc", "msgspec")
        },
        "runs": {transport: check(target, transport) for transport in transports},
    }
    if out["importable"]["google.protobuf"]:
        from google.protobuf import __version__

        out["protobuf"] = __version__
    # The rule's last resort: no fast socket here, and gRPC only if installed.
    lone = target.rsplit("/", 1)[0] + "/nowhere/agent.sock"
    try:
        kynara_sdk.Client(lone, timeout=0.5).decide(**REFUND, user="alice")
        out["without_fast_socket"] = "answered"
    except kynara_sdk.KynaraError as err:
        out["without_fast_socket"] = str(err)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
