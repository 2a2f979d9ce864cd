"""The Cerbos PDP as the benchmark's peer: install, configure, start, ask.

- ``ensure_cerbos`` installs the Cerbos binary once from the npm package
  ``@cerbos/cerbos-linux-x64`` (pinned) into an ignored folder beside this
  file and checks its version; later runs reuse it.
- ``start_cerbos`` writes a config into the run's scratch directory and
  starts ``cerbos server``: gRPC on a Unix socket, HTTP and the debug
  listener on loopback only, policies from ``policies/`` (Kynara's
  ``config/policies`` translated by hand; see their header), local audit on
  (access and decision logs, stored in the scratch directory), telemetry and
  every hub setting off.
- ``CerbosTranslator`` turns a ``kynara.v1.DecideRequest`` into the bytes of
  a Cerbos ``CheckResourcesRequest`` for one principal of the chain, and a
  Cerbos answer back into a Kynara decision (``allow``, ``deny`` or
  ``require_approval``).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import struct_pb2

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from decide_bench import REPO_ROOT, Server, free_port  # noqa: E402

from kynara_sidecar.policy.loader import load_policies  # noqa: E402

__all__ = [
    "CERBOS_VERSION",
    "CHECK_METHOD",
    "CerbosTranslator",
    "InstallError",
    "chain_of",
    "combine_chain",
    "compile_messages",
    "ensure_cerbos",
    "start_cerbos",
]

# The peer's version is pinned: the figures are for this release.
CERBOS_VERSION = "0.55.0"
NPM_PACKAGE = "@cerbos/cerbos-linux-x64"
PACKED_BINARY = "package/cerbos-linux-x64"
INSTALL_DIR = HERE / ".cerbos"
POLICY_DIR = HERE / "policies"
PROTO_FILE = HERE / "check.proto"
CHECK_METHOD = "/cerbos.svc.v1.CerbosService/CheckResources"
# npm pack fetches about 30 MB; generous for a slow mirror.
INSTALL_TIMEOUT_SECONDS = 600
# Kynara's decisions, strictest last (engine.py's chain combining).
_STRICTNESS = {"allow": 0, "require_approval": 1, "deny": 2}
# Output values of policies/*.yaml rules: the Kynara effect they stand for.
_DENY_OUTPUT, _APPROVAL_OUTPUT = "deny", "require_approval"


class InstallError(Exception):
    """The Cerbos binary could not be installed; the message says why."""


def _installed_version(binary: pathlib.Path) -> str:
    done = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60
    )
    first = done.stdout.strip().splitlines()
    return first[0].strip() if done.returncode == 0 and first else ""


def ensure_cerbos(install_dir: pathlib.Path = INSTALL_DIR) -> pathlib.Path:
    """The path of the pinned Cerbos binary, installed first if need be.

    Runs ``npm pack`` for the pinned package into a temporary directory and
    moves its binary into ``install_dir``; a binary already there of the
    pinned version is reused.

    Raises:
        InstallError: npm is missing or failed, or the binary is not the
            pinned version.
    """
    binary = install_dir / "cerbos"
    if binary.exists() and _installed_version(binary) == CERBOS_VERSION:
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise InstallError("npm not found on PATH: it installs the Cerbos binary")
    install_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=install_dir) as scratch:
        spec = f"{NPM_PACKAGE}@{CERBOS_VERSION}"
        done = subprocess.run(
            [npm, "pack", spec, "--pack-destination", scratch, "--silent"],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_SECONDS,
        )
        packed = sorted(pathlib.Path(scratch).glob("*.tgz"))
        if done.returncode != 0 or not packed:
            raise InstallError(f"npm pack {spec} failed:\n{done.stderr[-2000:]}")
        with tarfile.open(packed[0]) as archive:
            member = archive.getmember(PACKED_BINARY)
            archive.extract(member, scratch, filter="data")
        unpacked = pathlib.Path(scratch) / PACKED_BINARY
        unpacked.chmod(0o755)
        unpacked.replace(binary)
    found = _installed_version(binary)
    if found != CERBOS_VERSION:
        raise InstallError(
            f"{binary}: expected Cerbos {CERBOS_VERSION}, got {found or 'no version'}"
        )
    return binary


def _config_text(workdir: pathlib.Path, socket_path: pathlib.Path, port: int) -> str:
    # JSON is YAML: every value is quoted, so no path needs escaping rules.
    config = {
        "server": {
            "httpListenAddr": f"127.0.0.1:{port}",
            "grpcListenAddr": f"unix:{socket_path}",
            "adminAPI": {"enabled": False},
        },
        "storage": {
            "driver": "disk",
            "disk": {"directory": str(POLICY_DIR), "watchForChanges": False},
        },
        "audit": {
            "enabled": True,
            "accessLogsEnabled": True,
            "decisionLogsEnabled": True,
            "backend": "local",
            "local": {"storagePath": str(workdir / "audit"), "retentionPeriod": "24h"},
        },
        "telemetry": {"disabled": True},
    }
    return json.dumps(config, indent=2)


def start_cerbos(binary: pathlib.Path, workdir: pathlib.Path) -> Server:
    """Start ``cerbos server`` with its socket, config, log and audit log in
    workdir; stop it with ``decide_bench.stop_server``.

    The debug (gops) listener, on all interfaces by default, is bound to a
    free loopback port; telemetry is off in the config and the environment.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    socket_path = workdir / "cerbos.sock"
    config_path = workdir / "cerbos.yaml"
    config_path.write_text(_config_text(workdir, socket_path, free_port()))
    argv = [
        str(binary),
        "server",
        f"--config={config_path}",
        f"--debug-listen-addr=127.0.0.1:{free_port()}",
        "--log-level=warn",
    ]
    env = {**os.environ, "CERBOS_NO_TELEMETRY": "1"}
    for name in ("CERBOS_HUB_DEPLOYMENT_ID", "CERBOS_HUB_PLAYGROUND_ID"):
        env.pop(name, None)
    log_path = workdir / "cerbos.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            argv, cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    targets = {"unix": f"unix://{socket_path}"}
    return Server("cerbos", CHECK_METHOD, process, targets, log_path)


def compile_messages(scratch: pathlib.Path) -> Any:
    """Compile ``check.proto`` into scratch and import it.

    Raises:
        InstallError: grpc_tools (the project's test extra) is missing, or
            protoc failed.
    """
    try:
        from grpc_tools import protoc
    except ImportError as err:
        raise InstallError(
            "grpc_tools not installed: `scripts/setup --test` installs it"
        ) from err
    include = pathlib.Path(protoc.__file__).resolve().parent / "_proto"
    out = scratch / "cerbos_proto"
    out.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "protoc",
            f"-I{HERE}",
            f"-I{include}",
            f"--python_out={out}",
            str(PROTO_FILE),
        ]
    )
    if code != 0:
        raise InstallError(f"protoc failed on {PROTO_FILE} (exit {code})")
    sys.path.insert(0, str(out))
    return importlib.import_module("check_pb2")


def combine_chain(decisions: Iterable[str]) -> str:
    """A chain's decision from its principals' (Kynara's intersection)."""
    return max(decisions, key=_STRICTNESS.__getitem__, default="deny")


class CerbosTranslator:
    """Kynara requests to Cerbos requests, and Cerbos answers to Kynara
    decisions.

    A principal's Cerbos roles are its directory roles with every role they
    inherit (Cerbos takes the roles from the caller; Kynara resolves them
    from its directory). Kynara's request ``context`` travels as the Cerbos
    principal's attributes, resource attributes as resource attributes, with
    numbers as doubles (``google.protobuf.Value`` has no integers).
    """

    def __init__(self, messages: Any, policies: pathlib.Path | None = None):
        self._messages = messages
        loaded = load_policies(policies or REPO_ROOT / "config" / "policies")
        self._roles: dict[str, list[str]] = {}
        for principal in loaded.directory.principals.values():
            roles = loaded.policy_set.effective_roles(principal.roles)
            self._roles[principal.id] = sorted(roles)

    def check_request(self, decide: Any, principal_id: str) -> bytes:
        """The serialized CheckResourcesRequest asking whether
        ``principal_id`` may do ``decide``'s action on its resource.

        Raises:
            KeyError: the principal is not in the directory.
        """
        m = self._messages
        principal = m.Principal(id=principal_id, roles=self._roles[principal_id])
        _copy_values(decide.context, principal.attr)
        resource = m.Resource(kind=decide.resource.kind, id=decide.resource.id)
        _copy_values(decide.resource.attributes, resource.attr)
        entry = m.CheckResourcesRequest.ResourceEntry(
            actions=[decide.action], resource=resource
        )
        request = m.CheckResourcesRequest(principal=principal, resources=[entry])
        return request.SerializeToString()

    def decision_of(self, answer: bytes, action: str) -> str:
        """The Kynara decision a CheckResourcesResponse stands for.

        Any "deny" output denies; else a "require_approval" output requires
        approval; else EFFECT_ALLOW allows; anything else denies.

        Raises:
            ValueError: the answer has no result for ``action``.
        """
        m = self._messages
        response = m.CheckResourcesResponse.FromString(answer)
        if len(response.results) != 1 or action not in response.results[0].actions:
            raise ValueError(f"expected one result for {action!r}, got {response}")
        result = response.results[0]
        outputs = {entry.val.string_value for entry in result.outputs}
        if _DENY_OUTPUT in outputs:
            return "deny"
        if _APPROVAL_OUTPUT in outputs:
            return "require_approval"
        return "allow" if result.actions[action] == m.EFFECT_ALLOW else "deny"


def _copy_values(values: Any, target: Any) -> None:
    for key, value in values.items():
        target[key].CopyFrom(_struct_value(value))


def _struct_value(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    if kind in ("int_value", "uint_value", "double_value"):
        return struct_pb2.Value(number_value=float(getattr(value, kind)))
    if kind == "string_value":
        return struct_pb2.Value(string_value=value.string_value)
    if kind == "bool_value":
        return struct_pb2.Value(bool_value=value.bool_value)
    if kind == "list_value":
        items = [_struct_value(item) for item in value.list_value.values]
        return struct_pb2.Value(list_value=struct_pb2.ListValue(values=items))
    if kind == "map_value":
        out = struct_pb2.Value(struct_value=struct_pb2.Struct())
        for key, item in value.map_value.fields.items():
            out.struct_value.fields[key].CopyFrom(_struct_value(item))
        return out
    raise ValueError(f"a {kind} has no google.protobuf.Value form for Cerbos")


def chain_of(decide: Any, agent_id: str) -> Sequence[str]:
    """The chain Kynara decides for in development mode: the asserted chain
    with the daemon's agent appended."""
    return [*decide.asserted_chain, agent_id]
