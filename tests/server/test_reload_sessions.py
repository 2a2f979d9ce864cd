"""A reload ends the sign-in sessions of the admin credentials it removed or
changed, on the review page (/approvals) and the playground (/playground)
of a real daemon; the sessions of unchanged credentials go on."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from support import daemon_config
from test_playground import call
from test_playground import sign_in as playground_sign_in

from kynara_sidecar.server.review_page import LOGIN_COOKIE, SESSION_COOKIE

SECRETS = {
    "rita": ("rita-reviewer-secret-012345678", ["reviewer"]),
    "carol": ("carol-reviewer-secret-01234567", ["reviewer"]),
    "ops": ("ops-operator-secret-0123456789", ["operator"]),
}
ROTATED = "rita-rotated-secret-0123456789"


def credential_overrides(tmp_path, roles=None, names=None) -> list[str]:
    """The admin socket and credentials (secret files in tmp_path), with
    ``roles`` replacing some credentials' roles and only ``names`` kept."""
    credentials = {}
    for name, (secret, default_roles) in SECRETS.items():
        if names is not None and name not in names:
            continue
        path = tmp_path / f"{name}.secret"
        if not path.exists():
            path.write_text(secret)
        credentials[name] = {
            "secret_file": str(path),
            "roles": (roles or {}).get(name, default_roles),
        }
    return [
        f"admin.socket={tmp_path / 'admin.sock'}",
        f"admin.credentials={json.dumps(credentials)}",
    ]


def review_sign_in(running, token: str) -> str:
    """Sign in at /approvals through the form; return the session cookie."""
    _, form, page = call(running, "GET", "/approvals/login")
    login_cookie = [
        value.split(";", 1)[0]
        for name, value in form.getheaders()
        if name.lower() == "set-cookie" and value.startswith(LOGIN_COOKIE + "=")
    ][0]
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    status, response, _ = call(
        running,
        "POST",
        "/approvals/login",
        raw=urlencode({"csrf": csrf, "token": token, "next": "/approvals"}).encode(),
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "cookie": login_cookie,
            "origin": f"http://127.0.0.1:{running.daemon.http_port}",
        },
    )
    assert status == 303
    cookie = response.getheader("set-cookie").split(";", 1)[0]
    assert cookie.startswith(SESSION_COOKIE + "=")
    return cookie


def reviews(running, cookie: str) -> bool:
    """Whether the cookie still opens the review page's list (an ended
    session is sent to sign in)."""
    status, response, _ = call(running, "GET", "/approvals", headers={"cookie": cookie})
    assert status in (200, 303), status
    if status == 303:
        assert response.getheader("location").startswith("/approvals/login")
    return status == 200


def plays(running, cookie: str) -> bool:
    """Whether the cookie still calls the playground's API (401 otherwise)."""
    status, _, _ = call(
        running, "GET", "/playground/api/policies", headers={"cookie": cookie}
    )
    assert status in (200, 401), status
    return status == 200


def reload_with(running, config) -> bool:
    running.daemon._reload_config = lambda: config
    return running.call(running.daemon.reload())


def test_a_rotated_secret_ends_its_sessions_and_no_other(tmp_path, start_daemon):
    overrides = credential_overrides(tmp_path)
    running = start_daemon(*overrides)
    rita_review = review_sign_in(running, SECRETS["rita"][0])
    rita_play = playground_sign_in(running, SECRETS["rita"][0])
    carol_review = review_sign_in(running, SECRETS["carol"][0])
    carol_play = playground_sign_in(running, SECRETS["carol"][0])
    ops_play = playground_sign_in(running, SECRETS["ops"][0])
    assert all(reviews(running, c) for c in (rita_review, carol_review))
    assert all(plays(running, c) for c in (rita_play, carol_play, ops_play))

    (tmp_path / "rita.secret").write_text(ROTATED)
    reloaded = reload_with(running, daemon_config(tmp_path, *overrides))

    assert reloaded is True
    assert not reviews(running, rita_review)
    assert not plays(running, rita_play)
    assert reviews(running, carol_review)
    assert plays(running, carol_play)
    assert plays(running, ops_play)
    # The rotated secret signs in again; the old one no longer does.
    assert reviews(running, review_sign_in(running, ROTATED))
    status, _, _ = call(
        running,
        "GET",
        "/playground/api/policies",
        headers={"authorization": f"Bearer {SECRETS['rita'][0]}"},
    )
    assert status == 401


def test_changed_roles_and_a_removed_credential_end_their_sessions(
    tmp_path, start_daemon
):
    overrides = credential_overrides(tmp_path)
    running = start_daemon(*overrides)
    rita_review = review_sign_in(running, SECRETS["rita"][0])
    carol_review = review_sign_in(running, SECRETS["carol"][0])
    carol_play = playground_sign_in(running, SECRETS["carol"][0])
    ops_play = playground_sign_in(running, SECRETS["ops"][0])

    # A reload that fails keeps the credentials, and so their sessions.
    same = daemon_config(tmp_path, *overrides)
    (tmp_path / "rita.secret").write_text("short")
    refused = reload_with(running, same)
    assert refused is False
    assert reviews(running, rita_review) and reviews(running, carol_review)
    assert plays(running, ops_play)
    (tmp_path / "rita.secret").write_text(SECRETS["rita"][0])

    # carol keeps her secret but gains a role; ops is removed.
    changed = credential_overrides(
        tmp_path, roles={"carol": ["reviewer", "operator"]}, names={"rita", "carol"}
    )
    reloaded = reload_with(running, daemon_config(tmp_path, *changed))

    assert reloaded is True
    assert not reviews(running, carol_review)
    assert not plays(running, carol_play)
    assert not plays(running, ops_play)
    assert reviews(running, rita_review)
