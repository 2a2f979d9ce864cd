"""Generate the Python stubs for the Kynara gRPC contract.

Run ``python protos/generate.py`` (with any Python) after editing a
``.proto`` file. The stubs are committed so that installing the SDK needs no
protoc; a test regenerates them into a temporary directory and fails when
the committed ones are stale.

The generator is pinned (``GRPC_TOOLS``): grpcio-tools 1.70 bundles a protoc
that writes protobuf 5.29 gencode, which runs on every protobuf the SDK's
gRPC extra allows (5.29, which autogen-core pins, up to 7), and its
``_pb2_grpc.py`` asks for grpcio 1.70 or later. It runs in a venv of its own,
``.venvs/protoc`` (made by ``scripts/setup --test``, or here on first use),
since the daemon's venv holds a newer grpcio-tools whose stubs refuse
protobuf 5.29.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

__all__ = ["GRPC_TOOLS", "PROTOC_VENV", "PROTO_ROOT", "generate", "protoc_python"]

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT / "python"
# Keep in step with scripts/setup, which makes the same venv.
GRPC_TOOLS = "grpcio-tools==1.70.*"
PROTOC_VENV = PROTO_ROOT.parent / ".venvs" / "protoc"
_STAMP = PROTOC_VENV / ".kynara-installed"


def protoc_python() -> pathlib.Path:
    """The Python of ``.venvs/protoc``, made with ``GRPC_TOOLS`` when it is
    missing or holds another pin.

    Raises:
        RuntimeError: the venv cannot be made (no network to the package
            index, ...); the message says what failed.
    """
    python = PROTOC_VENV / "bin" / "python"
    if python.exists() and _STAMP.exists() and _STAMP.read_text().strip() == GRPC_TOOLS:
        return python
    print(
        f"generate.py: making {PROTOC_VENV} with {GRPC_TOOLS} (once)",
        file=sys.stderr,
    )
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(PROTOC_VENV)],
        [str(python), "-m", "pip", "install", "--quiet", GRPC_TOOLS],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"cannot make {PROTOC_VENV}: {' '.join(step)} failed:"
                f" {done.stderr.strip()[-2000:]}"
            )
    _STAMP.write_text(GRPC_TOOLS + "\n")
    return python


def generate(out_dir: pathlib.Path = DEFAULT_OUT) -> list[pathlib.Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_dir``
    with the pinned generator.

    Returns the generated files. Raises ``RuntimeError`` when protoc fails or
    its venv cannot be made.
    """
    python = protoc_python()
    if pathlib.Path(sys.prefix).resolve() != PROTOC_VENV.resolve():
        done = subprocess.run(
            [str(python), __file__, "--out", str(out_dir)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed: {done.stderr.strip()[-2000:]}")
        return _generated(out_dir)
    return _run_protoc(out_dir)


def _run_protoc(out_dir: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc

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
    return _generated(out_dir)


def _generated(out_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p for p in out_dir.rglob("*_pb2*.py*") if "__pycache__" not in p.parts
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    for path in generate(out):
        print(path.relative_to(out))
    sys.exit(0)
