"""Generate the Python stubs for the Kynara gRPC contract.

Run ``python protos/generate.py`` after editing a ``.proto`` file. The stubs
are committed so that installing the SDK needs no protoc; a test regenerates
them into a temporary directory and fails when the committed ones are stale.
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

__all__ = ["PROTO_ROOT", "generate"]

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT / "python"


def generate(out_dir: pathlib.Path = DEFAULT_OUT) -> list[pathlib.Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_dir``.

    Returns the generated files. Raises ``RuntimeError`` when protoc fails.
    """
    sources = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("kynara/**/*.proto")
    )
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *sources,
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} for {sources}")
    return sorted(p for p in out_dir.rglob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(PROTO_ROOT))
    sys.exit(0)
