"""Starting the test upstream (``upstream_server.py``) for gateway tests.

- ``http_upstream(...)``: a context manager running it over Streamable HTTP
  on a free loopback port until it answers; yields an ``HttpUpstream`` with
  its ``url`` and ``config`` (an ``UpstreamConfig``-style dict) and stops
  the process (by its PID) on exit.
- ``stdio_upstream_config(...)``: the ``UpstreamConfig``-style dict that
  makes the gateway start it as a stdio child.
- ``read_call_log(path)``: the calls that reached it, one dict per line.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx2
from support import free_port

UPSTREAM_SERVER = pathlib.Path(__file__).resolve().parent / "upstream_server.py"
# A cold start imports the SDK, starlette and uvicorn: about a second here,
# but the machine is shared.
START_TIMEOUT = 30.0


def upstream_flags(
    *,
    extra_tools: int = 0,
    page_size: int = 0,
    dotted: bool = False,
    collide: bool = False,
    handshake_only: bool = False,
    empty_name: bool = False,
    announce_early: bool = False,
    no_listen: bool = False,
    no_get_stream: bool = False,
) -> list[str]:
    """The server's command-line flags for these options."""
    flags: list[str] = []
    if extra_tools:
        flags += ["--extra-tools", str(extra_tools)]
    if page_size:
        flags += ["--page-size", str(page_size)]
    if dotted:
        flags.append("--dotted")
    if collide:
        flags.append("--collide")
    if handshake_only:
        flags.append("--handshake-only")
    if empty_name:
        flags.append("--empty-name")
    if announce_early:
        flags.append("--announce-early")
    if no_listen:
        flags.append("--no-listen")
    if no_get_stream:
        flags.append("--no-get-stream")
    return flags


def stdio_upstream_config(
    call_log: pathlib.Path | str | None = None,
    *,
    timeout_seconds: float = 30.0,
    **options: Any,
) -> dict[str, Any]:
    """An ``UpstreamConfig``-style dict: the gateway starts the server as a
    stdio child, with ``UPSTREAM_CALL_LOG`` set when ``call_log`` is given.
    ``options`` are those of ``upstream_flags``."""
    env = {"UPSTREAM_CALL_LOG": str(call_log)} if call_log is not None else {}
    return {
        "transport": "stdio",
        "command": [sys.executable, str(UPSTREAM_SERVER), "--stdio"]
        + upstream_flags(**options),
        "env": env,
        "timeout_seconds": timeout_seconds,
    }


class HttpUpstream:
    """A running HTTP upstream."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: pathlib.Path):
        self.process = process
        self.port = port
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def config(self, *, timeout_seconds: float = 30.0) -> dict[str, Any]:
        """An ``UpstreamConfig``-style dict reaching this server."""
        return {
            "transport": "http",
            "url": self.url,
            "timeout_seconds": timeout_seconds,
        }

    def stop(self) -> None:
        """End the process (by its PID) and wait for it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def start_http_upstream(
    log_dir: pathlib.Path,
    call_log: pathlib.Path | str | None = None,
    *,
    port: int | None = None,
    **options: Any,
) -> HttpUpstream:
    """Start the server over HTTP on 127.0.0.1 and wait until it answers.

    ``port`` reuses a port (to bring a server back where a gateway expects
    it); by default a free one is picked. The caller must ``stop()`` it.
    """
    env = dict(os.environ)
    env.pop("UPSTREAM_CALL_LOG", None)
    if call_log is not None:
        env["UPSTREAM_CALL_LOG"] = str(call_log)
    chosen = port if port is not None else free_port()
    log = log_dir / f"upstream-{chosen}.log"
    with open(log, "ab") as sink:
        process = subprocess.Popen(
            [sys.executable, str(UPSTREAM_SERVER), "--http", "--port", str(chosen)]
            + upstream_flags(**options),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    upstream = HttpUpstream(process, chosen, log)
    try:
        _wait_answering(upstream)
    except BaseException:
        upstream.stop()
        raise
    return upstream


def _wait_answering(upstream: HttpUpstream) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        exited = upstream.process.poll()
        if exited is not None:
            raise AssertionError(
                f"upstream exited {exited}:\n{upstream.log.read_text(errors='replace')}"
            )
        with contextlib.suppress(httpx2.HTTPError):
            # Any HTTP answer (the endpoint wants a POST) means it serves.
            httpx2.get(upstream.url, timeout=1.0)
            return
        time.sleep(0.05)
    raise AssertionError(
        f"upstream did not answer:\n{upstream.log.read_text(errors='replace')}"
    )


@contextlib.contextmanager
def http_upstream(
    log_dir: pathlib.Path,
    call_log: pathlib.Path | str | None = None,
    **options: Any,
) -> Iterator[HttpUpstream]:
    """Run the server over HTTP for the ``with`` block."""
    upstream = start_http_upstream(log_dir, call_log, **options)
    try:
        yield upstream
    finally:
        upstream.stop()


def read_call_log(path: pathlib.Path | str) -> list[dict[str, Any]]:
    """Every line of the upstream's call log, decoded; [] when none yet."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
