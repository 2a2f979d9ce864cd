"""Issue #7's acceptance end to end, as a user runs it: the CLI daemon, the
example agent waiting for a reviewer, a reviewer in headless Chromium, and
``kynara-sidecar verify`` on the log.

Each test starts ``kynara-sidecar run`` as a child process (shipped config
and policies, gRPC on a Unix socket in tmp_path, the review page on
127.0.0.1 at a port the kernel picks, an admin credential with the
``reviewer`` role) and runs ``clients/python/examples/refund_agent.py`` as
another, in wait mode, asking for a refund of 60000 cents (over the shipped
50000 limit). What the agent prints is read line by line while it runs: the
approval URL it prints is the one the reviewer opens.

- A reviewer approves in the browser: the agent completes, the refund is
  issued exactly once, and the log verifies and holds, in order, the
  require_approval decision, approval_requested, approval_resolved approved
  by carol, and the one allow with reason approval_granted.
- Timeout is not rejection: the agent's wait ends, the approval stays
  pending, a reviewer approves afterwards (``kynara-sidecar approvals
  approve``) and the retry with the grant (the SDK) is allowed.
- An approval never acted on (a test policy with a 2 s expiry) ends
  ``expired``, never ``rejected``; its grant is then denied approval_expired.

The browser helpers are tests/browser's (conftest fixtures and the page
tests' helpers), imported, not copied.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import browser.conftest as browser_fixtures
import pytest
from browser.test_review_browser import by, submit_and_wait
from fault_helpers import CLI, DaemonProcess, run_cli, verify_cli
from kynara_sdk import Client
from support import REPO_ROOT, SHIPPED_POLICIES

from kynara_sidecar.audit.chain import decode_record
from kynara_sidecar.audit.record import AuditRecordV1
from kynara_sidecar.audit.store import AuditStore

AGENT = REPO_ROOT / "clients" / "python" / "examples" / "refund_agent.py"
REVIEWER = "carol"
REVIEWER_SECRET = "carol-reviewer-secret-0123456789"
AMOUNT = 60000
REFUND_ID = "rf_1002"  # the agent's refund over the limit
# tests/browser's fixtures: a headless Chromium (Selenium, /usr/bin/chromedriver,
# a fresh profile, only 127.0.0.1 pages), skipped without the browser unless
# KYNARA_BROWSER_TESTS=required; and its screenshots.
browser_tools = browser_fixtures.browser_tools
chromium = browser_fixtures.chromium
screenshot = browser_fixtures.screenshot
screenshot_dir = browser_fixtures.screenshot_dir
# Bounds on waits for a child process: they stop a hung run, they are not
# speed checks. The agent's own wait for a reviewer is longer than any
# browser session here, so only a reviewer who never comes ends it.
LINE_TIMEOUT = 60.0
AGENT_WAIT_SECONDS = 120
EXIT_TIMEOUT = 60.0
# Short enough to see the expiry timer fire in a test, long enough that the
# agent is waiting on the approval before it expires.
EXPIRY_SETTING = "expires_in_seconds: 2"
APPROVAL_URL = re.compile(r"approval=(http://127\.0\.0\.1:\d+/approvals/(apr_\w+))")


class AgentRun:
    """The example agent as a child process; its stdout read as it comes.

    Args:
        target: the daemon's agent socket.
        args: more arguments for the agent.
    """

    def __init__(self, target: str, *args: str):
        # Only what the agent is told: no target or secret from outside.
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("KYNARA_TARGET", "KYNARA_AGENT_SECRET_FILE")
        }
        self.process = subprocess.Popen(
            [sys.executable, str(AGENT), "--target", target, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """Read lines until one matches; fail if the agent ends first."""
        while True:
            try:
                line = self._queue.get(timeout=LINE_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"agent printed no {pattern.pattern!r}: {self.lines}")
            if line is None:
                pytest.fail(f"agent ended without {pattern.pattern!r}: {self.lines}")
            self.lines.append(line)
            found = pattern.search(line)
            if found:
                return found

    def finish(self) -> tuple[int, str]:
        """Wait for the agent to exit; return its status and whole stdout.

        Raises:
            AssertionError: it exited non-zero (the message has its stderr).
        """
        status = self.process.wait(timeout=EXIT_TIMEOUT)
        self._reader.join(EXIT_TIMEOUT)
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        stderr = self.process.stderr.read()  # type: ignore[union-attr]
        assert status == 0, f"agent exited {status}: {stderr}\n{self.lines}"
        return status, "\n".join(self.lines)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=EXIT_TIMEOUT)
        self._reader.join(EXIT_TIMEOUT)
        self.process.stdout.close()  # type: ignore[union-attr]
        self.process.stderr.close()  # type: ignore[union-attr]


@pytest.fixture
def start_daemon(tmp_path) -> Iterator:
    """Call (with more settings) to start ``kynara-sidecar run`` with carol
    as a reviewer on its admin socket; it is killed, if still running, at
    teardown."""
    secret = tmp_path / "carol.secret"
    secret.write_text(REVIEWER_SECRET)
    started: list[DaemonProcess] = []

    def start(*overrides: str) -> DaemonProcess:
        daemon = DaemonProcess(
            tmp_path / "agent.sock",
            tmp_path / "audit",
            tmp_path / "daemon.log",
            *admin_settings(tmp_path),
            *overrides,
        )
        started.append(daemon)
        daemon.wait_serving()
        return daemon

    yield start
    for daemon in started:
        daemon.close()


def admin_settings(tmp_path: pathlib.Path) -> list[str]:
    credential = {"secret_file": str(tmp_path / "carol.secret"), "roles": ["reviewer"]}
    return [
        f"admin.socket={tmp_path / 'admin.sock'}",
        f"admin.credentials={json.dumps({REVIEWER: credential})}",
    ]


@pytest.fixture
def agents() -> Iterator:
    """Call with the daemon's target and agent arguments; each agent still
    running at teardown is killed."""
    runs: list[AgentRun] = []

    def start(target: str, *args: str) -> AgentRun:
        run = AgentRun(target, *args)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def log_records(audit: pathlib.Path) -> list[AuditRecordV1]:
    """Every record of the log, in order (read once the daemon stopped)."""
    store = AuditStore.open(audit, readonly=True)
    try:
        with contextlib.closing(store.iter_records()) as stored:
            return [decode_record(r.record_bytes) for r in stored]
    finally:
        store.close()


def about(records: list[AuditRecordV1], approval_id: str) -> list[AuditRecordV1]:
    """The records about one approval, in log order."""
    return [r for r in records if r.approval and r.approval.id == approval_id]


def lifecycle(records: list[AuditRecordV1]) -> list[tuple[str, str]]:
    """Each record as (kind, decision or resolution)."""
    return [
        (r.kind, r.decision if r.kind == "decision" else r.approval.resolution)
        for r in records
    ]


def verified(audit: pathlib.Path) -> str:
    checked = verify_cli(audit)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return checked.stdout


@pytest.mark.parametrize("chromium", ["desktop"], indirect=True)
def test_a_reviewer_approves_in_chromium_and_the_refund_is_issued_once(
    start_daemon, agents, chromium, screenshot, tmp_path
):
    daemon = start_daemon()
    agent = agents(
        daemon.target,
        f"--wait-for-approval={AGENT_WAIT_SECONDS}",
        f"--large-refund={AMOUNT}",
    )
    url, approval_id = agent.wait_for(APPROVAL_URL).groups()
    asked_line = agent.lines[-1]

    chromium.get(url)
    assert "/approvals/login" in chromium.current_url
    chromium.find_element(by("ID"), "token").send_keys(REVIEWER_SECRET)
    submit_and_wait(chromium, chromium.find_element(by("CSS_SELECTOR"), "form button"))
    assert chromium.current_url == url
    main = chromium.find_element(by("TAG_NAME"), "main").text
    assert str(AMOUNT) in main
    assert REFUND_ID in main
    chromium.find_element(by("ID"), "comment").send_keys("Customer verified.")
    submit_and_wait(
        chromium, chromium.find_element(by("CSS_SELECTOR"), "button.approve")
    )
    notice = chromium.find_element(by("CSS_SELECTOR"), "[role=status]").text
    screenshot("approved")
    status, stdout = agent.finish()
    stopped = daemon.terminate()

    assert notice == "Your approval was recorded."
    assert status == 0
    assert stdout.count(url) == 1
    assert stdout.count(f"refund {REFUND_ID} of {AMOUNT} issued") == 1
    [granted_line] = [line for line in agent.lines if "approval_granted" in line]
    assert granted_line.startswith(f"issue_refund({REFUND_ID}, {AMOUNT})")
    assert stopped == 0
    assert verified(daemon.audit).startswith("ok")
    log = log_records(daemon.audit)
    records = about(log, approval_id)
    assert lifecycle(records) == [
        ("decision", "require_approval"),
        ("approval_requested", ""),
        ("approval_resolved", "approved"),
        ("decision", "allow"),
    ]
    granted = [r for r in log if r.reason_code == "approval_granted"]
    assert granted == [records[-1]]
    asked, requested, resolved, allowed = records
    assert asked.decision_id in asked_line
    assert requested.approval.decision_id == asked.decision_id
    assert resolved.approval.reviewers == [REVIEWER]
    assert resolved.approval.comment == "Customer verified."
    assert allowed.reason_code == "approval_granted"
    assert allowed.approval.reviewers == [REVIEWER]
    assert allowed.approval.state == "used"
    assert allowed.decision_id in granted_line
    assert allowed.resource.id == REFUND_ID
    assert allowed.resource.attributes["amount"] == {"int": str(AMOUNT)}


def test_a_wait_that_times_out_is_not_a_rejection_and_the_grant_still_works(
    start_daemon, agents, tmp_path
):
    daemon = start_daemon()
    # The agent's wait ends (1 s) long before anyone reviews.
    agent = agents(daemon.target, "--wait-for-approval=1", f"--large-refund={AMOUNT}")
    url, approval_id = agent.wait_for(APPROVAL_URL).groups()
    status, stdout = agent.finish()
    pending = run_cli(approvals_cli(tmp_path, "show", approval_id))
    approved = run_cli(
        approvals_cli(tmp_path, "approve", approval_id, "--comment", "later")
    )
    with Client(daemon.target) as client:
        retried = client.decide(
            "payments.refund.issue",
            resource_kind="payments.refund",
            resource_id=REFUND_ID,
            attributes={"amount": AMOUNT},
            context={"region": "DE"},
            user="alice",
            approval_id=approval_id,
        )
    stopped = daemon.terminate()

    assert status == 0
    [ended] = [line for line in agent.lines if "approval_timeout" in line]
    assert ended.startswith(f"issue_refund({REFUND_ID}, {AMOUNT})")
    assert "still pending" in ended
    assert f"refund {REFUND_ID} of {AMOUNT} issued" not in stdout
    assert pending.returncode == 0, pending.stderr
    assert json.loads(pending.stdout)["state"] == "pending"
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["state"] == "approved"
    assert (retried.decision, retried.reason_code) == ("allow", "approval_granted")
    assert retried.approval.reviewers == (REVIEWER,)
    assert stopped == 0
    assert verified(daemon.audit).startswith("ok")
    assert lifecycle(about(log_records(daemon.audit), approval_id)) == [
        ("decision", "require_approval"),
        ("approval_requested", ""),
        ("approval_resolved", "approved"),
        ("decision", "allow"),
    ]


def test_an_approval_never_acted_on_ends_expired_never_rejected(
    start_daemon, agents, tmp_path
):
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    payments = policies / "payments.yaml"
    shipped = payments.read_text()
    assert "expires_in_seconds: 3600" in shipped
    payments.write_text(shipped.replace("expires_in_seconds: 3600", EXPIRY_SETTING))
    daemon = start_daemon(f"policy.source={policies}")
    # The agent would wait two minutes; the approval expires after 2 s.
    agent = agents(
        daemon.target,
        f"--wait-for-approval={AGENT_WAIT_SECONDS}",
        f"--large-refund={AMOUNT}",
    )
    url, approval_id = agent.wait_for(APPROVAL_URL).groups()
    status, stdout = agent.finish()
    shown = run_cli(approvals_cli(tmp_path, "show", approval_id))
    with Client(daemon.target) as client:
        retried = client.decide(
            "payments.refund.issue",
            resource_kind="payments.refund",
            resource_id=REFUND_ID,
            attributes={"amount": AMOUNT},
            context={"region": "DE"},
            user="alice",
            approval_id=approval_id,
        )
    stopped = daemon.terminate()

    assert status == 0
    [ended] = [
        line for line in agent.lines if approval_id in line and "expired" in line
    ]
    assert "approval_expired" in ended
    assert f"refund {REFUND_ID} of {AMOUNT} issued" not in stdout
    assert "rejected" not in stdout
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "expired"
    assert (retried.decision, retried.reason_code) == ("deny", "approval_expired")
    assert stopped == 0
    assert verified(daemon.audit).startswith("ok")
    log = log_records(daemon.audit)
    records = about(log, approval_id)
    assert lifecycle(records) == [
        ("decision", "require_approval"),
        ("approval_requested", ""),
        ("approval_resolved", "expired"),
        ("decision", "deny"),
    ]
    assert records[2].approval.state == "expired"
    assert [r for r in log if r.approval and r.approval.state == "rejected"] == []
    assert records[3].reason_code == "approval_expired"


def approvals_cli(tmp_path: pathlib.Path, *args: str) -> list[str]:
    """``kynara-sidecar approvals ...`` as carol, against the test daemon."""
    settings = []
    for setting in admin_settings(tmp_path):
        settings += ["--set", setting]
    return [
        *CLI,
        "approvals",
        *args,
        "--config",
        "config/kynara.yaml",
        *settings,
        "--credential-file",
        str(tmp_path / "carol.secret"),
    ]


@pytest.mark.parametrize("waits", [False, True], ids=["raise-mode", "wait-mode"])
def test_asked_again_after_an_approval_the_agent_uses_the_grant_once(
    start_daemon, agents, tmp_path, waits
):
    daemon = start_daemon()
    waited = agents(daemon.target, "--wait-for-approval=1", f"--large-refund={AMOUNT}")
    _, approval_id = waited.wait_for(APPROVAL_URL).groups()
    waited.finish()
    approved = run_cli(approvals_cli(tmp_path, "approve", approval_id))

    # No second announcement, no wait: the daemon hands back the approved
    # grant and the decorator retries with it, waiting mode or not.
    mode = ["--wait-for-approval=60"] if waits else []
    used = agents(daemon.target, *mode, f"--large-refund={AMOUNT}")
    _, used_out = used.finish()
    # Used once: the run after asks a reviewer afresh.
    again = agents(daemon.target, f"--large-refund={AMOUNT}")
    _, again_out = again.finish()

    assert approved.returncode == 0, approved.stderr
    assert f"refund {REFUND_ID} of {AMOUNT} issued" in used_out
    assert "waiting up to" not in used_out
    [line] = [
        x for x in used_out.splitlines() if x.startswith(f"issue_refund({REFUND_ID}")
    ]
    assert "approval_granted" in line
    [line] = [
        x for x in again_out.splitlines() if x.startswith(f"issue_refund({REFUND_ID}")
    ]
    assert "require_approval" in line
    assert approval_id not in line


def test_ctrl_c_during_a_wait_says_the_approval_stays_pending(
    start_daemon, agents, tmp_path
):
    daemon = start_daemon()
    agent = agents(
        daemon.target, f"--wait-for-approval={AGENT_WAIT_SECONDS}",
        f"--large-refund={AMOUNT}",
    )  # fmt: skip
    _, approval_id = agent.wait_for(APPROVAL_URL).groups()
    agent.wait_for(re.compile(r"waiting up to"))

    agent.process.send_signal(signal.SIGINT)
    status = agent.process.wait(timeout=EXIT_TIMEOUT)
    stderr = agent.process.stderr.read()  # type: ignore[union-attr]
    shown = run_cli(approvals_cli(tmp_path, "show", approval_id))

    assert status == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == [
        f"refund_agent: interrupted; approval {approval_id} stays pending (a "
        "reviewer may still approve it, and asking again for the same refund "
        "uses it)"
    ]
    assert json.loads(shown.stdout)["state"] == "pending"


# A child that waits for a reviewer on the fast path while another of its
# threads takes the SIGINT (as grpc's or an application's threads may): the
# handler runs only once the waiting main thread wakes.
INTERRUPTED_FROM_A_THREAD = f"""
import signal, sys, threading, time
sys.path.insert(0, {str(AGENT.parent)!r})
import refund_agent
from kynara_sdk import acting_for

def interrupt_from_this_thread():
    main = threading.main_thread().ident
    while sys._current_frames()[main].f_code.co_name != "_lead":
        time.sleep(0.01)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)

threading.Thread(target=interrupt_from_this_thread, daemon=True).start()
refund = refund_agent.waiting_refund(refund_agent.Announcer({AGENT_WAIT_SECONDS}))
try:
    with acting_for(user="alice"):
        refund("rf_2001", {AMOUNT})
except KeyboardInterrupt:
    print("interrupted while waiting", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_taken_by_another_thread_still_ends_a_wait(start_daemon):
    daemon = start_daemon()
    env = {**os.environ, "KYNARA_TARGET": daemon.target}
    env.pop("KYNARA_AGENT_SECRET_FILE", None)

    child = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_FROM_A_THREAD],
        capture_output=True, text=True, env=env, timeout=EXIT_TIMEOUT,
    )  # fmt: skip

    assert child.returncode == 130, child.stderr
    assert "waiting up to" in child.stdout
    assert child.stdout.splitlines()[-1] == "interrupted while waiting"
