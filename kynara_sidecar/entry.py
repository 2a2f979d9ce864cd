"""The console scripts' entry points (``kynara-sidecar``, ``kynara-collector``).

SIGHUP asks a running daemon to reload, but its default action ends the
process: one that arrives while the CLI is still importing its modules and
reading the config (before the event loop installs its handler) would kill
a daemon that is starting. So the entry points ignore SIGHUP first thing,
before importing anything else; the daemon's loop then takes SIGHUP over
(children it spawns get the default disposition back, as a caught signal
does not survive ``exec``), and the CLI puts back the disposition the
process was started with for commands that do not serve (a ``verify`` whose
terminal hangs up should end, unless started under ``nohup``).

This module imports nothing of the project's at load time, so the window
in which SIGHUP still kills is only the interpreter's own start.

gRPC's C core writes its own lines to stderr, bypassing Python's logging
(a failed TLS handshake at the admin port, say, as an ``E1205 ...`` line),
which would break a log of one JSON object a line. So the entry points
also set ``GRPC_VERBOSITY`` to ``NONE`` before grpc is imported, unless
the operator set it: ``GRPC_VERBOSITY=error`` (or ``info``, ``debug``)
brings gRPC's own lines back. What the daemon makes of a call gRPC
failed is logged through its own loggers either way.
"""

from __future__ import annotations

import os
import signal
import typing

__all__ = ["collector", "ignore_hangup", "quiet_grpc", "restore_hangup", "sidecar"]

# The SIGHUP disposition the process was started with, once ignore_hangup
# replaced it (SIG_DFL, or SIG_IGN under ``nohup``).
_inherited: typing.Any = None


def ignore_hangup() -> None:
    """Ignore SIGHUP, remembering the disposition the process had."""
    global _inherited
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if _inherited is None:
        _inherited = signal.SIG_DFL if previous is None else previous


def restore_hangup() -> None:
    """Put back the SIGHUP disposition the process was started with (for
    commands that do not serve); a no-op when no entry point replaced it."""
    if _inherited is not None:
        signal.signal(signal.SIGHUP, _inherited)


def quiet_grpc() -> None:
    """``GRPC_VERBOSITY=NONE`` unless the environment sets it: gRPC reads
    it once, when it is first imported."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def sidecar() -> int:
    """``kynara-sidecar``: SIGHUP ignored, gRPC's own stderr lines off,
    then the CLI."""
    ignore_hangup()
    quiet_grpc()
    from kynara_sidecar.cli import main

    return main()


def collector() -> int:
    """``kynara-collector``: SIGHUP ignored, gRPC's own stderr lines off
    (it pulls over gRPC), then the CLI."""
    ignore_hangup()
    quiet_grpc()
    from kynara_sidecar.collector.cli import main

    return main()
