"""The playground's HTML, its one style block and its one script.

No build step and no external asset: the page is this module's markup, one
``<style>`` and one ``<script>`` inline, each allowed by its SHA-256 in the
Content-Security-Policy (``STYLE_HASH``, ``SCRIPT_HASH``) and nothing else.
Values from the server reach markup through ``_e`` (``html.escape``); the
script writes everything it receives with ``textContent``, never as
markup, so a rule id or a principal cannot become an element.

The script reads the session's CSRF token from a ``<meta>`` and sends it in
the ``x-kynara-csrf`` header of each POST (``server.playground``).
"""

from __future__ import annotations

import base64
import hashlib
import html

from kynara_sidecar.server._review_html import CSS as REVIEW_CSS

__all__ = ["CSS", "SCRIPT", "SCRIPT_HASH", "STYLE_HASH", "render_login", "render_page"]

# The review page's look, and what the playground adds to it.
CSS = (
    REVIEW_CSS
    + """\
textarea.code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;\
min-height:14rem;white-space:pre;overflow-wrap:normal;overflow-x:auto}
textarea.file{min-height:10rem}
fieldset{border:1px solid #c9ced6;border-radius:6px;margin:.5rem 0;padding:.5rem .75rem}
fieldset label{display:inline;font-weight:400;margin-right:1rem}
fieldset input{width:auto}
ol.tour{padding-left:1.25rem}
ol.tour li{margin-bottom:.75rem}
ol.tour h3{margin:.2rem 0}
.effect{display:inline-block;padding:0 .4rem;border-radius:4px;border:1px solid;\
font-weight:600}
.effect-allow{color:#0f5323;background:#e8f5ec}
.effect-deny{color:#8a1a10;background:#fdecea}
.effect-require_approval{color:#7a4100;background:#fff4e5}
.file-block{margin:.75rem 0}
main p,main li{overflow-wrap:anywhere}
ul.trace{padding-left:1.25rem}
ul.trace li{margin-bottom:.4rem;overflow-wrap:anywhere}
"""
)
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode(
    "ascii"
)

SCRIPT = r"""
"use strict";
(() => {
  const csrf = document.querySelector('meta[name="kynara-csrf"]').content;
  const $ = (id) => document.getElementById(id);

  async function call(method, path, body) {
    const init = {method, headers: {accept: "application/json"},
                  credentials: "same-origin"};
    if (body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.headers["x-kynara-csrf"] = csrf;
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data;
    try { data = await response.json(); }
    catch (err) { data = {error: "HTTP " + response.status}; }
    if (!response.ok) {
      const failure = new Error(data.error || ("HTTP " + response.status));
      failure.data = data;
      throw failure;
    }
    return data;
  }
  function put(el, value) { el.textContent = value == null ? "" : String(value); }
  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); }
  function make(tag, value, cls) {
    const el = document.createElement(tag);
    if (value !== undefined) put(el, value);
    if (cls) el.className = cls;
    return el;
  }
  function status(message) { put($("status"), message); }
  function showError(message) {
    const el = $("error");
    put(el, message);
    el.hidden = !message;
  }
  function cite(rule) { return rule.policy + "/" + rule.rule + "@" + rule.principal; }
  function effectBadge(effect) {
    return make("span", effect || "–", "effect effect-" + (effect || "none"));
  }
  function ruleList(el, rules) {
    clear(el);
    if (!rules || rules.length === 0) { el.appendChild(make("li", "none")); return; }
    for (const rule of rules) {
      const item = make("li");
      item.dataset.rule = cite(rule);
      item.appendChild(make("code", cite(rule)));
      item.appendChild(document.createTextNode(
        " " + rule.effect + (rule.shadow ? " (shadow)" : "")));
      el.appendChild(item);
    }
  }
  const MATCH = ["action_matched", "resource_matched", "roles_matched"];
  const MATCH_NAMES = {action_matched: "action", resource_matched: "resource kind",
                       roles_matched: "roles"};
  function trace(el, explanation) {
    clear(el);
    if (!explanation) return;
    el.appendChild(make("p", explanation.summary));
    for (const principal of explanation.principals || []) {
      const by = principal.decided_by ? " by " + principal.decided_by : "";
      el.appendChild(make("h4", principal.principal + " (roles: " +
        (principal.roles.join(", ") || "none") + "): " + principal.effect +
        " (" + principal.reason_code + ")" + by));
      // One item a rule, not a table: it reads on a phone without
      // scrolling sideways.
      const list = make("ul", undefined, "trace");
      for (const rule of principal.rules || []) {
        const item = make("li");
        item.dataset.rule = rule.policy + "/" + rule.rule;
        item.appendChild(make("strong", rule.policy + "/" + rule.rule));
        const misses = MATCH.filter((k) => !rule[k]).map((k) => MATCH_NAMES[k]);
        const matched = misses.length ? "near miss: " + misses.join(" and ") +
          " did not match" : "patterns and roles match, " + rule.verdict;
        const error = rule.error ? ": " + rule.error : "";
        item.appendChild(document.createTextNode(" [" + rule.effect +
          (rule.shadow ? ", shadow" : "") + "] " + matched + error));
        if (rule.condition) item.appendChild(make("pre", rule.condition));
        list.appendChild(item);
      }
      el.appendChild(list);
    }
  }
  function envText(env) {
    if (!env) return "";
    const parts = [];
    for (const key of ["environment", "region", "daemon_id", "agent_id", "peer"]) {
      if (env[key]) parts.push(key + "=" + env[key]);
    }
    const labels = Object.keys(env.labels || {}).sort();
    if (labels.length) {
      parts.push("labels {" + labels.map((k) => k + ": " + env.labels[k])
        .join(", ") + "}");
    }
    return parts.join(", ") || "empty";
  }
  function render(result) {
    const decision = result.decision;
    const shown = $("decision");
    clear(shown);
    shown.appendChild(effectBadge(decision.effect));
    shown.dataset.effect = decision.effect;
    put($("reason-code"), decision.reason_code);
    put($("reason"), decision.reason);
    put($("instant"), result.now);
    put($("env-used"), envText(result.env));
    const ignored = result.directory_ignored;
    put($("policies-used"), (result.policies === "edited" ?
      "your edited copy" : "the active policies") + (ignored ?
      "; its directory file " + ignored.files.join(", ") + " left aside: " +
      ignored.why : ""));
    put($("policy-revision"), decision.policy_revision);
    ruleList($("matched-rules"), decision.matched_rules);
    const errors = $("condition-errors");
    clear(errors);
    for (const error of decision.condition_errors || []) {
      errors.appendChild(make("li", cite(error) + ": " + error.message));
    }
    if (!errors.firstChild) errors.appendChild(make("li", "none"));
    const limits = $("limits-seen");
    clear(limits);
    for (const line of decision.limits || []) limits.appendChild(make("li", line));
    if (!limits.firstChild) limits.appendChild(make("li", "none read or counted"));
    const compare = $("active-compare");
    if (result.active_decision) {
      const active = result.active_decision;
      compare.dataset.effect = active.effect;
      put(compare, "The active policies decide " + active.effect + " (" +
        active.reason_code + ")" + (active.effect === decision.effect ?
          ": your edit does not change the decision." :
          ": your edit changes the decision."));
      compare.hidden = false;
    } else {
      compare.hidden = true;
    }
    trace($("trace"), decision.explanation);
    put($("explained"), decision.explained);
    $("result").hidden = false;
  }
  function files() {
    return [...document.querySelectorAll("textarea.file")].map(
      (area) => ({name: area.dataset.name, content: area.value}));
  }
  async function run() {
    showError("");
    status("Deciding…");
    const body = {request: $("request").value};
    if ($("use-edited").checked) body.files = files();
    try {
      render(await call("POST", "/playground/api/evaluate", body));
      status("Decided.");
    } catch (err) {
      const where = err.data && err.data.file ? " (" + err.data.file +
        (err.data.location ? " at " + err.data.location : "") + ")" : "";
      showError(err.message + where);
      status("Not decided.");
    }
  }
  async function loadPolicies() {
    showError("");
    try {
      const data = await call("GET", "/playground/api/policies");
      const box = $("files");
      clear(box);
      data.files.forEach((file, i) => {
        const block = make("div", undefined, "file-block");
        const label = make("label", file.name);
        label.htmlFor = "file-" + i;
        const area = make("textarea", undefined, "code file");
        area.id = "file-" + i;
        area.dataset.name = file.name;
        area.spellcheck = false;
        area.value = file.content;
        block.appendChild(label);
        block.appendChild(area);
        box.appendChild(block);
      });
      // The signed directory decides every edited set as it stands: shown,
      // not editable, and never sent with the edited files.
      const signed = data.signed_directory ? data.signed_directory.files : [];
      signed.forEach((file, i) => {
        const block = make("div", undefined, "file-block");
        const label = make("label", file.name + " (signed directory, read-only)");
        label.htmlFor = "signed-" + i;
        const area = make("textarea", undefined, "code");
        area.id = "signed-" + i;
        area.readOnly = true;
        area.spellcheck = false;
        area.value = file.content;
        block.appendChild(label);
        block.appendChild(area);
        box.appendChild(block);
      });
      put($("policy-info"), "A copy of policy " + data.policy_revision +
        " and directory " + data.directory_revision + ". Edits stay in this page.");
      $("use-edited").disabled = false;
      $("use-edited").checked = true;
      status("Copied the active policies.");
    } catch (err) {
      showError(err.message);
    }
  }
  function row(table, name, recorded, replayed) {
    const tr = make("tr");
    const th = make("th", name);
    th.scope = "row";
    tr.appendChild(th);
    tr.appendChild(make("td", recorded));
    tr.appendChild(make("td", replayed));
    table.appendChild(tr);
  }
  let replayedRequest = "";
  async function replay() {
    showError("");
    const id = $("decision-id").value.trim();
    try {
      const data = await call("POST", "/playground/api/replay", {decision_id: id});
      const rec = data.recorded, rep = data.replayed;
      const table = $("replay-rows");
      clear(table);
      row(table, "Decision", rec.effect, rep.effect);
      row(table, "Reason code", rec.reason_code, rep.reason_code);
      row(table, "Reason", rec.reason, rep.reason);
      row(table, "Matched rules", rec.matched_rules.map(cite).join(", ") || "none",
          rep.matched_rules.map(cite).join(", ") || "none");
      row(table, "Policy revision", rec.policy_revision, rep.policy_revision);
      row(table, "Limits", rec.limits.join("; ") || "none",
          rep.limits.join("; ") || "none");
      const changed = $("replay-changed");
      changed.dataset.changed = String(data.changed);
      put(changed, data.changed ?
        "Replayed under the policies it cites, the decision differs from the record." :
        "Replayed under the policies it cites, the decision is the one recorded.");
      trace($("replay-trace"), rep.explanation);
      replayedRequest = data.request || "";
      $("replay-load").hidden = !replayedRequest;
      $("replay-result").hidden = false;
    } catch (err) {
      showError(err.message);
    }
  }
  async function tour() {
    try {
      const data = await call("GET", "/playground/api/tour");
      const list = $("tour");
      clear(list);
      const note = $("tour-note");
      put(note, data.note || "");
      note.hidden = !data.note;
      for (const step of data.steps) {
        const item = make("li");
        item.appendChild(make("h3", step.title));
        item.appendChild(make("p", step.text));
        const button = make("button", "Try: " + step.title);
        button.type = "button";
        button.dataset.step = step.id;
        button.addEventListener("click", () => {
          $("request").value = step.request;
          $("use-active").checked = true;
          run();
        });
        item.appendChild(button);
        list.appendChild(item);
      }
    } catch (err) {
      showError(err.message);
    }
  }
  $("run").addEventListener("click", run);
  $("load-policies").addEventListener("click", loadPolicies);
  $("replay").addEventListener("click", replay);
  $("replay-load").addEventListener("click", () => {
    $("request").value = replayedRequest;
    $("request").focus();
  });
  tour();
})();
"""
SCRIPT_HASH = "sha256-" + base64.b64encode(
    hashlib.sha256(SCRIPT.encode()).digest()
).decode("ascii")

_EXAMPLE = """\
request:
  now: "2026-12-07T10:00:00+01:00"     # leave out to use the daemon's clock
  chain: [alice, support-bot]          # user first, agent last
  action: payments.refund.issue
  resource: {kind: payments.refund, id: rf-1, attributes: {amount: 1200}}
  context: {region: DE}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(site: str, body: str, *, who: str = "", csrf: str = "") -> str:
    account, meta, script = "", "", ""
    if who:
        account = (
            '<nav aria-label="Account">'
            f"<span>Signed in as <strong><bdi>{_e(who)}</bdi></strong></span>"
            '<form method="post" action="/playground/logout">'
            f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
            '<button type="submit">Sign out</button></form></nav>'
        )
        meta = f'<meta name="kynara-csrf" content="{_e(csrf)}">'
        script = f"<script>{SCRIPT}</script>"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{meta}<title>Playground · {_e(site)}</title>"
        f"<style>{CSS}</style></head>"
        '<body><a class="skip" href="#main">Skip to content</a>'
        f'<header><p><a href="/playground">{_e(site)} playground</a></p>'
        f'{account}</header><main id="main">{body}</main>{script}</body></html>'
    )


def render_login(site: str, csrf: str, error: str = "") -> str:
    """The sign-in form: a reviewer's or an operator's token, once."""
    alert = f'<p class="error" role="alert">{_e(error)}</p>' if error else ""
    body = (
        "<h1>Sign in to the playground</h1>"
        f"{alert}"
        '<form method="post" action="/playground/login">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        '<label for="token">Reviewer or operator token</label>'
        '<input id="token" name="token" type="password" required '
        'autocomplete="off" aria-describedby="token-help">'
        '<p id="token-help" class="muted">An admin credential with the reviewer '
        "or operator role, or a reviewer JWT. It is checked once; the session "
        "cookie carries the sign-in afterwards.</p>"
        '<div class="actions"><button type="submit">Sign in</button></div>'
        "</form>"
    )
    return _page(site, body)


def render_page(site: str, *, who: str, csrf: str) -> str:
    """The playground: tour, request, policies, decision, replay."""
    body = (
        "<h1>Policy playground</h1>"
        "<p>Decide a request against the active policies or an edited copy, "
        "and see the reason and every rule's part in it. What-if runs call "
        "the engine alone: they are never audited and never change a live "
        "decision.</p>"
        '<p id="status" class="muted" role="status" aria-live="polite"></p>'
        '<p id="error" class="error" role="alert" hidden></p>'
        '<section aria-labelledby="tour-h"><h2 id="tour-h">Guided tour</h2>'
        "<p>Steps over the shipped example policies (config/policies); each "
        "loads a request and decides it with the active policies.</p>"
        '<p id="tour-note" class="notice" hidden></p>'
        '<ol id="tour" class="tour"></ol></section>'
        '<section aria-labelledby="request-h"><h2 id="request-h">Request</h2>'
        '<label for="request">Request file (YAML or JSON), as '
        "<code>kynara-sidecar explain --request</code> reads it</label>"
        '<textarea id="request" class="code" spellcheck="false" '
        f'aria-describedby="request-help">{_e(_EXAMPLE)}</textarea>'
        '<p id="request-help" class="muted">Without <code>now</code> the run '
        "uses the daemon's clock, read once. It is decided in the daemon's "
        "<code>env</code>, as a live Decide is; what the request's own "
        "<code>env</code> writes wins. The chain ends with the agent.</p>"
        "</section>"
        '<section aria-labelledby="policies-h"><h2 id="policies-h">Policies</h2>'
        "<fieldset><legend>Decide with</legend>"
        '<input type="radio" id="use-active" name="policies" value="active" '
        'checked><label for="use-active">the active policies</label>'
        '<input type="radio" id="use-edited" name="policies" value="edited" '
        'disabled><label for="use-edited">my edited copy</label></fieldset>'
        '<div class="actions"><button type="button" id="load-policies">'
        "Copy the active policies to edit</button></div>"
        '<p id="policy-info" class="muted"></p><div id="files"></div></section>'
        '<div class="actions"><button type="button" id="run" class="approve">'
        "Decide</button></div>"
        '<section id="result" aria-labelledby="result-h" hidden>'
        '<h2 id="result-h">Decision</h2><dl>'
        '<dt>Decision</dt><dd id="decision"></dd>'
        '<dt>Reason code</dt><dd id="reason-code"></dd>'
        '<dt>Reason</dt><dd id="reason"></dd>'
        '<dt>Instant</dt><dd id="instant"></dd>'
        '<dt>Env</dt><dd id="env-used"></dd>'
        '<dt>Policies</dt><dd id="policies-used"></dd>'
        '<dt>Policy revision</dt><dd><code id="policy-revision"></code></dd></dl>'
        '<p id="active-compare" class="notice" hidden></p>'
        '<h3>Matched rules</h3><ul id="matched-rules"></ul>'
        '<h3>Condition errors</h3><ul id="condition-errors"></ul>'
        '<h3>Limits seen</h3><ul id="limits-seen"></ul>'
        '<h3>Explain trace</h3><div id="trace"></div>'
        "<details><summary>As <code>kynara-sidecar explain</code> prints it"
        '</summary><pre id="explained"></pre></details></section>'
        '<section aria-labelledby="replay-h"><h2 id="replay-h">Replay a recorded '
        "decision</h2>"
        '<label for="decision-id">Decision id</label>'
        '<input id="decision-id" autocomplete="off" spellcheck="false">'
        '<div class="actions"><button type="button" id="replay">Replay</button>'
        "</div>"
        '<div id="replay-result" hidden><p id="replay-changed" class="notice"></p>'
        "<table><thead><tr>"
        '<th scope="col">Part</th>'
        '<th scope="col">Recorded</th><th scope="col">Replayed</th></tr></thead>'
        '<tbody id="replay-rows"></tbody></table>'
        '<div class="actions"><button type="button" id="replay-load" hidden>'
        "Load its request into the editor</button></div>"
        '<h3>Replay trace</h3><div id="replay-trace"></div></div></section>'
    )
    return _page(site, body, who=who, csrf=csrf)
