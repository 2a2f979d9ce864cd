"""The committed Python stubs match the protos, as the pinned generator
writes them, for the oldest protobuf and grpcio the packages declare."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import tomllib

from kynara.v1 import decision_pb2

from kynara_sidecar.errors import ErrorCode, ReasonCode

ROOT = pathlib.Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "generate", ROOT / "protos" / "generate.py"
)
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)


def test_committed_stubs_are_not_stale(tmp_path):
    fresh = generate.generate(tmp_path)

    stale = [
        str(path.relative_to(tmp_path))
        for path in fresh
        if path.read_bytes()
        != (ROOT / "protos" / "python" / path.relative_to(tmp_path)).read_bytes()
    ]
    assert fresh
    assert stale == [], "run: python protos/generate.py"


def declared_floor(pyproject: pathlib.Path, package: str, extra: str = "") -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = (
        project["optional-dependencies"][extra] if extra else project["dependencies"]
    )
    for requirement in requirements:
        found = re.fullmatch(rf"{package}>=([\d.]+),<\d+", requirement)
        if found:
            return found.group(1)
    raise AssertionError(f"{pyproject}: no {package}>=X,<Y in {requirements}")


def test_stubs_run_on_the_oldest_protobuf_and_grpcio_declared():
    stubs = ROOT / "protos" / "python" / "kynara" / "v1"
    gencode = re.search(
        r"Protobuf Python Version: (\d+\.\d+)\.",
        (stubs / "decision_pb2.py").read_text(),
    )
    grpc_generated = re.search(
        r"GRPC_GENERATED_VERSION = '([\d.]+)'",
        (stubs / "decision_pb2_grpc.py").read_text(),
    )
    protos = ROOT / "protos" / "pyproject.toml"
    sdk = ROOT / "clients" / "python" / "pyproject.toml"

    # autogen-core pins protobuf 5.29: the gencode must not ask for more.
    assert gencode.group(1) == "5.29"
    assert declared_floor(protos, "protobuf") == "5.29"
    assert declared_floor(sdk, "protobuf", "grpc") == "5.29"
    assert grpc_generated.group(1) == declared_floor(protos, "grpcio")
    assert grpc_generated.group(1) == declared_floor(sdk, "grpcio", "grpc")


def catalogue(enum_name: str, prefix: str) -> set[str]:
    values = decision_pb2.DESCRIPTOR.enum_types_by_name[enum_name].values
    return {v.name.removeprefix(prefix).lower() for v in values} - {"unspecified"}


def test_error_codes_match_proto_catalogue():
    assert {str(c) for c in ErrorCode} == catalogue("ErrorCode", "ERROR_CODE_")


def test_reason_codes_match_proto_catalogue():
    assert {str(c) for c in ReasonCode} == catalogue("ReasonCode", "REASON_CODE_")
