"""Lines the daemon's libraries write on their own stay in the daemon's log
format: gRPC's C core (failed TLS handshakes at the admin port, which
bypass Python's logging) and asyncio (its warning whenever a TLS
connection to the NATS server closes).

The daemon runs as operators start it, through the ``kynara-sidecar``
console script (``kynara_sidecar.entry``), which quiets gRPC's own lines
unless ``GRPC_VERBOSITY`` is set.
"""

from __future__ import annotations

import json
import logging
import pathlib
import socket
import ssl
import sys

import grpc
import pytest
from kynara.v1 import audit_pb2 as pb
from kynara.v1 import audit_pb2_grpc
from ops_daemon import DaemonProcess
from support import free_port
from tls_support import Authority, write_pair

from kynara_sidecar import logs

CONSOLE_SCRIPT = pathlib.Path(sys.executable).with_name("kynara-sidecar")
# Bounds the calls below; no assertion depends on how long anything takes.
CALL_TIMEOUT = 10
OPERATOR_SECRET = "operator-secret-0123456789"


def tls_admin_daemon(tmp_path: pathlib.Path) -> tuple[DaemonProcess, int, Authority]:
    """The console script serving a TLS admin port on 127.0.0.1."""
    authority = Authority("kynara test CA")
    pair = write_pair(tmp_path, authority.issue())
    secret = tmp_path / "ops.secret"
    secret.write_text(OPERATOR_SECRET + "\n")
    port = free_port()
    root = tmp_path / "daemon"
    root.mkdir()
    running = DaemonProcess(
        root,
        {
            "admin.host": "127.0.0.1",
            "admin.port": port,
            "admin.tls": pair.settings(),
            "admin.credentials": {
                "ops": {"secret_file": str(secret), "roles": ["operator"]}
            },
            "audit.create_signing_key": True,
        },
        command=(str(CONSOLE_SCRIPT),),
    )
    return running, port, authority


def fail_handshakes(port: int, authority: Authority) -> None:
    """A plaintext gRPC client, a TLS client asking for a server name the
    certificate does not hold, and one that does not trust the CA: each
    fails; then a trusting client is answered."""
    target = f"127.0.0.1:{port}"
    metadata = (("authorization", f"Bearer {OPERATOR_SECRET}"),)
    attempts = [
        grpc.insecure_channel(target),
        grpc.secure_channel(
            target,
            grpc.ssl_channel_credentials(root_certificates=authority.pem),
            options=[("grpc.ssl_target_name_override", "not-the-daemon.example")],
        ),
        grpc.secure_channel(
            target,
            grpc.ssl_channel_credentials(
                root_certificates=Authority("someone else's CA").pem
            ),
        ),
    ]
    for channel in attempts:
        with channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            with pytest.raises(grpc.RpcError) as failed:
                stub.GetHead(
                    pb.GetHeadRequest(), metadata=metadata, timeout=CALL_TIMEOUT
                )
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    # Raw bytes that are no TLS at all.
    with socket.create_connection(("127.0.0.1", port), timeout=CALL_TIMEOUT) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(CALL_TIMEOUT)
        try:
            while raw.recv(4096):
                pass
        except OSError:
            pass
    # An SNI the certificate does not name, in a handshake by hand.
    context = ssl.create_default_context(cadata=authority.pem.decode())
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=CALL_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="kynara.invalid") as wrapped:
            assert wrapped.version()
    with grpc.secure_channel(
        target, grpc.ssl_channel_credentials(root_certificates=authority.pem)
    ) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        head = stub.GetHead(
            pb.GetHeadRequest(), metadata=metadata, timeout=CALL_TIMEOUT
        )
        assert head.checkpoint.origin


def test_failed_handshakes_at_the_tls_admin_port_leave_only_json_lines(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    running, port, authority = tls_admin_daemon(tmp_path)
    try:
        fail_handshakes(port, authority)
    finally:
        assert running.stop() == 0
    lines = running.records()  # fails on a line that is not JSON
    assert lines and all("msg" in line for line in lines)


def test_grpc_verbosity_set_by_the_operator_brings_grpc_lines_back(
    tmp_path, monkeypatch
):
    """The other side of the default: the same failures with
    GRPC_VERBOSITY=error write gRPC's own (non-JSON) lines, so the test
    above does provoke them."""
    monkeypatch.setenv("GRPC_VERBOSITY", "error")
    running, port, authority = tls_admin_daemon(tmp_path)
    try:
        fail_handshakes(port, authority)
    finally:
        assert running.stop() == 0
    raw = []
    for line in running.lines():
        try:
            json.loads(line)
        except ValueError:
            raw.append(line)
    assert raw, "no line of gRPC's own with GRPC_VERBOSITY=error"


@pytest.fixture
def captured(capsys):
    """configure_logging to stderr (captured: ``lines()`` parses what was
    written); the loggers put back afterwards."""
    names = ("kynara", *logs.LIBRARY_LOGGERS)
    saved = {
        name: (
            logging.getLogger(name).handlers[:],
            logging.getLogger(name).propagate,
            logging.getLogger(name).level,
        )
        for name in names
    }

    def lines() -> list[dict]:
        return [json.loads(line) for line in capsys.readouterr().err.splitlines()]

    try:
        yield lines
    finally:
        for name, (handlers, propagate, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.setLevel(level)


def test_asyncio_and_nats_lines_go_out_as_json(captured):
    logs.configure_logging("info", "json")
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    logging.getLogger("nats.aio.client").warning("nats: encountered error")
    logging.getLogger("asyncio").info("below warning: not written")
    lines = captured()
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("asyncio", "error"),
        ("nats.aio.client", "warning"),
    ]
    assert lines[0]["component"] == "asyncio"


def test_asyncios_tls_eof_warning_is_debug_only(captured):
    logs.configure_logging("info", "json")
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.warning(logs._ASYNCIO_SSL_EOF)
    assert captured() == []
    logs.set_level("debug")
    asyncio_log.warning(logs._ASYNCIO_SSL_EOF)
    (line,) = captured()
    assert (line["logger"], line["level"], line["msg"]) == (
        "asyncio",
        "debug",
        logs._ASYNCIO_SSL_EOF,
    )
