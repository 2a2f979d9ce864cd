"""The playground in a real headless Chromium, on a real daemon.

The daemon runs the shipped config and policies (LMDB in tmp_path, gRPC on
a Unix socket, HTTP on 127.0.0.1); a reviewer signs in at /playground. The
acceptance points of #12, exactly: a pasted request shows the decision and
matched rules a real gRPC Decide of the same request gets; a policy edited
in the page shows the changed decision while live Decides, sent from a
thread during that page action, still get the active policy's answer; and
the audit log gains no record from the page (its count before and after,
less the Decides the test itself sent).
"""

from __future__ import annotations

import json
import threading

import pytest
from kynara.v1 import decision_pb2 as pb
from support import DEFAULT_NOW, read_record, small_refund
from test_review_browser import by, check_page, submit_and_wait, wait_for

pytestmark = pytest.mark.usefixtures("browser_tools")

CALL_TIMEOUT = 30
SECRET = "rita-reviewer-secret-0123456789"
# 500.01: above refund-small's limit, so refund-large asks for approval.
PASTED = f"""\
request:
  now: "{DEFAULT_NOW}"
  chain: [alice, support-bot]
  action: payments.refund.issue
  resource: {{kind: payments.refund, id: rf_1, attributes: {{amount: 50001}}}}
"""
SMALL = PASTED.replace("50001", "1200")
DECISIONS = {
    pb.DECISION_ALLOW: "allow",
    pb.DECISION_DENY: "deny",
    pb.DECISION_REQUIRE_APPROVAL: "require_approval",
}


@pytest.fixture
def served(tmp_path, start_daemon):
    path = tmp_path / "rita.secret"
    path.write_text(SECRET)
    credentials = {"rita": {"secret_file": str(path), "roles": ["reviewer"]}}
    running = start_daemon(
        f"admin.socket={tmp_path / 'admin.sock'}",
        f"admin.credentials={json.dumps(credentials)}",
    )
    running.base = f"http://127.0.0.1:{running.daemon.http_port}"
    return running


def records(running) -> int:
    return running.daemon._store.head().seq


def records_since(running, seq: int) -> list[tuple[str, str]]:
    """(kind, decision id) of every record after ``seq``."""
    return [
        (record.kind, record.decision_id)
        for record in (
            read_record(running, n) for n in range(seq + 1, records(running) + 1)
        )
    ]


def sign_in(driver, running) -> None:
    driver.get(running.base + "/playground")
    assert driver.current_url.endswith("/playground/login")
    driver.find_element(by("ID"), "token").send_keys(SECRET)
    submit_and_wait(driver, driver.find_element(by("CSS_SELECTOR"), "form button"))
    assert driver.current_url.endswith("/playground")
    # The tour arrives by fetch once the page runs its script.
    wait_for(driver, lambda d: d.find_elements(by("CSS_SELECTOR"), "#tour button"))


def paste(driver, text: str) -> None:
    area = driver.find_element(by("ID"), "request")
    area.clear()
    area.send_keys(text)


def decide_in_page(driver) -> None:
    """Click Decide and wait until this run's answer is shown."""
    driver.execute_script(
        "document.getElementById('result').hidden = true;"
        "document.getElementById('status').textContent = '';"
    )
    driver.find_element(by("ID"), "run").click()
    wait_for(
        driver,
        lambda d: (
            d.find_element(by("ID"), "status").text in ("Decided.", "Not decided.")
        ),
    )
    assert driver.find_element(by("ID"), "status").text == "Decided.", (
        driver.find_element(by("ID"), "error").text
    )


def shown_rules(driver) -> list[str]:
    return [
        item.get_attribute("data-rule")
        for item in driver.find_elements(by("CSS_SELECTOR"), "#matched-rules li")
        if item.get_attribute("data-rule")
    ]


def shown_effect(driver) -> str:
    return driver.find_element(by("ID"), "decision").get_attribute("data-effect")


def test_the_playground_meets_the_acceptance_points(chromium, served, axe, screenshot):
    stub = served.stub()
    # The decision ids of the Decides this test sends itself.
    sent: list[str] = []
    chromium.get(served.base + "/playground")
    check_page(chromium, axe, screenshot, "playground-login")
    sign_in(chromium, served)
    check_page(chromium, axe, screenshot, "playground")
    before = records(served)

    # 1. A pasted request shows what a real Decide of it gets.
    live = small_refund()
    live.resource.attributes["amount"].int_value = 50001
    answer = stub.Decide(live, timeout=CALL_TIMEOUT)
    sent.append(answer.decision_id)
    paste(chromium, PASTED)
    decide_in_page(chromium)

    assert answer.decision == pb.DECISION_REQUIRE_APPROVAL
    assert shown_effect(chromium) == DECISIONS[answer.decision]
    assert chromium.find_element(by("ID"), "reason-code").text == answer.reason_code
    assert shown_rules(chromium) == [
        f"{r.policy}/{r.rule}@{r.principal}" for r in answer.matched_rules
    ]
    assert chromium.find_elements(by("CSS_SELECTOR"), "#trace li[data-rule]")
    check_page(chromium, axe, screenshot, "pasted")

    # 2. An edited policy changes the page's answer, never the live one.
    chromium.find_element(by("ID"), "load-policies").click()
    wait_for(chromium, lambda d: d.find_elements(by("CSS_SELECTOR"), "textarea.file"))
    chromium.execute_script(
        "const area = document.querySelector('textarea[data-name=\"payments.yaml\"]');"
        "area.value = area.value.replace("
        "'resource.attr.amount <= 50000', 'resource.attr.amount <= 100');"
    )
    paste(chromium, SMALL)
    assert chromium.find_element(by("ID"), "use-edited").is_selected()
    live_answers: list[pb.DecideResponse] = []
    stop = threading.Event()

    def decide_live() -> None:
        while True:
            live_answers.append(stub.Decide(small_refund(), timeout=CALL_TIMEOUT))
            if stop.is_set():
                return

    worker = threading.Thread(target=decide_live)
    worker.start()
    try:
        decide_in_page(chromium)
    finally:
        stop.set()
        worker.join(CALL_TIMEOUT)
    sent.extend(live.decision_id for live in live_answers)

    assert shown_effect(chromium) == "deny"
    assert chromium.find_element(by("ID"), "reason-code").text == "no_rule_allows"
    compare = chromium.find_element(by("ID"), "active-compare")
    assert compare.get_attribute("data-effect") == "allow"
    assert live_answers
    assert {live.decision for live in live_answers} == {pb.DECISION_ALLOW}
    check_page(chromium, axe, screenshot, "edited")

    # The tour and a replay by id, still without a record from the page.
    chromium.find_element(
        by("CSS_SELECTOR"), '#tour button[data-step="inactive-principal"]'
    ).click()
    wait_for(
        chromium,
        lambda d: d.find_element(by("ID"), "reason-code").text == "inactive_principal",
    )
    chromium.find_element(by("ID"), "decision-id").send_keys(answer.decision_id)
    chromium.find_element(by("ID"), "replay").click()
    wait_for(
        chromium, lambda d: d.find_element(by("ID"), "replay-result").is_displayed()
    )
    changed = chromium.find_element(by("ID"), "replay-changed")
    assert changed.get_attribute("data-changed") == "false"
    check_page(chromium, axe, screenshot, "replayed")

    # 3. The audit log gained the test's own Decides and nothing else: one
    # decision record each, and the approval the first one asked for.
    added = records_since(served, before)
    assert sorted(d for kind, d in added if kind == "decision") == sorted(sent)
    assert [(k, d) for k, d in added if k != "decision"] == [
        ("approval_requested", answer.decision_id)
    ]
