"""The committed Python stubs match the protos."""

from __future__ import annotations

import importlib.util
import pathlib

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


def catalogue(enum_name: str, prefix: str) -> set[str]:
    values = decision_pb2.DESCRIPTOR.enum_types_by_name[enum_name].values
    return {v.name.removeprefix(prefix).lower() for v in values} - {"unspecified"}


def test_error_codes_match_proto_catalogue():
    assert {str(c) for c in ErrorCode} == catalogue("ErrorCode", "ERROR_CODE_")


def test_reason_codes_match_proto_catalogue():
    assert {str(c) for c in ReasonCode} == catalogue("ReasonCode", "REASON_CODE_")
