"""The review page in a real headless Chromium, at desktop and phone widths.

A reviewer signs in, lists, filters, opens, approves, and rejects with a
comment; a forged post from another origin and a stale CSRF token are
refused; the session cookie's flags are what the browser keeps. Every page
visited is screenshot and checked with axe-core: no serious or critical
violation, and nothing wider than the window.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from aiohttp import web
from review_support import (
    MemoryInbox,
    ServedPage,
    disguised_approvals,
    sample_approvals,
)

from kynara_sidecar.approvals.model import ApprovalState, Verdict
from kynara_sidecar.server.review_page import SESSION_COOKIE

pytestmark = pytest.mark.usefixtures("browser_tools")

PAGE_WAIT_SECONDS = 20
BLOCKING_IMPACTS = {"serious", "critical"}


@pytest.fixture
def page(browser_tools) -> Iterator[ServedPage]:
    served = ServedPage(MemoryInbox(sample_approvals()))
    try:
        yield served
    finally:
        served.stop()


def wait_for(driver, condition) -> None:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    # Mid-navigation, ChromeDriver may answer a probe with "unhandled
    # inspector error" (the old document's context is gone); probe again.
    wait = WebDriverWait(
        driver, PAGE_WAIT_SECONDS, ignored_exceptions=(WebDriverException,)
    )
    wait.until(condition)


def by(how: str):
    from selenium.webdriver.common.by import By

    return getattr(By, how)


def submit_and_wait(driver, element) -> None:
    """Click a submit button and wait for the next page to replace this one."""
    from selenium.webdriver.support import expected_conditions as ec

    old = driver.find_element(by("TAG_NAME"), "html")
    element.click()
    wait_for(driver, ec.staleness_of(old))


def sign_in(driver, page: ServedPage, token: str = "rita-secret") -> None:
    driver.get(page.base + "/approvals")
    assert "/approvals/login" in driver.current_url
    driver.find_element(by("ID"), "token").send_keys(token)
    submit_and_wait(driver, driver.find_element(by("CSS_SELECTOR"), "form button"))


def check_page(driver, axe, screenshot, name: str) -> None:
    """Screenshot, axe (no serious or critical violation), no sideways
    scrolling at this width."""
    path = screenshot(name)
    violations = axe()
    blocking = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']]}"
        for v in violations
        if v.get("impact") in BLOCKING_IMPACTS
    ]
    assert blocking == [], f"{name}: axe violations (screenshot {path})"
    # clientWidth: the viewport less a classic scrollbar, which headless
    # Chromium draws (a phone's overlays); so a page that fits here fits a
    # phone 15px narrower than the window too.
    overflow, wide = driver.execute_script(
        "const w = document.documentElement.clientWidth;"
        "const over = [...document.querySelectorAll('body *')]"
        ".filter(e => e.getBoundingClientRect().right > w + 0.5)"
        ".slice(0, 5).map(e => e.tagName + '.' + e.className);"
        "return [document.documentElement.scrollWidth - w, over];"
    )
    assert overflow <= 0, f"{name}: {overflow}px too wide: {wide} ({path})"


def listed_ids(driver) -> list[str]:
    return [
        link.get_attribute("href").rsplit("/", 1)[1]
        for link in driver.find_elements(by("CSS_SELECTOR"), "ul.approvals h2 a")
    ]


def test_sign_in_list_filter_open_and_approve(chromium, page, axe, screenshot):
    approvals = sample_approvals()
    chromium.get(page.base + "/approvals")
    check_page(chromium, axe, screenshot, "login")

    sign_in(chromium, page)

    width = chromium.execute_script("return window.innerWidth")
    assert width == chromium.get_window_size()["width"]
    assert chromium.find_element(by("TAG_NAME"), "h1").text == "Approvals"
    assert listed_ids(chromium) == [approvals[n].id for n in (3, 2, 1, 0)]
    check_page(chromium, axe, screenshot, "list")

    chromium.find_element(by("ID"), "f-agent").send_keys("bot-a")
    risk = chromium.find_element(by("ID"), "f-risk")
    risk.clear()
    risk.send_keys("25")
    filter_button = chromium.find_element(by("CSS_SELECTOR"), "form.filters button")
    submit_and_wait(chromium, filter_button)

    assert "agent=bot-a" in chromium.current_url
    assert listed_ids(chromium) == [approvals[2].id, approvals[0].id]
    check_page(chromium, axe, screenshot, "filtered")

    link = chromium.find_element(by("CSS_SELECTOR"), "ul.approvals h2 a")
    submit_and_wait(chromium, link)

    assert chromium.current_url.endswith(f"/approvals/{approvals[2].id}")
    text = chromium.find_element(by("TAG_NAME"), "main").text
    for shown in (
        "payments.payout.send",
        "9000",
        "Refunds over 1,000 EUR need a human.",
        "R.attr.amount > 1000",
        "amount 9000 past 1000",
        "bot-a",
        "alice",
        "finance",
    ):
        assert shown in text
    check_page(chromium, axe, screenshot, "approval")

    chromium.find_element(by("ID"), "comment").send_keys("Checked the invoice.")
    approve = chromium.find_element(by("CSS_SELECTOR"), "button.approve")
    submit_and_wait(chromium, approve)

    notice = chromium.find_element(by("CSS_SELECTOR"), "[role=status]").text
    assert notice == "Your approval was recorded."
    approval = page.inbox.get(approvals[2].id)
    assert approval.state is ApprovalState.APPROVED
    assert approval.reviews[0].reviewer == "rita"
    assert approval.reviews[0].comment == "Checked the invoice."
    assert chromium.find_elements(by("CSS_SELECTOR"), "button.approve") == []
    check_page(chromium, axe, screenshot, "approved")


def test_reject_with_a_comment(chromium, page, axe, screenshot):
    approval_id = sample_approvals()[1].id
    sign_in(chromium, page)
    chromium.get(f"{page.base}/approvals/{approval_id}")

    chromium.find_element(by("ID"), "comment").send_keys("Refund already paid.")
    reject = chromium.find_element(by("CSS_SELECTOR"), "button.reject")
    submit_and_wait(chromium, reject)

    approval = page.inbox.get(approval_id)
    assert approval.state is ApprovalState.REJECTED
    assert approval.reviews[0].verdict is Verdict.REJECT
    assert approval.reviews[0].comment == "Refund already paid."
    main = chromium.find_element(by("TAG_NAME"), "main").text
    assert "Your rejection was recorded." in main
    assert "Refund already paid." in main
    check_page(chromium, axe, screenshot, "rejected")


def test_self_approval_is_refused_on_the_page(chromium, page, axe, screenshot):
    approval_id = sample_approvals()[1].id  # alice's own refund
    sign_in(chromium, page, "alice-secret")
    chromium.get(f"{page.base}/approvals/{approval_id}")

    approve = chromium.find_element(by("CSS_SELECTOR"), "button.approve")
    submit_and_wait(chromium, approve)

    alert = chromium.find_element(by("CSS_SELECTOR"), "[role=alert]").text
    assert alert.startswith("You may not review your own request")
    assert page.inbox.get(approval_id).state is ApprovalState.PENDING
    check_page(chromium, axe, screenshot, "self-approval")


def test_session_cookie_is_secure_http_only_and_strict(chromium, page):
    sign_in(chromium, page)

    cookies = {c["name"]: c for c in chromium.get_cookies()}

    session = cookies[SESSION_COOKIE]
    assert session["secure"] is True
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert session["path"] == "/approvals"
    assert len(session["value"]) == 43
    # HttpOnly: the page's own script could not read it.
    assert chromium.execute_script("return document.cookie") == ""


def test_stale_csrf_token_is_refused(chromium, page, axe, screenshot):
    approval_id = sample_approvals()[1].id
    sign_in(chromium, page)
    chromium.get(f"{page.base}/approvals/{approval_id}")
    form = chromium.find_element(by("CSS_SELECTOR"), "form[action$='/review']")
    csrf = form.find_element(by("NAME"), "csrf")
    chromium.execute_script("arguments[0].value = 'stale-token'", csrf)

    submit_and_wait(chromium, form.find_element(by("CSS_SELECTOR"), "button.approve"))

    assert chromium.find_element(by("TAG_NAME"), "h1").text == "Review refused"
    alert = chromium.find_element(by("CSS_SELECTOR"), "[role=alert]").text
    assert "CSRF token does not match" in alert
    assert page.inbox.get(approval_id).reviews == ()
    check_page(chromium, axe, screenshot, "csrf-refused")


class AttackerSite:
    """Another origin on 127.0.0.1 (same site, other port: the session cookie
    still travels) serving a form that posts a review to the page, holding
    even the victim's real CSRF token."""

    def __init__(self, page: ServedPage, approval_id: str, csrf: str):
        target = f"{page.base}/approvals/{approval_id}/review"
        body = (
            '<!doctype html><html lang="en"><title>prize</title><main>'
            f'<form method="post" action="{target}">'
            f'<input type="hidden" name="csrf" value="{csrf}">'
            '<input type="hidden" name="verdict" value="approve">'
            '<button id="win">Claim prize</button></form></main></html>'
        )

        async def serve(_request: web.Request) -> web.Response:
            return web.Response(text=body, content_type="text/html")

        app = web.Application()
        app.router.add_get("/", serve)
        self._page = page
        self.runner = web.AppRunner(app, access_log=None)
        page._call(self._start())

    async def _start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/"

    def stop(self) -> None:
        self._page._call(self.runner.cleanup())


def test_post_from_another_origin_is_refused(chromium, page, axe, screenshot):
    approval_id = sample_approvals()[1].id
    sign_in(chromium, page)
    chromium.get(f"{page.base}/approvals/{approval_id}")
    csrf = chromium.find_element(by("NAME"), "csrf").get_attribute("value")
    attacker = AttackerSite(page, approval_id, csrf)
    try:
        chromium.get(attacker.url)

        submit_and_wait(chromium, chromium.find_element(by("ID"), "win"))

        assert chromium.find_element(by("TAG_NAME"), "h1").text == "Review refused"
        alert = chromium.find_element(by("CSS_SELECTOR"), "[role=alert]").text
        assert "not sent from this page's own origin" in alert
        assert page.inbox.get(approval_id).reviews == ()
        check_page(chromium, axe, screenshot, "origin-refused")
    finally:
        attacker.stop()


def test_a_disguised_resource_id_reads_as_it_is(chromium, axe, screenshot):
    approvals, disguised = disguised_approvals()
    page = ServedPage(MemoryInbox(approvals))
    try:
        sign_in(chromium, page)
        chromium.get(f"{page.base}/approvals/{disguised.id}")

        heading = chromium.find_element(by("TAG_NAME"), "h1").text
        badge = chromium.find_element(by("CSS_SELECTOR"), "h1 .ctl")
        shown_background = badge.value_of_css_property("background-color")
        main = chromium.find_element(by("TAG_NAME"), "main").text
        check_page(chromium, axe, screenshot, "disguised")
    finally:
        page.stop()

    # What the reviewer reads: the override written out where it stands,
    # not the file name it would have faked.
    assert "invoice-\\u202Efdp.exe" in heading
    assert "exe.pdf" not in heading
    assert badge.text == "\\u202E"
    assert shown_background not in ("rgba(0, 0, 0, 0)", "transparent")
    assert "\u202e" not in main and "\u200b" not in main
