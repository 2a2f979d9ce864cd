// The client against a real daemon: allow, deny, require_approval, an invalid
// request and an unreachable daemon, over the Unix socket and loopback TCP.

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import {
  ApprovalRequired,
  Client,
  DAEMON_UNREACHABLE,
  INVALID_REQUEST,
  KynaraError,
  KynaraUnavailable,
  PermissionDenied,
  TARGET_ENV,
} from '../src/index.js';
import { startDaemon } from './daemon.js';

const REFUND = 'payments.refund.issue';

function refund(id, amount, extra = {}) {
  return {
    resourceKind: 'payments.refund',
    resourceId: id,
    attributes: { amount },
    user: 'alice',
    ...extra,
  };
}

describe('Client against a real daemon', () => {
  let daemon;
  let client;

  before(async () => {
    daemon = await startDaemon();
    client = new Client({ target: daemon.unixTarget });
  });

  after(async () => {
    client?.close();
    await daemon?.stop();
  });

  test('a small refund for alice is allowed, with its audit place', async () => {
    const decision = await client.decide(REFUND, refund('rf_1', 1200, { requestId: 'req-1' }));
    assert.equal(decision.decision, 'allow');
    assert.equal(decision.allowed, true);
    assert.equal(decision.reasonCode, 'rule_allowed');
    assert.match(decision.decisionId, /\S/);
    assert.equal(decision.requestId, 'req-1');
    assert.equal(typeof decision.auditSequence, 'bigint');
    assert.ok(decision.auditSequence > 0n);
    assert.match(decision.recordHash, /^[0-9a-f]{64}$/);
    assert.equal(decision.approval, null);
    assert.deepEqual(decision.chain, ['alice', 'support-bot']);
    assert.ok(
      decision.matchedRules.some((rule) => rule.rule === 'refund-small' && rule.effect === 'allow'),
      JSON.stringify(decision.matchedRules),
    );
    assert.equal((await client.enforce(REFUND, refund('rf_2', 10))).decision, 'allow');
  });

  test('each answer has its own decision id and a later audit place', async () => {
    const first = await client.decide(REFUND, refund('rf_3', 5));
    const second = await client.decide(REFUND, refund('rf_4', 5));
    assert.notEqual(first.decisionId, second.decisionId);
    assert.ok(second.auditSequence > first.auditSequence);
  });

  test('a refund from a blocked region is denied, and enforce throws with the id', async () => {
    const request = refund('rf_5', 1200, { context: { region: 'KP' } });
    const decision = await client.decide(REFUND, request);
    assert.equal(decision.decision, 'deny');
    assert.equal(decision.allowed, false);
    assert.equal(decision.reasonCode, 'rule_denied');
    await assert.rejects(client.enforce(REFUND, request), (err) => {
      assert.ok(err instanceof PermissionDenied);
      assert.ok(err instanceof KynaraError);
      assert.equal(err.code, 'permission_denied');
      assert.equal(err.reasonCode, 'rule_denied');
      assert.match(err.decisionId, /\S/);
      assert.notEqual(err.decisionId, decision.decisionId);
      assert.equal(err.decision.decisionId, err.decisionId);
      return true;
    });
  });

  test('a large refund needs approval, with a review URL and an expiry', async () => {
    const decision = await client.decide(REFUND, refund('rf_6', 250000));
    assert.equal(decision.decision, 'require_approval');
    assert.equal(decision.reasonCode, 'approval_required');
    assert.ok(decision.approval, 'the answer names an approval');
    assert.match(decision.approval.id, /\S/);
    assert.match(decision.approval.url, /^https?:\/\/.*/);
    assert.ok(decision.approval.expiresAt instanceof Date);
    assert.ok(decision.approval.expiresAt.getTime() > Date.now());
    assert.equal(decision.approval.state, 'pending');
    await assert.rejects(client.enforce(REFUND, refund('rf_7', 250000)), (err) => {
      assert.ok(err instanceof ApprovalRequired);
      assert.equal(err.code, 'approval_required');
      assert.match(err.decisionId, /\S/);
      assert.match(err.approvalUrl, /^https?:\/\//);
      assert.match(err.approvalId, /\S/);
      assert.notEqual(err.approvalId, decision.approval.id);
      return true;
    });
  });

  test('an invalid request fails with invalid_request and names the field', async () => {
    await assert.rejects(
      client.decide(REFUND, { resourceKind: '', resourceId: 'rf_8', user: 'alice' }),
      (err) => {
        assert.ok(err instanceof KynaraError);
        assert.ok(!(err instanceof KynaraUnavailable));
        assert.equal(err.code, INVALID_REQUEST);
        assert.equal(err.field, 'resource.kind');
        return true;
      },
    );
  });

  test('a value with no wire form fails before sending, naming its path', async () => {
    await assert.rejects(
      client.decide(REFUND, refund('rf_9', 1, { context: { items: [{ when: Symbol('x') }] } })),
      (err) => err instanceof TypeError && err.message.startsWith('context.items[0].when:'),
    );
  });

  test('the same answers over loopback TCP', async () => {
    const tcp = new Client({ target: daemon.tcpTarget });
    try {
      assert.equal((await tcp.decide(REFUND, refund('rf_10', 1200))).decision, 'allow');
      const approval = await tcp.decide(REFUND, refund('rf_11', 250000));
      assert.equal(approval.decision, 'require_approval');
    } finally {
      tcp.close();
    }
  });

  test('the target comes from KYNARA_TARGET when none is given', async () => {
    const saved = process.env[TARGET_ENV];
    process.env[TARGET_ENV] = daemon.unixTarget;
    try {
      const fromEnv = new Client();
      try {
        assert.equal(fromEnv.target, daemon.unixTarget);
        assert.equal((await fromEnv.decide(REFUND, refund('rf_12', 1))).decision, 'allow');
      } finally {
        fromEnv.close();
      }
    } finally {
      if (saved === undefined) delete process.env[TARGET_ENV];
      else process.env[TARGET_ENV] = saved;
    }
  });
});

describe('Client without a daemon', () => {
  test('no socket is daemon_unreachable, with no decision id', async () => {
    const target = `unix://${join('/nonexistent-kynara-dir', 'agent.sock')}`;
    const client = new Client({ target, timeoutMs: 2000 });
    try {
      await assert.rejects(client.enforce(REFUND, refund('rf_13', 1)), (err) => {
        assert.ok(err instanceof KynaraUnavailable);
        assert.equal(err.code, DAEMON_UNREACHABLE);
        assert.equal(err.decisionId, undefined);
        assert.ok(err.message.includes(target), err.message);
        return true;
      });
    } finally {
      client.close();
    }
  });

  test('the default target is the conventional socket', () => {
    const saved = process.env[TARGET_ENV];
    delete process.env[TARGET_ENV];
    try {
      const client = new Client();
      assert.equal(client.target, 'unix:///run/kynara/agent.sock');
      client.close();
    } finally {
      if (saved !== undefined) process.env[TARGET_ENV] = saved;
    }
  });

  test('a closed client refuses calls', async () => {
    const client = new Client({ target: 'unix:///nonexistent-kynara-dir/agent.sock' });
    client.close();
    await assert.rejects(client.decide(REFUND, refund('rf_14', 1)), /closed/);
  });
});
