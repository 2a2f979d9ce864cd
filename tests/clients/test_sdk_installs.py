"""The SDK installed for real in venvs of its own (scripts/setup --test):
alone, it decides over the fast path with no protobuf or grpc importable;
with its gRPC extra beside autogen-core (protobuf 5.29, in the AutoGen
guard's venv), over both transports."""

from __future__ import annotations

import pathlib

from integration_support import run_scenario, venv_python

CHECK = pathlib.Path(__file__).with_name("sdk_install_check.py")


def run_check(python: pathlib.Path, target: str, *transports: str) -> dict:
    return run_scenario(python, CHECK, target, *transports)


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
    python = venv_python("autogen")
    running = start_daemon(path=socket_dir)

    seen = run_check(python, running.target, "grpc", "fast")

    assert seen["protobuf"].startswith("5.29.")
    assert seen["importable"]["grpc"] is True
    assert seen["runs"]["grpc"] == {"transport": "grpc", **EXPECTED_RUN}
    assert seen["runs"]["fast"] == {"transport": "fast", **EXPECTED_RUN}
    # With gRPC installed, auto falls back to it: the daemon is not there.
    assert "[daemon_unreachable]" in seen["without_fast_socket"]
    assert "pip install" not in seen["without_fast_socket"]
