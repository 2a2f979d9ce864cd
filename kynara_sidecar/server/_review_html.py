"""The review page's HTML: pure functions from approvals to markup.

Every page is rendered on the server from the ``Approval`` values an inbox
returns; there is no template engine, no script and no external asset. The
rules that keep it safe are structural:

- Every value that did not come from this module passes through ``_e``
  (``html.escape`` with quotes) before it reaches markup, attribute values
  included; ids in links are percent-encoded first. Nothing else builds
  markup from data.
- Every value an agent or a reviewer wrote (ids, names, attribute and
  context keys and values, descriptions, comments) is shown through ``_v``:
  isolated in a ``<bdi>`` so right-to-left text cannot reorder what stands
  around it, and with every control, format or otherwise invisible
  character (a bidi override, a zero-width space, NUL) written out as its
  code point (``\u202e``) in a ``ctl`` badge (``server._visible``), so a
  reviewer reads the resource id the request carries, not another one.
  Form fields that send a value back (the filters, the comment) keep it as
  it is, with ``dir="auto"``.
- The only style is one inline ``<style>`` block whose SHA-256 the
  Content-Security-Policy names (``STYLE_HASH``), so the policy can forbid
  every other source, inline ``style`` attributes included.
- Typed values (the audit record's JSON form, ``{"int": "5000"}``) are shown
  as a table of name, type and value, nested maps and lists as nested
  tables, a redacted value as "redacted" with its keyed hash.

Landmarks (``header``, ``nav``, ``main``), one ``h1`` a page, labelled
controls and text that states what colour also shows keep it usable with a
screen reader; the layout is one column that widens, so it reads at phone
widths without horizontal scrolling.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from kynara_sidecar.approvals.model import (
    Approval,
    ApprovalState,
    EarlierApproval,
    InboxQuery,
    Reviewer,
)
from kynara_sidecar.approvals.signed_review import view_digest
from kynara_sidecar.server._visible import escape_char, visible_parts, visible_text

__all__ = [
    "ALL_STATES",
    "CSS",
    "STYLE_HASH",
    "approval_path",
    "render_approval",
    "render_list",
    "render_login",
    "render_message",
]

CSS = """\
:root{color-scheme:light;font-family:system-ui,-apple-system,"Segoe UI",\
Roboto,sans-serif;line-height:1.45;color:#1b1b1b;background:#fff}
body{margin:0}
a{color:#0645ad}
a:focus,button:focus,input:focus,select:focus,textarea:focus\
{outline:3px solid #b35c00;outline-offset:2px}
.skip{position:absolute;left:-999em}
.skip:focus{left:.5rem;top:.5rem;background:#fff;padding:.25rem .5rem}
header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;\
justify-content:space-between;padding:.6rem 1rem;background:#f2f4f7;\
border-bottom:1px solid #c9ced6}
header p{margin:0;font-weight:600}
header nav{display:flex;flex-wrap:wrap;gap:.5rem;align-items:center}
header form{margin:0}
main{max-width:64rem;margin:0 auto;padding:1rem}
h1{font-size:1.5rem;margin:.2rem 0 1rem;overflow-wrap:anywhere}
h2{font-size:1.2rem;margin:1.5rem 0 .5rem}
h3{font-size:1rem;margin:1rem 0 .4rem}
table{border-collapse:collapse;width:100%;margin:.25rem 0 .75rem}
th,td{text-align:left;vertical-align:top;padding:.35rem .5rem;\
border-bottom:1px solid #d5d9e0}
th{background:#f6f7f9;overflow-wrap:break-word}
td{overflow-wrap:anywhere}
td.kind{white-space:nowrap}
td table{margin:0}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em;\
overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f7f9;\
padding:.5rem;margin:.25rem 0;border-radius:4px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;margin:.25rem 0}
dt{font-weight:600}
dd{margin:0;overflow-wrap:anywhere}
form.filters{display:grid;grid-template-columns:repeat(auto-fit,minmax(10rem,1fr));\
gap:.75rem;align-items:end;margin-bottom:1rem}
label{display:block;font-weight:600;margin-bottom:.2rem}
input,select,textarea{font:inherit;width:100%;box-sizing:border-box;\
padding:.4rem;border:1px solid #6b7280;border-radius:4px;background:#fff;\
color:#1b1b1b}
textarea{min-height:5rem}
button{font:inherit;padding:.5rem 1rem;border-radius:4px;border:1px solid #374151;\
background:#fff;color:#1b1b1b;cursor:pointer}
button.approve{background:#146c2e;border-color:#146c2e;color:#fff}
button.reject{background:#a51d12;border-color:#a51d12;color:#fff}
.actions{display:flex;flex-wrap:wrap;gap:.75rem;margin-top:.75rem}
ul.approvals{list-style:none;padding:0;margin:0}
ul.approvals li{border:1px solid #c9ced6;border-radius:6px;padding:.6rem .8rem;\
margin-bottom:.75rem}
ul.approvals h2{margin:0 0 .4rem;font-size:1.05rem;overflow-wrap:anywhere}
.state{display:inline-block;padding:0 .4rem;border-radius:4px;border:1px solid;\
font-weight:600}
.state-pending{color:#7a4100;background:#fff4e5}
.state-approved,.state-used{color:#0f5323;background:#e8f5ec}
.state-rejected{color:#8a1a10;background:#fdecea}
.state-expired{color:#3d4451;background:#eef0f3}
.notice{border-left:4px solid #0645ad;background:#eef3fb;padding:.5rem .75rem;\
margin:.75rem 0}
.error{border-left:4px solid #a51d12;background:#fdecea;padding:.5rem .75rem;\
margin:.75rem 0}
.muted{color:#4b5563}
.ctl{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;\
color:#8a1a10;background:#fdecea;border:1px solid #a51d12;border-radius:3px;\
padding:0 .15em;margin:0 .05em}
@media (max-width:40rem){main{padding:.75rem}th,td{padding:.3rem}}
"""

# The Content-Security-Policy allows this one block and nothing else.
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode(
    "ascii"
)

# The state filter's word for every state, as `approvals list --state all`
# and ListApprovalsRequest.state say it.
ALL_STATES = "all"
_STATE_CHOICES = ("pending", "approved", "rejected", "expired", "used", ALL_STATES)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _v(value: object, *, multiline: bool = False) -> str:
    """An agent's or reviewer's value: isolated, escaped, and with every
    hidden character shown as its code point in a ``ctl`` badge."""
    shown = "".join(
        f'<span class="ctl">{escape_char(run)}</span>' if hidden else _e(run)
        for run, hidden in visible_parts(str(value), multiline=multiline)
    )
    return f"<bdi>{shown}</bdi>"


def _breakable(name: str) -> str:
    # Factor names are config keys (delegation_depth); let a phone wrap them.
    return _e(name).replace("_", "_<wbr>")


def approval_path(approval_id: str) -> str:
    """The page of one approval, as a path (the id percent-encoded)."""
    return "/approvals/" + quote(approval_id, safe="")


def _page(
    title: str,
    site: str,
    body: str,
    *,
    reviewer: Reviewer | None = None,
    csrf: str = "",
) -> str:
    account = ""
    if reviewer is not None:
        account = (
            '<nav aria-label="Account">'
            f"<span>Signed in as <strong>{_v(reviewer.id)}</strong></span>"
            '<form method="post" action="/approvals/logout">'
            f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
            '<button type="submit">Sign out</button></form></nav>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(visible_text(title))} · {_e(site)}</title>"
        f"<style>{CSS}</style></head>"
        '<body><a class="skip" href="#main">Skip to content</a>'
        f'<header><p><a href="/approvals">{_e(site)}</a></p>{account}</header>'
        f'<main id="main">{body}</main></body></html>'
    )


def render_message(
    site: str, heading: str, message: str, *, link: tuple[str, str] | None = None
) -> str:
    """A page that says one thing: a refusal, a missing approval."""
    more = ""
    if link is not None:
        more = f'<p><a href="{_e(link[0])}">{_e(link[1])}</a></p>'
    body = f'<h1>{_e(heading)}</h1><p class="error" role="alert">{_v(message)}</p>'
    return _page(heading, site, body + more)


def render_login(site: str, *, csrf: str, next_path: str, error: str = "") -> str:
    """The sign-in form: one token, exchanged for a session cookie."""
    alert = f'<p class="error" role="alert">{_e(error)}</p>' if error else ""
    body = (
        "<h1>Sign in to review approvals</h1>"
        f"{alert}"
        '<form method="post" action="/approvals/login">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        f'<input type="hidden" name="next" value="{_e(next_path)}">'
        '<label for="token">Reviewer token</label>'
        '<input id="token" name="token" type="password" required '
        'autocomplete="off" aria-describedby="token-help">'
        '<p id="token-help" class="muted">An admin credential with the reviewer '
        "role, or a reviewer JWT from a configured issuer. It is checked once; "
        "the session cookie carries the sign-in afterwards.</p>"
        '<div class="actions"><button type="submit">Sign in</button></div>'
        "</form>"
    )
    return _page("Sign in", site, body)


# ----------------------------------------------------------------- the list


def _state_badge(state: ApprovalState) -> str:
    return f'<span class="state state-{_e(state.value)}">{_e(state.value)}</span>'


def _filters(query: InboxQuery) -> str:
    state = query.state.value if query.state is not None else ALL_STATES
    options = "".join(
        f'<option value="{s}"{" selected" if s == state else ""}>{s}</option>'
        for s in _STATE_CHOICES
    )
    return (
        '<form class="filters" method="get" action="/approvals" '
        'aria-label="Filter approvals">'
        '<div><label for="f-agent">Agent</label>'
        f'<input id="f-agent" name="agent" dir="auto" value="{_e(query.agent_id)}">'
        "</div>"
        '<div><label for="f-action">Action</label>'
        f'<input id="f-action" name="action" dir="auto" value="{_e(query.action)}">'
        "</div>"
        '<div><label for="f-risk">Minimum risk (0–100)</label>'
        '<input id="f-risk" name="min_risk" type="number" min="0" max="100" '
        f'value="{_e(query.min_risk)}"></div>'
        '<div><label for="f-state">State</label>'
        f'<select id="f-state" name="state">{options}</select></div>'
        '<div><button type="submit">Filter</button></div></form>'
    )


def _summary(approval: Approval, now_ns: int) -> str:
    resource = _v(approval.resource_kind)
    if approval.resource_id:
        resource += f" {_v(approval.resource_id)}"
    return (
        f'<li><h2><a href="{_e(approval_path(approval.id))}">'
        f"{_v(approval.action)} on {resource}</a></h2><dl>"
        f"<dt>State</dt><dd>{_state_badge(approval.state)}</dd>"
        f"<dt>Risk</dt><dd>{approval.risk.score} / 100</dd>"
        f"<dt>Agent</dt><dd>{_v(approval.agent_id)}</dd>"
        f"<dt>For user</dt><dd>{_v(approval.user_id)}</dd>"
        f"<dt>Asked</dt><dd>{_time(approval.created_at, now_ns)}</dd>"
        f"<dt>Expires</dt><dd>{_time(approval.expires_at, now_ns)}</dd>"
        f"<dt>Id</dt><dd><code>{_v(approval.id)}</code></dd></dl></li>"
    )


def render_list(
    site: str,
    approvals: Sequence[Approval],
    query: InboxQuery,
    *,
    reviewer: Reviewer,
    csrf: str,
    now_ns: int,
    error: str = "",
) -> str:
    """Approvals matching ``query``, newest first (as the inbox gave them)."""
    alert = f'<p class="error" role="alert">{_v(error)}</p>' if error else ""
    if approvals:
        items = "".join(_summary(a, now_ns) for a in approvals)
        found = f'<ul class="approvals">{items}</ul>'
    else:
        found = '<p class="notice" role="status">No approvals match.</p>'
    more = ""
    if approvals and len(approvals) >= query.limit:
        params = _query_params(query) | {"after": approvals[-1].id}
        more = (
            f'<p><a href="/approvals?{_e(urlencode(params))}">Older approvals</a></p>'
        )
    body = (
        "<h1>Approvals</h1>"
        f"{alert}{_filters(query)}"
        f'<section aria-label="Results">{found}{more}</section>'
    )
    return _page("Approvals", site, body, reviewer=reviewer, csrf=csrf)


def _query_params(query: InboxQuery) -> dict[str, str]:
    params = {"state": query.state.value if query.state is not None else ALL_STATES}
    if query.agent_id:
        params["agent"] = query.agent_id
    if query.action:
        params["action"] = query.action
    if query.min_risk:
        params["min_risk"] = str(query.min_risk)
    return params


# ------------------------------------------------------------ one approval


def _parse_time(value: str) -> datetime.datetime | None:
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _relative(seconds: float) -> str:
    amount = abs(int(seconds))
    if amount == 0:
        return "now"
    for unit, size in (("day", 86_400), ("h", 3600), ("min", 60)):
        if amount >= size:
            count = amount // size
            text = f"{count} {unit}{'s' if unit == 'day' and count > 1 else ''}"
            break
    else:
        text = f"{amount} s"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _time(value: str, now_ns: int) -> str:
    if not value:
        return '<span class="muted">–</span>'
    parsed = _parse_time(value)
    if parsed is None:
        return _v(value)
    delta = parsed.timestamp() - now_ns / 1e9
    return (
        f'<time datetime="{_e(value)}">{_v(value)}</time> '
        f'<span class="muted">({_relative(delta)})</span>'
    )


def _typed(value: Any) -> tuple[str, str]:
    """(type, rendered value) of one value in the typed JSON form."""
    if not isinstance(value, Mapping) or len(value) != 1:
        return "?", f"<code>{_v(value)}</code>"
    ((tag, inner),) = value.items()
    if tag == "map" and isinstance(inner, Mapping):
        return "map", _typed_table(inner.items(), "Key")
    if tag == "list" and isinstance(inner, Sequence) and not isinstance(inner, str):
        return "list", _typed_table(
            ((f"[{i}]", item) for i, item in enumerate(inner)), "Index"
        )
    if tag == "redacted":
        return (
            "redacted",
            f'<span class="muted">redacted</span> <code>{_v(inner)}</code>',
        )
    if tag == "string":
        return "string", _v(inner)
    return str(tag), f"<code>{_v(inner)}</code>"


def _typed_table(entries: Iterable[tuple[str, Any]], first: str) -> str:
    rows = []
    for name, value in entries:
        kind, shown = _typed(value)
        rows.append(
            f'<tr><th scope="row">{_v(name)}</th><td class="kind">{_v(kind)}</td>'
            f"<td>{shown}</td></tr>"
        )
    if not rows:
        return '<span class="muted">none</span>'
    return (
        f'<table><thead><tr><th scope="col">{_e(first)}</th>'
        '<th scope="col">Type</th><th scope="col">Value</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _who(approval: Approval) -> str:
    rows = []
    for i, principal in enumerate(approval.chain):
        part = "user" if i == 0 else "agent"
        rows.append(
            f"<tr><td>{i + 1}</td><td>{part}</td><td>{_v(principal.id)}</td>"
            f"<td>{_v(principal.kind) if principal.kind else '–'}</td>"
            f"<td>{_v(', '.join(principal.roles)) if principal.roles else '–'}</td>"
            "</tr>"
        )
    return (
        '<section aria-labelledby="who"><h2 id="who">Who</h2><dl>'
        f"<dt>User</dt><dd>{_v(approval.user_id)}</dd>"
        f"<dt>Agent</dt><dd>{_v(approval.agent_id)}</dd>"
        f"<dt>Daemon</dt><dd>{_v(approval.daemon_id)}</dd></dl>"
        "<h3>Delegation chain (user first)</h3>"
        '<table><thead><tr><th scope="col">#</th><th scope="col">Part</th>'
        '<th scope="col">Principal</th><th scope="col">Kind</th>'
        f'<th scope="col">Roles</th></tr></thead><tbody>{"".join(rows)}</tbody>'
        "</table></section>"
    )


def _what(approval: Approval) -> str:
    request_id = ""
    if approval.request_id:
        request_id = (
            f"<dt>Request id</dt><dd><code>{_v(approval.request_id)}</code></dd>"
        )
    return (
        '<section aria-labelledby="what"><h2 id="what">What</h2><dl>'
        f"<dt>Action</dt><dd><code>{_v(approval.action)}</code></dd>"
        f"<dt>Resource kind</dt><dd><code>{_v(approval.resource_kind)}</code></dd>"
        f"<dt>Resource id</dt><dd><code>{_v(approval.resource_id)}</code></dd>"
        f"{request_id}</dl>"
        "<h3>Resource attributes</h3>"
        f"{_typed_table(approval.attributes.items(), 'Attribute')}"
        "<h3>Context</h3>"
        f"{_typed_table(approval.context.items(), 'Entry')}"
        "</section>"
    )


def _why(approval: Approval) -> str:
    rules = []
    for rule in approval.rules:
        condition = (
            f"<pre>{_v(rule.condition, multiline=True)}</pre>"
            if rule.condition
            else '<p class="muted">No condition: the rule always asks.</p>'
        )
        description = _v(rule.description, multiline=True) if rule.description else "–"
        rules.append(
            f"<li><p><strong>{_v(rule.policy)}</strong> rule "
            f"<code>{_v(rule.rule)}</code> for <code>{_v(rule.principal)}</code>"
            f"</p><p>{description}</p>{condition}</li>"
        )
    factors = "".join(
        f'<tr><th scope="row">{_breakable(f.name)}</th>'
        f'<td class="kind">{f.weight:g} × {f.fraction:g} = <strong>{f.points:g}'
        f"</strong></td><td>{_v(f.detail) if f.detail else '–'}</td></tr>"
        for f in approval.risk.factors
    )
    rules_html = f"<ol>{''.join(rules)}</ol>" if rules else "<p>No rule recorded.</p>"
    return (
        '<section aria-labelledby="why"><h2 id="why">Why</h2>'
        f"<h3>Rules that asked for approval</h3>{rules_html}"
        f"<h3>Risk: {approval.risk.score} / 100</h3>"
        '<table><thead><tr><th scope="col">Factor</th>'
        '<th scope="col">Weight × fraction = points</th>'
        f'<th scope="col">Detail</th></tr></thead><tbody>{factors}</tbody></table>'
        f'<p class="muted">Policy revision <code>{_v(approval.policy_revision)}'
        "</code></p></section>"
    )


def _status(approval: Approval, now_ns: int) -> str:
    need = approval.requirement
    roles = "; ".join(" or ".join(group) for group in need.reviewer_roles) or "–"
    reviews = "".join(
        f"<tr><td>{_v(r.reviewer)}</td><td>{_e(r.verdict.value)}</td>"
        f"<td>{_time(r.at, now_ns)}</td>"
        f"<td>{_v(r.comment, multiline=True) if r.comment else '–'}</td>"
        f"<td>{_v(r.via)}</td></tr>"
        for r in approval.reviews
    )
    reviews_html = (
        '<table><thead><tr><th scope="col">Reviewer</th><th scope="col">Verdict'
        '</th><th scope="col">At</th><th scope="col">Comment</th>'
        f'<th scope="col">Via</th></tr></thead><tbody>{reviews}</tbody></table>'
        if reviews
        else "<p>No reviews yet.</p>"
    )
    return (
        '<section aria-labelledby="status"><h2 id="status">Status</h2><dl>'
        f"<dt>State</dt><dd>{_state_badge(approval.state)}</dd>"
        f"<dt>Asked</dt><dd>{_time(approval.created_at, now_ns)}</dd>"
        f"<dt>Expires</dt><dd>{_time(approval.expires_at, now_ns)}</dd>"
        f"<dt>Approvers needed</dt><dd>{need.approvers} "
        f"({len(approval.approvers)} so far)</dd>"
        f"<dt>Reviewer roles needed</dt><dd>{_v(roles)}</dd>"
        "<dt>Self approval</dt>"
        f"<dd>{'allowed' if need.allow_self_approval else 'not allowed'}</dd>"
        f"</dl><h3>Reviews</h3>{reviews_html}</section>"
    )


def _earlier(earlier: Sequence[EarlierApproval], now_ns: int) -> str:
    """The same request asked before, and what became of it."""
    if not earlier:
        return ""
    items = []
    for before in earlier:
        link = (
            f'<a href="{_e(approval_path(before.id))}"><code>{_v(before.id)}</code></a>'
        )
        if before.state is None:
            items.append(f'<li>{link} <span class="muted">(no longer held)</span></li>')
            continue
        what = _state_badge(before.state)
        if before.reviewer:
            what += f" by {_v(before.reviewer)}"
        if before.comment:
            what += f": “{_v(before.comment, multiline=True)}”"
        items.append(f"<li>{link} {what} {_time(before.resolved_at, now_ns)}</li>")
    return (
        '<section aria-labelledby="before"><h2 id="before">Asked before</h2>'
        "<p>This agent asked for this same request before, and it was not "
        f"granted:</p><ul>{''.join(items)}</ul></section>"
    )


def _review_form(approval: Approval, csrf: str, comment: str) -> str:
    if approval.state is not ApprovalState.PENDING:
        return ""
    return (
        '<section aria-labelledby="review"><h2 id="review">Review</h2>'
        f'<form method="post" action="{_e(approval_path(approval.id))}/review">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        # What this page shows: the review binds it (a differing approval
        # is refused, "changed since you read it").
        f'<input type="hidden" name="view" value="{_e(view_digest(approval))}">'
        '<label for="comment">Comment (optional; kept in the audit log)</label>'
        '<textarea id="comment" name="comment" maxlength="2000" dir="auto">'
        f"{_e(comment)}"
        "</textarea>"
        '<div class="actions">'
        '<button type="submit" name="verdict" value="approve" class="approve">'
        "Approve</button>"
        '<button type="submit" name="verdict" value="reject" class="reject">'
        "Reject</button></div></form></section>"
    )


def render_approval(
    site: str,
    approval: Approval,
    *,
    reviewer: Reviewer,
    csrf: str,
    now_ns: int,
    notice: str = "",
    error: str = "",
    comment: str = "",
    earlier: Sequence[EarlierApproval] = (),
) -> str:
    """One approval: who, what, why, its status, and the review form;
    ``earlier``, what became of the approvals ``approval.previous`` names
    (``model.earlier_approvals``), shown as "Asked before"."""
    banner = ""
    if error:
        banner = f'<p class="error" role="alert">{_v(error)}</p>'
    elif notice:
        banner = f'<p class="notice" role="status">{_e(notice)}</p>'
    body = (
        '<p><a href="/approvals">All approvals</a></p>'
        f"<h1>{_v(approval.action)} on {_v(approval.resource_kind)} "
        f"{_v(approval.resource_id)}</h1>"
        f"<p>Approval <code>{_v(approval.id)}</code> · "
        f"{_state_badge(approval.state)} · risk {approval.risk.score} / 100</p>"
        f"{banner}{_earlier(earlier, now_ns)}"
        f"{_who(approval)}{_what(approval)}{_why(approval)}"
        f"{_status(approval, now_ns)}{_review_form(approval, csrf, comment)}"
    )
    return _page(f"Approval {approval.id}", site, body, reviewer=reviewer, csrf=csrf)
