"""A bare gRPC echo server: the floor that ``decide_bench.py`` measures against.

It serves one unary method on grpc.aio over uvloop, on the same listeners
and with the same server options as the daemon's agent listener (a Unix
socket and a loopback TCP port), and answers every call with the same fixed
small message without decoding the request. Whatever a decision costs above
this server is Kynara's: validation, policy evaluation, the audit record and
its durable commit.

Example:
    python benchmarks/echo_server.py --socket /tmp/echo.sock --port 50161

Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import grpc
import uvloop

__all__ = ["ECHO_METHOD", "ECHO_REPLY", "main", "serve"]

SERVICE_NAME = "kynara.bench.v1.Echo"
ECHO_METHOD = f"/{SERVICE_NAME}/Echo"
# A valid kynara.v1.DecideResponse with only `decision = DECISION_ALLOW`: the
# smallest answer an agent could act on, so the floor pays for no payload.
ECHO_REPLY = b"\x08\x01"
# The daemon's receive limit for the shipped agent.max_message_bytes (65536
# * 2 + 64 KiB headroom); the same value keeps the two servers' setup alike.
RECEIVE_LIMIT_BYTES = 65536 * 2 + 64 * 1024


async def _echo(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
    return ECHO_REPLY


def _register(server: grpc.aio.Server) -> None:
    # Raw bytes both ways, registered the way the daemon registers Decide.
    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
    )
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def serve(socket_path: str, host: str, port: int) -> None:
    """Serve the echo method until SIGTERM or SIGINT.

    Args:
        socket_path: Unix socket to listen on; empty for none.
        host: loopback address for TCP.
        port: TCP port; -1 for none.

    Raises:
        RuntimeError: a listener could not be bound.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", RECEIVE_LIMIT_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    _register(server)
    if port != -1:
        server.add_insecure_port(f"{host}:{port}")
    if socket_path:
        server.add_insecure_port(f"unix://{os.path.abspath(socket_path)}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", default="", help="Unix socket path")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address")
    parser.add_argument("--port", type=int, default=-1, help="TCP port, -1: none")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.socket, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
