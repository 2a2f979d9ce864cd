// kynaraMiddleware against a real daemon, in a real Express app (and a plain
// node:http server) on 127.0.0.1, called with fetch: allow passes with the
// decision; deny and approval are 403 with the HTTP doors' body and headers;
// the retry with the approval header passes once; no answer is the error
// status and body, never a pass, unless failOpen says so and logs it.

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { after, before, describe, test } from 'node:test';

import express from 'express';

import { Client, kynaraMiddleware } from '../src/index.js';
import { startDaemon } from './daemon.js';

const NOWHERE = 'unix:///nonexistent-kynara-dir/agent.sock';

// The app's own authentication: a session the server issued names the user.
// Nothing the caller sends names a user directly.
const SESSIONS = new Map([['s-alice', 'alice']]);

function authenticate(req, res, next) {
  const session = /^Session (\S+)$/.exec(req.get('authorization') ?? '')?.[1];
  req.user = SESSIONS.get(session) ?? null;
  next();
}

/** An Express refunds app guarded by the middleware; `handled` counts handler runs. */
function refundsApp(client, options = {}) {
  const handled = [];
  const app = express();
  app.use(express.json());
  app.use(authenticate);
  const kynara = kynaraMiddleware({
    client,
    action: 'payments.refund.issue',
    resourceKind: 'payments.refund',
    resourceId: (req) => req.params.id,
    attributes: (req) => ({ amount: req.body.amount }),
    context: (req) => (req.body.region ? { region: req.body.region } : {}),
    subject: (req) => (req.user ? { user: req.user } : null),
    ...options,
  });
  app.post('/refunds/:id', kynara, (req, res) => {
    handled.push(res.locals.kynara);
    res.json({ issued: req.params.id, decision_id: res.locals.kynara?.decisionId ?? null });
  });
  return { app, handled };
}

async function listen(handler) {
  const server = createServer(handler);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

async function post(base, path, body, headers = {}) {
  const response = await fetch(`${base}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Session s-alice', ...headers },
    body: JSON.stringify(body),
  });
  return { status: response.status, headers: response.headers, body: await response.json() };
}

describe('kynaraMiddleware in Express against a real daemon', () => {
  let daemon;
  let client;
  let server;
  let handled;

  before(async () => {
    daemon = await startDaemon();
    client = new Client({ target: daemon.unixTarget });
    const made = refundsApp(client);
    handled = made.handled;
    server = await listen(made.app);
  });

  after(async () => {
    await server?.close();
    client?.close();
    await daemon?.stop();
  });

  test('allow: the handler runs with the Decision, its id on the response', async () => {
    const before = handled.length;
    const { status, headers, body } = await post(server.url, '/refunds/rf_m1', { amount: 1200 });
    assert.equal(status, 200);
    assert.equal(body.issued, 'rf_m1');
    assert.match(body.decision_id, /\S/);
    assert.equal(headers.get('kynara-decision-id'), body.decision_id);
    assert.equal(handled.length, before + 1);
    const decision = handled.at(-1);
    assert.equal(decision.decision, 'allow');
    assert.equal(decision.reasonCode, 'rule_allowed');
    assert.deepEqual(decision.chain, ['alice', 'support-bot']);
  });

  test("deny: 403 with exactly the HTTP doors' keys and headers", async () => {
    const before = handled.length;
    const { status, headers, body } = await post(server.url, '/refunds/rf_m2', {
      amount: 10,
      region: 'KP',
    });
    assert.equal(status, 403);
    assert.deepEqual(Object.keys(body), ['decision', 'reason', 'reason_code', 'decision_id']);
    assert.equal(body.decision, 'deny');
    assert.equal(body.reason_code, 'rule_denied');
    assert.match(body.reason, /\S/);
    assert.equal(headers.get('content-type'), 'application/json');
    assert.equal(headers.get('kynara-decision'), 'deny');
    assert.equal(headers.get('kynara-decision-id'), body.decision_id);
    assert.equal(headers.get('kynara-approval-url'), null);
    assert.equal(handled.length, before);
  });

  test('approval: 403 with the approval; the retry with its id passes once', async () => {
    const before = handled.length;
    const asked = await post(server.url, '/refunds/rf_m3', { amount: 60000 });
    assert.equal(asked.status, 403);
    assert.deepEqual(Object.keys(asked.body), [
      'decision',
      'reason',
      'reason_code',
      'decision_id',
      'approval',
    ]);
    assert.equal(asked.body.decision, 'require_approval');
    assert.equal(asked.body.reason_code, 'approval_required');
    const { approval } = asked.body;
    assert.deepEqual(Object.keys(approval), ['id', 'url', 'expires_at']);
    assert.match(approval.id, /^apr_/);
    assert.ok(approval.url.endsWith(`/approvals/${approval.id}`));
    // The daemon's own text, its fraction kept past the millisecond a JS
    // Date holds (an expiry on a whole millisecond is a one in a million).
    assert.match(approval.expires_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{4,9}Z$/);
    assert.equal(asked.headers.get('kynara-decision'), 'require_approval');
    assert.equal(asked.headers.get('kynara-decision-id'), asked.body.decision_id);
    assert.equal(asked.headers.get('kynara-approval-url'), approval.url);
    assert.equal(handled.length, before);

    await daemon.approve(approval.id);
    const retry = { 'kynara-approval-id': approval.id };
    const granted = await post(server.url, '/refunds/rf_m3', { amount: 60000 }, retry);
    assert.equal(granted.status, 200);
    assert.equal(handled.at(-1).reasonCode, 'approval_granted');
    assert.equal(granted.headers.get('kynara-decision-id'), handled.at(-1).decisionId);

    const used = await post(server.url, '/refunds/rf_m3', { amount: 60000 }, retry);
    assert.equal(used.status, 403);
    assert.equal(used.body.decision, 'deny');
    assert.equal(used.body.reason_code, 'approval_used');
    assert.equal(used.body.approval.id, approval.id, 'a deny about an approval names it');
    assert.equal(handled.length, before + 1);
  });

  test('the subject is only what the server established, never a header', async () => {
    const before = handled.length;
    const { status, body } = await post(
      server.url,
      '/refunds/rf_m4',
      { amount: 5 },
      { authorization: 'Session unknown', 'kynara-chain': 'alice', 'x-kynara-user': 'alice' },
    );
    assert.equal(status, 401);
    assert.deepEqual(body, {
      error: {
        code: 'identity_invalid',
        message: 'no subject: the server established no user for this request',
        field: 'subject',
      },
    });
    assert.equal(handled.length, before);
  });

  test('a value with no wire form is 400 invalid_request naming the field', async () => {
    const { status, body } = await post(server.url, '/refunds/rf_m5', { amount: null });
    assert.equal(status, 400);
    assert.equal(body.error.code, 'invalid_request');
    assert.equal(body.error.field, 'resource.attributes.amount');
  });

  test("the daemon's own refusal keeps its code and field: 400", async () => {
    const { app } = refundsApp(client, { resourceKind: (req) => req.body.kind });
    const bad = await listen(app);
    try {
      const { status, body } = await post(bad.url, '/refunds/rf_m6', {
        amount: 5,
        kind: 'Not A Kind',
      });
      assert.equal(status, 400);
      assert.equal(body.error.code, 'invalid_request');
      assert.equal(body.error.field, 'resource.kind');
    } finally {
      await bad.close();
    }
  });

  test('a mapping that throws is 500 internal, logged, never a pass', async () => {
    const logged = [];
    const { app, handled: ran } = refundsApp(client, {
      attributes: () => {
        throw new Error('no refund table');
      },
      logger: (line) => logged.push(line),
      failOpen: true,
    });
    const broken = await listen(app);
    try {
      const { status, body } = await post(broken.url, '/refunds/rf_m7', { amount: 5 });
      assert.equal(status, 500);
      assert.equal(body.error.code, 'internal');
      assert.doesNotMatch(body.error.message, /no refund table/);
      assert.equal(ran.length, 0);
      assert.equal(logged.length, 1);
      assert.match(logged[0], /no refund table/);
    } finally {
      await broken.close();
    }
  });

  test('a mapping giving a non-string resourceKind is 500 internal, logged', async () => {
    const logged = [];
    const { app, handled: ran } = refundsApp(client, {
      resourceKind: () => ['payments.refund'],
      logger: (line) => logged.push(line),
    });
    const broken = await listen(app);
    try {
      const { status, body } = await post(broken.url, '/refunds/rf_m7b', { amount: 5 });
      assert.equal(status, 500);
      assert.equal(body.error.code, 'internal');
      assert.equal(ran.length, 0);
      assert.equal(logged.length, 1);
      assert.match(logged[0], /resourceKind expected a dotted string, got array/);
    } finally {
      await broken.close();
    }
  });

  test('a repeated approval header is 400', async () => {
    const { status, body } = await post(
      server.url,
      '/refunds/rf_m8',
      { amount: 5 },
      { 'kynara-approval-id': 'apr_a, apr_b' },
    );
    assert.equal(status, 400);
    assert.deepEqual(body.error, {
      code: 'invalid_request',
      message: 'expected the header kynara-approval-id once',
      field: 'kynara-approval-id',
    });
  });

  test('a plain node:http server is served alike', async () => {
    const kynara = kynaraMiddleware({
      client,
      action: (req) =>
        req.method === 'DELETE' ? 'payments.refund.cancel' : 'payments.refund.issue',
      resourceKind: 'payments.refund',
      resourceId: (req) => req.url.split('/').at(-1),
      attributes: () => ({ amount: 5 }),
      context: (req) => ({ region: req.headers['x-region'] ?? 'DE' }),
      subject: () => ({ chain: ['alice'] }),
    });
    const plain = await listen((req, res) => {
      kynara(req, res, () => {
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ ok: true, decision: res.locals.kynara.decision }));
      });
    });
    try {
      const allowed = await fetch(`${plain.url}/refunds/rf_m9`);
      assert.equal(allowed.status, 200);
      assert.deepEqual(await allowed.json(), { ok: true, decision: 'allow' });
      assert.match(allowed.headers.get('kynara-decision-id'), /\S/);
      const denied = await fetch(`${plain.url}/refunds/rf_m10`, { headers: { 'x-region': 'KP' } });
      assert.equal(denied.status, 403);
      assert.equal(denied.headers.get('kynara-decision'), 'deny');
      assert.equal((await denied.json()).reason_code, 'rule_denied');
      // No rule allows cancelling: a deny, not a pass.
      const cancel = await fetch(`${plain.url}/refunds/rf_m11`, { method: 'DELETE' });
      assert.equal(cancel.status, 403);
      assert.equal((await cancel.json()).reason_code, 'no_rule_allows');
    } finally {
      await plain.close();
    }
  });
});

describe('kynaraMiddleware without a daemon', () => {
  let client;

  before(() => {
    client = new Client({ target: NOWHERE, timeoutMs: 2000 });
  });

  after(() => client.close());

  test('no answer is 503 daemon_unreachable; the handler never runs', async () => {
    const { app, handled } = refundsApp(client);
    const server = await listen(app);
    try {
      const { status, headers, body } = await post(server.url, '/refunds/rf_m12', { amount: 5 });
      assert.equal(status, 503);
      assert.deepEqual(body, {
        error: {
          code: 'daemon_unreachable',
          message: 'no answer from the Kynara daemon',
          field: '',
        },
      });
      assert.equal(headers.get('kynara-decision-id'), null);
      assert.deepEqual(handled, []);
    } finally {
      await server.close();
    }
  });

  test('failOpen passes without a decision and logs the action and code each time', async () => {
    const logged = [];
    const { app, handled } = refundsApp(client, {
      failOpen: true,
      logger: { warn: (line) => logged.push(line) },
    });
    const server = await listen(app);
    try {
      for (const id of ['rf_m13', 'rf_m14']) {
        const { status, body } = await post(server.url, `/refunds/${id}`, { amount: 5 });
        assert.equal(status, 200);
        assert.deepEqual(body, { issued: id, decision_id: null });
      }
      assert.deepEqual(handled, [null, null]);
      assert.equal(logged.length, 2);
      assert.match(logged[0], /payments\.refund\.issue.*daemon_unreachable/);
    } finally {
      await server.close();
    }
  });

  test('a closed client is 500 client_closed, logged and named, never a pass', async () => {
    const closed = new Client({ target: NOWHERE });
    closed.close();
    const logged = [];
    const { app, handled } = refundsApp(closed, {
      failOpen: true,
      logger: (line) => logged.push(line),
    });
    const server = await listen(app);
    try {
      const { status, body } = await post(server.url, '/refunds/rf_m15', { amount: 5 });
      assert.equal(status, 500);
      assert.equal(body.error.code, 'client_closed');
      assert.match(body.error.message, /client_closed/);
      assert.doesNotMatch(body.error.message, /nonexistent/);
      assert.deepEqual(handled, []);
      assert.equal(logged.length, 1);
      assert.match(logged[0], /payments\.refund\.issue.*client_closed.*closed/);
    } finally {
      await server.close();
    }
  });

  test('any other error from the client is 500 internal, its cause logged and its kind named', async () => {
    class Broken extends Client {
      async decide() {
        throw new Error('socket table full');
      }
    }
    const broken = new Broken({ target: NOWHERE });
    const logged = [];
    const { app, handled } = refundsApp(broken, { logger: (line) => logged.push(line) });
    const server = await listen(app);
    try {
      const { status, body } = await post(server.url, '/refunds/rf_m16', { amount: 5 });
      assert.equal(status, 500);
      assert.equal(body.error.code, 'internal');
      assert.match(body.error.message, /\(Error in the server\)/);
      assert.doesNotMatch(body.error.message, /socket table full/);
      assert.deepEqual(handled, []);
      assert.equal(logged.length, 1);
      assert.match(logged[0], /Error: socket table full/);
    } finally {
      broken.close();
      await server.close();
    }
  });

  test('options are checked when the middleware is made', () => {
    const base = { action: 'a.b', resourceKind: 'k.k', subject: () => null };
    assert.throws(
      () => kynaraMiddleware({ ...base, subject: undefined }),
      /subject expected a function of req/,
    );
    assert.throws(
      () => kynaraMiddleware({ ...base, action: 7 }),
      /action: expected a string or a function/,
    );
    assert.throws(
      () => kynaraMiddleware({ ...base, resourceId: 'rf_1' }),
      /resourceId: expected a function/,
    );
    assert.throws(
      () => kynaraMiddleware({ ...base, failOpen: 1 }),
      /failOpen expected true or false/,
    );
    assert.throws(
      () => kynaraMiddleware({ ...base, failopen: true }),
      /kynaraMiddleware: unknown option failopen; expected any of .*failOpen/,
    );
    for (const header of ['Kynara-Approval-Id', 'approval id', '', 'x:y']) {
      assert.throws(
        () => kynaraMiddleware({ ...base, approvalHeader: header }),
        /approvalHeader expected a lower-case HTTP header name/,
      );
    }
    assert.doesNotThrow(() => kynaraMiddleware({ ...base, approvalHeader: 'x-approval' }));
  });
});
