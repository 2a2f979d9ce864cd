"""Running the SDK's framework adapters in their own venvs against a real
daemon, and reading what the daemon logged.

Each framework pins what the daemon's venv cannot hold (autogen-core wants
protobuf 5.29, crewai wants mcp below 2), so scripts/setup --test builds a
venv per adapter under .venvs/, and a test runs a scenario script there
with that venv's Python: the script drives the framework, prints what it
saw as JSON, and the test (in the daemon's venv) checks it against the
audit log.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import subprocess

import pytest
from support import REPO_ROOT

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.record import AuditRecordV1

# CI sets this so that a missing venv fails instead of skipping.
REQUIRED_ENV = "KYNARA_SDK_VENV_TESTS"
# A bound on a scenario run: it stops a hung run, it is not a speed check.
SCENARIO_TIMEOUT = 120
REVIEWER_SECRET = "carol-reviewer-secret-0123456789"


def venv_python(name: str) -> pathlib.Path:
    """``.venvs/NAME``'s Python; skips (fails under CI) when it is missing."""
    python = REPO_ROOT / ".venvs" / name / "bin" / "python"
    if not python.exists():
        message = f".venvs/{name} is missing: run scripts/setup --test"
        if os.environ.get(REQUIRED_ENV) == "required":
            pytest.fail(message)
        pytest.skip(message)
    return python


def run_scenario(
    python: pathlib.Path, script: pathlib.Path, *args: str, **env: str
) -> dict:
    """Run ``script ARGS`` with ``python`` isolated (only its venv's packages
    importable, not this checkout's) and return the JSON it printed.

    Raises:
        AssertionError: it exited non-zero (the message has its stderr).
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for key in ("KYNARA_TRANSPORT", "KYNARA_TARGET", "KYNARA_AGENT_SECRET_FILE"):
        clean.pop(key, None)
    done = subprocess.run(
        [str(python), "-I", str(script), *args],
        capture_output=True, text=True, timeout=SCENARIO_TIMEOUT,
        env={**clean, **env}, cwd=script.parent,
    )  # fmt: skip
    exited = f"{script.name} exited {done.returncode}"
    assert done.returncode == 0, f"{exited}:\n{done.stderr}"
    return json.loads(done.stdout)


def audit_records(running) -> dict[str, AuditRecordV1]:
    """The in-process daemon's decision records so far, by decision id, read
    through its own store (LMDB allows one environment per file in a
    process). Each answered decision is committed before its answer in the
    default durable mode, so a read after the answers sees them all."""
    store = running.daemon._store
    with contextlib.closing(store.iter_records()) as stored:
        records = [decode_record(r.record_bytes) for r in stored]
    return {r.decision_id: r for r in records if r.kind == "decision"}


def assert_in_audit_log(audit: dict[str, AuditRecordV1], events: list[dict]) -> None:
    """Each event's decision id names a record in ``audit`` (from
    ``audit_records``) of the same action and decision."""
    for event in events:
        record = audit[event["decision_id"]]
        assert (record.action, record.decision) == (event["action"], event["decision"])


def readme_example(framework: str) -> str:
    """The python block of clients/python/README.md's ``### FRAMEWORK``
    subsection: the copy-and-run example a reader would take."""
    text = (REPO_ROOT / "clients" / "python" / "README.md").read_text("utf-8")
    section = text.split(f"\n### {framework}\n", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    return code


def reviewer_settings(tmp_path: pathlib.Path) -> list[str]:
    """Daemon settings for carol, a reviewer on the admin socket in
    ``tmp_path``, so a test can approve with ``approve``."""
    secret = tmp_path / "carol.secret"
    secret.write_text(REVIEWER_SECRET)
    credentials = {"carol": {"secret_file": str(secret), "roles": ["reviewer"]}}
    return [
        f"admin.socket={tmp_path / 'admin.sock'}",
        f"admin.credentials={json.dumps(credentials)}",
    ]


def approve(running, approval_id: str) -> None:
    """Carol approves ``approval_id`` on the daemon's admin socket."""
    import grpc
    from kynara.v1 import approval_pb2, approval_pb2_grpc

    metadata = (("authorization", f"Bearer {REVIEWER_SECRET}"),)
    with grpc.insecure_channel(f"unix://{running.config.admin.socket}") as channel:
        approval_pb2_grpc.ApprovalServiceStub(channel).Approve(
            approval_pb2.ReviewRequest(approval_id=approval_id), metadata=metadata
        )
