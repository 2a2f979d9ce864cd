"""atheris harness: request bytes through decode, translate and validate.

Run it through ``fuzz/run.py``, or by hand on one input to reproduce a
finding: ``python fuzz/harness_request.py crash-<hash>``.
"""

from __future__ import annotations

import sys

import atheris

# Coverage feedback from our code and the parsers it leans on.
with atheris.instrument_imports(include=["kynara_sidecar", "yaml", "tomllib"]):
    import targets

__all__ = ["main"]


def main() -> None:
    """Hand control to libFuzzer with the command line's flags."""
    atheris.Setup(sys.argv, targets.check_request)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
