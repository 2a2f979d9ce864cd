"""Requests the daemon's HTTP listener cannot parse, as the log shows them:
a header line too long (carrying a bearer secret) and a request line that is
no HTTP. aiohttp answers 400; its own record of the error must go out as one
of the daemon's lines, without the request's bytes, and only at debug.

Also here: a SIGHUP that finds the policy set unchanged says so at debug
rather than announcing an activation."""

from __future__ import annotations

import socket

from ops_daemon import CALL_TIMEOUT, DaemonProcess, wait_for

# A bearer secret sent in an over-long header: no log line may show it.
CANARY = "CANARY-5f0e2b7d91c4a3"
TOO_LONG = (
    b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    + f"Authorization: Bearer {CANARY}".encode()
    + b" " * 9000
    + b"\r\n\r\n"
)
GARBAGE = b"GARBAGE\r\n\r\n"
REFUSED = "HTTP request refused: not parsed"


def send_raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection; what came back until the close."""
    answer = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=CALL_TIMEOUT) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            answer += chunk
    return bytes(answer)


def status_line(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


def test_unparsable_requests_log_one_line_without_their_bytes(tmp_path):
    daemon = DaemonProcess(tmp_path)
    try:
        (started,) = [
            r for r in daemon.records() if r["msg"] == "http listener started"
        ]
        port = started["port"]
        # aiohttp logs the error before it answers: once answered, logged.
        for request in (TOO_LONG, GARBAGE):
            assert status_line(send_raw(port, request)).endswith(b" 400 Bad Request")
        at_info = daemon.records()  # fails on a line that is not JSON

        daemon.set(**{"log.level": "debug"})
        daemon.reload()
        wait_for(
            lambda: any(r["msg"] == "config reloaded" for r in daemon.records()),
            "the reload to debug",
        )
        for request in (TOO_LONG, GARBAGE):
            assert status_line(send_raw(port, request)).endswith(b" 400 Bad Request")
    finally:
        assert daemon.stop() == 0
    lines = daemon.records()

    assert CANARY not in daemon.log_path.read_text()
    # At info, the 400 is the whole answer: nothing logged.
    assert not [r for r in at_info if r["logger"].startswith("aiohttp")]
    refused = [r for r in lines if r["msg"] == REFUSED]
    assert len(refused) == 2
    assert refused[0]["error_type"] == "LineTooLong"
    assert refused[1]["error_type"] in ("BadStatusLine", "BadHttpMethod")
    for line in refused:
        assert (line["level"], line["logger"], line["status"]) == (
            "debug",
            "aiohttp.server",
            400,
        )
        assert "error" not in line
    # The reload found the same policy set: not announced as an activation.
    assert [r["msg"] for r in lines if r["component"] == "policy"] == [
        "policy activated",
        "policy unchanged; still active",
    ]
    (unchanged,) = [r for r in lines if r["msg"] == "policy unchanged; still active"]
    assert unchanged["level"] == "debug"
