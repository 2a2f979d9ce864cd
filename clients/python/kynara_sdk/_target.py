"""Which transport a client speaks, and where: the target and transport rule.

- ``fast:///path/agent.fast.sock`` is the fast path at that socket.
- ``unix:///dir/NAME.sock`` (or ``unix:dir/NAME.sock``) is gRPC at that
  socket, with the fast path's socket named after it in the same
  directory: ``NAME.fast.sock`` (``agent.sock`` -> ``agent.fast.sock``, as
  the shipped config names them). Derived from the target's own name, so
  two daemons sharing a directory are never mixed up. A Unix target whose
  name does not end in ``.sock`` has no fast socket to guess: gRPC, or
  give ``fast:///...`` explicitly.
- Anything else (``127.0.0.1:50151``, ``dns:...``, ``unix-abstract:...``) is
  gRPC only: TCP targets have no fast path.

``transport`` (or ``$KYNARA_TRANSPORT``, any case) is ``"auto"`` (the
default), ``"fast"`` or ``"grpc"``. ``"auto"`` takes the fast path when its
socket exists, else gRPC when ``kynara-sdk[grpc]`` is installed. It settles
only once a call reached a daemon, so a client made (or called) before its
daemon started still finds the fast path; a fast socket that refuses the
connection (left by a daemon that stopped) is passed over for gRPC, and
tried again at most once per ``FAST_RETRY_SECONDS``.
"""

from __future__ import annotations

import dataclasses
import os
import stat

__all__ = [
    "AUTO",
    "FAST",
    "FAST_RETRY_SECONDS",
    "FAST_SCHEME",
    "FAST_SOCKET_NAME",
    "GRPC",
    "GRPC_EXTRA",
    "TRANSPORTS",
    "TRANSPORT_ENV",
    "Route",
    "fast_socket_for",
    "grpc_installed",
    "route",
]

TRANSPORT_ENV = "KYNARA_TRANSPORT"
AUTO, FAST, GRPC = "auto", "fast", "grpc"
TRANSPORTS = (AUTO, FAST, GRPC)
FAST_SCHEME = "fast://"
# The fast path's socket beside the default gRPC socket (agent.sock): the
# shipped config and the Kubernetes manifests name it so.
FAST_SOCKET_NAME = "agent.fast.sock"
_SOCK_SUFFIX = ".sock"
_FAST_SUFFIX = ".fast.sock"
# In "auto", how long a fast socket that refused the connection is passed
# over for gRPC before it is dialled again.
FAST_RETRY_SECONDS = 1.0
GRPC_EXTRA = "pip install 'kynara-sdk[grpc]'"


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """Where a client may go: ``transport`` as asked (auto, fast or grpc),
    the fast path's socket (None for a TCP target) and the gRPC target
    (None for a ``fast://`` one)."""

    transport: str
    fast_socket: str | None
    grpc_target: str | None

    def fast_socket_exists(self) -> bool:
        """True when the fast path's socket is there to dial."""
        if self.fast_socket is None:
            return False
        try:
            return stat.S_ISSOCK(os.stat(self.fast_socket).st_mode)
        except OSError:
            return False


def route(target: str, transport: str | None) -> Route:
    """Read a target and a transport choice; no I/O.

    Args:
        target: a ``fast://``, ``unix:`` or TCP target.
        transport: ``"auto"``, ``"fast"`` or ``"grpc"``; None reads
            ``$KYNARA_TRANSPORT``, then ``"auto"``.

    Raises:
        ValueError: the transport is not one of those, a ``fast://`` target
            has no path or is asked to speak gRPC, or a TCP target is asked
            to speak the fast path.
    """
    where = "transport"
    if transport is None:
        where = f"${TRANSPORT_ENV}"
        transport = os.environ.get(TRANSPORT_ENV) or AUTO
    if isinstance(transport, str):
        transport = transport.strip().lower() or AUTO
    if transport not in TRANSPORTS:
        raise ValueError(
            f"{where}: expected one of {', '.join(TRANSPORTS)}, got {transport!r}"
        )
    if target.startswith(FAST_SCHEME):
        path = target[len(FAST_SCHEME) :]
        if not path:
            raise ValueError(
                f"target {target!r}: expected a socket path after {FAST_SCHEME},"
                " e.g. fast:///run/kynara/agent.fast.sock"
            )
        if transport == GRPC:
            raise ValueError(
                f"{where}: grpc cannot speak to the fast path's target {target!r};"
                " give the gRPC socket (unix:///...) instead"
            )
        return Route(FAST, path, None)
    socket_path = _unix_path(target)
    if socket_path is None:
        if transport == FAST:
            raise ValueError(
                f"{where}: fast needs a Unix socket target (fast:///... or"
                f" unix:///...), got {target!r}; TCP targets are gRPC only"
            )
        return Route(GRPC, None, target)
    fast_socket = fast_socket_for(socket_path)
    if fast_socket is None:
        if transport == FAST:
            raise ValueError(
                f"{where}: fast cannot tell the fast path's socket from {target!r}"
                f" (only a NAME{_SOCK_SUFFIX} target has one, NAME{_FAST_SUFFIX});"
                " give it as fast:///path/to/the.fast.sock"
            )
        return Route(GRPC, None, target)
    return Route(transport, fast_socket, target)


def fast_socket_for(socket_path: str) -> str | None:
    """The fast path's socket beside the gRPC socket ``socket_path``:
    ``NAME.sock`` -> ``NAME.fast.sock`` in the same directory; None when the
    name does not end in ``.sock`` (nothing to derive it from)."""
    directory, name = os.path.split(socket_path)
    stem = name[: -len(_SOCK_SUFFIX)] if name.endswith(_SOCK_SUFFIX) else ""
    if not stem:
        return None
    return os.path.join(directory, stem + _FAST_SUFFIX)


def grpc_installed() -> bool:
    """True when the gRPC extra's packages can be imported."""
    import importlib.util

    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in ("grpc", "google.protobuf", "kynara.v1")
        )
    except ImportError:  # a parent package (google) is missing
        return False


def _unix_path(target: str) -> str | None:
    # gRPC's Unix forms: unix:///absolute/path and unix:relative/path.
    if target.startswith("unix://"):
        return target[len("unix://") :] or None
    if target.startswith("unix:") and not target.startswith("unix-abstract:"):
        return target[len("unix:") :] or None
    return None
