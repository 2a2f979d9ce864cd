// What must never fail open, and what must fail early, against a real daemon
// and a silent socket: client-side failures (a value with no wire form, a
// closed client, a gRPC status that is not the daemon's) are never "the
// daemon could not answer"; timeouts past what grpc-js holds are refused at
// construction; a wait that never reached the daemon is daemon_unreachable,
// not a pending approval; close() ends calls and waits in flight; options
// and request fields are checked by name.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import * as grpc from '@grpc/grpc-js';

import {
  ApprovalError,
  CLIENT_CLOSED,
  Client,
  DAEMON_UNREACHABLE,
  FAIL_OPEN_CODES,
  INTERNAL,
  KynaraError,
  MAX_TIMEOUT_MS,
  UNEXPECTED_STATUS,
  actingFor,
  guard,
} from '../src/index.js';
import { errorFromStatus, timestampText } from '../src/client.js';
import { failOpenPolicy } from '../src/guard.js';
import { REFUND, refund, useDaemon } from './daemon.js';


/** A guarded refund with failOpen on `client`; `ran` and `logged` record what happened. */
function openRefund(client) {
  const ran = [];
  const logged = [];
  const issue = guard(REFUND, {
    resourceKind: 'payments.refund',
    attributes: (values) => values,
    client,
    failOpen: true,
    logger: (line) => logged.push(line),
  })(async () => ran.push('body'));
  return { issue: (values) => actingFor({ user: 'alice' }, () => issue(values)), ran, logged };
}

/** A Unix socket that accepts connections and never says a word. */
async function silentSocket() {
  const dir = mkdtempSync(join(tmpdir(), 'kynara-ts-silent-'));
  const path = join(dir, 'silent.sock');
  const sockets = new Set();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise((resolve) => server.listen(path, resolve));
  return {
    target: `unix://${path}`,
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function status(code, details, trailer = {}) {
  const metadata = new grpc.Metadata();
  for (const [key, value] of Object.entries(trailer)) metadata.set(key, value);
  return { code, details, metadata };
}

describe('against a real daemon', () => {
  let daemon;
  let client;
  useDaemon((started, made) => {
    daemon = started;
    client = made;
  });

  test('a sparse array is refused before sending, naming its path; failOpen stays closed', async () => {
    // eslint-disable-next-line no-sparse-arrays
    for (const [list, index] of [[[1, , 3], 1], [new Array(2), 0]]) {
      await assert.rejects(client.decide(REFUND, refund('rf_h1', 5, { attributes: { l: list } })), {
        name: 'TypeError',
        message: new RegExp(`^resource\\.attributes\\.l\\[${index}\\]: .*hole`),
      });
    }
    const { issue, ran, logged } = openRefund(client);
    // eslint-disable-next-line no-sparse-arrays
    await assert.rejects(issue({ l: [1, , 3] }), TypeError);
    assert.deepEqual(ran, []);
    assert.deepEqual(logged, []);
    // The same guard lets an unreachable daemon through: failOpen is on.
    assert.ok(FAIL_OPEN_CODES.includes(DAEMON_UNREACHABLE));
  });

  test('a `__proto__` key is carried as a key; the daemon answers', async () => {
    const attributes = JSON.parse('{"__proto__": 7, "amount": 5}');
    const decision = await client.decide(REFUND, refund('rf_h2', 5, { attributes }));
    assert.equal(decision.decision, 'allow');
  });

  test("the admin socket's UNIMPLEMENTED is unexpected_status, and failOpen stays closed", async () => {
    const admin = new Client({ target: `unix://${join(daemon.workdir, 'admin.sock')}` });
    try {
      await assert.rejects(admin.decide(REFUND, refund('rf_h3', 5)), (err) => {
        assert.equal(err.code, UNEXPECTED_STATUS);
        assert.equal(err.fromDaemon, false);
        assert.match(err.message, /UNIMPLEMENTED/);
        return true;
      });
      const { issue, ran, logged } = openRefund(admin);
      await assert.rejects(issue({ amount: 5 }), { code: UNEXPECTED_STATUS });
      assert.deepEqual(ran, []);
      assert.deepEqual(logged, []);
    } finally {
      admin.close();
    }
  });

  test('the longest timeout taken still works with grpc-js', async () => {
    const patient = new Client({ target: daemon.unixTarget, timeoutMs: MAX_TIMEOUT_MS });
    try {
      assert.equal((await patient.decide(REFUND, refund('rf_h4', 5))).decision, 'allow');
    } finally {
      patient.close();
    }
  });

  test('close() ends a wait in progress with client_closed; the approval stays pending', async () => {
    const closing = new Client({ target: daemon.unixTarget });
    const asked = await closing.decide(REFUND, refund('rf_h5', 60000));
    assert.equal(asked.decision, 'require_approval');
    // If close() did not end it, the wait would end at its timeout as ApprovalTimeout.
    const waiting = closing.waitApproval(asked.approval.id, { timeoutMs: 20_000 });
    // Let the first (pending) update arrive, so the wait is truly in progress.
    await new Promise((resolve) => setImmediate(resolve));
    closing.close();
    await assert.rejects(waiting, (err) => {
      assert.ok(err instanceof ApprovalError);
      assert.equal(err.code, CLIENT_CLOSED);
      assert.equal(err.approvalId, asked.approval.id);
      return true;
    });
    await assert.rejects(closing.decide(REFUND, refund('rf_h5', 1)), { code: CLIENT_CLOSED });
    const again = await client.decide(REFUND, refund('rf_h5', 60000));
    assert.equal(again.approval.state, 'pending');
  });

  test("an approval's expiry keeps the daemon's fraction, as text", async () => {
    const asked = await client.decide(REFUND, refund('rf_h6', 60000));
    const text = asked.approval.expiresAtText;
    assert.match(text, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$/);
    assert.equal(Date.parse(text), asked.approval.expiresAt.getTime());
    await daemon.approve(asked.approval.id);
    const update = await client.waitApproval(asked.approval.id, { timeoutMs: 20_000 });
    // WaitApproval's updates carry the same instant, to the nanosecond.
    assert.equal(update.expiresAtText, text);
  });
});

describe('without a daemon', () => {
  let silent;

  before(async () => {
    silent = await silentSocket();
  });

  after(async () => {
    await silent?.close();
  });

  test('a wait on a silent socket is daemon_unreachable, not ApprovalTimeout', async () => {
    const client = new Client({ target: silent.target });
    try {
      await assert.rejects(client.waitApproval('apr_h1', { timeoutMs: 300 }), (err) => {
        assert.equal(err.code, DAEMON_UNREACHABLE);
        assert.match(err.message, /DEADLINE_EXCEEDED/);
        return true;
      });
    } finally {
      client.close();
    }
  });

  test('close() ends a call and a wait in flight with client_closed', async () => {
    const client = new Client({ target: silent.target, timeoutMs: 20_000 });
    const deciding = client.decide(REFUND, refund('rf_h7', 5));
    const waiting = client.waitApproval('apr_h2', { timeoutMs: 20_000 });
    await new Promise((resolve) => setImmediate(resolve));
    client.close();
    await assert.rejects(deciding, (err) => {
      assert.ok(err instanceof KynaraError);
      assert.equal(err.code, CLIENT_CLOSED);
      return true;
    });
    await assert.rejects(waiting, { code: CLIENT_CLOSED });
  });

  test('a closed client is client_closed, never daemon_unreachable, and failOpen stays closed', async () => {
    const client = new Client({ target: silent.target });
    client.close();
    const { issue, ran, logged } = openRefund(client);
    await assert.rejects(issue({ amount: 5 }), { code: CLIENT_CLOSED });
    assert.deepEqual(ran, []);
    assert.deepEqual(logged, []);
  });

  test('timeouts past MAX_TIMEOUT_MS are refused at construction, naming the option', async () => {
    assert.equal(MAX_TIMEOUT_MS, 2 ** 31 - 1);
    assert.throws(() => new Client({ target: silent.target, timeoutMs: 4e14 }), {
      name: 'RangeError',
      message: /^timeoutMs: expected at most MAX_TIMEOUT_MS/,
    });
    assert.throws(
      () => guard(REFUND, { resourceKind: 'payments.refund', approvalTimeoutMs: 4e14 }),
      { name: 'RangeError', message: /approvalTimeoutMs: expected at most/ },
    );
    const client = new Client({ target: silent.target });
    try {
      await assert.rejects(client.waitApproval('apr_h3', { timeoutMs: MAX_TIMEOUT_MS + 1 }), {
        name: 'RangeError',
        message: /^timeoutMs/,
      });
    } finally {
      client.close();
    }
  });

  test('request fields that are not strings are refused, naming the option', async () => {
    const client = new Client({ target: silent.target });
    try {
      for (const [name, value] of [
        ['resourceKind', ['payments.refund']],
        ['resourceId', { id: 1 }],
        ['requestId', 5],
        ['approvalId', ['apr_1']],
        ['resourceKind', null],
      ]) {
        await assert.rejects(client.decide(REFUND, refund('rf_h8', 5, { [name]: value })), {
          name: 'TypeError',
          message: new RegExp(`^${name}: expected a string`),
        });
      }
      await assert.rejects(client.decide({ a: 1 }, refund('rf_h8', 5)), {
        name: 'TypeError',
        message: /^action: /,
      });
      await assert.rejects(client.decide(REFUND, refund('rf_h8', 5, { resourceid: 'x' })), {
        name: 'TypeError',
        message: /unknown option resourceid/,
      });
      await assert.rejects(client.decide(REFUND, refund('rf_h8', 5, { user: 'al\uD800' })), {
        name: 'TypeError',
        message: /user.*lone surrogate/,
      });
    } finally {
      client.close();
    }
  });

  test('unknown or malformed Client and guard options are refused by name', () => {
    assert.throws(() => new Client({ target: 5 }), { name: 'TypeError', message: /^target: / });
    assert.throws(() => new Client({ taget: 'unix:///x' }), /Client: unknown option taget/);
    assert.throws(
      () => guard(REFUND, { resourceKind: 'payments.refund', failopen: true }),
      /guard\(payments\.refund\.issue\): unknown option failopen; expected any of .*failOpen/,
    );
  });
});

describe('mapping a gRPC status', () => {
  test("only a no-answer or the daemon's own code may fail open", () => {
    const target = 'unix:///x.sock';
    const policy = failOpenPolicy({ failOpen: true, logger: () => {} }, 'test');
    const cases = [
      [status(grpc.status.UNIMPLEMENTED, 'Method not found!'), UNEXPECTED_STATUS, false],
      [status(grpc.status.INTERNAL, 'Request message serialization failure'), UNEXPECTED_STATUS, false],
      [status(grpc.status.UNKNOWN, 'boom'), UNEXPECTED_STATUS, false],
      [status(grpc.status.UNAVAILABLE, 'No connection established'), DAEMON_UNREACHABLE, true],
      [status(grpc.status.DEADLINE_EXCEEDED, 'Deadline exceeded'), DAEMON_UNREACHABLE, true],
      [status(grpc.status.INTERNAL, 'fault', { 'kynara-error-code': INTERNAL }), INTERNAL, false],
      [
        status(grpc.status.UNAVAILABLE, 'stopping', { 'kynara-error-code': 'shutting_down' }),
        'shutting_down',
        true,
      ],
      [
        status(grpc.status.INVALID_ARGUMENT, 'bad', { 'kynara-error-code': 'invalid_request' }),
        'invalid_request',
        false,
      ],
    ];
    for (const [err, code, opens] of cases) {
      const mapped = errorFromStatus(err, target);
      assert.equal(mapped.code, code, err.details);
      assert.equal(policy.opensOn(mapped), opens, err.details);
      if (code === UNEXPECTED_STATUS) {
        assert.match(mapped.message, new RegExp(grpc.status[err.code]));
      }
    }
    // `internal` that the SDK made up (not the daemon's) never opens.
    assert.equal(policy.opensOn(new KynaraError(INTERNAL, 'made up here')), false);
  });

  test('timestamps keep their nanoseconds as the daemon writes them', () => {
    assert.equal(timestampText({ seconds: '1796472000', nanos: 925235000 }), '2026-12-05T12:00:00.925235Z');
    assert.equal(timestampText({ seconds: '1796472000', nanos: 0 }), '2026-12-05T12:00:00Z');
    assert.equal(timestampText({ seconds: '0', nanos: 1 }), '1970-01-01T00:00:00.000000001Z');
    assert.equal(timestampText({ seconds: '-1', nanos: 500000000 }), '1969-12-31T23:59:59.5Z');
    assert.equal(timestampText(null), '');
  });
});
