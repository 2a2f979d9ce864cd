"""A sign-in session never outlives its credential: a JWT's exp caps the
session, and the sessions of admin credentials a reload removed or changed
end (SessionStore, ReviewerAuth.adopt_credentials, and the review page over
them with a settable clock)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import DummyCookieJar, web
from aiohttp.test_utils import TestClient, TestServer
from identity_support import ISSUER, NOW, SigningKey, claims, jwks
from review_support import MemoryInbox, sample_approvals

from kynara_sidecar.approvals.model import Reviewer
from kynara_sidecar.identity import Issuer, parse_jwks
from kynara_sidecar.server.playground import (
    LOGIN_COOKIE as PLAYGROUND_LOGIN_COOKIE,
)
from kynara_sidecar.server.playground import (
    PLAYGROUND_COOKIE,
    PlaygroundSources,
    add_playground_routes,
)
from kynara_sidecar.server.review_page import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SessionStore,
    add_review_routes,
)
from kynara_sidecar.server.reviewers import (
    AdminReviewer,
    ReviewerAuth,
    ReviewerIssuer,
    token_expiry_ns,
)

SECOND = 1_000_000_000
SESSION_SECONDS = 3600
AUDIENCE = "kynara:reviewers"
RITA = b"rita-reviewer-secret-0123456789"
CAROL = b"carol-reviewer-secret-012345678"


class Clock:
    def __init__(self) -> None:
        self.now = NOW * SECOND

    def __call__(self) -> int:
        return self.now


def reviewer(credential: str, who: str = "") -> Reviewer:
    return Reviewer(
        id=who or credential, roles=frozenset({"reviewer"}), credential=credential
    )


def admin(secret: bytes, *roles: str, principal: str = "") -> AdminReviewer:
    """An admin credential whose principal is, unless given, the secret's
    first word (rita, carol)."""
    who = principal or secret.decode().split("-", 1)[0]
    return AdminReviewer(secret, frozenset(roles or ("reviewer",)), who)


@pytest.fixture(scope="module")
def idp_key() -> SigningKey:
    return SigningKey("ES256", "idp-1")


def reviewer_auth(key: SigningKey, clock: Clock, **credentials) -> ReviewerAuth:
    keys = parse_jwks(jwks(key), ["ES256"], "test")
    issuer = Issuer(ISSUER, AUDIENCE, keys, frozenset({"ES256"}))
    return ReviewerAuth(
        credentials,
        [ReviewerIssuer(issuer)],
        clock=clock,
    )


def jwt_for(key: SigningKey, exp: int, sub: str = "dana") -> str:
    return key.sign(claims(sub, aud=AUDIENCE, exp=exp, roles=["reviewer"]))


# ---------------------------------------------------------------- the store


def test_a_session_ends_at_not_after_when_that_comes_before_its_lifetime():
    clock = Clock()
    store = SessionStore(SESSION_SECONDS, clock=clock)
    capped, session = store.open(reviewer("idp"), not_after_ns=clock.now + 60 * SECOND)
    plain, _ = store.open(reviewer("rita"))

    assert session.expires_ns == clock.now + 60 * SECOND
    clock.now += 59 * SECOND
    assert store.get(capped) is not None
    clock.now += SECOND
    assert store.get(capped) is None
    assert store.get(plain) is not None


def test_a_later_not_after_never_lengthens_a_session():
    clock = Clock()
    store = SessionStore(SESSION_SECONDS, clock=clock)
    cookie, session = store.open(
        reviewer("idp"), not_after_ns=clock.now + 10 * SESSION_SECONDS * SECOND
    )

    assert session.expires_ns == clock.now + SESSION_SECONDS * SECOND
    clock.now += SESSION_SECONDS * SECOND
    assert store.get(cookie) is None


def test_end_credentials_ends_the_named_credentials_sessions_only():
    store = SessionStore(SESSION_SECONDS, clock=Clock())
    rita_one, _ = store.open(reviewer("rita"))
    rita_two, _ = store.open(reviewer("rita", who="rita@example.com"))
    carol, _ = store.open(reviewer("carol"))
    store.flash(rita_one, "ap-1", "refused", "a comment")

    ended = store.end_credentials({"rita", "nobody"})

    assert ended == 2
    assert store.get(rita_one) is None and store.get(rita_two) is None
    assert store.take_flash(rita_one, "ap-1") is None
    assert store.get(carol) is not None
    assert len(store) == 1


def test_a_full_store_drops_expired_capped_sessions_before_a_live_one():
    clock = Clock()
    store = SessionStore(SESSION_SECONDS, max_sessions=3, clock=clock)
    oldest, _ = store.open(reviewer("rita"))
    store.open(reviewer("idp"), not_after_ns=clock.now + SECOND)
    store.open(reviewer("idp"), not_after_ns=clock.now + SECOND)
    clock.now += 2 * SECOND

    newest, _ = store.open(reviewer("carol"))

    assert store.get(oldest) is not None
    assert store.get(newest) is not None
    assert len(store) == 2


def test_follow_watches_the_reviewer_auth_behind_a_bound_method(idp_key):
    clock = Clock()
    auth = reviewer_auth(idp_key, clock, rita=admin(RITA), carol=admin(CAROL))
    followed = SessionStore(SESSION_SECONDS, clock=clock)
    plain = SessionStore(SESSION_SECONDS, clock=clock)

    assert followed.follow(auth.authenticate) is True
    assert plain.follow(lambda token: reviewer("rita")) is False
    rita, _ = followed.open(auth.authenticate(RITA.decode()))
    kept, _ = plain.open(reviewer("rita"))
    auth.adopt_credentials(reviewer_auth(idp_key, clock, carol=admin(CAROL)))

    assert followed.get(rita) is None
    assert plain.get(kept) is not None


# ------------------------------------------------------- the credential diff


@pytest.mark.parametrize(
    ("fresh", "changed"),
    [
        ({"rita": admin(RITA), "carol": admin(CAROL)}, set()),
        ({"carol": admin(CAROL)}, {"rita"}),
        ({"rita": admin(b"rita-rotated-secret-0123456789"), "carol": admin(CAROL)},
         {"rita"}),
        ({"rita": admin(RITA, "reviewer", "operator"), "carol": admin(CAROL)},
         {"rita"}),
        ({"rita": admin(RITA, principal="rita@example.com"), "carol": admin(CAROL)},
         {"rita"}),
        ({"rita": AdminReviewer(RITA, frozenset({"reviewer"}), "rita",
                                frozenset({"finance_lead"})),
          "carol": admin(CAROL)},
         {"rita"}),
        ({"dora": admin(b"dora-reviewer-secret-012345678")}, {"rita", "carol"}),
    ],
    ids=["same", "removed", "secret", "roles", "principal", "reviewer-roles", "all"],
)  # fmt: skip
def test_adopt_credentials_names_what_was_removed_or_changed(idp_key, fresh, changed):
    clock = Clock()
    auth = reviewer_auth(idp_key, clock, rita=admin(RITA), carol=admin(CAROL))
    told: list[frozenset[str]] = []
    auth.watch_credentials(told.append)

    returned = auth.adopt_credentials(reviewer_auth(idp_key, clock, **fresh))

    assert returned == changed
    assert told == ([changed] if changed else [])


def test_token_expiry_is_a_jwts_exp_and_none_for_a_secret(idp_key):
    assert token_expiry_ns(jwt_for(idp_key, NOW + 90)) == (NOW + 90) * SECOND
    assert token_expiry_ns(RITA.decode()) is None
    assert token_expiry_ns("not.a.jwt") is None


# ------------------------------------------------------------- on the page


@contextlib.asynccontextmanager
async def page_over(auth: ReviewerAuth, clock: Clock) -> AsyncIterator[TestClient]:
    app = web.Application()
    add_review_routes(
        app,
        MemoryInbox(sample_approvals()),
        auth.authenticate,
        title="Kynara test inbox",
        session_seconds=SESSION_SECONDS,
        clock=clock,
    )
    server = TestServer(app, host="127.0.0.1")
    async with TestClient(server, cookie_jar=DummyCookieJar()) as client:
        yield client


async def sign_in(client: TestClient, token: str):
    form = await client.get("/approvals/login")
    login_csrf = form.cookies[LOGIN_COOKIE].value
    answer = await client.post(
        "/approvals/login",
        data={"token": token, "csrf": login_csrf, "next": "/approvals"},
        headers={
            "Origin": str(client.make_url("/")).rstrip("/"),
            "Cookie": f"{LOGIN_COOKIE}={login_csrf}",
        },
        allow_redirects=False,
    )
    assert answer.status == 303, await answer.text()
    return answer.cookies[SESSION_COOKIE]


async def listed(client: TestClient, session: str) -> int:
    answer = await client.get(
        "/approvals",
        headers={"Cookie": f"{SESSION_COOKIE}={session}"},
        allow_redirects=False,
    )
    return answer.status


def test_a_jwt_session_ends_at_the_tokens_exp(idp_key):
    async def run():
        clock = Clock()
        auth = reviewer_auth(idp_key, clock, rita=admin(RITA))
        async with page_over(auth, clock) as client:
            jwt_cookie = await sign_in(client, jwt_for(idp_key, NOW + 120))
            secret_cookie = await sign_in(client, RITA.decode())
            assert jwt_cookie["max-age"] == "120"
            assert secret_cookie["max-age"] == str(SESSION_SECONDS)
            before = await listed(client, jwt_cookie.value)
            clock.now += 120 * SECOND
            return (
                before,
                await listed(client, jwt_cookie.value),
                await listed(client, secret_cookie.value),
            )

    before, after, secret = asyncio.run(run())

    assert before == 200
    # Sent to sign in as any expired session is, long before session_seconds.
    assert after == 303
    assert secret == 200


def test_a_changed_credential_is_signed_out_of_the_page(idp_key):
    async def run():
        clock = Clock()
        auth = reviewer_auth(idp_key, clock, rita=admin(RITA), carol=admin(CAROL))
        async with page_over(auth, clock) as client:
            rita = await sign_in(client, RITA.decode())
            carol = await sign_in(client, CAROL.decode())
            auth.adopt_credentials(
                reviewer_auth(
                    idp_key,
                    clock,
                    rita=admin(RITA, "reviewer", "operator"),
                    carol=admin(CAROL),
                )
            )
            return await listed(client, rita.value), await listed(client, carol.value)

    assert asyncio.run(run()) == (303, 200)


def test_a_playground_session_ends_at_the_tokens_exp_and_on_a_change(idp_key):
    async def run():
        clock = Clock()
        auth = reviewer_auth(idp_key, clock, rita=admin(RITA))
        app = web.Application()
        add_playground_routes(
            app,
            PlaygroundSources(
                policies=lambda: None,
                store=lambda: None,
                authenticate=auth.authenticate,
            ),
            title="Kynara test playground",
            session_seconds=SESSION_SECONDS,
            clock=clock,
        )
        server = TestServer(app, host="127.0.0.1")
        async with TestClient(server, cookie_jar=DummyCookieJar()) as client:

            async def signed_in(token: str) -> str:
                form = await client.get("/playground/login")
                csrf = form.cookies[PLAYGROUND_LOGIN_COOKIE].value
                answer = await client.post(
                    "/playground/login",
                    data={"token": token, "csrf": csrf},
                    headers={
                        "Origin": str(client.make_url("/")).rstrip("/"),
                        "Cookie": f"{PLAYGROUND_LOGIN_COOKIE}={csrf}",
                    },
                    allow_redirects=False,
                )
                assert answer.status == 303, await answer.text()
                return answer.cookies[PLAYGROUND_COOKIE].value

            async def page(cookie: str) -> int:
                answer = await client.get(
                    "/playground",
                    headers={"Cookie": f"{PLAYGROUND_COOKIE}={cookie}"},
                    allow_redirects=False,
                )
                return answer.status

            dana = await signed_in(jwt_for(idp_key, NOW + 60))
            rita = await signed_in(RITA.decode())
            seen = [await page(dana), await page(rita)]
            clock.now += 60 * SECOND
            seen += [await page(dana), await page(rita)]
            auth.adopt_credentials(reviewer_auth(idp_key, clock))
            seen.append(await page(rita))
            return seen

    assert asyncio.run(run()) == [200, 200, 303, 200, 303]


# ------------------------------------------ a token past exp within the skew


def playground_over(auth: ReviewerAuth, clock: Clock) -> web.Application:
    app = web.Application()
    add_playground_routes(
        app,
        PlaygroundSources(
            policies=lambda: None, store=lambda: None, authenticate=auth.authenticate
        ),
        title="Kynara test playground",
        session_seconds=SESSION_SECONDS,
        clock=clock,
    )
    return app


async def post_sign_in(client: TestClient, path: str, cookie: str, token: str):
    """POST the sign-in form at ``path`` (/approvals or /playground)."""
    form = await client.get(f"{path}/login")
    csrf = form.cookies[cookie].value
    return await client.post(
        f"{path}/login",
        data={"token": token, "csrf": csrf, "next": path},
        headers={
            "Origin": str(client.make_url("/")).rstrip("/"),
            "Cookie": f"{cookie}={csrf}",
        },
        allow_redirects=False,
    )


def test_a_token_past_exp_within_the_skew_is_refused_as_expired(idp_key):
    """Accepted by the verifier (10 s skew) but 5 s past exp: a session
    opened with it would be over at once, so both pages refuse it, naming
    why, rather than bouncing the browser back to sign in."""

    async def run():
        clock = Clock()
        keys = parse_jwks(jwks(idp_key), ["ES256"], "test")
        issuer = Issuer(ISSUER, AUDIENCE, keys, frozenset({"ES256"}))
        auth = ReviewerAuth(
            {}, [ReviewerIssuer(issuer)], clock=clock, max_clock_skew_seconds=10
        )
        token = jwt_for(idp_key, NOW - 5)
        assert auth.authenticate(token).id == "dana"  # within the skew
        answers = []
        async with page_over(auth, clock) as client:
            answer = await post_sign_in(client, "/approvals", LOGIN_COOKIE, token)
            answers.append((answer.status, await answer.text(), answer.cookies))
        server = TestServer(playground_over(auth, clock), host="127.0.0.1")
        async with TestClient(server, cookie_jar=DummyCookieJar()) as client:
            answer = await post_sign_in(
                client, "/playground", PLAYGROUND_LOGIN_COOKIE, token
            )
            answers.append((answer.status, await answer.text(), answer.cookies))
        return answers

    (review, playground) = asyncio.run(run())

    assert review[0] == 401 and "token has expired" in review[1]
    assert SESSION_COOKIE not in review[2]
    assert playground[0] == 401 and "token has expired" in playground[1]
    assert PLAYGROUND_COOKIE not in playground[2]


def test_a_playground_cookie_lasts_the_sessions_remaining_seconds(idp_key):
    async def run():
        clock = Clock()
        auth = reviewer_auth(idp_key, clock, rita=admin(RITA))
        server = TestServer(playground_over(auth, clock), host="127.0.0.1")
        async with TestClient(server, cookie_jar=DummyCookieJar()) as client:
            jwt = await post_sign_in(
                client,
                "/playground",
                PLAYGROUND_LOGIN_COOKIE,
                jwt_for(idp_key, NOW + 90),
            )
            secret = await post_sign_in(
                client, "/playground", PLAYGROUND_LOGIN_COOKIE, RITA.decode()
            )
            return jwt.cookies[PLAYGROUND_COOKIE], secret.cookies[PLAYGROUND_COOKIE]

    jwt_cookie, secret_cookie = asyncio.run(run())

    assert jwt_cookie["max-age"] == "90"
    assert secret_cookie["max-age"] == str(SESSION_SECONDS)
