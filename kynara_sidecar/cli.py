"""The ``kynara-sidecar`` command.

Examples:
    kynara-sidecar run --config config/kynara.yaml
    kynara-sidecar run --config config/kynara.yaml --set audit.durability=deferred
    kynara-sidecar gateway --config config/kynara.yaml   # MCP over stdio
    kynara-sidecar gateway --list-tools --config config/kynara.yaml
    kynara-sidecar verify --config config/kynara.yaml
    kynara-sidecar verify var/audit --trusted-key audit-key.pub --witness /mnt/w
    kynara-sidecar check config/policies
    kynara-sidecar test config/policies
    kynara-sidecar explain --request req.yaml --policies config/policies
    kynara-sidecar replay --policies candidate/ --audit var/audit
    kynara-sidecar keygen --out /etc/kynara/keys
    kynara-sidecar prove head var/audit
    kynara-sidecar prove record var/audit --decision-id 01J... --tree-size 2048
    kynara-sidecar prove consistency var/audit 1024 2048
    kynara-sidecar new-chain --config config/kynara.yaml
    kynara-sidecar export --config config/kynara.yaml \
        --from 2026-12-01T00:00:00Z --to 2026-12-31T23:59:59Z evidence/
    kynara-sidecar verify-export evidence/ --trusted-key audit-key.pub \
        --publisher-key directory-key.pub --publisher-key bundle-key.pub
    kynara-sidecar bundle build config/policies --key bundle-key.pem --out b.tar
    kynara-sidecar bundle verify b.tar --trusted-key bundle-key.pub
    kynara-sidecar bundle publish b.tar --store nats://127.0.0.1:4222 \
        --trusted-key bundle-key.pub
    kynara-sidecar sync now --config config/kynara.yaml \
        --credential-file var/secrets/operator
    kynara-sidecar sync ship --wait 20 --config config/kynara.yaml \
        --credential-file var/secrets/operator
    kynara-sidecar fleet status --store nats://127.0.0.1:4222
    kynara-sidecar approvals list --config config/kynara.yaml \
        --credential-file var/secrets/carol
    kynara-sidecar approvals approve apr_... --comment "customer verified"
    kynara-sidecar fleet status --store dir:///srv/kynara-store --json
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import typing

from kynara_sidecar.config import (
    DEFAULT_BUNDLE_CLOCK_SKEW_SECONDS,
    DEFAULT_CONFIG_ENV,
    Config,
    host_port,
    load_config,
)
from kynara_sidecar.entry import ignore_hangup, restore_hangup
from kynara_sidecar.errors import ConfigError, KynaraError
from kynara_sidecar.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from kynara_sidecar.server._visible import visible_text

if typing.TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from kynara_sidecar.audit.keys import PublicKey
    from kynara_sidecar.decision import Timestamp
    from kynara_sidecar.sync import BundleEntry
    from kynara_sidecar.sync.bundle import VerifiedBundle

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


def _add_log_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="log lines as json objects or as text (default: log.format in "
        "the config, json; this overrides it)",
    )


def _daemon_config(args: argparse.Namespace) -> tuple[Config, Callable[[], Config]]:
    """The config of ``run`` and ``gateway``, logging set up from it, and
    the loader a SIGHUP calls: the same file with the same overrides, the
    log flags among them (they keep winning over the file).

    Start reads and checks every file the config names; a reload checks the
    values only. The certificates and keys it names are restart-only (the
    served certificate is watched on its own), and the admin secrets, the
    one kind a reload applies, the daemon reads itself.
    """
    overrides = list(args.overrides)
    if args.log_level:
        overrides.append(f"log.level={args.log_level}")
    if args.log_format:
        overrides.append(f"log.format={args.log_format}")
    path = args.config

    def reload() -> Config:
        return load_config(path, overrides, read_files=False)

    config = load_config(path, overrides)
    configure_logging(config.log.level, config.log.format)
    return config, reload


def _add_trusted_keys(
    parser: argparse.ArgumentParser, text: str, *, required: bool = False
) -> None:
    parser.add_argument(
        "--trusted-key",
        dest="trusted_keys",
        metavar="FILE",
        action="append",
        default=[],
        required=required,
        help=text,
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kynara-sidecar",
        description="The Kynara permission daemon for AI agents.",
        epilog=__doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="lowest level logged (default info; for run and gateway, "
        "log.level in the config, which this overrides)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="serve decisions until SIGTERM; SIGHUP reloads"
    )
    _add_config_args(run)
    _add_log_format(run)

    gateway = commands.add_parser(
        "gateway",
        help="run the daemon with the MCP gateway on stdin/stdout, for one "
        "agent that starts it as its MCP server (gateway.stdio)",
    )
    _add_config_args(gateway)
    _add_log_format(gateway)
    gateway.add_argument(
        "--list-tools",
        action="store_true",
        help="connect to gateway.servers, print each upstream tool's names "
        "(exposed, action, resource id) and how many enforced rules name it, "
        "one JSON object a line, and exit; starts no daemon and writes no "
        "audit record",
    )

    verify = commands.add_parser(
        "verify",
        help="check the audit log's chain, Merkle tree, signed checkpoints and "
        "witness, and name the first problem",
    )
    _add_config_args(verify)
    verify.add_argument(
        "audit_path",
        nargs="?",
        metavar="AUDIT_PATH",
        help="audit log directory (default: the config's audit.path)",
    )
    verify.add_argument(
        "--audit", metavar="DIR", help="audit log directory (same as AUDIT_PATH)"
    )
    _add_trusted_keys(
        verify,
        "a public key file to trust, besides the config's audit.trusted_keys "
        "and signing keys; repeatable",
    )
    verify.add_argument(
        "--witness",
        metavar="DIR",
        help="the witness location (default: the config's audit.witness_path)",
    )

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
        help="make an Ed25519 key pair: the audit signing key (audit-key.pem, "
        "audit-key.pub) or, with --name, a bundle signing key",
    )
    keygen.add_argument(
        "--out",
        metavar="DIR",
        required=True,
        help="directory for the key files (created if missing; never overwritten)",
    )
    keygen.add_argument(
        "--name",
        default="audit-key",
        metavar="NAME",
        help="file name stem: NAME.pem and NAME.pub (default audit-key), e.g. "
        "bundle-key for the policy publisher's key",
    )
    _add_prove_parser(commands)
    _add_export_parsers(commands)
    _add_bundle_parser(commands)
    _add_sync_parser(commands)
    _add_fleet_parser(commands)
    _add_approvals_parser(commands)
    new_chain = commands.add_parser(
        "new-chain",
        help="move a log that fails verification aside and start a new one "
        "whose first record names the break (stop the daemon first)",
    )
    _add_config_args(new_chain)
    new_chain.add_argument(
        "--force",
        action="store_true",
        help="start a new chain without verifying the old log first (when it "
        "verifies, or is too damaged to walk)",
    )
    return parser


def _add_prove_parser(commands: argparse._SubParsersAction) -> None:
    prove = commands.add_parser(
        "prove",
        help="print a checkpoint, an inclusion proof or a consistency proof as "
        "JSON (read-only; works beside a running daemon)",
    )
    kinds = prove.add_subparsers(dest="prove_command", required=True)
    head = kinds.add_parser("head", help="the latest checkpoint and the log's size")
    head.add_argument("audit", metavar="AUDIT_PATH", help="audit log directory")
    record = kinds.add_parser(
        "record", help="a record and its inclusion proof against a checkpoint"
    )
    record.add_argument("audit", metavar="AUDIT_PATH", help="audit log directory")
    which = record.add_mutually_exclusive_group(required=True)
    which.add_argument("--seq", type=int, metavar="N", help="the record's seq")
    which.add_argument("--decision-id", metavar="ID", help="its decision id")
    record.add_argument(
        "--tree-size",
        type=int,
        default=0,
        metavar="N",
        help="prove against the checkpoint of this tree size (default: latest)",
    )
    consistency = kinds.add_parser(
        "consistency", help="the consistency proof between two checkpoints"
    )
    consistency.add_argument("audit", metavar="AUDIT_PATH", help="audit log directory")
    consistency.add_argument("old", type=int, metavar="OLD", help="older tree size")
    consistency.add_argument("new", type=int, metavar="NEW", help="newer tree size")


class _IntermixedParser(argparse.ArgumentParser):
    """Takes positionals between options (``export AUDIT --from T OUT``).

    Plain argparse consumes all positionals at the first run of them, so an
    optional AUDIT_PATH there would leave OUT unrecognised.
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _add_export_parsers(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write an evidence pack (records of whole sealed segments, "
        "checkpoints, proofs, keys, policy sets) an auditor verifies offline",
    )
    # NOTE: the subparsers action fixes one parser class for all commands.
    export.__class__ = _IntermixedParser
    _add_config_args(export)
    export.add_argument(
        "audit",
        nargs="?",
        metavar="AUDIT_PATH",
        help="audit log directory (instead of --config; then only --key "
        "files go into the pack)",
    )
    export.add_argument(
        "out",
        metavar="OUT",
        help="new or empty pack directory (its parent must exist)",
    )
    export.add_argument(
        "--from", dest="start", required=True, metavar="T1", help="RFC 3339 time"
    )
    export.add_argument(
        "--to", dest="stop", required=True, metavar="T2", help="RFC 3339 time"
    )
    export.add_argument(
        "--key",
        dest="keys",
        metavar="FILE",
        action="append",
        default=[],
        help="a public key file to put in the pack as well; repeatable",
    )
    verify_export = commands.add_parser(
        "verify-export", help="check an evidence pack, as its verify_pack.py does"
    )
    verify_export.add_argument("pack", metavar="OUT", help="the pack directory")
    _add_trusted_keys(
        verify_export,
        "an audit public key to trust for the checkpoints instead of the pack's "
        "own; repeatable",
    )
    verify_export.add_argument(
        "--publisher-key",
        dest="publisher_keys",
        metavar="FILE",
        action="append",
        default=[],
        help="a public key of a policy bundle or directory update signer; checks "
        "only the pack's signed updates, never its checkpoints; repeatable",
    )


def _add_bundle_parser(commands: argparse._SubParsersAction) -> None:
    bundle = commands.add_parser(
        "bundle", help="build or verify a signed policy bundle"
    )
    kinds = bundle.add_subparsers(dest="bundle_command", required=True)
    build = kinds.add_parser(
        "build", help="pack and sign a policy directory as one bundle file"
    )
    build.add_argument("policies", metavar="POLICY_DIR", help="policy directory")
    build.add_argument(
        "--key", required=True, metavar="KEY.pem", help="Ed25519 private key (PEM)"
    )
    build.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="new bundle file (never overwritten)",
    )
    verify = kinds.add_parser(
        "verify", help="check a bundle's signature, hashes and policies"
    )
    verify.add_argument("bundle", metavar="FILE", help="the bundle file")
    _add_trusted_keys(
        verify,
        "a public key to trust (PEM or base64url file); repeatable",
        required=True,
    )
    publish = kinds.add_parser(
        "publish", help="make a bundle file the current bundle of a central store"
    )
    publish.add_argument("bundle", metavar="FILE", help="the bundle file")
    publish.add_argument(
        "--store",
        required=True,
        metavar="URL",
        help="dir:///srv/kynara-store or nats://127.0.0.1:4222",
    )
    _add_nats_settings(publish)
    _add_trusted_keys(
        publish,
        "verify against this public key before publishing; repeatable",
    )
    publish.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long the store may take to answer (default 5)",
    )
    publish.add_argument(
        "--force",
        action="store_true",
        help="publish a bundle created before the store's current one (a "
        "deliberate rollback; daemons then need `sync now --force`)",
    )


# The operator secret `sync now` sends when --credential-file is not given.
ADMIN_SECRET_ENV = "KYNARA_ADMIN_SECRET"
# A sync verifies and compiles a bundle, and a store may be slow to answer:
# wait longer than sync.timeout_seconds before giving up on the daemon.
SYNC_NOW_TIMEOUT_SECONDS = 120.0


def _add_sync_parser(commands: argparse._SubParsersAction) -> None:
    sync = commands.add_parser(
        "sync",
        help="policy bundle and signed directory sync on a running daemon "
        "(admin listener)",
    )
    kinds = sync.add_subparsers(dest="sync_command", required=True)
    now = kinds.add_parser(
        "now",
        help="make the daemon fetch its bundle (and signed directory) now; "
        "print the outcome as JSON",
        description=(
            "Call SyncService.SyncNow on the daemon's admin listener (admin.socket, "
            "else admin.port from the config) with an operator credential. Prints "
            "the bundle's {outcome, revision, previous_revision, error, digest} "
            "and, when the daemon follows a signed directory (directory.store), "
            "the directory's own under 'directory' (synced first); exits 0 when "
            "each was activated or unchanged, 1 when either was refused or its "
            "source unreachable. Without bundles (policy.source a directory) the "
            "bundle's outcome is empty and only the directory counts."
        ),
    )
    _add_config_args(now)
    now.add_argument(
        "--force",
        action="store_true",
        help="take a bundle or signed directory created before the active one "
        "(a deliberate rollback)",
    )
    now.add_argument(
        "--credential-file",
        metavar="FILE",
        help=f"file holding an operator's admin secret (default: ${ADMIN_SECRET_ENV},"
        " the secret itself)",
    )
    _add_admin_tls_args(now)
    ship = kinds.add_parser(
        "ship",
        help="make the daemon seal its audit segment and ship it to the store",
        description=(
            "Call SyncService.ShipNow on the daemon's admin listener with an "
            "operator credential: the open audit segment is sealed and every "
            "sealed segment shipped to the central store, waiting up to --wait "
            "seconds for its acknowledgement (a Kubernetes preStop hook runs "
            "this). Prints {sealed_tree_size, shipped_segments, backlog_records, "
            "shipped_tree_size}; exits 0 when the store acknowledged every "
            "sealed record, 1 when it did not in time or the daemon ships "
            "nothing."
        ),
    )
    _add_config_args(ship)
    ship.add_argument(
        "--wait",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="how long to wait for the store (default: sync.timeout_seconds)",
    )
    ship.add_argument(
        "--credential-file",
        metavar="FILE",
        help=f"file holding an operator's admin secret (default: ${ADMIN_SECRET_ENV},"
        " the secret itself)",
    )
    _add_admin_tls_args(ship)


def _run(args: argparse.Namespace) -> int:
    import logging

    from kynara_sidecar.daemon import run_daemon

    config, reload_config = _daemon_config(args)
    if not run_daemon(config, reload_config=reload_config):
        # The audit log is closed; threads stuck in a store call (a hung
        # mount) would hold the interpreter's exit forever.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def _gateway(args: argparse.Namespace) -> int:
    """The daemon, serving the MCP gateway over stdio until the agent
    closes stdin (or SIGTERM)."""
    import logging

    from kynara_sidecar.daemon import run_daemon
    from kynara_sidecar.gateway.stdio import StdioWire

    config, reload_config = _daemon_config(args)
    if args.list_tools:
        return _list_gateway_tools(config)
    # Before anything else can write to stdout: it is the agent's wire now.
    wire = StdioWire.claim()
    if not run_daemon(config, stdio=wire, reload_config=reload_config):
        logging.shutdown()
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def _list_gateway_tools(config: Config) -> int:
    """Print every upstream tool's names and rule count, one JSON line each.

    The names are the ones the gateway will use (exposed to agents, action
    and resource id for policies); ``rules`` counts the enforced rules (not
    shadow) whose action and resource kind patterns match, whatever their
    roles and conditions: 0 means no policy names the tool, so every agent
    is denied it. Only the upstream connections are started: no listener,
    no audit log.

    Raises:
        ConfigError: no upstreams, a policy source that cannot be read here
            (a store), two tools with one name, or an upstream unreachable.
        PolicyError: the policies do not load.
    """
    import asyncio

    import msgspec

    from kynara_sidecar.gateway.catalog import Catalog
    from kynara_sidecar.gateway.names import RESOURCE_KIND

    servers = config.gateway.servers
    if not servers:
        raise ConfigError(
            "gateway.servers: expected at least one upstream MCP server to "
            "list the tools of, got none"
        )
    policy_set = _gateway_policies(config).policy_set

    async def connect() -> list[dict[str, object]]:
        reached: set[str] = set()
        catalog = Catalog(servers, on_change=reached.add)
        await catalog.start()
        try:
            missing = sorted(set(servers) - reached)
            if missing:
                raise ConfigError(
                    f"gateway.servers: upstream {', '.join(map(repr, missing))} "
                    "could not be reached (the error is logged above); its tools "
                    "cannot be listed"
                )
            return [
                {
                    "exposed": tool.name.exposed,
                    "server": tool.name.server,
                    "tool": tool.name.tool,
                    "action": tool.name.action,
                    "resource_id": tool.name.resource_id,
                    "rules": sum(
                        not rule.shadow
                        for rule in policy_set.candidate_rules(
                            RESOURCE_KIND, tool.name.action
                        )
                    ),
                }
                for tool in catalog.tools()
            ]
        finally:
            await catalog.stop()

    for row in asyncio.run(connect()):
        print(msgspec.json.encode(row).decode())
    return EXIT_OK


def _gateway_policies(config: Config):
    """The policies ``policy.source`` names, loaded as the daemon loads them:
    a directory (unsigned) or a bundle file verified with
    ``policy.trusted_keys``. A store is not read here.

    Raises:
        ConfigError: the source is a store, or a bundle file cannot be read.
        PolicyError, BundleError: the policies do not load or verify.
    """
    from kynara_sidecar.policy.loader import load_policies

    policy = config.policy
    if policy.store:
        raise ConfigError(
            f"policy.source: --list-tools reads a policy directory or bundle "
            f"file, got the store {policy.store!r}; name a local copy with "
            "--set policy.source=DIR"
        )
    if not policy.signed:
        return load_policies(policy.path)
    from kynara_sidecar.audit.keys import load_trusted_keys
    from kynara_sidecar.sync import bundle

    trusted = load_trusted_keys(policy.trusted_keys)
    return bundle.verify_bundle(bundle.read_bundle(policy.path), trusted).policies


def _verify(args: argparse.Namespace) -> int:
    from kynara_sidecar.audit.keys import load_trusted_keys
    from kynara_sidecar.audit.startup import configured_public_keys
    from kynara_sidecar.audit.verify import format_report, verify_log

    if args.audit_path and args.audit:
        raise _UsageError(
            f"two audit logs given: AUDIT_PATH {args.audit_path} and --audit "
            f"{args.audit}; expected one of them"
        )
    path = args.audit_path or args.audit
    config = _config_unless_path(
        args,
        path,
        "no audit log given: name it with AUDIT_PATH (or --audit DIR), or give "
        f"{_GIVE_CONFIG} to verify its audit.path",
    )
    trusted = load_trusted_keys(args.trusted_keys)
    witness = args.witness
    origin = None
    if config is not None:
        from kynara_sidecar.daemon import with_daemon_id

        trusted = {**configured_public_keys(config.audit), **trusted}
        path = path or config.audit.path
        witness = witness or config.audit.witness_path or None
        # A log that names no origin yet (empty) is still this daemon's.
        origin = with_daemon_id(config).identity.daemon_id
    if not trusted:
        raise _UsageError(
            "no trusted key: give one with --trusted-key FILE, or set "
            "audit.trusted_keys (or audit.signing_key) in --config; a "
            "checkpoint's signature means nothing without a key to check it by"
        )
    # A witness named here, or in the config, is meant to hold this log's
    # checkpoints: one holding nothing (mistyped, emptied) is a failure.
    report = verify_log(
        path, trusted, witness, origin=origin, require_witness=bool(witness)
    )
    print(format_report(report))
    return EXIT_OK if report.ok else EXIT_FAILED


class _UsageError(Exception):
    """The command line asks for something impossible or ambiguous: exit 2."""


# Without a config file, validation fails on its first required key
# (identity.agent_id), which says nothing about what the command lacks.
_GIVE_CONFIG = f"--config FILE (or set ${DEFAULT_CONFIG_ENV})"


def _config_unless_path(
    args: argparse.Namespace, path: str | None, without: str
) -> Config | None:
    """The config, loaded when ``--config`` or ``--set`` is given or there is
    no ``path``; ``None`` when ``path`` alone will do.

    Raises:
        _UsageError: a config is needed and neither ``--config`` nor
            ``$KYNARA_CONFIG`` names one; ``without`` is the message when
            there is no ``path`` either.
    """
    if path and not (args.config or args.overrides):
        return None
    if not (args.config or os.environ.get(DEFAULT_CONFIG_ENV)):
        if path:
            raise _UsageError(f"--set needs a config to change: give {_GIVE_CONFIG}")
        raise _UsageError(without)
    # A client of the daemon: it reads only its own credential and trust
    # roots, never the daemon's secrets, keys or certificates.
    return _client_config(args)


def _client_config(args: argparse.Namespace) -> Config:
    """The daemon's config as a command other than ``run`` needs it: the
    values checked, no secret, key or certificate file read (see
    ``load_config``'s ``read_files``)."""
    return load_config(args.config, args.overrides, read_files=False)


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
    from kynara_sidecar.policy_tests import (
        decide,
        format_explanation,
        load_request,
        look_limits,
    )

    policies = args.policies or _client_config(args).policy.path
    loaded = load_policies(pathlib.Path(policies))
    request = load_request(pathlib.Path(args.request))
    seen = look_limits(loaded, request)
    decision = decide(loaded, request, explain=True, limits=seen)
    print(format_explanation(decision, seen))
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
    from kynara_sidecar.audit.startup import public_key_path

    out = pathlib.Path(args.out)
    if not args.name or pathlib.Path(args.name).name != args.name:
        raise ConfigError(
            f"--name: expected a file name without a directory, got {args.name!r}"
        )
    private = out / f"{args.name}.pem"
    public = public_key_path(private)
    # Checked before writing either file, so a refusal never leaves half a
    # pair; the O_EXCL writes still guard against a race.
    for path in (private, public):
        if path.exists():
            raise ConfigError(
                f"{path}: already exists; expected a directory without "
                f"{args.name} key files (keys are never overwritten)"
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


def _prove(args: argparse.Namespace) -> int:
    import msgspec

    from kynara_sidecar.audit import prove
    from kynara_sidecar.audit.store import AuditStore

    store = AuditStore.open(args.audit, readonly=True)
    try:
        if args.prove_command == "head":
            out = prove.head_json(prove.prove_head(store))
        elif args.prove_command == "record":
            proof = prove.prove_record(
                store,
                seq=args.seq or 0,
                decision_id=args.decision_id or "",
                tree_size=args.tree_size,
            )
            out = prove.record_json(proof)
        else:
            proof = prove.prove_consistency(store, args.old, args.new)
            out = prove.consistency_json(proof)
    finally:
        store.close()
    print(msgspec.json.format(msgspec.json.encode(out), indent=2).decode())
    return EXIT_OK


def _new_chain(args: argparse.Namespace) -> int:
    import time

    from kynara_sidecar.audit.newchain import start_new_chain
    from kynara_sidecar.audit.startup import load_audit_keys
    from kynara_sidecar.daemon import with_daemon_id

    if not (args.config or os.environ.get(DEFAULT_CONFIG_ENV)):
        raise _UsageError(
            f"no config: give {_GIVE_CONFIG}; new-chain takes the log, keys "
            "and witness from audit.path, audit.signing_key and "
            "audit.witness_path"
        )
    config = with_daemon_id(_client_config(args))
    done = start_new_chain(
        config.audit.path,
        # Only `run` creates a missing key: a new chain signed by a key made
        # here would be trusted by no verifier.
        load_audit_keys(config.audit, create=False),
        origin=config.identity.daemon_id,
        witness_root=config.audit.witness_path,
        now_nanos=time.time_ns(),
        force=args.force,
    )
    kept = f"; the old log is kept at {done.kept_at}" if done.kept_at else ""
    print(f"new chain {done.new_log_id} started after {done.problem}{kept}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from kynara_sidecar.audit.export import config_keys, export_pack, parse_time
    from kynara_sidecar.audit.keys import load_public_key

    if args.audit and (args.config or args.overrides):
        given = f"--config {args.config}" if args.config else "--set"
        raise _UsageError(
            f"AUDIT_PATH {args.audit} and {given} given: expected one of them; "
            "with AUDIT_PATH no config is read (give its keys with --key FILE)"
        )
    config = _config_unless_path(
        args,
        args.audit,
        "no audit log given: name it with AUDIT_PATH (and its public keys with "
        f"--key FILE), or give {_GIVE_CONFIG} to export its audit.path",
    )
    keys = [load_public_key(path) for path in args.keys]
    audit_path = args.audit
    if config is not None:
        audit_path = config.audit.path
        keys += config_keys(config.audit)
    summary = export_pack(
        audit_path,
        args.out,
        parse_time(args.start, where="--from"),
        parse_time(args.stop, where="--to"),
        keys,
        request={"from": args.start, "to": args.stop},
    )
    print(
        f"exported records {summary.first_seq}..{summary.last_seq} "
        f"({summary.checkpoints} checkpoints, {summary.approvals} approval "
        f"records) to {args.out}"
    )
    if summary.unsealed:
        print(
            f"not exported: {summary.unsealed} records in range after the last "
            f"checkpoint (tree size {summary.sealed_through}); they are not "
            "signed yet: export again after the next checkpoint"
        )
    if not keys:
        print("note: the pack holds no public key; verify with --trusted-key")
    return EXIT_OK


def _verify_export(args: argparse.Namespace) -> int:
    from kynara_sidecar.audit.verify_pack import PackError, verify_pack

    try:
        report = verify_pack(args.pack, args.trusted_keys, args.publisher_keys)
    except PackError as err:
        print(f"FAILED: {err}")
        return EXIT_FAILED
    print(report.summary())
    return EXIT_OK


def _bundle(args: argparse.Namespace) -> int:
    import pathlib

    from kynara_sidecar.audit.keys import load_signing_key, load_trusted_keys
    from kynara_sidecar.sync import bundle

    if args.bundle_command == "build":
        key = load_signing_key(args.key)
        data = bundle.build_bundle(pathlib.Path(args.policies), key, _now())
        # Checked as a daemon will check it, before anything is written.
        verified = bundle.verify_bundle(data, {key.key_id: key.public()})
        bundle.write_bundle(args.out, data)
        print(
            f"ok: wrote {args.out}: policy {verified.revision}, "
            f"{_directory_text(verified.directory_revision)}, "
            f"{len(verified.files)} files, signed by {key.key_id}"
        )
        return EXIT_OK
    if args.bundle_command == "publish":
        return _publish_bundle(args)
    trusted = load_trusted_keys(args.trusted_keys)
    verified = _verify_bundle_file(bundle.read_bundle(args.bundle), trusted)
    print(
        f"ok: {args.bundle}: policy {verified.revision}, "
        f"{_directory_text(verified.directory_revision)}, "
        f"{len(verified.files)} files, created {verified.created}, signed by "
        f"{verified.key_id}"
    )
    _warn_if_future(verified.created)
    return EXIT_OK


def _directory_text(revision: str) -> str:
    """``directory <revision>``, or ``no directory`` for a bundle without a
    directory file (its revision is empty), rather than a blank."""
    return f"directory {revision}" if revision else "no directory"


def _now() -> Timestamp:
    import time

    from kynara_sidecar.decision import Timestamp

    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    return Timestamp(seconds, nanos)


def _verify_bundle_file(
    data: bytes, trusted: Mapping[str, PublicKey] | None
) -> VerifiedBundle:
    """verify_bundle with the CLI's hint, or inspect_bundle without keys."""
    from kynara_sidecar.sync import bundle

    try:
        if trusted is None:
            return bundle.inspect_bundle(data)
        return bundle.verify_bundle(data, trusted)
    except bundle.BundleError as err:
        if err.kind is bundle.BundleProblem.UNKNOWN_KEY:
            raise bundle.BundleError(
                err.kind, f"{err.detail}; pass its public key with --trusted-key"
            ) from err
        raise


def _warn_if_future(created: str) -> None:
    from kynara_sidecar.sync.bundle import seconds_ahead

    try:
        ahead = seconds_ahead(created, _now())
    except ValueError:
        return  # verifying it found no problem with created: not reached
    if ahead > DEFAULT_BUNDLE_CLOCK_SKEW_SECONDS:
        print(
            f"warning: the bundle was created {created}, {ahead:.0f}s ahead of "
            f"this machine's clock: daemons refuse a bundle created more than "
            f"sync.max_clock_skew_seconds (default "
            f"{DEFAULT_BUNDLE_CLOCK_SKEW_SECONDS}) in the future; check the "
            "publisher's clock",
            file=sys.stderr,
        )


def _add_nats_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats",
        metavar="FILE",
        default="",
        help="YAML file of the nats:// store's TLS and credentials: the keys "
        "of sync.nats (ca_file, user, password_file, token_file, ...)",
    )


def _unknown_key_line(text: bytes, err: Exception) -> str:
    """``:LINE`` of the top-level key a msgspec error calls unknown in the
    YAML ``text`` (msgspec names the key, not where it is); "" otherwise."""
    import yaml

    found = re.fullmatch(r"Object contains unknown field `([^`]*)`", str(err))
    if found is None:
        return ""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return ""
    if not isinstance(node, yaml.MappingNode):
        return ""
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value == found.group(1):
            return f":{key.start_mark.line + 1}"
    return ""


def _store_of(args: argparse.Namespace):
    """The store ``--store`` names, with ``--nats``'s connection settings.

    Raises:
        ConfigError: ``--nats`` cannot be read, or its settings are wrong
            or do not fit the store (named by key, under the file's name).
    """
    import msgspec
    import yaml

    from kynara_sidecar._unique_keys import load_yaml
    from kynara_sidecar.config import NatsConnectionConfig
    from kynara_sidecar.sync import open_store

    settings = NatsConnectionConfig()
    if args.nats:
        text = b""
        try:
            with open(args.nats, "rb") as file:
                text = file.read()
            raw = load_yaml(text) or {}
            settings = msgspec.convert(raw, NatsConnectionConfig)
        except (OSError, yaml.YAMLError, msgspec.ValidationError) as err:
            where = _unknown_key_line(text, err)
            raise ConfigError(f"--nats {args.nats}{where}: {err}") from None
    section = args.nats or "--nats"
    settings.validate(section, files=False)
    settings.check_store(section, args.store, "--store")
    connection = settings.load(section) if settings.configured else None
    return open_store(
        args.store, timeout=args.timeout, nats=connection, timeout_key="--timeout"
    )


def _publish_bundle(args: argparse.Namespace) -> int:
    import asyncio

    from kynara_sidecar.audit.keys import load_trusted_keys
    from kynara_sidecar.sync import bundle

    data = bundle.read_bundle(args.bundle)
    trusted = load_trusted_keys(args.trusted_keys) if args.trusted_keys else None
    # Without a key the structure, hashes and policies are still checked: a
    # store only ever holds something that is a bundle.
    verified = _verify_bundle_file(data, trusted)
    revision = verified.revision
    if trusted is None:
        revision += " (not verified: no --trusted-key)"
    _warn_if_future(verified.created)
    store = _store_of(args)

    async def publish() -> str:
        try:
            await store.connect()
            if not args.force:
                _check_not_older(verified, await _current_or_none(store), args.store)
            return await store.publish_bundle(data)
        finally:
            await store.close()

    digest = asyncio.run(publish())
    print(f"ok: published {args.bundle} to {args.store}: {digest}, policy {revision}")
    return EXIT_OK


async def _current_or_none(store) -> BundleEntry | None:
    """The store's current bundle; None when it cannot be read whole (a
    corrupt or oversized one): replacing it is the fix. An unreachable
    store still fails the publish that follows."""
    from kynara_sidecar.sync import BundleTooLarge, StoreUnavailable

    try:
        return await store.current_bundle()
    except (StoreUnavailable, BundleTooLarge) as err:
        print(f"warning: the current bundle is not readable ({err})", file=sys.stderr)
        return None


def _check_not_older(
    verified: VerifiedBundle, current: BundleEntry | None, url: str
) -> None:
    """Refuse to replace the store's current bundle with an older one: every
    daemon would refuse it as older."""
    from kynara_sidecar.audit.record import parse_timestamp
    from kynara_sidecar.sync.bundle import BundleError, inspect_bundle, seconds_ahead

    if current is None:
        return
    try:
        created = inspect_bundle(current.data).created
        older = seconds_ahead(verified.created, parse_timestamp(created)) < 0
        future = seconds_ahead(created, _now()) > DEFAULT_BUNDLE_CLOCK_SKEW_SECONDS
    except (BundleError, ValueError):
        return  # the current bundle is broken: replacing it is the fix
    if older and not future:  # daemons refused a future one: replace it
        raise _UsageError(
            f"the bundle was created {verified.created}, before the current "
            f"bundle of {url} ({current.digest}, created {created}); daemons "
            "would refuse it as older. Pass --force to publish it anyway (a "
            "deliberate rollback: then run `kynara-sidecar sync now --force` "
            "on each daemon)"
        )


def _admin_target(config: Config) -> str:
    """The admin listener's gRPC target: the Unix socket when there is one,
    else ``admin.host:admin.port`` (a wildcard host is reached on loopback:
    the CLI runs beside the daemon)."""
    admin = config.admin
    if admin.socket:
        return f"unix://{os.path.abspath(admin.socket)}"
    if admin.port > 0:
        host = _WILDCARD_HOSTS.get(admin.host.strip("[]"), admin.host)
        return host_port(host, admin.port)
    raise _UsageError(
        "expected the daemon's admin listener in the config (admin.socket, or a "
        "fixed admin.port), got none"
    )


class _Credential(typing.NamedTuple):
    """What an admin command sends, in its error messages."""

    # What the file holds: "secret" or "token".
    noun: str
    # What a file must hold, and what is missing when none is given.
    expected: str
    missing: str


_OPERATOR = _Credential(
    "secret",
    "an operator's admin secret (the file admin.credentials names)",
    "an operator secret",
)
_REVIEWER = _Credential(
    "token", "a reviewer's admin secret or reviewer JWT", "a reviewer's token"
)


def _admin_call(
    args: argparse.Namespace, credential: _Credential
) -> tuple[Config, str, list[tuple[str, str]]]:
    """The daemon's config, its admin listener's target, and the bearer
    metadata of the credential in --credential-file or $KYNARA_ADMIN_SECRET.
    Open the channel with ``_admin_channel``.
    """
    config = _config_unless_path(
        args, None, f"expected the daemon's config: give {_GIVE_CONFIG}"
    )
    assert config is not None  # no path: the config is always loaded
    target = _admin_target(config)
    token = _admin_token(args, credential)
    return config, target, [("authorization", f"Bearer {token}")]


# Hosts a listener binds to mean "every address"; the CLI dials loopback.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1"}
# Where --ca-file is read from when the flag is not given.
ADMIN_CA_ENV = "KYNARA_ADMIN_CA_FILE"


def _add_admin_tls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca-file",
        metavar="FILE",
        help="PEM certificates to trust when admin.port serves TLS (default: "
        f"${ADMIN_CA_ENV}, else admin.tls.cert_file itself, which suits a "
        "self-signed certificate)",
    )
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        help="the name to check the admin certificate for (default: admin.host; "
        "when that is an address the certificate does not name, the "
        "certificate's first DNS name)",
    )


def _admin_channel(args: argparse.Namespace, config: Config, target: str):
    """A gRPC channel to ``target`` (from ``_admin_target``): plaintext on
    the Unix socket, TLS to admin.port when admin.tls is set.

    Raises:
        ConfigError: the trust roots cannot be read.
    """
    import grpc

    if target.startswith("unix://") or not config.admin.tls.enabled:
        return grpc.insecure_channel(target)
    tls = config.admin.tls
    # The first given of: the flag, the environment, the served certificate.
    where, ca_file = next(
        (where, path)
        for where, path in (
            ("--ca-file", args.ca_file),
            (f"${ADMIN_CA_ENV}", os.environ.get(ADMIN_CA_ENV, "")),
            ("admin.tls.cert_file", tls.cert_file),
        )
        if path
    )
    try:
        with open(ca_file, "rb") as file:
            roots = file.read()
    except OSError as err:
        raise ConfigError(
            f"{where}: cannot read the certificates to trust: {err}"
        ) from None
    _check_trust_roots(where, ca_file, roots)
    name = args.server_name or _certificate_name(tls.cert_file, target)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(
        target, grpc.ssl_channel_credentials(root_certificates=roots), options
    )


def _check_trust_roots(where: str, ca_file: str, roots: bytes) -> None:
    """Refuse trust roots that hold no PEM certificate (a private key given
    by mistake, say): gRPC would only report that it could not build a
    handshake, as if nothing answered.

    Raises:
        ConfigError: naming ``where`` (the flag or setting) and the file.
    """
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(roots)
    except ValueError as err:
        raise ConfigError(
            f"{where}: expected PEM certificates to trust in {ca_file}, got none "
            f"readable ({err})"
        ) from None


# What gRPC's details say of a failed TLS handshake (an untrusted or
# misnamed certificate, roots it cannot use), as against nothing listening.
_TLS_FAILURE = re.compile(
    r"handshake|hostname verification|ssl_error|certificate", re.IGNORECASE
)
# Bounds the handshake that tells a TLS-only admin port from a dead one.
_TLS_PROBE_SECONDS = 3.0


def _tls_failure(
    err, call: str, target: str, config: Config | None = None
) -> ConfigError | None:
    """The error to show for an UNAVAILABLE ``err`` that is a failed TLS
    handshake with the admin port, or a plaintext call (``config`` without
    admin.tls) to a port that serves TLS; None when it is neither."""
    if (
        config is not None
        and not config.admin.tls.enabled
        and not target.startswith("unix:")
        and _serves_tls(target)
    ):
        return ConfigError(
            f"{call} at {target}: the port serves TLS, but this config has no "
            "admin.tls, so the call went in plaintext: give the daemon's own "
            "config (with its admin.tls), or set admin.tls here as it does "
            "(the CLI then trusts admin.tls.cert_file, or --ca-file)"
        )
    details = visible_text(err.details() or "")
    if not _TLS_FAILURE.search(details):
        return None
    return ConfigError(
        f"{call} at {target}: UNAVAILABLE: the TLS handshake failed: {details}; "
        f"check --ca-file (the certificates trusted; default ${ADMIN_CA_ENV}, else "
        "admin.tls.cert_file) and --server-name (the name the certificate "
        "must hold; default admin.host) against the daemon's admin.tls "
        "certificate"
    )


def _serves_tls(target: str) -> bool:
    """Whether ``HOST:PORT`` completes a TLS handshake. Nothing is checked
    (no trust, no name): it only tells a TLS port from one that answers
    plaintext or nothing, which gRPC's error for a plaintext call cannot
    (it reports a closed or reset connection either way)."""
    import socket
    import ssl

    host, _, port = target.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(
            (host.strip("[]"), int(port)), timeout=_TLS_PROBE_SECONDS
        ) as raw:
            with context.wrap_socket(raw):
                return True
    except (OSError, ValueError):
        return False


def _certificate_name(cert_file: str, target: str) -> str:
    """The name to check the served certificate for when ``target`` dials an
    IP address the certificate (``cert_file``, the daemon's own) does not
    name: its first DNS name, else its common name; "" when no override is
    needed."""
    import ipaddress

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    host = target.rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ""  # a name: checked as it is
    with open(cert_file, "rb") as file:
        leaf = x509.load_pem_x509_certificates(file.read())[0]
    try:
        names = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    if address in names.get_values_for_type(x509.IPAddress):
        return ""
    dns = names.get_values_for_type(x509.DNSName)
    if dns:
        return dns[0]
    common = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else ""


def _admin_token(args: argparse.Namespace, credential: _Credential) -> str:
    if args.credential_file:
        try:
            with open(args.credential_file, encoding="utf-8") as file:
                token = file.read().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"--credential-file: cannot read the {credential.noun}: {err}"
            ) from None
        if not token:
            raise ConfigError(
                f"--credential-file: {args.credential_file} is empty; expected "
                f"{credential.expected}"
            )
        return token
    token = os.environ.get(ADMIN_SECRET_ENV, "").strip()
    if not token:
        raise _UsageError(
            f"expected {credential.missing}: --credential-file FILE or "
            f"${ADMIN_SECRET_ENV}"
        )
    return token


def _sync(args: argparse.Namespace) -> int:
    import json

    import grpc
    from kynara.v1 import sync_pb2, sync_pb2_grpc

    if args.sync_command == "ship":
        return _sync_ship(args)
    config, target, metadata = _admin_call(args, _OPERATOR)
    with _admin_channel(args, config, target) as channel:
        try:
            reply = sync_pb2_grpc.SyncServiceStub(channel).SyncNow(
                sync_pb2.SyncNowRequest(force=args.force),
                metadata=metadata,
                timeout=SYNC_NOW_TIMEOUT_SECONDS,
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ConfigError(
                    f"the daemon at {target} follows no bundles and no signed "
                    "directory (its policy.source is a directory and directory.store "
                    "is not set; SIGHUP reloads it)"
                ) from None
            if (
                err.code() == grpc.StatusCode.UNAVAILABLE
                and not config.admin.credentials
            ):
                raise ConfigError(
                    f"SyncNow at {target}: no admin listener there: it starts only "
                    "once admin.credentials names a credential, and this config "
                    "names none; add one with the operator role (see the README) "
                    "and restart the daemon"
                ) from None
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                raise _tls_failure(err, "SyncNow", target, config) or ConfigError(
                    f"SyncNow at {target}: nothing answers: is the daemon running, "
                    "with this config? Its admin listener starts only when the "
                    "daemon's own admin.credentials names a credential"
                ) from None
            raise ConfigError(
                f"SyncNow at {target} failed: {err.code().name}: {err.details()}"
            ) from None
    fields = ("outcome", "revision", "previous_revision", "error", "digest")
    shown: dict[str, object] = {name: getattr(reply, name) for name in fields}
    # Bundles are followed unless the daemon said "" (policy files) while it
    # follows a directory: then only the directory's outcome counts.
    directory = reply.directory
    good = ("activated", "unchanged")
    ok = reply.outcome in good or (reply.outcome == "" and directory.configured)
    if directory.configured:
        shown["directory"] = {name: getattr(directory, name) for name in fields}
        ok = ok and directory.outcome in good
    print(json.dumps(shown, indent=2))
    return EXIT_OK if ok else EXIT_FAILED


# ShipNow waits --wait seconds for the store; the seal and the answer get
# this much more before the CLI gives up on the daemon.
SHIP_NOW_MARGIN_SECONDS = 10.0


def _sync_ship(args: argparse.Namespace) -> int:
    """``sync ship``: ShipNow on the daemon; non-zero unless the store
    acknowledged every sealed record."""
    import json

    import grpc
    from kynara.v1 import sync_pb2, sync_pb2_grpc

    if not 0 <= args.wait <= 600:
        raise _UsageError(f"--wait: expected 0..600 seconds, got {args.wait:g}")
    config, target, metadata = _admin_call(args, _OPERATOR)
    wait = args.wait or config.sync.timeout_seconds
    with _admin_channel(args, config, target) as channel:
        try:
            reply = sync_pb2_grpc.SyncServiceStub(channel).ShipNow(
                sync_pb2.ShipNowRequest(wait_seconds=args.wait),
                metadata=metadata,
                timeout=wait + SHIP_NOW_MARGIN_SECONDS,
            )
        except grpc.RpcError as err:
            coded = dict(err.trailing_metadata() or ()).get("kynara-error-code")
            if err.code() == grpc.StatusCode.UNAVAILABLE and not coded:
                raise _tls_failure(err, "ShipNow", target, config) or ConfigError(
                    f"ShipNow at {target}: nothing answers: is the daemon running, "
                    "with this config? Its admin listener starts only when the "
                    "daemon's own admin.credentials names a credential"
                ) from None
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                raise ConfigError(
                    f"ShipNow at {target}: not all shipped: {err.details()}"
                ) from None
            raise ConfigError(
                f"ShipNow at {target} failed: {err.code().name}: {err.details()}"
            ) from None
    print(
        json.dumps(
            {
                "sealed_tree_size": reply.sealed_tree_size,
                "shipped_segments": reply.shipped_segments,
                "backlog_records": reply.backlog_records,
                "shipped_tree_size": reply.shipped_tree_size,
            },
            indent=2,
        )
    )
    return EXIT_OK


# A reviewer answers in seconds; the daemon records a review in one commit.
APPROVALS_TIMEOUT_SECONDS = 30.0


def _add_approvals_parser(commands: argparse._SubParsersAction) -> None:
    approvals = commands.add_parser(
        "approvals",
        help="list, show, approve and reject approvals on a running daemon "
        "(admin listener)",
        description=(
            "Call ApprovalService on the daemon's admin listener (admin.socket, "
            "else admin.port from the config) as a reviewer: an admin "
            "credential with the reviewer role, or a reviewer JWT from "
            "approvals.reviewer_issuers."
        ),
    )
    kinds = approvals.add_subparsers(dest="approvals_command", required=True)
    listing = kinds.add_parser(
        "list", help="approvals, newest first: a table, or --json"
    )
    listing.add_argument(
        "--state",
        default="pending",
        choices=["pending", "approved", "rejected", "expired", "used", "all"],
        help="which approvals (default pending)",
    )
    listing.add_argument("--agent", default="", help="only this agent's")
    listing.add_argument("--action", default="", help="only this action's")
    listing.add_argument(
        "--min-risk", type=int, default=0, metavar="SCORE", help="risk 0..100"
    )
    listing.add_argument(
        "--page-size", type=int, default=50, metavar="N", help="at most 500"
    )
    listing.add_argument(
        "--page-token", default="", metavar="ID", help="the next page's token"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = kinds.add_parser("show", help="one approval in full, as JSON")
    show.add_argument("approval_id", metavar="ID")
    subcommands = [listing, show]
    for verdict in ("approve", "reject"):
        review = kinds.add_parser(
            verdict, help=f"{verdict} an approval as the reviewer; print it as JSON"
        )
        review.add_argument("approval_id", metavar="ID")
        review.add_argument(
            "--comment", default="", help="why; kept in the audit record"
        )
        subcommands.append(review)
    for subcommand in subcommands:
        _add_config_args(subcommand)
        subcommand.add_argument(
            "--credential-file",
            metavar="FILE",
            help="file holding a reviewer's admin secret or reviewer JWT "
            f"(default: ${ADMIN_SECRET_ENV}, the token itself)",
        )
        _add_admin_tls_args(subcommand)


def _approvals(args: argparse.Namespace) -> int:
    import json

    import grpc
    from google.protobuf import json_format
    from kynara.v1 import approval_pb2, approval_pb2_grpc

    config, target, metadata = _admin_call(args, _REVIEWER)
    command = args.approvals_command
    with _admin_channel(args, config, target) as channel:
        stub = approval_pb2_grpc.ApprovalServiceStub(channel)
        calls = {
            "list": lambda: stub.ListApprovals(
                approval_pb2.ListApprovalsRequest(
                    state=args.state,
                    agent_id=args.agent,
                    action=args.action,
                    min_risk=max(args.min_risk, 0),
                    page_size=max(args.page_size, 0),
                    page_token=args.page_token,
                ),
                metadata=metadata,
                timeout=APPROVALS_TIMEOUT_SECONDS,
            ),
            "show": lambda: stub.GetApproval(
                approval_pb2.GetApprovalRequest(approval_id=args.approval_id),
                metadata=metadata,
                timeout=APPROVALS_TIMEOUT_SECONDS,
            ),
        }
        for verdict, method in (("approve", stub.Approve), ("reject", stub.Reject)):
            calls[verdict] = lambda method=method: method(
                approval_pb2.ReviewRequest(
                    approval_id=args.approval_id, comment=args.comment
                ),
                metadata=metadata,
                timeout=APPROVALS_TIMEOUT_SECONDS,
            )
        try:
            reply = calls[command]()
        except grpc.RpcError as err:
            raise _approvals_error(err, target, config) from None
    if command == "list" and not args.json:
        print(_format_approvals(reply.approvals))
        if reply.next_page_token:
            token = visible_text(reply.next_page_token)
            print(f"next page: --page-token {token}", file=sys.stderr)
        return EXIT_OK
    document = json_format.MessageToDict(
        reply,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    for detail in document.get("approvals", [document]):
        _decode_request_json(detail)
    # ensure_ascii (the default) writes every non-ASCII and control
    # character as its escaped code point (\u202e): an agent's value
    # never reaches the terminal raw.
    # Sorted keys: the same approval prints the same way every time.
    print(json.dumps(document, indent=2, ensure_ascii=True, sort_keys=True))
    return EXIT_OK


def _decode_request_json(detail: dict) -> None:
    # The wire carries the recorded attributes and context as JSON text
    # (attributes_json, context_json); a reader wants them as objects.
    import json

    for name in ("attributes", "context"):
        text = detail.pop(f"{name}_json", "")
        detail[name] = json.loads(text) if text else {}


def _approvals_error(err, target: str, config: Config) -> KynaraError:
    import grpc

    from kynara_sidecar.server.status import ERROR_CODE_KEY

    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return _tls_failure(err, "ApprovalService", target, config) or ConfigError(
            f"ApprovalService at {target}: nothing answers: is the daemon running, "
            "with this config? Its admin listener starts only once "
            "admin.credentials or approvals.reviewer_issuers names someone"
        )
    if err.code() == grpc.StatusCode.UNIMPLEMENTED:
        return ConfigError(
            f"the daemon at {target} serves no approvals (its audit log is down?)"
        )
    code = dict(err.trailing_metadata() or ()).get(ERROR_CODE_KEY, "")
    # The daemon's message may repeat an agent's values (an id, a comment).
    return ConfigError(
        f"ApprovalService at {target}: {err.code().name}"
        + (f" [{visible_text(code)}]" if code else "")
        + f": {visible_text(err.details() or '')}"
    )


def _format_approvals(approvals) -> str:
    # Every cell goes through visible_text: an agent's resource id or action
    # may hold a terminal escape (ESC, BEL, CR) or a bidi override that would
    # make the reviewer's terminal show something else; they are printed as
    # \u001B, \u202E, ... instead.
    if not approvals:
        return "no approvals match"
    header = ("ID", "STATE", "RISK", "AGENT", "USER", "ACTION", "RESOURCE", "EXPIRES")
    rows = [header]
    for approval in approvals:
        user = approval.chain[0].id if approval.chain else ""
        rows.append(
            (
                approval.id,
                approval.state,
                str(approval.risk.score),
                approval.agent_id,
                user,
                approval.action,
                f"{approval.resource_kind}/{approval.resource_id}",
                approval.expires_at.ToJsonString(),
            )
        )
    rows = [tuple(visible_text(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    )


def _add_fleet_parser(commands: argparse._SubParsersAction) -> None:
    fleet = commands.add_parser(
        "fleet", help="what every daemon of a central store reports"
    )
    kinds = fleet.add_subparsers(dest="fleet_command", required=True)
    status = kinds.add_parser(
        "status",
        help="one row per daemon: revision, last sync, audit head and "
        "checkpoint, shipping backlog, age of its status",
        description=(
            "Read every daemon's status document from the store and print a "
            "table (or --json). A status older than 3 times its daemon's "
            "sync.status_seconds is marked STALE: that daemon stopped or lost "
            "the store. Exits 1 when a status is unreadable or names another "
            "daemon than the one it is stored under (a mismatch)."
        ),
    )
    status.add_argument(
        "--store",
        required=True,
        metavar="URL",
        help="dir:///srv/kynara-store or nats://127.0.0.1:4222",
    )
    _add_nats_settings(status)
    status.add_argument(
        "--json", action="store_true", help="print the rows as JSON instead"
    )
    status.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long the store may take to answer (default 5)",
    )


def _fleet(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from kynara_sidecar.sync.status import (
        fleet_json,
        fleet_rows,
        format_fleet,
        read_fleet,
    )

    store = _store_of(args)
    documents = asyncio.run(read_fleet(store))
    rows = fleet_rows(documents, time.time_ns())
    if args.json:
        print(fleet_json(rows).decode())
    elif not rows:
        print(f"no daemon has published a status to {args.store} yet")
        # As the daemon's _start_sync does: a status only with a store (and
        # an open audit log), once it has started.
        print(
            "hint: a daemon publishes its status only when its sync.store (or "
            "a store as its policy.source) names this store and its audit log "
            "is open; its log says 'sync started' once it does"
        )
    else:
        print(format_fleet(rows))
    bad = [row for row in rows if not row.ok]
    for row in bad:
        problem = (
            f"status stored under the key of daemon {row.stored_under}"
            if row.mismatch
            else row.error
        )
        print(f"kynara-sidecar fleet: {row.daemon_id}: {problem}", file=sys.stderr)
    return EXIT_FAILED if bad else EXIT_OK


COMMANDS = {
    "replay": _replay,
    "run": _run,
    "gateway": _gateway,
    "verify": _verify,
    "check": _check,
    "test": _test,
    "explain": _explain,
    "keygen": _keygen,
    "prove": _prove,
    "new-chain": _new_chain,
    "export": _export,
    "verify-export": _verify_export,
    "bundle": _bundle,
    "sync": _sync,
    "fleet": _fleet,
    "approvals": _approvals,
}


def _log_fatal(err: KynaraError) -> None:
    """Log the error that ends a daemon as one JSON line (the daemon's
    logger) when its lines go out as JSON: a pipeline reading them then
    sees why it stopped. The plain line that follows is for a person."""
    import logging

    from kynara_sidecar.logs import JsonFormatter

    handlers = logging.getLogger("kynara").handlers
    # TextFormatter is a JsonFormatter too; its lines a person reads.
    if not handlers or type(handlers[0].formatter) is not JsonFormatter:
        return
    logging.getLogger("kynara.daemon").error(
        "daemon stopped: fatal error",
        extra={
            "fields": {
                "component": "daemon",
                "error": str(err),
                "error_type": type(err).__name__,
            }
        },
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _build_parser().parse_args(argv)
    if args.command not in ("run", "gateway"):
        # Only a serving daemon reloads on SIGHUP (see kynara_sidecar.entry).
        restore_hangup()
    # --log-format (run, gateway) applies from the first line: a start that
    # fails before the config is read logs in the format asked for.
    configure_logging(
        args.log_level or "info", getattr(args, "log_format", None) or "json"
    )
    try:
        return COMMANDS[args.command](args)
    except _UsageError as err:
        print(f"kynara-sidecar {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KynaraError as err:
        if args.command in ("run", "gateway"):
            _log_fatal(err)
        print(f"kynara-sidecar {args.command}: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    # Run as ``python -m kynara_sidecar.cli``, SIGHUP still ends the process
    # while the modules above import; the console script ignores it first.
    ignore_hangup()
    sys.exit(main())
