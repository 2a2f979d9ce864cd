"""The review page's HTTP rules, through aiohttp's test client on 127.0.0.1:
sign-in and its cookie, CSRF and origin checks, security headers, escaping,
and the refusals an inbox gives shown on the page.

Cookies are carried by hand (the client's jar is a dummy) so each test
sees exactly what the page set and sends exactly what it means to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp import DummyCookieJar, web
from aiohttp.test_utils import TestClient, TestServer
from review_support import (
    HOSTILE,
    NOW_NS,
    MemoryInbox,
    authenticate,
    disguised_approvals,
    sample_approvals,
)
from yarl import URL

from kynara_sidecar.approvals.model import ApprovalState, AskingRule, Review, Verdict
from kynara_sidecar.errors import AuditUnavailable
from kynara_sidecar.server.review_page import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    add_review_routes,
)

SESSION_SECONDS = 3600
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def run_async(test):
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return wrapper


class Clock:
    def __init__(self) -> None:
        self.now = NOW_NS

    def __call__(self) -> int:
        return self.now


@dataclasses.dataclass
class Page:
    client: TestClient
    inbox: MemoryInbox
    clock: Clock
    session: str = ""
    csrf: str = ""
    # Why each refused post or sign-in was refused, as counted.
    refused: list[str] = dataclasses.field(default_factory=list)

    @property
    def origin(self) -> str:
        return str(self.client.make_url("/")).rstrip("/")

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {"Origin": self.origin}
        if self.session:
            headers["Cookie"] = f"{SESSION_COOKIE}={self.session}"
        headers.update(extra)
        return headers

    async def login(
        self, token: str = "rita-secret", next_path: str = "/approvals", **headers: str
    ):
        form = await self.client.get("/approvals/login")
        login_csrf = form.cookies[LOGIN_COOKIE].value
        answer = await self.client.post(
            "/approvals/login",
            data={"token": token, "csrf": login_csrf, "next": next_path},
            headers={
                "Origin": self.origin,
                "Cookie": f"{LOGIN_COOKIE}={login_csrf}",
                **headers,
            },
            allow_redirects=False,
        )
        if SESSION_COOKIE in answer.cookies:
            self.session = answer.cookies[SESSION_COOKIE].value
            listing = await self.client.get("/approvals", headers=self.headers())
            self.csrf = CSRF_FIELD.search(await listing.text()).group(1)
        return answer

    async def review(self, approval_id: str, verdict: str, /, **overrides: str):
        data = {"csrf": self.csrf, "verdict": verdict, "comment": "checked"}
        headers = self.headers()
        for name, value in overrides.items():
            if name in data:
                data[name] = value
            else:
                headers[name.replace("_", "-")] = value
        return await self.client.post(
            f"/approvals/{approval_id}/review",
            data=data,
            headers={k: v for k, v in headers.items() if v != "<none>"},
            allow_redirects=False,
        )

    async def follow(self, answer) -> tuple[int, str]:
        """GET where a 303 sends the browser; its status and text."""
        assert answer.status == 303, await answer.text()
        shown = await self.client.get(
            answer.headers["Location"], headers=self.headers()
        )
        return shown.status, await shown.text()


@contextlib.asynccontextmanager
async def served(
    approvals=None, *, max_sessions: int = 100, inbox_type=MemoryInbox
) -> AsyncIterator[Page]:
    inbox = inbox_type(sample_approvals() if approvals is None else approvals)
    clock = Clock()
    refused: list[str] = []
    app = web.Application()
    add_review_routes(
        app,
        inbox,
        authenticate,
        title="Kynara test inbox",
        session_seconds=SESSION_SECONDS,
        clock=clock,
        max_sessions=max_sessions,
        on_refused=refused.append,
    )
    server = TestServer(app, host="127.0.0.1")
    async with TestClient(server, cookie_jar=DummyCookieJar()) as client:
        yield Page(client, inbox, clock, refused=refused)


def first_pending(_page: Page) -> str:
    # Approval #2: pending, no role required, user alice (not rita).
    return sample_approvals()[1].id


# ------------------------------------------------------------ sign-in


@run_async
async def test_signed_out_reader_is_sent_to_sign_in_with_the_page_to_return_to():
    async with served() as page:
        approval_id = first_pending(page)

        answer = await page.client.get(
            f"/approvals/{approval_id}", allow_redirects=False
        )

        assert answer.status == 303
        location = URL(answer.headers["Location"])
        assert location.path == "/approvals/login"
        assert location.query["next"] == f"/approvals/{approval_id}"


@run_async
async def test_sign_in_sets_a_secure_http_only_strict_session_cookie():
    async with served() as page:
        answer = await page.login()

        assert answer.status == 303
        assert answer.headers["Location"] == "/approvals"
        raw = [
            h
            for h in answer.headers.getall("Set-Cookie")
            if h.startswith(SESSION_COOKIE)
        ]
        assert len(raw) == 1
        cookie = answer.cookies[SESSION_COOKIE]
        assert len(cookie.value) == 43  # 32 random bytes, base64url
        assert cookie["secure"] is True
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/approvals"
        assert cookie["max-age"] == str(SESSION_SECONDS)
        assert "Secure" in raw[0] and "HttpOnly" in raw[0]


@run_async
async def test_sign_in_opens_a_new_session_each_time():
    async with served() as page:
        await page.login()
        first = page.session

        await page.login()

        assert page.session != first


@pytest.mark.parametrize(
    ("token", "status", "message"),
    [
        ("nobody-knows-this", 401, "not a known reviewer credential"),
        ("agent-secret", 403, "lacks the reviewer role"),
        ("", 401, "not a known reviewer credential"),
    ],
    ids=["unknown", "agent", "empty"],
)
@run_async
async def test_refused_sign_in_says_why_and_opens_no_session(token, status, message):
    async with served() as page:
        answer = await page.login(token)

        assert answer.status == status
        assert message in await answer.text()
        assert SESSION_COOKIE not in answer.cookies
        code = "identity_invalid" if status == 401 else "role_missing"
        assert page.refused == [code]


@run_async
async def test_sign_in_from_another_origin_is_refused():
    async with served() as page:
        answer = await page.login(Origin="http://evil.example")

        assert answer.status == 403
        assert "not sent from this page" in await answer.text()
        assert SESSION_COOKIE not in answer.cookies
        assert page.refused == ["origin"]


@run_async
async def test_sign_in_without_its_form_token_is_refused():
    async with served() as page:
        answer = await page.client.post(
            "/approvals/login",
            data={"token": "rita-secret", "csrf": "guess"},
            headers={"Origin": page.origin, "Cookie": f"{LOGIN_COOKIE}=other"},
            allow_redirects=False,
        )

        assert answer.status == 403
        assert "CSRF token does not match" in await answer.text()
        assert page.refused == ["csrf"]


@pytest.mark.parametrize(
    "next_path",
    ["//evil.example/approvals", "http://evil.example/approvals", "/metrics"],
)
@run_async
async def test_sign_in_never_redirects_off_the_inbox(next_path):
    async with served() as page:
        form = await page.client.get("/approvals/login")
        login_csrf = form.cookies[LOGIN_COOKIE].value

        answer = await page.client.post(
            "/approvals/login",
            data={"token": "rita-secret", "csrf": login_csrf, "next": next_path},
            headers={"Origin": page.origin, "Cookie": f"{LOGIN_COOKIE}={login_csrf}"},
            allow_redirects=False,
        )

        assert answer.status == 303
        assert answer.headers["Location"] == "/approvals"


@run_async
async def test_session_ends_after_session_seconds():
    async with served() as page:
        await page.login()
        page.clock.now += SESSION_SECONDS * 1_000_000_000

        answer = await page.client.get(
            "/approvals", headers=page.headers(), allow_redirects=False
        )

        assert answer.status == 303
        assert answer.headers["Location"].startswith("/approvals/login")


@run_async
async def test_sessions_are_bounded_and_the_oldest_ends_first():
    async with served(max_sessions=2) as page:
        await page.login()
        oldest = page.session
        await page.login("sam-secret")
        await page.login("otto-secret")

        page.session = oldest
        answer = await page.client.get(
            "/approvals", headers=page.headers(), allow_redirects=False
        )

        assert answer.status == 303


@run_async
async def test_sign_out_ends_the_session_and_clears_the_cookie():
    async with served() as page:
        await page.login()

        answer = await page.client.post(
            "/approvals/logout",
            data={"csrf": page.csrf},
            headers=page.headers(),
            allow_redirects=False,
        )
        after = await page.client.get(
            "/approvals", headers=page.headers(), allow_redirects=False
        )

        assert answer.status == 303
        assert answer.cookies[SESSION_COOKIE].value == ""
        assert after.status == 303


# ------------------------------------------------------------ forged posts


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"csrf": ""}, "CSRF token does not match"),
        ({"csrf": "A" * 43}, "CSRF token does not match"),
        ({"Origin": "http://evil.example"}, "not sent from this page"),
        ({"Origin": "null", "Sec_Fetch_Site": "cross-site"}, "not sent from"),
        ({"Origin": "<none>"}, "not sent from this page"),
        (
            {"Origin": "<none>", "Referer": "http://evil.example/x"},
            "not sent from this page",
        ),
    ],
    ids=[
        "no-token",
        "wrong-token",
        "other-origin",
        "null-origin-cross-site",
        "no-origin",
        "other-referer",
    ],
)
@run_async
async def test_forged_review_is_refused_with_a_403_page(overrides, why):
    async with served() as page:
        await page.login()
        approval_id = first_pending(page)

        answer = await page.review(approval_id, "approve", **overrides)

        assert answer.status == 403
        text = await answer.text()
        assert why in text
        assert "<h1>Review refused</h1>" in text
        assert page.inbox.get(approval_id).state is ApprovalState.PENDING
        assert page.inbox.get(approval_id).reviews == ()
        assert page.refused == ["csrf" if "CSRF" in why else "origin"]


@run_async
async def test_csrf_token_of_another_session_is_refused():
    async with served() as page:
        await page.login("sam-secret")
        sams_token = page.csrf
        await page.login()
        approval_id = first_pending(page)

        answer = await page.review(approval_id, "approve", csrf=sams_token)

        assert answer.status == 403
        assert page.inbox.get(approval_id).reviews == ()


@pytest.mark.parametrize(
    "headers",
    [
        # What a browser sends under Referrer-Policy: no-referrer.
        {"Origin": "null", "Sec_Fetch_Site": "same-origin"},
        {"Origin": "<own>"},
        {"Origin": "<none>", "Referer": "<own>/approvals"},
    ],
    ids=["null-origin-same-site", "own-origin", "own-referer"],
)
@run_async
async def test_review_from_the_page_itself_is_recorded(headers, caplog):
    caplog.set_level(logging.INFO, logger="kynara")
    async with served() as page:
        await page.login()
        approval_id = first_pending(page)
        headers = {k: v.replace("<own>", page.origin) for k, v in headers.items()}

        answer = await page.review(approval_id, "approve", **headers)

        assert answer.status == 303
        assert (
            answer.headers["Location"] == f"/approvals/{approval_id}?reviewed=approve"
        )
        approval = page.inbox.get(approval_id)
        assert approval.state is ApprovalState.APPROVED
        assert approval.reviews[0].reviewer == "rita"
        assert approval.reviews[0].comment == "checked"
        (line,) = [
            r.fields
            for r in caplog.records
            if r.getMessage() == "reviewed approval on review page"
        ]
        assert (line["approval_id"], line["decision_id"]) == (
            approval_id,
            approval.decision_id,
        )


@run_async
async def test_review_without_a_session_is_refused():
    async with served() as page:
        approval_id = first_pending(page)

        answer = await page.review(approval_id, "approve")

        assert answer.status == 403
        assert "session has ended" in await answer.text()
        assert page.inbox.get(approval_id).reviews == ()


# ------------------------------------------------------------ the inbox's refusals


@pytest.mark.parametrize(
    ("token", "index", "shown"),
    [
        ("alice-secret", 1, "You may not review your own request"),
        ("sam-secret", 2, "Your roles do not allow this review"),
        ("rita-secret", 4, "This approval is closed to your review"),
    ],
    ids=["self-approval", "role-missing", "closed"],
)
@run_async
async def test_refused_review_redirects_to_the_approval_page_showing_why(
    token, index, shown
):
    async with served() as page:
        await page.login(token)
        approval_id = sample_approvals()[index].id

        answer = await page.review(approval_id, "approve", comment="<b>mine</b>")
        status, text = await page.follow(answer)
        _, reloaded = await page.follow(answer)

        assert answer.headers["Location"] == f"/approvals/{approval_id}"
        assert status == 200
        assert shown in text
        assert 'role="alert"' in text
        pending = sample_approvals()[index].state is ApprovalState.PENDING
        assert "&lt;b&gt;mine&lt;/b&gt;</textarea>" in text or not pending
        # Shown once: reloading the page neither posts again nor repeats it.
        assert shown not in reloaded
        assert page.inbox.get(approval_id).state is sample_approvals()[index].state


@run_async
async def test_refused_review_message_comes_from_the_session_not_the_url():
    async with served() as page:
        await page.login("sam-secret")
        approval_id = sample_approvals()[2].id
        refused = await page.review(approval_id, "approve")
        # Another browser (no session) following the same Location sees
        # nothing of it; nor does a made-up query parameter show anything.
        other = Page(page.client, page.inbox, page.clock)
        await other.login("rita-secret")

        _, theirs = await other.follow(refused)
        _, mine = await page.follow(refused)
        crafted = await page.client.get(
            f"/approvals/{approval_id}?error=Forged+words", headers=page.headers()
        )

        assert "Your roles do not allow this review" not in theirs
        assert "Your roles do not allow this review" in mine
        assert "Forged words" not in await crafted.text()


@run_async
async def test_second_review_by_the_same_reviewer_is_refused():
    approvals = sample_approvals()
    approvals[1] = msgspec.structs.replace(
        approvals[1],
        requirement=msgspec.structs.replace(approvals[1].requirement, approvers=2),
    )
    async with served(approvals) as page:
        await page.login()
        approval_id = approvals[1].id
        first = await page.review(approval_id, "approve")

        second = await page.review(approval_id, "approve")

        assert first.status == 303
        _, text = await page.follow(second)
        assert "has reviewed approval" in text
        assert page.inbox.get(approval_id).state is ApprovalState.PENDING


@run_async
async def test_reject_with_comment_rejects_and_keeps_the_comment():
    async with served() as page:
        await page.login()
        approval_id = first_pending(page)

        answer = await page.review(approval_id, "reject", comment="Not this one")
        shown = await page.client.get(
            answer.headers["Location"], headers=page.headers()
        )

        approval = page.inbox.get(approval_id)
        assert approval.state is ApprovalState.REJECTED
        assert approval.reviews[0].verdict is Verdict.REJECT
        assert approval.reviews[0].comment == "Not this one"
        text = await shown.text()
        assert "Your rejection was recorded." in text
        assert "Not this one" in text
        assert 'name="verdict"' not in text  # no form on a closed approval


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"verdict": "maybe"}, "expected verdict approve or reject"),
        ({"comment": "x" * 2001}, "expected a comment of at most 2000"),
    ],
    ids=["verdict", "comment"],
)
@run_async
async def test_malformed_review_is_refused_with_the_field_named(overrides, message):
    async with served() as page:
        await page.login()
        approval_id = first_pending(page)

        answer = await page.review(approval_id, "approve", **overrides)
        _, text = await page.follow(answer)

        assert message in text
        assert page.inbox.get(approval_id).reviews == ()


@run_async
async def test_unknown_approval_is_a_404_page():
    async with served() as page:
        await page.login()

        shown = await page.client.get("/approvals/apr_nope", headers=page.headers())
        reviewed = await page.review("apr_nope", "approve")

        assert shown.status == 404
        assert "No approval has the id apr_nope." in await shown.text()
        assert reviewed.status == 404


# ------------------------------------------------------------ list and filters


def _listed_ids(text: str) -> list[str]:
    return re.findall(r'<a href="/approvals/(apr_[a-z0-9]+)">', text)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", [4, 3, 2, 1]),
        ("?agent=bot-a", [4, 3, 1]),
        ("?action=payments.payout.send", [3]),
        ("?min_risk=50", [3, 2]),
        ("?state=rejected", [5]),
        ("?state=all&agent=bot-b", [5, 2]),
    ],
    ids=["pending", "agent", "action", "risk", "state", "all-states"],
)
@run_async
async def test_list_is_newest_first_and_filtered(query, expected):
    async with served() as page:
        await page.login()

        answer = await page.client.get(f"/approvals{query}", headers=page.headers())

        assert answer.status == 200
        ids = [sample_approvals()[n - 1].id for n in expected]
        assert _listed_ids(await answer.text()) == ids


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?min_risk=101", "filter min_risk: expected a whole number 0..100"),
        ("?min_risk=-1", "filter min_risk: expected a whole number 0..100"),
        ("?state=gone", "filter state: expected one of pending"),
        ("?state=any", "expired, used, all; got"),
        ("?agent=" + "a" * 257, "filter agent: expected at most 256 characters"),
    ],
    ids=["risk-high", "risk-negative", "state", "state-any", "agent-long"],
)
@run_async
async def test_bad_filter_is_a_400_naming_the_filter(query, message):
    async with served() as page:
        await page.login()

        answer = await page.client.get(f"/approvals{query}", headers=page.headers())

        assert answer.status == 400
        assert message in await answer.text()


# ------------------------------------------------------------ headers and escaping


@pytest.mark.parametrize("path", ["/approvals/login", "/approvals", "/approvals/x/y"])
@run_async
async def test_every_answer_under_approvals_carries_the_security_headers(path):
    async with served() as page:
        await page.login()

        answer = await page.client.get(path, headers=page.headers())

        csp = answer.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp
        assert "form-action 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert re.search(r"style-src 'sha256-[A-Za-z0-9+/]+=*'", csp)
        assert "script-src" not in csp  # default-src 'none' forbids scripts
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
        assert answer.headers["Cache-Control"] == "no-store"


@run_async
async def test_the_inline_style_is_the_one_the_policy_allows():
    import base64
    import hashlib

    async with served() as page:
        answer = await page.client.get("/approvals/login")

        text = await answer.text()
        (style,) = re.findall(r"<style>(.*?)</style>", text, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in answer.headers["Content-Security-Policy"]
        assert " style=" not in text


@run_async
async def test_hostile_values_are_escaped_everywhere():
    approvals = sample_approvals()
    hostile = msgspec.structs.replace(
        approvals[1],
        action=HOSTILE,
        agent_id=HOSTILE,
        resource_id=HOSTILE,
        attributes={
            HOSTILE: {"string": HOSTILE},
            "n": {"map": {HOSTILE: {"int": "1"}}},
        },
        context={"note": {HOSTILE: HOSTILE}},
        rules=(
            AskingRule(
                policy=HOSTILE,
                rule=HOSTILE,
                principal=HOSTILE,
                description=HOSTILE,
                condition=HOSTILE,
            ),
        ),
        reviews=(
            Review(
                reviewer=HOSTILE,
                roles=(),
                verdict=Verdict.APPROVE,
                at=HOSTILE,
                comment=HOSTILE,
            ),
        ),
        requirement=msgspec.structs.replace(approvals[1].requirement, approvers=2),
    )
    approvals[1] = hostile
    async with served(approvals) as page:
        await page.login()

        shown = await page.client.get(
            f"/approvals/{hostile.id}", headers=page.headers()
        )
        listed = await page.client.get(
            "/approvals?agent=" + HOSTILE.replace("&", "%26"), headers=page.headers()
        )

        for answer in (shown, listed):
            text = await answer.text()
            assert answer.status == 200
            assert "<script>" not in text
            assert "<img" not in text
            assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
        assert "&#x27;&gt;&lt;img src=x onerror=alert(1)&gt;" in await shown.text()


class UnrecordableInbox(MemoryInbox):
    async def review(self, approval_id, reviewer, verdict, comment, *, view=""):
        raise AuditUnavailable("the audit log refuses appends: disk full")


@run_async
async def test_review_the_log_cannot_record_is_shown_and_changes_nothing():
    async with served(inbox_type=UnrecordableInbox) as page:
        await page.login()
        approval_id = first_pending(page)

        answer = await page.review(approval_id, "approve")
        _, text = await page.follow(answer)

        assert "Review not recorded: the audit log refuses appends" in text
        assert page.inbox.get(approval_id).state is ApprovalState.PENDING


# ------------------------------------------------- characters a reader cannot see

# A right-to-left override, zero-width space and joiner, NUL, ESC, a bidi
# isolate, a byte order mark, a no-break space, a tag character, a Hangul
# filler: each hides itself or changes what the text around it reads as.
HIDDEN = (
    "\u202e", "\u200b", "\u200d", "\x00", "\x1b", "\u2066", "\ufeff", "\u00a0",
    "\U000e0041", "\u3164",
)  # fmt: skip


def _shown(char: str) -> str:
    code = ord(char)
    text = f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"
    return f'<span class="ctl">{text}</span>'


@run_async
async def test_hidden_characters_are_shown_as_code_points_never_raw():
    approvals, disguised = disguised_approvals()
    async with served(approvals) as page:
        await page.login()

        shown = await page.client.get(
            f"/approvals/{disguised.id}", headers=page.headers()
        )
        listed = await page.client.get("/approvals", headers=page.headers())

        for answer in (shown, listed):
            text = await answer.text()
            assert answer.status == 200
            assert not [c for c in HIDDEN if c in text]
        text = await shown.text()
        for char in HIDDEN:
            assert _shown(char) in text, repr(char)
        assert (
            f"<bdi>invoice-{_shown(chr(0x202E))}fdp.exe</bdi>" in text
        )  # the resource id as the request carries it
        assert f"<bdi>fine{_shown(chr(0x202E))} by me</bdi>" in text
        assert f"<bdi>bot-b{_shown(chr(0x200B))}</bdi>" in await listed.text()


@run_async
async def test_every_agent_written_value_is_isolated_from_its_neighbours():
    approvals, disguised = disguised_approvals()
    async with served(approvals) as page:
        await page.login()

        text = await (
            await page.client.get(f"/approvals/{disguised.id}", headers=page.headers())
        ).text()

        for value in (
            "payments.refund.issue",  # action
            "refund",  # resource kind
            f"req{_shown(chr(0x2066))}-1",  # request id
            f"alice{_shown(chr(0x200D))}",  # a principal of the chain
            f"amount{_shown(chr(0x200B))}",  # an attribute name
            f"reason{_shown(chr(0x2066))}",  # a context key
            f"damaged{_shown(chr(0x202E))} parcel",  # a context value
            "large-refund",  # the rule
        ):
            assert f"<bdi>{value}</bdi>" in text, value


@run_async
async def test_filter_and_comment_fields_take_their_direction_from_their_text():
    async with served() as page:
        await page.login()
        approval_id = first_pending(page)

        listed = await page.client.get("/approvals", headers=page.headers())
        shown = await page.client.get(
            f"/approvals/{approval_id}", headers=page.headers()
        )

        listing = await listed.text()
        assert re.search(r'<input id="f-agent" name="agent" dir="auto"', listing)
        assert re.search(r'<input id="f-action" name="action" dir="auto"', listing)
        assert '<textarea id="comment" name="comment" maxlength="2000" dir="auto">' in (
            await shown.text()
        )


@pytest.mark.parametrize(
    "value",
    ["\u00b2", "\u0663", "\uff11", "1e2", " 5", "+5", "0" * 5000],
    ids=["superscript", "arabic-indic", "fullwidth", "exponent", "space", "plus",
         "many-digits"],
)  # fmt: skip
@run_async
async def test_min_risk_takes_ascii_digits_only(value):
    async with served() as page:
        await page.login()

        answer = await page.client.get(
            "/approvals", params={"min_risk": value}, headers=page.headers()
        )

        assert answer.status == 400
        assert "filter min_risk: expected a whole number 0..100" in (
            await answer.text()
        )


@run_async
async def test_min_risk_with_leading_zeros_is_still_a_score():
    async with served() as page:
        await page.login()

        answer = await page.client.get(
            "/approvals?min_risk=0050", headers=page.headers()
        )

        assert answer.status == 200
        assert _listed_ids(await answer.text()) == [
            sample_approvals()[n - 1].id for n in (3, 2)
        ]


@run_async
async def test_a_next_path_that_is_no_url_returns_to_the_list():
    async with served() as page:
        form = await page.client.get("/approvals/login?next=//[")
        answer = await page.login(next_path="//[")

        assert form.status == 200
        assert 'name="next" value="/approvals"' in await form.text()
        assert answer.status == 303
        assert answer.headers["Location"] == "/approvals"


@run_async
async def test_a_referer_that_is_no_url_is_no_origin():
    async with served() as page:
        await page.login()

        answer = await page.review(
            first_pending(page),
            "approve",
            Origin="<none>",
            Referer="http://[::1/approvals",
        )

        assert answer.status == 403
        assert "This form was not sent from this page" in await answer.text()


@run_async
async def test_an_approval_asked_again_shows_what_became_of_the_earlier_ones():
    approvals = sample_approvals()
    rejected = msgspec.structs.replace(
        approvals[4],
        reviews=(
            Review(
                reviewer="erin",
                roles=("reviewer",),
                verdict=Verdict.REJECT,
                at="2026-12-07T08:30:00Z",
                comment="not <b>this</b> one",
            ),
        ),
        resolved_at="2026-12-07T08:30:00Z",
    )
    approvals[4] = rejected
    gone = "apr_" + "z" * 26
    approvals[1] = msgspec.structs.replace(approvals[1], previous=(rejected.id, gone))
    async with served(approvals) as page:
        await page.login()

        answer = await page.client.get(
            f"/approvals/{approvals[1].id}", headers=page.headers()
        )
        plain = await page.client.get(
            f"/approvals/{approvals[0].id}", headers=page.headers()
        )

        text = await answer.text()
        assert '<h2 id="before">Asked before</h2>' in text
        assert f'<a href="/approvals/{rejected.id}">' in text
        assert "state-rejected" in text.split('id="before"')[1].split("</section>")[0]
        assert "by <bdi>erin</bdi>" in text
        assert "not &lt;b&gt;this&lt;/b&gt; one" in text
        assert f'<a href="/approvals/{gone}">' in text
        assert "no longer held" in text
        assert "Asked before" not in await plain.text()
