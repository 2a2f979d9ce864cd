"""The review page: where a human reads an approval and approves or rejects it.

Theory of operation. The page is a handful of aiohttp routes under
``/approvals`` on the one HTTP stack (``server.http``); the daemon mounts it
over its own ``ApprovalBook`` and the collector over the fleet's inbox, both
through the ``Inbox`` protocol, so the page never knows which it serves.

Signing in. A reviewer pastes a token once (an admin credential's secret or
a reviewer JWT); the ``Authenticator`` (``ReviewerAuth.authenticate``)
turns it into a ``Reviewer`` or refuses it. The page then opens a session:
32 random bytes in a cookie (``Secure; HttpOnly; SameSite=Strict;
Path=/approvals``), kept server side in a bounded store under their SHA-256
(a leaked store does not hand out live cookies), expiring after
``approvals.session_seconds``. The token itself is never stored. Signing
out forgets the session. A session never outlives its credential: one
opened with a JWT ends at the token's ``exp`` if that comes sooner, and when
a reload removes or changes an admin credential (its secret, roles or
principal), the sessions opened with it end at once (the store follows the
``Authenticator``'s ``ReviewerAuth``); the next request with such a cookie is
sent to sign in, as after any expiry.

Forged posts. Every POST must pass two checks before anything else runs:

1. The request comes from this page's own origin. The page sends
   ``Referrer-Policy: no-referrer``, under which browsers send no Referer
   and, on a form POST, ``Origin: null`` (Fetch, "serializing a request
   origin"). So the check accepts an ``Origin`` equal to the page's own
   origin (``scheme://host`` of the request, or one of the configured
   public origins behind a proxy); for ``Origin: null`` or none it takes
   the browser's ``Sec-Fetch-Site: same-origin``, which a referrer policy
   does not change; with neither, a Referer of the own origin. Anything
   else is refused.
2. The form's hidden ``csrf`` field equals the token bound to the session
   (or, for sign-in, to a short-lived pre-session cookie), compared in
   constant time.

Either failure is a 403 page that says what was wrong; the
``SameSite=Strict`` cookie is a third layer, not a reason to skip these.

Every response under ``/approvals`` carries a strict Content-Security-Policy
(no script at all, the one inline style by hash, forms only to this origin,
no framing), ``nosniff``, ``no-referrer`` and ``no-store``. Markup is built
in ``_review_html``, which escapes every value.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NoReturn, Protocol, runtime_checkable
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from kynara_sidecar.approvals.model import (
    MAX_COMMENT_CHARS,
    ApprovalState,
    InboxQuery,
    Reviewer,
    Verdict,
    earlier_approvals,
)
from kynara_sidecar.approvals.model import Inbox as Inbox
from kynara_sidecar.errors import (
    ApprovalClosed,
    IdentityInvalid,
    InvalidRequest,
    NotFound,
    RequestError,
    RoleMissing,
    SelfApproval,
    ServiceError,
)
from kynara_sidecar.server import _review_html as pages
from kynara_sidecar.server.reviewers import token_expiry_ns

__all__ = [
    "COOKIE_PATH",
    "CONTENT_SECURITY_POLICY",
    "DEFAULT_MAX_SESSIONS",
    "FLASH_SECONDS",
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "Authenticator",
    "CredentialWatch",
    "Flash",
    "Session",
    "SessionStore",
    "add_review_routes",
    "add_security_headers",
    "origin_of",
    "same_origin",
    "set_strict_cookie",
]

log = logging.getLogger("kynara.server")

SESSION_COOKIE = "kynara_session"
LOGIN_COOKIE = "kynara_login"
COOKIE_PATH = "/approvals"
# Sessions are small (a reviewer and two tokens); ten thousand is far more
# reviewers than one inbox has and a few MB at most. Past it the oldest
# session ends first.
DEFAULT_MAX_SESSIONS = 10_000
# The sign-in form's pre-session cookie: long enough to paste a token.
LOGIN_FORM_SECONDS = 600
# A refused review's message waits this long for the redirect to be
# followed; a browser follows at once, a very slow link in well under this.
FLASH_SECONDS = 300
# 32 bytes of randomness for session ids and CSRF tokens (OWASP asks for at
# least 64 bits; 256 leaves no doubt).
TOKEN_BYTES = 32
# A reviewer JWT is far shorter; identity.MAX_TOKEN_BYTES bounds it again.
MAX_TOKEN_CHARS = 16_384
# The sign-in refusal for a JWT accepted within the clock skew but already
# past its exp (the review page's and the playground's).
TOKEN_EXPIRED = "That token has expired; sign in with a current one."
MAX_FILTER_CHARS = 256
MAX_SCORE = 100
# "0100" is still a score; past this many digits it cannot be one.
MAX_SCORE_DIGITS = 8
# How much of a refused filter value its error message repeats.
MAX_SHOWN_CHARS = 40

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"style-src '{pages.STYLE_HASH}'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# Where sign-in may send the reviewer on: this page's own paths only, so the
# ``next`` field cannot become an open redirect.
_NEXT_PATH = re.compile(r"/approvals(/[A-Za-z0-9_-]{1,128})?")
_APPROVAL_ID = "{approval_id:[A-Za-z0-9_-]{1,128}}"


@runtime_checkable
class CredentialWatch(Protocol):
    """Tells of admin credentials a reload removed or changed
    (``ReviewerAuth.watch_credentials``), so sessions opened with them end."""

    def watch_credentials(self, ended: Callable[[frozenset[str]], None]) -> None: ...


class Authenticator(Protocol):
    """Turns a pasted token into a reviewer (``ReviewerAuth.authenticate``).

    Raises ``IdentityInvalid`` for a token nobody issued and ``RoleMissing``
    for a known credential without the reviewer role.
    """

    def __call__(self, token: str) -> Reviewer: ...


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in reviewer: who, the CSRF token of their forms, and until
    when (nanoseconds since the epoch)."""

    reviewer: Reviewer
    csrf: str
    expires_ns: int


@dataclass(frozen=True, slots=True)
class Flash:
    """A refused review, kept for the redirect to the approval's page: what
    was wrong, the comment the reviewer wrote, and until when (ns)."""

    approval_id: str
    error: str
    comment: str
    expires_ns: int


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


class SessionStore:
    """Server-side sessions, bounded and expiring.

    Keyed by the SHA-256 of the cookie value; the value itself is only in
    the reviewer's browser. ``clock`` gives nanoseconds since the epoch.

    A session never outlives the credential it was opened with: one opened
    with a JWT ends at the token's ``exp`` at the latest (``open``'s
    ``not_after_ns``), and ``end_credentials`` ends those of admin
    credentials a reload removed or changed (``follow``).
    """

    def __init__(
        self,
        session_seconds: int,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        clock: Callable[[], int] = time.time_ns,
    ):
        self.session_seconds = session_seconds
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        # At most one per session: the refusal of its latest review, shown
        # once on the approval's page it was redirected to.
        self._flashes: dict[bytes, Flash] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def open(
        self, reviewer: Reviewer, *, not_after_ns: int | None = None
    ) -> tuple[str, Session]:
        """Start a session for ``reviewer``; return its cookie value and it.

        It lasts ``session_seconds``, or until ``not_after_ns`` (ns since
        the epoch) if that comes first: the ``exp`` of the JWT it was opened
        with (``reviewers.token_expiry_ns``). Prunes expired sessions first,
        then ends the oldest while full.
        """
        now = self._clock()
        self._prune(now)
        if len(self._sessions) >= self.max_sessions:
            # Sessions capped by a token's exp may have expired behind
            # younger ones: sweep them all before ending a live one.
            self._end_where(lambda session: session.expires_ns <= now)
        while len(self._sessions) >= self.max_sessions:
            key, _ = self._sessions.popitem(last=False)
            self._flashes.pop(key, None)
        session_id = secrets.token_urlsafe(TOKEN_BYTES)
        expires_ns = now + self.session_seconds * 1_000_000_000
        if not_after_ns is not None:
            expires_ns = min(expires_ns, not_after_ns)
        session = Session(
            reviewer=reviewer,
            csrf=secrets.token_urlsafe(TOKEN_BYTES),
            expires_ns=expires_ns,
        )
        self._sessions[_key(session_id)] = session
        return session_id, session

    def get(self, session_id: str) -> Session | None:
        """The live session behind a cookie value, or None (and forget it if
        it has expired)."""
        if not session_id or len(session_id) > 2 * TOKEN_BYTES:
            return None
        key = _key(session_id)
        session = self._sessions.get(key)
        if session is not None and session.expires_ns <= self._clock():
            del self._sessions[key]
            self._flashes.pop(key, None)
            return None
        return session

    def close(self, session_id: str) -> None:
        """End the session behind a cookie value, if there is one."""
        key = _key(session_id)
        self._sessions.pop(key, None)
        self._flashes.pop(key, None)

    def end_credentials(self, names: Iterable[str]) -> int:
        """End every session opened with one of the admin credentials
        ``names`` (``Reviewer.credential``); return how many ended.

        Called when a reload removed or changed them (their secret, roles or
        principal): the next request with such a cookie is treated as one
        whose session expired. A JWT session whose issuer is spelled like
        one of ``names`` ends too; its reviewer signs in again.
        """
        gone = frozenset(names)
        ended = self._end_where(lambda session: session.reviewer.credential in gone)
        if ended:
            log.info(
                "sign-in sessions ended: their credential changed",
                extra={"fields": {"credentials": sorted(gone), "sessions": ended}},
            )
        return ended

    def follow(self, authenticate: object) -> bool:
        """End sessions whenever the credentials behind ``authenticate``
        change: when it is a ``CredentialWatch`` (``ReviewerAuth``) or a
        bound method of one (``ReviewerAuth.authenticate``), watch it with
        ``end_credentials``. Returns whether there was anything to watch (a
        plain function has no reload to follow)."""
        for source in (authenticate, getattr(authenticate, "__self__", None)):
            if isinstance(source, CredentialWatch):
                source.watch_credentials(self.end_credentials)
                return True
        return False

    def flash(
        self, session_id: str, approval_id: str, error: str, comment: str
    ) -> None:
        """Keep a refused review's ``error`` (and the reviewer's ``comment``)
        for the next view of ``approval_id`` in this session, for
        ``FLASH_SECONDS``; it replaces any earlier one."""
        key = _key(session_id)
        if key in self._sessions:
            expires = self._clock() + FLASH_SECONDS * 1_000_000_000
            self._flashes[key] = Flash(approval_id, error, comment, expires)

    def take_flash(self, session_id: str, approval_id: str) -> Flash | None:
        """The live flash of this session for ``approval_id``, once."""
        key = _key(session_id)
        flash = self._flashes.get(key)
        if flash is None or flash.approval_id != approval_id:
            return None
        del self._flashes[key]
        return flash if flash.expires_ns > self._clock() else None

    def _end_where(self, ends: Callable[[Session], bool]) -> int:
        """End every session ``ends`` picks, with its flash; return how many."""
        ended = [key for key, session in self._sessions.items() if ends(session)]
        for key in ended:
            del self._sessions[key]
            self._flashes.pop(key, None)
        return len(ended)

    def _prune(self, now: int) -> None:
        # Sessions are appended in time order with one lifetime, so the
        # expired ones are at the front; one capped by a token's exp may
        # expire sooner and is dropped when read, reached or swept.
        while self._sessions:
            key, session = next(iter(self._sessions.items()))
            if session.expires_ns > now:
                return
            del self._sessions[key]
            self._flashes.pop(key, None)


# ------------------------------------------------------------ the handlers


class _ReviewPage:
    def __init__(
        self,
        inbox: Inbox,
        authenticate: Authenticator,
        *,
        title: str,
        secure_cookie: bool,
        sessions: SessionStore,
        origins: frozenset[str],
        clock: Callable[[], int],
        on_refused: Callable[[str], None],
    ):
        self.on_refused = on_refused
        self.inbox = inbox
        self.authenticate = authenticate
        self.title = title
        self.secure_cookie = secure_cookie
        self.sessions = sessions
        self.origins = origins
        self.clock = clock

    # -- shared checks

    def _html(self, text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html")

    def _refuse(self, heading: str, message: str, status: int) -> web.Response:
        page = pages.render_message(
            self.title, heading, message, link=("/approvals", "Back to approvals")
        )
        return self._html(page, status)

    def _session(self, request: web.Request) -> tuple[str, Session] | None:
        session_id = request.cookies.get(SESSION_COOKIE, "")
        session = self.sessions.get(session_id)
        return None if session is None else (session_id, session)

    def _forged(self, request: web.Request, form_csrf: str, expected: str) -> str:
        """Why a POST is refused as forged, or "" when it is not."""
        if not same_origin(request, self.origins):
            log.warning(
                "refused review page post",
                extra={"fields": {"path": request.path, "why": "origin"}},
            )
            self.on_refused("origin")
            return (
                "This form was not sent from this page's own origin "
                f"({request.scheme}://{request.host}), so it was refused. "
                "Open the page again and send the form from there."
            )
        if not expected or not hmac.compare_digest(
            form_csrf.encode(), expected.encode()
        ):
            log.warning(
                "refused review page post",
                extra={"fields": {"path": request.path, "why": "csrf"}},
            )
            self.on_refused("csrf")
            return (
                "The form's CSRF token does not match this session (the page "
                "may be older than your sign-in), so it was refused. Reload "
                "the page and send the form again."
            )
        return ""

    def _to_login(self, request: web.Request) -> NoReturn:
        raise web.HTTPSeeOther(
            "/approvals/login?" + urlencode({"next": request.path_qs})
        )

    # -- sign in and out

    async def login_form(self, request: web.Request) -> web.Response:
        return self._login_page(_safe_next(request.query.get("next", "")))

    def _login_page(
        self, next_path: str, error: str = "", status: int = 200
    ) -> web.Response:
        csrf = secrets.token_urlsafe(TOKEN_BYTES)
        page = pages.render_login(
            self.title, csrf=csrf, next_path=next_path, error=error
        )
        response = self._html(page, status)
        set_strict_cookie(
            response,
            LOGIN_COOKIE,
            csrf,
            max_age=LOGIN_FORM_SECONDS,
            path="/approvals/login",
            secure=self.secure_cookie,
        )
        return response

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        next_path = _safe_next(_field(form, "next"))
        why = self._forged(
            request, _field(form, "csrf"), request.cookies.get(LOGIN_COOKIE, "")
        )
        if why:
            return self._refuse("Sign-in refused", why, 403)
        token = _field(form, "token").strip()
        try:
            if not token or len(token) > MAX_TOKEN_CHARS:
                raise IdentityInvalid(
                    f"expected a token of 1..{MAX_TOKEN_CHARS} characters, "
                    f"got {len(token)}",
                    field="token",
                )
            reviewer = self.authenticate(token)
        except IdentityInvalid as err:
            log.warning(
                "refused review page sign-in",
                extra={"fields": {"code": err.code.value, "error": str(err)}},
            )
            self.on_refused(err.code.value)
            return self._login_page(
                next_path, "That token is not a known reviewer credential.", 401
            )
        except RoleMissing as err:
            log.warning(
                "refused review page sign-in",
                extra={"fields": {"code": err.code.value, "error": str(err)}},
            )
            self.on_refused(err.code.value)
            return self._login_page(
                next_path,
                "That credential is valid but may not review approvals: it "
                "lacks the reviewer role (an agent's credential never has it).",
                403,
            )
        not_after_ns = token_expiry_ns(token)
        if expired(not_after_ns, self.clock()):
            # Accepted within the clock skew but past its exp: a session
            # opened with it would be over before the page loads, a silent
            # bounce back to this form.
            log.warning(
                "refused review page sign-in",
                extra={
                    "fields": {
                        "code": IdentityInvalid.code.value,
                        "error": "token has expired (its exp is past)",
                    }
                },
            )
            self.on_refused(IdentityInvalid.code.value)
            return self._login_page(next_path, TOKEN_EXPIRED, 401)
        # A new sign-in replaces the session this browser had, if any.
        self.sessions.close(request.cookies.get(SESSION_COOKIE, ""))
        session_id, session = self.sessions.open(reviewer, not_after_ns=not_after_ns)
        log.info(
            "signed in to review page",
            extra={
                "fields": {"reviewer": reviewer.id, "credential": reviewer.credential}
            },
        )
        response = web.HTTPSeeOther(next_path)
        set_strict_cookie(
            response,
            SESSION_COOKIE,
            session_id,
            max_age=seconds_left(session, self.clock()),
            path=COOKIE_PATH,
            secure=self.secure_cookie,
        )
        response.del_cookie(LOGIN_COOKIE, path="/approvals/login")
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        form = await request.post()
        current = self._session(request)
        expected = current[1].csrf if current is not None else ""
        why = self._forged(request, _field(form, "csrf"), expected)
        if why or current is None:
            return self._refuse("Sign-out refused", why, 403)
        self.sessions.close(current[0])
        response = web.HTTPSeeOther("/approvals/login")
        response.del_cookie(SESSION_COOKIE, path=COOKIE_PATH)
        raise response

    # -- reading

    async def list_approvals(self, request: web.Request) -> web.Response:
        current = self._session(request)
        if current is None:
            self._to_login(request)
        session = current[1]
        try:
            query = _query_of(request.query)
            approvals = self.inbox.list(query)
        except InvalidRequest as err:
            page = pages.render_list(
                self.title,
                (),
                InboxQuery(),
                reviewer=session.reviewer,
                csrf=session.csrf,
                now_ns=self.clock(),
                error=str(err),
            )
            return self._html(page, 400)
        page = pages.render_list(
            self.title,
            approvals,
            query,
            reviewer=session.reviewer,
            csrf=session.csrf,
            now_ns=self.clock(),
        )
        return self._html(page)

    async def show_approval(self, request: web.Request) -> web.Response:
        current = self._session(request)
        if current is None:
            self._to_login(request)
        session_id, session = current
        approval_id = request.match_info["approval_id"]
        approval = self.inbox.get(approval_id)
        if approval is None:
            return self._refuse(
                "Approval not found", f"No approval has the id {approval_id}.", 404
            )
        flash = self.sessions.take_flash(session_id, approval_id)
        if flash is not None:
            page = pages.render_approval(
                self.title,
                approval,
                reviewer=session.reviewer,
                csrf=session.csrf,
                now_ns=self.clock(),
                error=flash.error,
                comment=flash.comment,
                earlier=earlier_approvals(approval, self.inbox.get),
            )
            return self._html(page)
        reviewed = request.query.get("reviewed", "")
        notice = _NOTICES.get(reviewed, "")
        if notice and getattr(self.inbox, "sends_reviews", False):
            # The fleet inbox only sent it; the daemon records it (or not).
            notice = _SENT_NOTICE.format(
                what=_SENT_WHAT[reviewed], daemon=approval.daemon_id
            )
        page = pages.render_approval(
            self.title,
            approval,
            reviewer=session.reviewer,
            csrf=session.csrf,
            now_ns=self.clock(),
            notice=notice,
            earlier=earlier_approvals(approval, self.inbox.get),
        )
        return self._html(page)

    # -- reviewing

    async def review(self, request: web.Request) -> web.Response:
        form = await request.post()
        current = self._session(request)
        if current is None:
            # A forged post has no session either; say the same to both.
            if not same_origin(request, self.origins):
                return self._refuse(
                    "Review refused", self._forged(request, "", ""), 403
                )
            return self._refuse(
                "Signed out",
                "Your session has ended, so the review was not recorded. Sign in "
                "and review again.",
                403,
            )
        session = current[1]
        why = self._forged(request, _field(form, "csrf"), session.csrf)
        if why:
            return self._refuse("Review refused", why, 403)
        approval_id = request.match_info["approval_id"]
        comment = _field(form, "comment")
        try:
            verdict = _verdict_of(_field(form, "verdict"))
            if len(comment) > MAX_COMMENT_CHARS:
                raise InvalidRequest(
                    f"expected a comment of at most {MAX_COMMENT_CHARS} "
                    f"characters, got {len(comment)}",
                    field="comment",
                )
            reviewed = await self.inbox.review(
                approval_id,
                session.reviewer,
                verdict,
                comment,
                view=_field(form, "view"),
            )
        except (RequestError, ServiceError) as err:
            return self._review_refused(request, current[0], err, comment)
        log.info(
            "reviewed approval on review page",
            extra={
                "fields": {
                    "approval_id": approval_id,
                    "decision_id": reviewed.decision_id,
                    "reviewer": session.reviewer.id,
                    "verdict": verdict.value,
                }
            },
        )
        raise web.HTTPSeeOther(
            pages.approval_path(approval_id) + f"?reviewed={verdict.value}"
        )

    def _review_refused(
        self,
        request: web.Request,
        session_id: str,
        err: RequestError | ServiceError,
        comment: str,
    ) -> web.Response:
        """Send the reviewer back to the approval's page (303), where the
        refusal is shown with their comment kept, so that reloading the
        page does not post the form again. The message travels in the
        session (``SessionStore.flash``), never in the URL."""
        approval_id = request.match_info["approval_id"]
        heading = _REFUSALS.get(type(err), "Review not recorded")
        approval = self.inbox.get(approval_id)
        if approval is None or isinstance(err, NotFound):
            return self._refuse(
                "Approval not found", f"No approval has the id {approval_id}.", 404
            )
        self.sessions.flash(session_id, approval_id, f"{heading}: {err}", comment)
        raise web.HTTPSeeOther(pages.approval_path(approval_id))


_NOTICES = {
    "approve": "Your approval was recorded.",
    "reject": "Your rejection was recorded.",
}
_SENT_WHAT = {"approve": "approval", "reject": "rejection"}
_SENT_NOTICE = (
    "Your {what} was sent to {daemon}. It counts once that daemon records "
    "it; this page shows the approval as that daemon publishes it."
)
# What the page says when the inbox refuses a review.
_REFUSALS: dict[type[Exception], str] = {
    SelfApproval: "You may not review your own request",
    RoleMissing: "Your roles do not allow this review",
    ApprovalClosed: "This approval is closed to your review",
    InvalidRequest: "Review not recorded",
}


def seconds_left(session: Session, now_ns: int) -> int:
    """The cookie's Max-Age: the session's remaining lifetime, at least 1."""
    return max(1, -(-(session.expires_ns - now_ns) // 1_000_000_000))


def expired(not_after_ns: int | None, now_ns: int) -> bool:
    """A token's exp (``reviewers.token_expiry_ns``; None: it has none) is
    already past at ``now_ns``: a sign-in with it is refused rather than
    opening a session that is over at once."""
    return not_after_ns is not None and not_after_ns <= now_ns


def _field(form: Mapping[str, object], name: str) -> str:
    # A file upload where text belongs counts as no value.
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def _safe_next(value: str) -> str:
    """Where sign-in may continue: a page of this inbox, else the list."""
    try:
        parts = urlsplit(value)
    except ValueError:  # "//[": an IPv6 netloc left open
        return "/approvals"
    if parts.scheme or parts.netloc or not _NEXT_PATH.fullmatch(parts.path):
        return "/approvals"
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _verdict_of(value: str) -> Verdict:
    try:
        return Verdict(value)
    except ValueError:
        raise InvalidRequest(
            f"expected verdict approve or reject, got {value!r}", field="verdict"
        ) from None


def _query_of(params: Mapping[str, str]) -> InboxQuery:
    """The list's filters from the query string; InvalidRequest names a bad
    one."""
    get = params.get
    state_name = get("state", ApprovalState.PENDING.value)
    state: ApprovalState | None
    if state_name == pages.ALL_STATES:
        state = None
    else:
        try:
            state = ApprovalState(state_name)
        except ValueError:
            raise InvalidRequest(
                "filter state: expected one of pending, approved, rejected, "
                f"expired, used, all; got {state_name[:MAX_SHOWN_CHARS]!r}",
                field="state",
            ) from None
    raw_risk = get("min_risk", "") or "0"
    # ASCII digits only: str.isdigit() also takes "²" and "٣", which int()
    # refuses or reads as another number; the length bound keeps int() from
    # its own limit on very long digit strings.
    if (
        not (raw_risk.isascii() and raw_risk.isdigit())
        or len(raw_risk) > MAX_SCORE_DIGITS
        or int(raw_risk) > MAX_SCORE
    ):
        raise InvalidRequest(
            f"filter min_risk: expected a whole number 0..{MAX_SCORE}, "
            f"got {raw_risk[:MAX_SHOWN_CHARS]!r}",
            field="min_risk",
        )
    filters = {name: get(name, "").strip() for name in ("agent", "action", "after")}
    for name, value in filters.items():
        if len(value) > MAX_FILTER_CHARS:
            raise InvalidRequest(
                f"filter {name}: expected at most {MAX_FILTER_CHARS} characters, "
                f"got {len(value)}",
                field=name,
            )
    return InboxQuery(
        state=state,
        agent_id=filters["agent"],
        action=filters["action"],
        min_risk=int(raw_risk),
        after=filters["after"],
    )


# ------------------------------------------------- shared with the playground
#
# The playground (``server.playground``) signs in and checks posts with these
# same pieces, under its own path, cookies and session store.


def same_origin(
    request: web.Request, origins: frozenset[str], *, referer: bool = True
) -> bool:
    """Whether a POST comes from this page's own origin.

    An ``Origin`` must be the request's own (``scheme://host``) or one of
    ``origins`` (public origins behind a proxy); for ``Origin: null`` or none,
    ``Sec-Fetch-Site: same-origin`` decides. A request with neither is judged
    by its ``Referer``'s origin when ``referer`` allows; the playground passes
    ``referer=False``, and nothing else passes there.
    """
    own = f"{request.scheme}://{request.host}".lower()
    origin = request.headers.get("Origin", "")
    if origin and origin != "null":
        return origin.lower() == own or origin.lower() in origins
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None or not referer:
        return site == "same-origin"
    try:
        sent_from = urlsplit(request.headers.get("Referer", ""))
    except ValueError:  # an IPv6 netloc left open: no origin at all
        return False
    if sent_from.scheme and sent_from.netloc:
        seen = f"{sent_from.scheme}://{sent_from.netloc}".lower()
        return seen == own or seen in origins
    return False


def origin_of(url: str) -> str:
    """A configured public URL's origin (``scheme://host[:port]``, lower
    case), as ``same_origin`` compares it with a request's."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def set_strict_cookie(
    response: web.StreamResponse,
    name: str,
    value: str,
    *,
    max_age: int,
    path: str,
    secure: bool,
) -> None:
    """Set a sign-in cookie as these pages set each of theirs: ``HttpOnly``
    (no script reads it), ``SameSite=Strict`` (no other site's page sends
    it), ``Secure`` when ``secure``, for ``max_age`` seconds, below
    ``path`` only."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        secure=secure,
        httponly=True,
        samesite="Strict",
    )


def add_security_headers(
    app: web.Application, path: str, content_security_policy: str
) -> None:
    """Give every response at or below ``path`` the page's headers: its
    Content-Security-Policy, ``nosniff``, ``no-referrer``, no framing and
    ``no-store``."""
    headers = {
        "Content-Security-Policy": content_security_policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
    }

    async def secure_headers(
        request: web.Request, response: web.StreamResponse
    ) -> None:
        if request.path == path or request.path.startswith(path + "/"):
            response.headers.update(headers)

    app.on_response_prepare.append(secure_headers)


def add_review_routes(
    app: web.Application,
    inbox: Inbox,
    authenticate: Authenticator,
    *,
    title: str,
    session_seconds: int,
    secure_cookie: bool = True,
    public_urls: Iterable[str] = (),
    clock: Callable[[], int] = time.time_ns,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    on_refused: Callable[[str], None] = lambda _why: None,
) -> SessionStore:
    """Mount the review page under ``/approvals`` of ``app``.

    Args:
        app: the HTTP stack's application (not yet started).
        inbox: where approvals are read and reviewed.
        authenticate: token -> Reviewer, as ``ReviewerAuth.authenticate``.
        title: the site name in the header, e.g. "Kynara sidecar".
        session_seconds: how long a sign-in lasts
            (``approvals.session_seconds``).
        secure_cookie: mark cookies ``Secure``. Browsers keep Secure cookies
            from https and from http://localhost or 127.0.0.1 only, so the
            page needs TLS (or a TLS proxy) anywhere else.
        public_urls: the base URLs reviewers reach the page by when a proxy
            stands in front (``approvals.inbox_url``); their origins are
            accepted on POSTs besides the request's own.
        clock: nanoseconds since the epoch, for sessions and "expires in".
        max_sessions: sessions kept at most; the oldest ends first.
        on_refused: told why each refused post or sign-in was refused
            (``origin``, ``csrf``, or the sign-in's error code), to count it
            beside its log line.

    Returns:
        The session store, for tests and for ending sessions. It follows
        ``authenticate`` when that is ``ReviewerAuth.authenticate``: the
        sessions of admin credentials a reload removes or changes end.
    """
    sessions = SessionStore(session_seconds, max_sessions=max_sessions, clock=clock)
    sessions.follow(authenticate)
    page = _ReviewPage(
        inbox,
        authenticate,
        title=title,
        secure_cookie=secure_cookie,
        sessions=sessions,
        origins=frozenset(origin_of(url) for url in public_urls if url),
        clock=clock,
        on_refused=on_refused,
    )
    add_security_headers(app, COOKIE_PATH, CONTENT_SECURITY_POLICY)
    app.router.add_get("/approvals/login", page.login_form)
    app.router.add_post("/approvals/login", page.login)
    app.router.add_post("/approvals/logout", page.logout)
    app.router.add_get("/approvals", page.list_approvals)
    app.router.add_get(f"/approvals/{_APPROVAL_ID}", page.show_approval)
    app.router.add_post(f"/approvals/{_APPROVAL_ID}/review", page.review)
    return sessions
