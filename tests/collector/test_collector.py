"""The collector end to end: real logs shipped through a real store (dir://
and a real nats-server) or pulled from a real AuditService on a Unix
socket, a running collector, and the archive queried back (HTTP and the
``kynara-collector query`` command)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import subprocess
import sys
import threading
import time
import traceback
import urllib.request

import grpc
import uvloop
import yaml
from tls_support import Authority

from kynara_sidecar.audit.checkpoint import decode_checkpoint
from kynara_sidecar.audit.keys import save_public_key
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.collector.config import load_collector_config
from kynara_sidecar.collector.service import Collector
from kynara_sidecar.config import AdminRole
from kynara_sidecar.server.admin import AdminCredentials
from kynara_sidecar.server.audit_service import AuditService
from kynara_sidecar.sync import open_store, segment_message_id

from ._logs import ORIGIN, append_sealed, messages_of, restore_copy, write_log

# Bounded waits on a condition, never a blind sleep.
WAIT_SECONDS = 20.0
SECRET = b"collector-operator-secret-0123456789"
# Small messages, so every segment of these logs comes in several.
CHUNK_BYTES = 600


class RunningCollector:
    """A collector on its own uvloop thread; stop() is idempotent."""

    def __init__(self, config_path: pathlib.Path):
        self.collector = Collector(load_collector_config(config_path))
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.collector.start())

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.collector.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def daemon(self, daemon_id: str = ORIGIN) -> dict:
        _, body = self.get("/daemons")
        return next(
            d for d in json.loads(body)["daemons"] if d["daemon_id"] == daemon_id
        )

    def wait_for(self, condition, what: str) -> dict:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            found = self.daemon()
            if condition(found):
                return found
            time.sleep(0.05)
        raise AssertionError(f"collector never saw {what}: {self.daemon()}")

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.collector.stop())
        except TimeoutError:
            raise AssertionError(
                f"the collector's stop did not end in time:\n{self._where()}"
            ) from None
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self.loop.close()

    def _where(self) -> str:
        """Where the loop's thread is, and where each of its tasks waits:
        what a stop that does not end is waiting for."""
        frame = sys._current_frames().get(self._thread.ident or 0)
        lines = ["loop thread:\n", *traceback.format_stack(frame)] if frame else []
        for task in asyncio.all_tasks(self.loop):
            lines.append(f"task {task.get_name()}:\n")
            awaited = task.get_coro()
            while awaited is not None:
                frame = getattr(awaited, "cr_frame", None)
                if frame is not None:
                    code = frame.f_code
                    lines.append(
                        f"  {code.co_filename}:{frame.f_lineno} {code.co_name}\n"
                    )
                awaited = getattr(awaited, "cr_await", None)
        return "".join(lines)


def write_config(tmp_path: pathlib.Path, log, **sections) -> pathlib.Path:
    key_file = tmp_path / "daemon-a.pub"
    if not key_file.exists():
        save_public_key(log.key.public(), key_file)
    config = {
        "daemons": {ORIGIN: {"public_keys": [str(key_file)]}},
        "archive": {"url": f"dir://{tmp_path / 'archive'}"},
        "state": {"path": str(tmp_path / "state"), "map_size": 1 << 26},
        "http": {"port": 0},
        **sections,
    }
    path = tmp_path / "collector.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ship(url: str, log_path: pathlib.Path, after: int = 0) -> int:
    """Ship every sealed segment after ``after`` as the shipper would, in
    small messages; returns how many the store stored anew."""
    return ship_messages(url, messages_of(log_path, after, CHUNK_BYTES))


def ship_messages(url: str, messages) -> int:
    """Put ``messages`` (segment messages, in order) into the store at
    ``url`` as the shipper would; returns how many it stored anew."""

    async def run() -> int:
        store = open_store(url)
        await store.connect()
        try:
            stored = 0
            for message in messages:
                msg_id = segment_message_id(message)
                data = message.SerializeToString()
                stored += await store.ship_segment(ORIGIN, msg_id, data)
            return stored
        finally:
            await store.close()

    return asyncio.run(run())


def query_cli(config_path: pathlib.Path, first: int, last: int) -> list[dict]:
    result = subprocess.run(
        [
            sys.executable, "-m", "kynara_sidecar.collector.cli", "query",
            "--config", str(config_path), "--daemon", ORIGIN,
            "--from", str(first), "--to", str(last),
        ],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in result.stdout.splitlines()]


def dir_store(tmp_path: pathlib.Path) -> str:
    root = tmp_path / "store"
    root.mkdir(exist_ok=True)
    return f"dir://{root}"


def test_shipped_segments_through_a_dir_store_are_archived_and_queried(
    tmp_path, start_collector
):
    log = write_log(tmp_path / "log", 30, segment=6)
    store_url = dir_store(tmp_path)
    config = write_config(tmp_path, log, store={"url": store_url, "poll_seconds": 0.05})
    assert ship(store_url, log.path) > 5
    collector = start_collector(config)

    found = collector.wait_for(lambda d: d["tree_size"] == 30, "tree size 30")

    assert (found["log_id"], found["alerts"]) == (log.log_id, [])
    records = query_cli(config, 7, 25)
    assert [r["seq"] for r in records] == list(range(7, 26))
    status, body = collector.get(f"/records?daemon={ORIGIN}&from=1&to=3")
    assert status == 200
    assert [json.loads(line)["decision_id"] for line in body.splitlines()] == [
        "dec-1",
        "dec-2",
        "dec-3",
    ]
    _, metrics = collector.get("/metrics")
    assert b'kynara_collector_records_archived_total{daemon="daemon-a"} 30.0' in metrics
    assert b'kynara_collector_accepted_tree_size{daemon="daemon-a"} 30.0' in metrics


def test_restored_copy_shipped_again_is_reported_as_a_fork(tmp_path, start_collector):
    log = write_log(tmp_path / "log", 8)
    shutil.copytree(log.path, tmp_path / "copy")
    append_sealed(log, 9, 4)
    store_url = dir_store(tmp_path)
    config = write_config(tmp_path, log, store={"url": store_url, "poll_seconds": 0.05})
    ship(store_url, log.path)
    collector = start_collector(config)
    collector.wait_for(lambda d: d["tree_size"] == 12, "tree size 12")
    restore_copy(tmp_path / "copy", log.path)
    # Sealed at the very sizes the collector accepted: only the records
    # differ, and the message ids carry the checkpoint's root.
    append_sealed(log, 9, 4, tag="rewritten ")

    assert ship(store_url, log.path, after=8) > 0
    found = collector.wait_for(lambda d: d["refused"], "a refusal")

    assert found["refused"] == "fork"
    assert [a["kind"] for a in found["alerts"]] == ["fork"]
    assert found["tree_size"] == 12
    _, metrics = collector.get("/metrics")
    assert (
        b'kynara_collector_alerts_total{daemon="daemon-a",kind="fork"} 1.0' in metrics
    )
    assert [r["reason"] for r in query_cli(config, 9, 12)] == [
        f"rule {n}" for n in range(9, 13)
    ]


def test_segment_not_archived_is_not_acknowledged_and_comes_again(
    tmp_path, start_collector
):
    log = write_log(tmp_path / "log", 8)
    store_url = dir_store(tmp_path)
    blocked = tmp_path / "archive"
    blocked.write_bytes(b"a file where the archive directory should be")
    config = write_config(tmp_path, log, store={"url": store_url, "poll_seconds": 0.05})
    ship(store_url, log.path)
    collector = start_collector(config)
    _wait(
        lambda: (
            _metric(
                collector, 'kynara_collector_failures_total{what="archive_or_state"}'
            )
            >= 1
        ),
        "a failed archive write",
    )
    assert collector.daemon()["tree_size"] == 0

    blocked.unlink()
    found = collector.wait_for(lambda d: d["tree_size"] == 8, "tree size 8")

    assert found["alerts"] == []
    assert len(query_cli(config, 1, 8)) == 8


def _metric(collector: RunningCollector, name: str) -> float:
    _, body = collector.get("/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never saw {what}")


def wait_for_a_failed_pull(collector: RunningCollector) -> None:
    """Wait until the collector has counted a pull that failed."""
    registry = collector.collector.metrics.registry
    _wait(
        lambda: registry.get_sample_value(
            "kynara_collector_failures_total", {"what": "pull"}
        ),
        "a failed pull",
    )


def test_segments_through_a_real_nats_server(tmp_path, start_collector, nats_server):
    log = write_log(tmp_path / "log", 20, segment=5)
    config = write_config(tmp_path, log, store={"url": nats_server.url})
    ship(nats_server.url, log.path)
    collector = start_collector(config)

    collector.wait_for(lambda d: d["tree_size"] == 20, "tree size 20")
    collector.stop()
    append_sealed(log, 21, 5)
    ship(nats_server.url, log.path, after=20)
    ship(nats_server.url, log.path)  # every message again: dropped as resends
    collector = start_collector(config)
    found = collector.wait_for(lambda d: d["tree_size"] == 25, "tree size 25")

    assert found["alerts"] == []
    assert [r["seq"] for r in query_cli(config, 1, 25)] == list(range(1, 26))


def test_unregistered_daemon_is_counted_and_nothing_kept(tmp_path, start_collector):
    log = write_log(tmp_path / "log", 4)
    other = write_log(tmp_path / "other", 1)
    store_url = dir_store(tmp_path)
    config = write_config(
        tmp_path, other, store={"url": store_url, "poll_seconds": 0.05}
    )
    key_file = tmp_path / "b.pub"
    save_public_key(other.key.public(), key_file)
    raw = yaml.safe_load(config.read_text())
    raw["daemons"] = {"daemon-b": {"public_keys": [str(key_file)]}}
    config.write_text(yaml.safe_dump(raw))
    ship(store_url, log.path)
    collector = start_collector(config)

    _wait(
        lambda: (
            _metric(
                collector,
                'kynara_collector_alerts_total{daemon="unregistered",kind="unknown_daemon"}',
            )
            >= 1
        ),
        "an unknown_daemon alert",
    )

    _, body = collector.get("/daemons")
    assert [d["daemon_id"] for d in json.loads(body)["daemons"]] == ["daemon-b"]


# ------------------------------------------------------------------ pull


class AdminServer:
    """A real AuditService over a log, on a Unix socket, on its own loop;
    with ``tls`` (certificate and key PEM), on a TLS port of 127.0.0.2."""

    def __init__(
        self,
        log_path: pathlib.Path,
        socket_path: pathlib.Path,
        tls: tuple[bytes, bytes] | None = None,
    ):
        self.target = f"unix://{socket_path}"
        self._tls = tls
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._log_path = log_path
        self._socket = socket_path
        self.store = None
        self.call(self._start())

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> None:
        self.store = AuditStore.open(self._log_path, readonly=True)
        credentials = AdminCredentials({"collector": (SECRET, {AdminRole.OPERATOR})})
        self.service = AuditService(
            self.store, credentials, max_segment_message_bytes=CHUNK_BYTES
        )
        self.server = grpc.aio.server()
        self.service.register(self.server)
        if self._tls is None:
            self.server.add_insecure_port(self.target)
        else:
            served = grpc.ssl_server_credentials([(self._tls[1], self._tls[0])])
            # The same port again when the log is served anew.
            bound_before = self.target.startswith("127.0.0.2:")
            port = self.target.rpartition(":")[2] if bound_before else "0"
            bound = self.server.add_secure_port(f"127.0.0.2:{port}", served)
            self.target = f"127.0.0.2:{bound}"
        await self.server.start()

    async def _stop(self) -> None:
        if self.store is None:
            return
        await self.server.stop(1)
        await self.service.close()
        self.store.close()
        self.store = None

    def close_log(self) -> None:
        """Stop serving and close the log, so the test may write it."""
        self.call(self._stop())

    def open_log(self) -> None:
        """Serve the log again."""
        self.call(self._start())

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def pull_config(tmp_path, log, server: AdminServer, **settings) -> pathlib.Path:
    secret_file = tmp_path / "operator.secret"
    secret_file.write_bytes(SECRET)
    entry = {
        "daemon_id": ORIGIN,
        "target": server.target,
        "credential_file": str(secret_file),
        "poll_seconds": 0.05,
        **settings,
    }
    return write_config(tmp_path, log, pull=[entry])


def test_pulled_segments_are_verified_and_archived(
    tmp_path, start_collector, admin_server
):
    log = write_log(tmp_path / "log", 16)
    server = admin_server(log.path)
    config = pull_config(tmp_path, log, server)
    collector = start_collector(config)
    collector.wait_for(lambda d: d["tree_size"] == 16, "tree size 16")

    server.close_log()
    append_sealed(log, 17, 4)
    server.open_log()
    found = collector.wait_for(lambda d: d["tree_size"] == 20, "tree size 20")

    assert found["alerts"] == []
    assert [r["seq"] for r in query_cli(config, 15, 20)] == list(range(15, 21))


def test_pulled_over_tls_from_an_admin_port_off_the_socket(
    tmp_path, start_collector, admin_server
):
    authority = Authority("kynara pull test CA")
    cert, key, _ = authority.issue()
    (tmp_path / "ca.pem").write_bytes(authority.pem)
    log = write_log(tmp_path / "log", 8)
    server = admin_server(log.path, (cert, key))
    config = pull_config(tmp_path, log, server, ca_file=str(tmp_path / "ca.pem"))
    collector = start_collector(config)
    found = collector.wait_for(lambda d: d["tree_size"] == 8, "tree size 8")

    assert server.target.startswith("127.0.0.2:")
    assert found["alerts"] == []
    assert [r["seq"] for r in query_cli(config, 1, 8)] == list(range(1, 9))


def test_pull_trusts_only_its_ca_file(tmp_path, start_collector, admin_server):
    (tmp_path / "ca.pem").write_bytes(Authority("some other CA").pem)
    cert, key, _ = Authority("kynara pull test CA").issue()
    log = write_log(tmp_path / "log", 8)
    server = admin_server(log.path, (cert, key))
    config = pull_config(tmp_path, log, server, ca_file=str(tmp_path / "ca.pem"))
    collector = start_collector(config)
    wait_for_a_failed_pull(collector)

    assert collector.daemon()["tree_size"] == 0


def test_pulled_restored_copy_is_refused(tmp_path, start_collector, admin_server):
    log = write_log(tmp_path / "log", 8)
    shutil.copytree(log.path, tmp_path / "copy")
    append_sealed(log, 9, 4)
    server = admin_server(log.path)
    config = pull_config(tmp_path, log, server)
    collector = start_collector(config)
    collector.wait_for(lambda d: d["tree_size"] == 12, "tree size 12")

    server.close_log()
    restore_copy(tmp_path / "copy", log.path)
    append_sealed(log, 9, 2, tag="rewritten ")
    server.open_log()
    found = collector.wait_for(lambda d: d["refused"], "a refusal")

    assert found["refused"] == "fork"
    head = decode_checkpoint(found["alerts"][0]["checkpoint"].encode())
    assert head.tree_size == 10
