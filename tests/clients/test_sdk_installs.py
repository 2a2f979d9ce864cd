"""The SDK installed for real in venvs of its own (scripts/setup --test):
alone, it decides over the fast path with no protobuf or grpc importable;
with its gRPC extra beside autogen-core (protobuf 5.29), over both
transports."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest
from support import REPO_ROOT

CHECK = pathlib.Path(__file__).with_name("sdk_install_check.py")
# CI sets this so that a missing venv fails instead of skipping.
REQUIRED_ENV = "KYNARA_SDK_VENV_TESTS"


def venv_python(name: str) -> pathlib.Path:
    python = REPO_ROOT / ".venvs" / name / "bin" / "python"
    if not python.exists():
        message = f".venvs/{name} is missing: run scripts/setup --test"
        if os.environ.get(REQUIRED_ENV) == "required":
            pytest.fail(message)
        pytest.skip(message)
    return python


def run_check(python: pathlib.Path, target: str, *transports: str) -> dict:
    # Run from the check's folder with no PYTHONPATH: only the venv's own
    # packages are importable, not this checkout's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.pop("KYNARA_TRANSPORT", None)
    done = subprocess.run(
        [str(python), "-I", str(CHECK), target, *transports],
        capture_output=True, text=True, timeout=60, env=env, cwd=CHECK.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


EXPECTED_RUN = {
    "decisions": ["allow", "deny", "require_approval"],
    "error": "invalid_request",
    "batch": ["allow", "invalid_request"],
}


def test_the_sdk_alone_decides_over_the_fast_path_without_protobuf(
    start_daemon, socket_dir
):
    python = venv_python("sdk-fast")
    running = start_daemon(path=socket_dir)

    seen = run_check(python, running.target, "auto", "fast")

    assert seen["importable"] == {
        "google.protobuf": False,
        "grpc": False,
        "msgspec": True,
    }
    for transport in ("auto", "fast"):
        assert seen["runs"][transport] == {"transport": "fast", **EXPECTED_RUN}
    assert "agent.fast.sock does not exist" in seen["without_fast_socket"]
    assert "pip install 'kynara-sdk[grpc]'" in seen["without_fast_socket"]


def test_the_grpc_extra_works_beside_protobuf_5_29(start_daemon, socket_dir):
    python = venv_python("sdk-pb529")
    running = start_daemon(path=socket_dir)

    seen = run_check(python, running.target, "grpc", "fast")

    assert seen["protobuf"].startswith("5.29.")
    assert seen["importable"]["grpc"] is True
    assert seen["runs"]["grpc"] == {"transport": "grpc", **EXPECTED_RUN}
    assert seen["runs"]["fast"] == {"transport": "fast", **EXPECTED_RUN}
    # With gRPC installed, auto falls back to it: the daemon is not there.
    assert "[daemon_unreachable]" in seen["without_fast_socket"]
    assert "pip install" not in seen["without_fast_socket"]
