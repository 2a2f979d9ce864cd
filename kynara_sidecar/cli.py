"""The ``kynara-sidecar`` command.

Examples:
    kynara-sidecar run --config config/kynara.yaml
    kynara-sidecar run --config config/kynara.yaml --set audit.durability=deferred
    kynara-sidecar verify --config config/kynara.yaml
    kynara-sidecar verify --audit var/audit
    kynara-sidecar check config/policies
"""

from __future__ import annotations

import argparse
import sys

from kynara_sidecar.config import DEFAULT_CONFIG_ENV, load_config
from kynara_sidecar.errors import KynaraError
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


COMMANDS = {"run": _run, "verify": _verify, "check": _check}


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
