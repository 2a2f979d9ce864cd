"""The ``kynara-collector`` command.

Examples:
    kynara-collector run --config config/collector.yaml
    kynara-collector run --config collector.yaml --set store.url=nats://127.0.0.1:4222
    kynara-collector query --config collector.yaml --daemon bot-7 --from 1 --to 100
    kynara-collector daemons --config collector.yaml
    kynara-collector daemons clear bot-7 --config collector.yaml \
        --reason "restored from backup; ticket OPS-12"
    kynara-collector daemons clear bot-7 --config collector.yaml \
        --reason "old log replayed first; OPS-13" --take-on-new-log LOG_ID
    kynara-collector directory sync --config collector.yaml --once
    kynara-collector directory sync --config collector.yaml --every 900
    kynara-collector directory publish principals.yaml --config collector.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import msgspec

from kynara_sidecar.collector.config import DEFAULT_CONFIG_ENV, load_collector_config
from kynara_sidecar.entry import ignore_hangup, restore_hangup
from kynara_sidecar.errors import KynaraError
from kynara_sidecar.logs import LOG_LEVELS, configure_logging

__all__ = ["main"]

log = logging.getLogger("kynara.collector")

EXIT_OK = 0
EXIT_FAILED = 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kynara-collector",
        description="Witness every daemon's audit log: verify, archive, query.",
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="consume and pull segments until SIGTERM")
    query = commands.add_parser(
        "query", help="print a daemon's records from the archive, verified"
    )
    query.add_argument("--daemon", required=True, help="the daemon id")
    query.add_argument("--from", dest="first", type=int, required=True, metavar="N")
    query.add_argument("--to", dest="last", type=int, required=True, metavar="M")
    query.add_argument(
        "--log", default="", metavar="LOG_ID", help="a log id (default: the current)"
    )
    daemons = commands.add_parser(
        "daemons", help="print each daemon's accepted tree size, log id and alerts"
    )
    daemon_commands = daemons.add_subparsers(dest="daemons_command")
    clear = daemon_commands.add_parser(
        "clear",
        help="lift a daemon's sticky refusal once investigated; its next "
        "segment is judged afresh (works beside a running collector)",
    )
    clear.add_argument("daemon_id", help="the refused daemon's id")
    clear.add_argument(
        "--reason",
        required=True,
        metavar="TEXT",
        help="why it is cleared (logged with the clear, for the audit trail), "
        "e.g. a ticket",
    )
    clear.add_argument(
        "--take-on-new-log",
        dest="take_on_log",
        default="",
        metavar="LOG_ID",
        help="also end the accepted log and take the daemon on from log LOG_ID "
        "once a segment of it arrives from 0 beginning with a chain_break: for a "
        "daemon whose new chain names a log the collector never accepted (an old "
        "log replayed first). LOG_ID: the refused checkpoint's log_id in the "
        "daemon's alerts, or what `kynara-sidecar new-chain` printed",
    )
    directory = commands.add_parser(
        "directory",
        help="publish or sync the directory: sign a directory file into the "
        "store, or pull users and groups from an identity provider",
    )
    directory_commands = directory.add_subparsers(
        dest="directory_command", required=True
    )
    sync = directory_commands.add_parser(
        "sync",
        help="pull users and groups from the SCIM endpoint in directory.pull.url "
        "into the collector's own SCIM endpoint",
    )
    when = sync.add_mutually_exclusive_group()
    when.add_argument(
        "--once",
        action="store_true",
        help="one run, even if directory.pull.interval_seconds is set",
    )
    when.add_argument(
        "--every",
        type=float,
        metavar="SECONDS",
        help="a run every SECONDS until SIGTERM or SIGINT (default: "
        "directory.pull.interval_seconds; unset, one run)",
    )
    sync.add_argument(
        "--force",
        action="store_true",
        help="let this one run delete more of the target's users than "
        "directory.pull.max_delete_fraction allows",
    )
    publish = directory_commands.add_parser(
        "publish",
        help="sign a directory file (YAML or JSON, as a policy directory's "
        "directory file) with directory.signing_key and make it the store's "
        "current directory: a first import, or a fix by hand (SCIM, when "
        "enabled, publishes over it at its next change; a restart without "
        "one leaves it)",
    )
    publish.add_argument("file", metavar="FILE", help="the directory file")
    for sub in (run, query, daemons, clear, sync, publish):
        # ``daemons`` options come before or after ``clear``; what the
        # subcommand does not see keeps the value given before it.
        nested = sub is clear
        sub.add_argument(
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS if nested else None,
            help=f"collector YAML (default: ${DEFAULT_CONFIG_ENV})",
        )
        sub.add_argument(
            "--set",
            dest="overrides",
            metavar="SECTION.KEY=VALUE",
            action="append",
            default=argparse.SUPPRESS if nested else [],
            help="override one config key, e.g. --set http.port=0",
        )
    return parser


def _run(args: argparse.Namespace) -> int:
    import uvloop

    from kynara_sidecar.collector.service import Collector

    config = load_collector_config(args.config, args.overrides)
    uvloop.run(Collector(config).run())
    return EXIT_OK


def _open_readonly(args: argparse.Namespace):
    from kynara_sidecar.collector.archive import open_archive
    from kynara_sidecar.collector.state import CollectorState

    config = load_collector_config(args.config, args.overrides)
    state = CollectorState.open(
        config.state.path, map_size=config.state.map_size, readonly=True
    )
    archive = open_archive(
        config.archive.url,
        endpoint_url=config.archive.s3.endpoint_url,
        region=config.archive.s3.region,
    )
    return config, state, archive


def _query(args: argparse.Namespace) -> int:
    from kynara_sidecar.collector.http import records_for

    config, state, archive = _open_readonly(args)
    try:
        records = records_for(
            state,
            archive,
            config.registry(),
            args.daemon,
            args.first,
            args.last,
            args.log,
        )
    finally:
        state.close()
    out = sys.stdout.buffer
    for record in records:
        out.write(record + b"\n")
    out.flush()
    return EXIT_OK


def _daemons(args: argparse.Namespace) -> int:
    from kynara_sidecar.collector.http import daemons_json

    if args.daemons_command == "clear":
        return _clear(args)
    config, state, _ = _open_readonly(args)
    try:
        body = daemons_json(state, config.registry())
    finally:
        state.close()
    sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(body)) + b"\n")
    return EXIT_OK


def _clear(args: argparse.Namespace) -> int:
    """``daemons clear``: lift the refusal, log it, print what was cleared."""
    from kynara_sidecar.collector.state import CollectorState, StateError

    if not args.daemon_id.strip():
        raise StateError("clear: expected a daemon id, got an empty one")
    if not args.reason.strip():
        raise StateError("clear: --reason is empty; say why, e.g. a ticket")
    config = load_collector_config(args.config, args.overrides)
    if not os.path.isfile(os.path.join(config.state.path, "data.mdb")):
        # Opening for writing would create an empty state at a mistyped path.
        raise StateError(f"no collector state at {config.state.path}; check state.path")
    state = CollectorState.open(config.state.path, map_size=config.state.map_size)
    try:
        cleared = state.clear_refusal(
            args.daemon_id, take_on_log=args.take_on_log, reason=args.reason
        )
    finally:
        state.close()
    log.info(
        "daemon refusal cleared",
        extra={
            "fields": {
                "component": "collector",
                "daemon_id": cleared.daemon_id,
                "refused": cleared.refused,
                "refused_reason": cleared.refused_reason,
                "tree_size": cleared.tree_size,
                "log_id": cleared.log_id,
                "dropped_held": cleared.dropped_held,
                "take_on_log": cleared.take_on_log,
                "ended_log": cleared.ended_log,
                "reason": args.reason,
            }
        },
    )
    body = {**msgspec.to_builtins(cleared), "reason": args.reason}
    sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(body)) + b"\n")
    return EXIT_OK


def _directory(args: argparse.Namespace) -> int:
    """``directory publish`` or ``directory sync``: see ``_directory_publish``
    and kynara_sidecar.collector.dirsync."""
    if args.directory_command == "publish":
        return _directory_publish(args)
    from kynara_sidecar.collector.dirsync import sync_command

    config = load_collector_config(args.config, args.overrides)
    return sync_command(config, once=args.once, every=args.every, force=args.force)


def _directory_publish(args: argparse.Namespace) -> int:
    """``directory publish FILE``: sign and publish a directory file."""
    import asyncio

    from kynara_sidecar.collector.config import load_directory_key
    from kynara_sidecar.collector.directory import DirectoryPublisher
    from kynara_sidecar.errors import ConfigError, PolicyError
    from kynara_sidecar.policy.loader import decode_document
    from kynara_sidecar.sync.directory import directory_content

    config = load_collector_config(args.config, args.overrides)
    key = load_directory_key(config)
    if not config.store.url:
        raise ConfigError(
            "store.url: expected the central store the daemons read the "
            "directory from, got none"
        )
    try:
        with open(args.file, "rb") as file:
            raw = file.read()
    except OSError as err:
        raise ConfigError(f"{args.file}: cannot read directory file: {err}") from err
    try:
        source = decode_document(args.file, raw)
    except PolicyError as err:
        raise ConfigError(f"expected a directory file: {err}") from err
    if source.document.kind != "directory":
        raise ConfigError(
            f"{args.file}: expected kind 'directory', got {source.document.kind!r}"
        )
    content = directory_content(
        {
            "id": entry.id,
            "kind": entry.kind.value,
            "roles": list(entry.roles),
            "attributes": entry.attributes,
            "active": entry.active,
        }
        for entry in source.document.principals
    )
    store = config.store.open_store()

    async def publish() -> str:
        await store.connect()
        try:
            return await DirectoryPublisher(store, key).publish(content)
        finally:
            await store.close()

    revision = asyncio.run(publish())
    count = len(source.document.principals)
    print(f"ok: directory {revision} ({count} principals) is current in {store.url}")
    return EXIT_OK


COMMANDS = {
    "run": _run,
    "query": _query,
    "daemons": _daemons,
    "directory": _directory,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _build_parser().parse_args(argv)
    if args.command != "run":
        # Only a running collector handles SIGHUP (see kynara_sidecar.entry).
        restore_hangup()
    configure_logging(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except KynaraError as err:
        print(f"kynara-collector {args.command}: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    # Run as ``python -m``, SIGHUP still ends the process while the modules
    # above import; the console script ignores it first.
    ignore_hangup()
    sys.exit(main())
