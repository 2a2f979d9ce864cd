"""The ``kynara-sidecar`` command.

Examples:
    kynara-sidecar run --config config/kynara.yaml
    kynara-sidecar run --config config/kynara.yaml --set audit.durability=deferred
    kynara-sidecar verify --config config/kynara.yaml
    kynara-sidecar verify --audit var/audit
    kynara-sidecar check config/policies
    kynara-sidecar test config/policies
    kynara-sidecar explain --request req.yaml --policies config/policies
    kynara-sidecar replay --policies candidate/ --audit var/audit
    kynara-sidecar keygen --out /etc/kynara/keys
"""

from __future__ import annotations

import argparse
import sys

from kynara_sidecar.config import DEFAULT_CONFIG_ENV, load_config
from kynara_sidecar.errors import ConfigError, KynaraError
from kynara_sidecar.logs import LOG_LEVELS, configure_logging

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"daemon config YAML (default: ${DEFAULT_CONFIG_ENV})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=[],
        help="override one config key, e.g. --set audit.durability=deferred",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kynara-sidecar",
        description="The Kynara permission daemon for AI agents.",
        epilog=__doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve decisions until SIGTERM")
    _add_config_args(run)

    verify = commands.add_parser(
        "verify", help="walk the audit hash chain and name the first bad record"
    )
    _add_config_args(verify)
    verify.add_argument("--audit", metavar="DIR", help="audit log directory")

    check = commands.add_parser("check", help="load and compile a policy directory")
    check.add_argument("policies", metavar="DIR")

    test = commands.add_parser(
        "test",
        help="run the policy tests in every DIR/**/tests/ against the policies "
        "beside them",
    )
    test.add_argument("policies", metavar="DIR")

    explain = commands.add_parser(
        "explain", help="decide one request file and show every rule's part in it"
    )
    _add_config_args(explain)
    explain.add_argument(
        "--request", metavar="FILE", required=True, help="request YAML"
    )
    explain.add_argument(
        "--policies",
        metavar="DIR",
        help="policy directory (default: the config's policy.source)",
    )

    replay = commands.add_parser(
        "replay", help="re-decide logged requests against candidate policies"
    )
    replay.add_argument(
        "--policies", metavar="DIR", required=True, help="candidate policy directory"
    )
    replay.add_argument(
        "--audit",
        metavar="DIR",
        required=True,
        help="audit log directory (read-only; may be in use by a daemon)",
    )
    replay.add_argument(
        "--against",
        choices=("recorded", "original"),
        default="recorded",
        help="compare with the recorded decision, or with the record's own "
        "policy set re-evaluated",
    )

    keygen = commands.add_parser(
        "keygen",
        help="make the audit signing key pair (audit-key.pem, audit-key.pub)",
    )
    keygen.add_argument(
        "--out",
        metavar="DIR",
        required=True,
        help="directory for the key files (created if missing; never overwritten)",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    import uvloop

    from kynara_sidecar.daemon import Daemon

    config = load_config(args.config, args.overrides)
    uvloop.run(Daemon(config).run())
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from kynara_sidecar.audit.verify import format_report, verify_log

    path = args.audit or load_config(args.config, args.overrides).audit.path
    report = verify_log(path)
    print(format_report(report))
    return EXIT_OK if report.ok else EXIT_FAILED


def _check(args: argparse.Namespace) -> int:
    import pathlib

    from kynara_sidecar.policy.loader import load_policies

    loaded = load_policies(pathlib.Path(args.policies))
    print(
        f"ok: policy {loaded.policy_set.revision}, "
        f"directory {loaded.directory.revision}"
    )
    return EXIT_OK


def _test(args: argparse.Namespace) -> int:
    import pathlib

    from kynara_sidecar.policy_tests import (
        find_policy_roots,
        format_report,
        run_policy_tests,
    )

    directory = pathlib.Path(args.policies)
    roots = find_policy_roots(directory) or [directory]
    passed = True
    for root in roots:
        report = run_policy_tests(root)
        print(f"{root}:\n{format_report(report)}")
        passed = passed and report.passed
    return EXIT_OK if passed else EXIT_FAILED


def _explain(args: argparse.Namespace) -> int:
    import pathlib

    from kynara_sidecar.policy.loader import load_policies
    from kynara_sidecar.policy_tests import decide, format_explanation, load_request

    policies = args.policies or load_config(args.config, args.overrides).policy.path
    loaded = load_policies(pathlib.Path(policies))
    request = load_request(pathlib.Path(args.request))
    print(format_explanation(decide(loaded, request, explain=True)))
    return EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    from kynara_sidecar.replay import replay_main

    return replay_main(args.policies, args.audit, baseline=args.against)


def _keygen(args: argparse.Namespace) -> int:
    import pathlib

    from kynara_sidecar.audit.keys import (
        generate_key,
        save_public_key,
        save_signing_key,
    )

    out = pathlib.Path(args.out)
    private, public = out / "audit-key.pem", out / "audit-key.pub"
    # Checked before writing either file, so a refusal never leaves half a
    # pair; the O_EXCL writes still guard against a race.
    for path in (private, public):
        if path.exists():
            raise ConfigError(
                f"{path}: already exists; expected a directory without audit "
                "key files (keys are never overwritten)"
            )
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{out}: cannot create key directory: {err}") from err
    key = generate_key()
    save_signing_key(key, private)
    save_public_key(key.public(), public)
    print(f"private key: {private}\npublic key: {public}\nkey id: {key.key_id}")
    return EXIT_OK


COMMANDS = {
    "replay": _replay,
    "run": _run,
    "verify": _verify,
    "check": _check,
    "test": _test,
    "explain": _explain,
    "keygen": _keygen,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except KynaraError as err:
        print(f"kynara-sidecar {args.command}: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
