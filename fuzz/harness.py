"""atheris harness for one fuzz target: request, policy or config.

Run it through ``fuzz/run.py``, or by hand on one input to reproduce a
finding: ``python fuzz/harness.py policy crash-<hash>``. Arguments after the
target are libFuzzer's.
"""

from __future__ import annotations

import sys

import atheris

# Coverage feedback from our code and the parsers it leans on.
with atheris.instrument_imports(include=["kynara_sidecar", "yaml", "tomllib"]):
    import targets

__all__ = ["main"]


def main() -> None:
    """Hand control to libFuzzer with the target's check and the flags."""
    if len(sys.argv) < 2 or sys.argv[1] not in targets.CHECKS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(targets.CHECKS)}}} [flags]")
    check = targets.CHECKS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
