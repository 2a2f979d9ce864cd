"""Run each atheris harness for a bounded time; exit non-zero on a finding.

Usage::

    python fuzz/run.py                    # 20 s per target, a fresh seed
    python fuzz/run.py --seconds 60 --seed 1234 --target policy

Each target runs as its own libFuzzer process, started from a corpus of the
shipped good inputs, with ``-max_total_time`` and ``-seed`` so that a run
stops by itself and can be repeated. A Python exception, a contract
violation, an input slower than ``--input-timeout`` seconds or a process
past ``--rss-mb`` is a finding: the runner prints the input as hex, keeps it
under the artifacts directory, and exits 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import secrets
import subprocess
import sys
import tempfile

import targets

__all__ = ["main"]

FUZZ_DIR = pathlib.Path(__file__).resolve().parent
TARGETS = tuple(targets.CHECKS)
DEFAULT_SECONDS = 20
# libFuzzer's per-input limit: every target answers in milliseconds, so an
# input that takes seconds is the hang we are looking for.
DEFAULT_INPUT_TIMEOUT = 10
DEFAULT_RSS_MB = 2048
# Policy and config files are a few KiB; room to grow past the seeds.
MAX_INPUT_BYTES = 8192
# Start-up (imports, corpus load) on top of the fuzzing time.
STARTUP_GRACE_SECONDS = 120
ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=DEFAULT_SECONDS)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--target", action="append", choices=TARGETS)
    parser.add_argument("--artifacts", type=pathlib.Path, default=None)
    parser.add_argument("--input-timeout", type=int, default=DEFAULT_INPUT_TIMEOUT)
    parser.add_argument("--rss-mb", type=int, default=DEFAULT_RSS_MB)
    return parser.parse_args(argv)


def _write_corpus(target: str, directory: pathlib.Path) -> None:
    directory.mkdir(parents=True)
    for index, seed in enumerate(targets.seed_inputs(target)):
        (directory / f"seed-{index}").write_bytes(seed)


def _findings(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        path for path in directory.iterdir() if path.name.startswith(ARTIFACT_PREFIXES)
    )


def _run_target(
    target: str, args: argparse.Namespace, seed: int, work: pathlib.Path
) -> bool:
    corpus = work / f"corpus-{target}"
    artifacts = args.artifacts / target
    artifacts.mkdir(parents=True, exist_ok=True)
    _write_corpus(target, corpus)
    command = [
        sys.executable,
        str(FUZZ_DIR / "harness.py"),
        target,
        f"-max_total_time={args.seconds}",
        f"-seed={seed}",
        f"-timeout={args.input_timeout}",
        f"-rss_limit_mb={args.rss_mb}",
        f"-max_len={MAX_INPUT_BYTES}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        str(corpus),
    ]
    env = dict(os.environ)
    env[targets.WORKDIR_ENV] = str(work)
    log = work / f"{target}.log"
    with log.open("wb") as out:
        try:
            result = subprocess.run(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=args.seconds + STARTUP_GRACE_SECONDS,
                check=False,
            )
            code = result.returncode
        except subprocess.TimeoutExpired:
            # subprocess.run has killed its own child; report it as a hang.
            code = None
    output = log.read_text(errors="replace").splitlines()
    found = _findings(artifacts)
    if code == 0 and not found:
        runs = [line for line in output if "stat::number_of_executed_units" in line]
        print(f"{target}: ok, {runs[-1].split(':')[-1].strip() if runs else '?'} runs")
        return True
    print(f"{target}: FINDING (exit {code})")
    print("\n".join(f"  | {line}" for line in output[-40:]))
    for path in found:
        print(f"  input {path} ({path.stat().st_size} bytes), hex:")
        print(f"  {path.read_bytes().hex()}")
        print(f"  reproduce: {sys.executable} {FUZZ_DIR}/harness.py {target} {path}")
    return False


def main(argv: list[str] | None = None) -> int:
    """Run the chosen targets; return 0 when none found anything, else 1."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31 - 1) + 1
    chosen = args.target or list(TARGETS)
    with tempfile.TemporaryDirectory(prefix="kynara-fuzz-") as tmp:
        work = pathlib.Path(tmp)
        args.artifacts = args.artifacts or pathlib.Path(
            tempfile.mkdtemp(prefix="kynara-fuzz-artifacts-")
        )
        print(
            f"fuzz: {args.seconds} s per target ({', '.join(chosen)}), "
            f"seed {seed}, artifacts in {args.artifacts}",
            flush=True,
        )
        results = [_run_target(target, args, seed, work) for target in chosen]
    if all(results):
        _remove_empty(args.artifacts)
        return 0
    return 1


def _remove_empty(directory: pathlib.Path) -> None:
    for child in directory.iterdir():
        if child.is_dir() and not any(child.iterdir()):
            child.rmdir()
    if not any(directory.iterdir()):
        directory.rmdir()


if __name__ == "__main__":
    sys.exit(main())
