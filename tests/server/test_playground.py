"""The playground on a real daemon's HTTP stack: who may use it, what-if
runs that equal the engine and change with edited policies, a recorded
decision replayed by id, and an audit log that no playground call touches."""

from __future__ import annotations

import http.client
import json
import logging
import multiprocessing
import pathlib
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import msgspec
import pytest
import yaml
from kynara.v1 import decision_pb2 as pb
from support import DEFAULT_NOW, REPO_ROOT, SHIPPED_POLICIES, small_refund

from kynara_sidecar import policy_tests
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.config import PlaygroundConfig
from kynara_sidecar.decision import Env, Timestamp
from kynara_sidecar.errors import ConfigError, PolicyError
from kynara_sidecar.metrics import Metrics
from kynara_sidecar.policy.loader import load_policies
from kynara_sidecar.policy_tests import decide, load_request
from kynara_sidecar.server import playground as playground_module
from kynara_sidecar.server.http import build_http_app
from kynara_sidecar.server.playground import (
    CSRF_HEADER,
    MAX_BODY_BYTES,
    MAX_RUNS,
    PLAYGROUND_COOKIE,
    TOUR,
    PlaygroundSources,
    parse_request,
)

SECRETS = {
    "ops": ("ops-operator-secret-0123456789", ["operator"]),
    "rita": ("rita-reviewer-secret-012345678", ["reviewer"]),
    "prom": ("prom-metrics-secret-0123456789", ["metrics"]),
}
REQUEST_FILE = REPO_ROOT / "config" / "requests" / "refund-over-limit.yaml"
CALL_TIMEOUT = 30
SMALL_REFUND = """\
request:
  now: "2026-12-07T10:00:00+01:00"
  chain: [alice, support-bot]
  action: payments.refund.issue
  resource: {kind: payments.refund, id: rf_1, attributes: {amount: 1200}}
"""

# A rule that holds only in the env this daemon is configured with.
DAEMON_ID = "playground-daemon-1"
ENV_POLICY = f"""\
format_version: 1
kind: policy
name: reports
rules:
  - id: export-in-production
    effect: allow
    actions: [reports.export]
    resources: [report]
    roles: [support, support_agent]
    condition: >-
      env.environment == "production" && env.region == "eu-west-1"
      && env.labels.team == "payments" && env.daemon_id == "{DAEMON_ID}"
"""
DAEMON_ENV = (
    "env.environment=production",
    "env.region=eu-west-1",
    'env.labels={"team": "payments"}',
    f"identity.daemon_id={DAEMON_ID}",
)
EXPORT = """\
request:
  now: "2026-12-07T10:00:00+01:00"
  chain: [alice, support-bot]
  action: reports.export
  resource: {kind: report, id: r-1}
"""


def admin_overrides(tmp_path) -> list[str]:
    credentials = {}
    for name, (secret, roles) in SECRETS.items():
        path = tmp_path / f"{name}.secret"
        path.write_text(secret)
        credentials[name] = {"secret_file": str(path), "roles": roles}
    return [
        f"admin.socket={tmp_path / 'admin.sock'}",
        f"admin.credentials={json.dumps(credentials)}",
    ]


@pytest.fixture
def served(tmp_path, start_daemon):
    return start_daemon(*admin_overrides(tmp_path))


@pytest.fixture
def served_in_env(tmp_path, start_daemon):
    """A daemon whose env section (and id) a policy's condition reads."""
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies)
    (policies / "reports.yaml").write_text(ENV_POLICY)
    return start_daemon(
        *admin_overrides(tmp_path), *DAEMON_ENV, f"policy.source={policies}"
    )


def call(running, method, path, body=None, headers=None, raw=None):
    """(status, headers, parsed JSON or text) of one HTTP call."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", running.daemon.http_port, timeout=CALL_TIMEOUT
    )
    try:
        sent = raw if raw is not None else None
        if body is not None:
            sent = json.dumps(body).encode()
        connection.request(method, path, body=sent, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        kind = response.getheader("content-type", "")
        parsed = json.loads(data) if "json" in kind else data.decode()
        return response.status, response, parsed
    finally:
        connection.close()


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {SECRETS[name][0]}"}


def evaluate(running, request: str, files=None, who: str = "ops"):
    body = {"request": request} | ({"files": files} if files is not None else {})
    return call(running, "POST", "/playground/api/evaluate", body, bearer(who))


def record_count(running) -> int:
    return running.daemon._store.head().seq


def active_files(running) -> list[dict[str, str]]:
    status, _, body = call(
        running, "GET", "/playground/api/policies", None, bearer("ops")
    )
    assert status == 200, body
    return body["files"]


def edited(files, name: str, old: str, new: str) -> list[dict[str, str]]:
    out = []
    for file in files:
        content = file["content"]
        if file["name"] == name:
            assert old in content
            content = content.replace(old, new)
        out.append({"name": file["name"], "content": content})
    return out


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/playground/api/tour"),
        ("GET", "/playground/api/policies"),
        ("POST", "/playground/api/evaluate"),
        ("POST", "/playground/api/replay"),
    ],
)
def test_refuses_callers_without_a_reviewer_or_operator_credential(
    served, method, path
):
    before = record_count(served)
    body = {"request": SMALL_REFUND} if method == "POST" else None

    nobody = call(served, method, path, body)
    unknown = call(served, method, path, body, {"authorization": "Bearer nope-x"})
    reviewer_bearer = call(served, method, path, body, bearer("rita"))
    metrics_only = call(served, method, path, body, bearer("prom"))

    assert nobody[0] == 401
    assert nobody[1].getheader("www-authenticate") == 'Bearer realm="kynara playground"'
    assert unknown[0] == 401
    assert "unknown" in unknown[2]["error"]
    assert unknown[1].getheader("www-authenticate") == (
        'Bearer realm="kynara playground", error="invalid_token"'
    )
    # A reviewer signs in on the page; as a bearer only operators pass.
    assert reviewer_bearer[0] == 403
    assert metrics_only[0] == 403
    assert "operator role" in metrics_only[2]["error"]
    assert record_count(served) == before


def test_the_page_sends_a_visitor_without_a_session_to_sign_in(served):
    status, response, _ = call(served, "GET", "/playground")

    assert status == 303
    assert response.getheader("location") == "/playground/login"
    assert "script-src 'sha256-" in response.getheader("content-security-policy")


def test_evaluate_equals_the_engine_with_the_full_explain_trace(served):
    text = REQUEST_FILE.read_text()
    expected = decide(
        load_policies(SHIPPED_POLICIES), load_request(REQUEST_FILE), explain=True
    )

    status, _, body = evaluate(served, text)

    assert status == 200, body
    got = body["decision"]
    assert got.pop("explained").startswith("decision: require_approval")
    assert got.pop("limits") == []  # the shipped policies declare none
    assert got == json.loads(msgspec.json.encode(expected))
    assert got["explanation"]["principals"], "no trace"
    assert body["policies"] == "active"
    assert body["now"] == "2026-12-07T09:00:00Z"


@pytest.mark.parametrize("step", TOUR, ids=[step.id for step in TOUR])
def test_each_tour_step_decides_as_its_sentence_says(served, step):
    status, _, body = evaluate(served, step.request)

    assert status == 200, body
    decision = body["decision"]
    assert (decision["effect"], decision["reason_code"]) == (
        step.effect,
        step.reason_code,
    )


def test_a_request_without_now_is_decided_at_the_daemons_clock(served):
    text = SMALL_REFUND.replace('  now: "2026-12-07T10:00:00+01:00"\n', "")

    status, _, body = evaluate(served, text)

    assert status == 200, body
    assert body["now"] == DEFAULT_NOW
    assert body["decision"]["effect"] == "allow"


def test_an_edited_policy_changes_the_answer_and_the_live_one_stays(served):
    files = edited(
        active_files(served),
        "payments.yaml",
        "resource.attr.amount <= 50000",
        "resource.attr.amount <= 100",
    )

    status, _, body = evaluate(served, SMALL_REFUND, files)
    live = served.stub().Decide(small_refund(), timeout=CALL_TIMEOUT)

    assert status == 200, body
    assert body["policies"] == "edited"
    assert body["decision"]["effect"] == "deny"
    assert body["decision"]["reason_code"] == "no_rule_allows"
    assert body["active_decision"]["effect"] == "allow"
    assert body["decision"]["policy_revision"] != live.policy_revision
    assert live.decision == pb.DECISION_ALLOW


def test_a_bad_policy_file_is_a_400_naming_the_file_and_field(served):
    files = edited(
        active_files(served), "payments.yaml", "effect: allow", "effect: permit"
    )

    status, _, body = evaluate(served, SMALL_REFUND, files)

    assert status == 400
    assert body["file"] == "payments.yaml"
    assert body["location"] == "$.rules[1].effect"
    assert "permit" in body["error"]


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ([{"name": "../x.yaml", "content": ""}], "without . or .. parts"),
        ([{"name": "x.txt", "content": ""}], "ending"),
        ([], "non-empty list"),
        # The loader never reads these as policies (policy/loader.py).
        ([{"name": "tests/x.yaml", "content": ""}], "below a tests/ directory"),
        ([{"name": "a/tests/x.yaml", "content": ""}], "'a/tests/x.yaml' is below"),
        ([{"name": ".x.yaml", "content": ""}], "part starting with '.'"),
        ([{"name": "a/.git/x.yaml", "content": ""}], "'a/.git/x.yaml' has a part"),
        ([{"name": "a\\b.yaml", "content": ""}], "backslash"),
    ],
)
def test_bad_file_lists_are_refused(served, files, error):
    status, _, body = evaluate(served, SMALL_REFUND, files)

    assert status == 400
    assert error in body["error"]


def test_a_bad_request_is_a_400_naming_its_location(served):
    text = SMALL_REFUND.replace("  chain: [alice, support-bot]\n", "")

    status, _, body = evaluate(served, text)

    assert status == 400
    assert body["file"] == "request"
    assert "chain" in body["error"]


def test_an_oversized_body_is_refused_with_413(served):
    raw = b'{"request": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    status, _, body = call(
        served, "POST", "/playground/api/evaluate", raw=raw, headers=bearer("ops")
    )

    assert status == 413
    assert str(MAX_BODY_BYTES) in body["error"]


def test_a_recorded_decision_is_replayed_by_id(served):
    answer = served.stub().Decide(small_refund(), timeout=CALL_TIMEOUT)
    before = record_count(served)

    status, _, body = call(
        served,
        "POST",
        "/playground/api/replay",
        {"decision_id": answer.decision_id},
        bearer("ops"),
    )

    assert status == 200, body
    assert body["recorded"]["effect"] == "allow"
    assert body["replayed"]["effect"] == "allow"
    assert body["changed"] is False
    assert body["replayed"]["policy_revision"] == answer.policy_revision
    assert [r["rule"] for r in body["replayed"]["matched_rules"]] == [
        r.rule for r in answer.matched_rules
    ]
    # Its request, as a request file, decides the same again.
    again = parse_request(body["request"], Timestamp(0))
    assert again.request.chain == ("alice", "support-bot")
    assert again.request.resource.attributes == {"amount": 1200}
    assert again.env.environment == "development"
    assert record_count(served) == before


def test_an_unknown_decision_id_is_404(served):
    status, _, body = call(
        served, "POST", "/playground/api/replay", {"decision_id": "nope"}, bearer("ops")
    )

    assert status == 404
    assert "nope" in body["error"]


def sign_in(running, token: str) -> str:
    """Sign in through the form as a browser would; return the cookie."""
    _, form, page = call(running, "GET", "/playground/login")
    login_cookie = form.getheader("set-cookie").split(";", 1)[0]
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    origin = f"http://127.0.0.1:{running.daemon.http_port}"
    status, response, _ = call(
        running,
        "POST",
        "/playground/login",
        raw=urlencode({"csrf": csrf, "token": token}).encode(),
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "cookie": login_cookie,
            "origin": origin,
        },
    )
    assert status == 303
    cookie = response.getheader("set-cookie")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/playground" in cookie
    return cookie.split(";", 1)[0]


def session_csrf(running, cookie: str) -> str:
    status, _, page = call(running, "GET", "/playground", headers={"cookie": cookie})
    assert status == 200
    return page.split('name="kynara-csrf" content="', 1)[1].split('"', 1)[0]


def test_a_signed_in_reviewer_posts_with_the_sessions_csrf_token(served):
    cookie = sign_in(served, SECRETS["rita"][0])
    assert cookie.startswith(PLAYGROUND_COOKIE + "=")
    csrf = session_csrf(served, cookie)
    origin = f"http://127.0.0.1:{served.daemon.http_port}"
    body = {"request": SMALL_REFUND}

    good = call(
        served, "POST", "/playground/api/evaluate", body,
        {"cookie": cookie, "origin": origin, CSRF_HEADER: csrf},
    )  # fmt: skip
    no_token = call(
        served, "POST", "/playground/api/evaluate", body,
        {"cookie": cookie, "origin": origin},
    )  # fmt: skip
    elsewhere = call(
        served, "POST", "/playground/api/evaluate", body,
        {"cookie": cookie, "origin": "http://evil.example", CSRF_HEADER: csrf},
    )  # fmt: skip

    assert good[0] == 200 and good[2]["decision"]["effect"] == "allow"
    assert no_token[0] == 403 and "CSRF" in no_token[2]["error"]
    assert elsewhere[0] == 403 and "origin" in elsewhere[2]["error"]


def test_sign_in_refuses_a_metrics_only_credential(served):
    _, form, page = call(served, "GET", "/playground/login")
    login_cookie = form.getheader("set-cookie").split(";", 1)[0]
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]

    status, _, text = call(
        served,
        "POST",
        "/playground/login",
        raw=urlencode({"csrf": csrf, "token": SECRETS["prom"][0]}).encode(),
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "cookie": login_cookie,
            "origin": f"http://127.0.0.1:{served.daemon.http_port}",
        },
    )

    assert status == 403
    assert "reviewer or the operator role" in text


def test_no_playground_call_adds_an_audit_record(served):
    answer = served.stub().Decide(small_refund(), timeout=CALL_TIMEOUT)
    before = record_count(served)
    files = active_files(served)

    for step in TOUR:
        assert evaluate(served, step.request)[0] == 200
        assert evaluate(served, step.request, files)[0] == 200
    call(served, "GET", "/playground/api/tour", None, bearer("ops"))
    call(
        served,
        "POST",
        "/playground/api/replay",
        {"decision_id": answer.decision_id},
        bearer("ops"),
    )

    assert record_count(served) == before


def test_the_tour_is_served_from_the_daemon(served):
    status, _, body = call(served, "GET", "/playground/api/tour", None, bearer("ops"))

    assert status == 200
    assert "note" not in body
    assert [step["id"] for step in body["steps"]] == [step.id for step in TOUR]
    assert {step["effect"] for step in body["steps"]} == {
        "allow",
        "deny",
        "require_approval",
    }


def test_the_active_files_are_the_shipped_ones(served):
    files = {file["name"]: file["content"] for file in active_files(served)}

    shipped = {
        path.relative_to(SHIPPED_POLICIES).as_posix(): path.read_text()
        for path in pathlib.Path(SHIPPED_POLICIES).glob("*.yaml")
    }
    assert files == shipped
    assert yaml.safe_load(files["directory.yaml"])["kind"] == "directory"


def test_an_operator_signs_in_on_the_page_too(served):
    cookie = sign_in(served, SECRETS["ops"][0])
    csrf = session_csrf(served, cookie)

    status, _, body = call(
        served, "POST", "/playground/api/evaluate", {"request": SMALL_REFUND},
        {
            "cookie": cookie,
            "origin": f"http://127.0.0.1:{served.daemon.http_port}",
            CSRF_HEADER: csrf,
        },
    )  # fmt: skip

    assert status == 200
    assert body["decision"]["effect"] == "allow"


# --- the daemon's env ---------------------------------------------------------


def test_a_pasted_request_is_decided_in_the_daemons_env_as_decide_is(served_in_env):
    live = served_in_env.stub().Decide(
        pb.DecideRequest(
            asserted_chain=["alice"],
            action="reports.export",
            resource=pb.Resource(kind="report", id="r-1"),
        ),
        timeout=CALL_TIMEOUT,
    )
    alone = policy_tests.parse_request(EXPORT)

    status, _, body = evaluate(served_in_env, EXPORT)

    assert status == 200, body
    assert live.decision == pb.DECISION_ALLOW
    assert body["decision"]["effect"] == "allow"
    assert [r["rule"] for r in body["decision"]["matched_rules"]] == [
        r.rule for r in live.matched_rules
    ]
    assert body["env"] == {
        "daemon_id": DAEMON_ID,
        "agent_id": "support-bot",
        "environment": "production",
        "region": "eu-west-1",
        "labels": {"team": "payments"},
        "peer": "",
    }
    # Read alone, as explain reads the file, the env is empty: no allow.
    assert alone.env.environment == ""
    assert decide(load_policies(SHIPPED_POLICIES), alone).effect == "deny"


def test_what_the_requests_env_writes_wins_over_the_daemons(served_in_env):
    staging = EXPORT + "  env: {environment: staging}\n"

    status, _, body = evaluate(served_in_env, staging)

    assert status == 200, body
    assert body["decision"]["effect"] == "deny"
    assert body["decision"]["reason_code"] == "no_rule_allows"
    assert body["env"]["environment"] == "staging"
    # The fields it leaves out are still the daemon's.
    assert body["env"]["region"] == "eu-west-1"
    assert body["env"]["daemon_id"] == DAEMON_ID


def test_parse_request_reads_the_file_alone_or_fills_from_defaults():
    daemon = Env(
        Timestamp(1_800_000_000),
        daemon_id="d-1",
        environment="production",
        region="eu-west-1",
        labels={"team": "payments", "tier": "1"},
    )
    written = (
        EXPORT.replace('  now: "2026-12-07T10:00:00+01:00"\n', "")
        + "  env: {labels: {team: support}, peer: 'unix:/run/agent.sock'}\n"
    )

    filled = policy_tests.parse_request(written, defaults=daemon).env
    with pytest.raises(PolicyError, match="now") as missing:
        policy_tests.parse_request(written, name="req.yaml")

    assert filled == Env(
        Timestamp(1_800_000_000),
        daemon_id="d-1",
        agent_id="support-bot",
        environment="production",
        region="eu-west-1",
        labels={"team": "support"},
        peer="unix:/run/agent.sock",
    )
    assert missing.value.path == "req.yaml"


def test_explain_reads_a_request_file_through_parse_request(tmp_path):
    path = tmp_path / "req.yaml"
    path.write_text(EXPORT + "  env: {environment: production}\n")

    loaded = load_request(path)

    assert loaded == policy_tests.parse_request(path.read_text(), name=str(path))
    assert loaded.env.environment == "production"
    assert loaded.env.daemon_id == ""


# --- refusals, limits, and no listener ------------------------------------------


def test_refusals_are_counted_as_the_playgrounds_own(served):
    registry = served.daemon.metrics.registry

    def counted(name: str, why: str) -> float:
        return registry.get_sample_value(name, {"why": why}) or 0.0

    nobody = call(served, "GET", "/playground/api/tour")
    reviewer_bearer = call(served, "GET", "/playground/api/tour", None, bearer("rita"))

    assert (nobody[0], reviewer_bearer[0]) == (401, 403)
    assert counted("kynara_playground_refusals_total", "identity_invalid") == 1
    assert counted("kynara_playground_refusals_total", "role_missing") == 1
    assert counted("kynara_review_page_refusals_total", "identity_invalid") == 0
    assert counted("kynara_review_page_refusals_total", "role_missing") == 0


def test_a_run_past_max_runs_is_refused_with_429(served, monkeypatch):
    started = threading.Semaphore(0)
    release = threading.Event()
    real = playground_module._run_isolated

    def held(*args):
        started.release()
        release.wait(CALL_TIMEOUT)
        return real(*args)

    monkeypatch.setattr(playground_module, "_run_isolated", held)
    with ThreadPoolExecutor(MAX_RUNS) as pool:
        runs = [pool.submit(evaluate, served, SMALL_REFUND) for _ in range(MAX_RUNS)]
        try:
            for _ in range(MAX_RUNS):
                assert started.acquire(timeout=CALL_TIMEOUT), "a run never started"
            status, _, body = evaluate(served, SMALL_REFUND)
        finally:
            release.set()
        finished = [run.result()[0] for run in runs]
    after = evaluate(served, SMALL_REFUND)

    assert status == 429
    assert f"{MAX_RUNS} playground runs" in body["error"]
    assert finished == [200] * MAX_RUNS
    # The held runs gave their places back.
    assert after[0] == 200


def test_no_playground_is_served_without_the_http_listener(start_daemon):
    running = start_daemon("http.port=-1")

    live = running.stub().Decide(small_refund(), timeout=CALL_TIMEOUT)

    assert live.decision == pb.DECISION_ALLOW
    assert running.daemon.http_port is None
    assert running.daemon._http is None


def test_the_http_app_has_playground_routes_only_when_given_its_sources():
    sources = PlaygroundSources(
        policies=lambda: None, store=lambda: None, authenticate=lambda token: None
    )

    without = build_http_app(Metrics())
    with_sources = build_http_app(Metrics(), playground=sources)

    def paths(app) -> set[str]:
        return {resource.canonical for resource in app.router.resources()}

    assert paths(without) == {"/metrics"}
    assert "/playground/api/evaluate" in paths(with_sources)


# The breaker's condition: a 100-character literal, each replace x100, so
# 10**10 characters after four; three build 10**8 (100 MB, about a second).
HUNDRED = "a" * 100


def huge_string_policy(replaces: int, times: int = 1) -> str:
    built = f'"{HUNDRED}"' + f'.replace("a", "{HUNDRED}")' * replaces
    condition = " + ".join([f"size({built})"] * times) + " > 0"
    return f"""\
format_version: 1
kind: policy
name: huge
rules:
  - id: huge-string
    effect: allow
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support, support_agent]
    condition: '{condition}'
"""


def with_file(files, name: str, content: str) -> list[dict[str, str]]:
    return [*files, {"name": name, "content": content}]


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM): the daemon under test
    runs on a thread of it."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_a_condition_building_a_huge_string_is_stopped_in_its_own_process(served):
    files = with_file(active_files(served), "huge.yaml", huge_string_policy(4))
    peak_before = peak_rss_bytes()

    lives = []
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(evaluate, served, SMALL_REFUND, files)
        while not run.done():
            lives.append(served.stub().Decide(small_refund(), timeout=CALL_TIMEOUT))
            time.sleep(0.02)
        status, _, body = run.result()
    lives.append(served.stub().Decide(small_refund(), timeout=CALL_TIMEOUT))
    peak_after = peak_rss_bytes()

    assert status == 422, body
    assert "memory limit of 1024 MiB (playground.memory_mib)" in body["error"]
    assert all(live.decision == pb.DECISION_ALLOW for live in lives)
    # 10**10 characters would be gigabytes; the daemon grew by none of it.
    assert peak_after - peak_before < 256 * 1024 * 1024
    # The daemon goes on answering what-if runs.
    assert evaluate(served, SMALL_REFUND)[0] == 200


def test_a_run_past_its_cpu_time_is_stopped_naming_the_setting(tmp_path, start_daemon):
    running = start_daemon(*admin_overrides(tmp_path), "playground.cpu_seconds=1")
    # Twelve strings of 100 MB, one at a time (under the memory limit): 0.3
    # to 1.2 s of CPU each where measured, so seconds in all.
    files = with_file(active_files(running), "huge.yaml", huge_string_policy(3, 12))

    status, _, body = evaluate(running, SMALL_REFUND, files)
    live = running.stub().Decide(small_refund(), timeout=CALL_TIMEOUT)

    assert status == 422, body
    assert "CPU time limit of 1 s (playground.cpu_seconds)" in body["error"]
    assert live.decision == pb.DECISION_ALLOW


def test_a_run_past_its_deadline_is_killed_naming_the_setting(tmp_path, start_daemon):
    running = start_daemon(
        *admin_overrides(tmp_path), "playground.deadline_seconds=0.05"
    )
    files = with_file(active_files(running), "huge.yaml", huge_string_policy(3, 4))

    status, _, body = evaluate(running, SMALL_REFUND, files)

    assert status == 422, body
    assert "deadline of 0.05 s (playground.deadline_seconds)" in body["error"]


def test_a_body_of_a_megabyte_is_read_whole(served):
    # A real client's body arrives in many chunks; each must be read.
    comment = "# " + "x" * 1000 + "\n"
    files = [
        {"name": file["name"], "content": comment * 1000 + file["content"]}
        if file["name"] == "payments.yaml"
        else file
        for file in edited(
            active_files(served),
            "payments.yaml",
            "resource.attr.amount <= 50000",
            "resource.attr.amount <= 100",
        )
    ]
    sent = json.dumps({"request": SMALL_REFUND, "files": files}).encode()
    assert 1_000_000 < len(sent) < MAX_BODY_BYTES

    status, _, body = call(
        served, "POST", "/playground/api/evaluate", raw=sent, headers=bearer("ops")
    )

    assert status == 200, body
    assert body["decision"]["reason_code"] == "no_rule_allows"
    assert body["active_decision"]["effect"] == "allow"


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("memory_mib", 16, "playground.memory_mib: expected 256..65536 MiB, got 16"),
        ("cpu_seconds", 0, "playground.cpu_seconds: expected 1..600 seconds"),
        ("deadline_seconds", 0.0, "playground.deadline_seconds: expected 0 <"),
    ],
)
def test_playground_limits_are_checked_naming_the_key(key, value, error):
    limits = msgspec.structs.replace(PlaygroundConfig(), **{key: value})

    with pytest.raises(ConfigError, match=error):
        limits.validate("playground")


# ------------------------------------------ a daemon following a signed directory


@pytest.fixture
def served_signed(tmp_path, start_daemon):
    """A daemon whose policy files have no directory file, following a
    signed directory (dir:// store) that names zoe, with a role no policy
    defines; returns the daemon and the directory's revision."""
    from sync.test_daemon_directory import (
        DIRECTORY_KEY,
        publish,
        revision_in,
        update,
    )

    from kynara_sidecar.audit.keys import save_public_key

    store = tmp_path / "store"
    store.mkdir()
    data = update()
    publish(f"dir://{store}", data)
    key_file = tmp_path / "directory-key.pub"
    save_public_key(DIRECTORY_KEY.public(), key_file)
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies, ignore=shutil.ignore_patterns("tests"))
    (policies / "directory.yaml").unlink()
    running = start_daemon(
        *admin_overrides(tmp_path),
        f"policy.source={policies}",
        f"directory.store=dir://{store}",
        f"directory.trusted_keys=[{key_file}]",
        "sync.poll_seconds=0.05",
        "sync.ship_segments=false",
    )
    return running, revision_in(data)


ZOE_REFUND = SMALL_REFUND.replace("[alice, support-bot]", "[zoe, support-bot]")


def test_a_pasted_request_matches_decide_under_a_signed_directory(served_signed):
    from sync.test_daemon_directory import SCIM_ONLY_ROLE

    running, revision = served_signed
    live = running.stub().Decide(
        pb.DecideRequest(
            asserted_chain=["zoe"],
            action="payments.refund.issue",
            resource=pb.Resource(
                kind="payments.refund",
                id="rf_1",
                attributes={"amount": pb.Value(int_value=1200)},
            ),
        ),
        timeout=CALL_TIMEOUT,
    )

    status, _, body = evaluate(running, ZOE_REFUND)

    assert live.directory_revision == revision
    assert live.decision == pb.DECISION_ALLOW
    assert status == 200, body
    decision = body["decision"]
    assert (decision["effect"], decision["reason_code"]) == ("allow", live.reason_code)
    assert decision["directory_revision"] == revision
    assert decision["policy_revision"] == live.policy_revision
    assert [r["rule"] for r in decision["matched_rules"]] == [
        r.rule for r in live.matched_rules
    ]
    assert body["directory"] == "signed"
    assert SCIM_ONLY_ROLE in running.daemon._pipeline.policies.directory.unknown_roles
    # The tour was written for the shipped directory, and says so here.
    status, _, tour = call(running, "GET", "/playground/api/tour", None, bearer("ops"))
    assert status == 200 and "directory.store" in tour["note"]


def test_an_edited_set_without_a_directory_file_evaluates_with_the_signed_one(
    served_signed,
):
    running, revision = served_signed
    files = [
        file
        for file in edited(
            active_files(running),
            "payments.yaml",
            "resource.attr.amount <= 50000",
            "resource.attr.amount <= 100",
        )
        if file["name"] != "directory.json"
    ]

    status, _, body = evaluate(running, ZOE_REFUND, files)

    assert status == 200, body
    assert body["policies"] == "edited"
    assert body["decision"]["effect"] == "deny"
    assert body["decision"]["reason_code"] == "no_rule_allows"
    assert body["decision"]["directory_revision"] == revision
    assert body["active_decision"]["effect"] == "allow"
    assert "directory_ignored" not in body


def test_an_edited_sets_own_directory_file_is_ignored_and_said_so(served_signed):
    running, revision = served_signed
    # The shipped directory file, which has no zoe.
    files = [
        *(f for f in active_files(running) if f["name"] != "directory.json"),
        {
            "name": "directory.yaml",
            "content": (SHIPPED_POLICIES / "directory.yaml").read_text(),
        },
    ]

    status, _, body = evaluate(running, ZOE_REFUND, files)

    assert status == 200, body
    assert body["decision"]["effect"] == "allow"
    assert body["decision"]["directory_revision"] == revision
    assert body["directory_ignored"]["files"] == ["directory.yaml"]
    assert "directory.store" in body["directory_ignored"]["why"]


def test_an_unexpected_failure_is_a_json_500_and_logged(served, monkeypatch, caplog):
    """A store that fails to read (as LMDB may) is no refusal: the caller
    gets JSON it can show, the log what failed and where."""

    def broken(_self, _decision_id):
        raise OSError("MDB_PANIC: the store failed to read")

    monkeypatch.setattr(AuditStore, "find_decision", broken)
    with caplog.at_level(logging.ERROR, logger=playground_module.log.name):
        status, response, body = call(
            served,
            "POST",
            "/playground/api/replay",
            {"decision_id": "some-id"},
            bearer("ops"),
        )

    assert status == 500
    assert "json" in response.getheader("content-type")
    assert body == {"error": "internal error; see the daemon's log"}
    (failed,) = [
        r for r in caplog.records if r.getMessage() == "playground call failed"
    ]
    assert failed.exc_info is not None
    assert failed.fields["component"] == "server"
    assert failed.fields["path"] == "/playground/api/replay"
    assert "MDB_PANIC" in failed.fields["error"]


def test_a_replay_compiles_and_decides_in_a_run_process(served, monkeypatch):
    """The daemon reads the record and the files; the run's process
    compiles and decides (under the run's limits), not the daemon."""
    jobs = []
    real = playground_module._run_isolated

    def seen(job, limits):
        jobs.append(msgspec.msgpack.decode(job, type=playground_module._ReplayJob))
        return real(job, limits)

    monkeypatch.setattr(playground_module, "_run_isolated", seen)
    answer = served.stub().Decide(small_refund(), timeout=CALL_TIMEOUT)

    status, _, body = call(
        served,
        "POST",
        "/playground/api/replay",
        {"decision_id": answer.decision_id},
        bearer("ops"),
    )

    assert status == 200, body
    assert body["replayed"]["effect"] == "allow"
    assert [job.decision_id for job in jobs] == [answer.decision_id]
    assert jobs[0].policy_revision == answer.policy_revision


def test_a_run_process_lowers_its_priority(monkeypatch):
    """_answer_in_process asks for the lowest priority, then runs."""
    niced = []
    monkeypatch.setattr(playground_module.os, "nice", niced.append)
    monkeypatch.setattr(playground_module, "_limit_process", lambda *_: None)
    monkeypatch.setattr(playground_module.resource, "setrlimit", lambda *_: None)
    files = [
        playground_module._File(path.name, path.read_text())
        for path in sorted(pathlib.Path(SHIPPED_POLICIES).glob("*.yaml"))
    ]
    job = playground_module._WhatIfJob(SMALL_REFUND, Env(now=Timestamp(0)), files)
    ours, theirs = multiprocessing.Pipe(duplex=False)

    playground_module._answer_in_process(msgspec.msgpack.encode(job), 64, 1, theirs)

    answer = msgspec.msgpack.decode(ours.recv_bytes())
    ours.close()
    assert niced == [19]
    assert answer["status"] == 200, answer
    assert answer["body"]["decision"]["effect"] == "allow"


def test_a_decision_recorded_with_no_directory_is_replayed(served, monkeypatch):
    """A record citing directory "" (a daemon following a signed directory
    decided it before one arrived, ``NO_DIRECTORY``) is decided again with
    its policies alone, as a what-if then is, not refused naming a blank
    directory."""
    real = playground_module.decode_record

    def without_directory(data):
        return msgspec.structs.replace(real(data), directory_revision="")

    monkeypatch.setattr(playground_module, "decode_record", without_directory)
    answer = served.stub().Decide(small_refund(), timeout=CALL_TIMEOUT)

    status, _, body = call(
        served,
        "POST",
        "/playground/api/replay",
        {"decision_id": answer.decision_id},
        bearer("ops"),
    )

    assert status == 200, body
    assert body["recorded"]["directory_revision"] == ""
    assert body["replayed"]["policy_revision"] == answer.policy_revision
    assert body["replayed"]["directory_revision"] == ""


def test_the_signed_directory_is_answered_apart_and_read_only(served_signed):
    running, revision = served_signed

    status, _, body = call(
        running, "GET", "/playground/api/policies", None, bearer("ops")
    )

    assert status == 200, body
    assert body["directory_revision"] == revision
    names = [file["name"] for file in body["files"]]
    assert "payments.yaml" in names
    assert "directory.json" not in names
    assert body["signed_directory"]["read_only"] is True
    assert [f["name"] for f in body["signed_directory"]["files"]] == ["directory.json"]
    # The editable copy, sent back as it is, leaves nothing aside.
    status, _, decided = evaluate(running, ZOE_REFUND, body["files"])
    assert status == 200, decided
    assert "directory_ignored" not in decided
    assert decided["decision"]["effect"] == "allow"


# --- limits -------------------------------------------------------------------


@pytest.fixture
def served_limited(tmp_path, start_daemon):
    """A daemon whose policies declare limits (``limits_support``)."""
    from limits_support import limits_policies

    policies = limits_policies(tmp_path / "limited")
    return start_daemon(*admin_overrides(tmp_path), f"policy.source={policies}")


@pytest.mark.parametrize(("count", "effect"), [(4, "allow"), (5, "deny")])
def test_a_pasted_request_sets_its_limit_counts(served_limited, count, effect):
    from limits_support import request_with

    text = request_with(f"{{refunds_today: {{count: {count}}}}}")

    status, _, body = evaluate(served_limited, text)

    assert status == 200, body
    decision = body["decision"]
    assert decision["effect"] == effect
    today = [line for line in decision["limits"] if line.startswith("refunds_today")]
    assert today == [
        f"refunds_today: count {count}, ceiling 5, remaining {5 - count}, exceeded "
        f"{str(count == 5).lower()}; window start 2026-12-06T23:00:00Z, "
        'key ["alice"], scope daemon (given)'
    ]
    assert "limits:" in decision["explained"]


def test_a_pasted_request_giving_an_undeclared_limit_is_a_400(served_limited):
    from limits_support import request_with

    status, _, body = evaluate(served_limited, request_with("{nope: {count: 1}}"))

    assert status == 400, body
    assert body["location"] == "$.request.limits.nope"


def test_a_replay_shows_the_recorded_limits_and_decides_with_them(served_limited):
    stub = served_limited.stub()
    refund = pb.DecideRequest(
        asserted_chain=["alice"],
        action="payments.refund.issue",
        resource=pb.Resource(kind="payments.refund", id="rf-1"),
        context={"amount": pb.Value(int_value=500)},
    )
    answers = [stub.Decide(refund, timeout=CALL_TIMEOUT) for _ in range(6)]
    fifth, sixth = answers[4], answers[5]

    replays = [
        call(
            served_limited,
            "POST",
            "/playground/api/replay",
            {"decision_id": answer.decision_id},
            bearer("ops"),
        )
        for answer in (fifth, sixth)
    ]

    (s5, _, b5), (s6, _, b6) = replays
    assert (s5, s6) == (200, 200), (b5, b6)
    # The sixth replays as denied though the log now holds six counted
    # decisions, and the fifth as allowed: each with what it recorded.
    assert (b5["replayed"]["effect"], b6["replayed"]["effect"]) == ("allow", "deny")
    assert (b5["changed"], b6["changed"]) == (False, False)
    assert any(
        line.startswith("refunds_today: count 5, ceiling 5, remaining 0, exceeded true")
        for line in b6["recorded"]["limits"]
    ), b6["recorded"]["limits"]
    assert any(
        line.startswith("refunds_today: count 5, ceiling 5, remaining 0, exceeded true")
        for line in b6["replayed"]["limits"]
    ), b6["replayed"]["limits"]
    # Its request, loaded into the editor, carries the recorded values.
    assert "refunds_today:\n      count: 5" in b6["request"]
