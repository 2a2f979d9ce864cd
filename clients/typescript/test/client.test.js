// The client against a real daemon: allow, deny, require_approval, an invalid
// request and an unreachable daemon, over the Unix socket and loopback TCP;
// batches, waits on approvals a reviewer resolves, and actingFor.

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describe, test } from 'node:test';

import {
  APPROVAL_REJECTED,
  APPROVAL_TIMEOUT,
  APPROVAL_USED,
  ApprovalError,
  ApprovalRejected,
  ApprovalRequired,
  ApprovalTimeout,
  Client,
  DAEMON_UNREACHABLE,
  Duration,
  INVALID_REQUEST,
  KynaraError,
  KynaraUnavailable,
  PermissionDenied,
  TARGET_ENV,
  actingFor,
  currentSubject,
} from '../src/index.js';
import { REFUND, refund, useDaemon } from './daemon.js';


describe('Client against a real daemon', () => {
  let daemon;
  let client;
  useDaemon((started, made) => {
    daemon = started;
    client = made;
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

  test('a batch answers each item in order, a bad item with its own error', async () => {
    const item = (id, amount, extra = {}) => ({ action: REFUND, ...refund(id, amount), ...extra });
    const outcomes = await client.decideBatch([
      item('rf_b1', 10),
      item('rf_b2', 10, { context: { region: 'KP' } }),
      item('rf_b3', 250000),
      item('rf_b4', 10, { resourceKind: '' }),
    ]);
    assert.deepEqual(
      outcomes.slice(0, 3).map((d) => [d.decision, d.reasonCode]),
      [
        ['allow', 'rule_allowed'],
        ['deny', 'rule_denied'],
        ['require_approval', 'approval_required'],
      ],
    );
    assert.equal(new Set(outcomes.slice(0, 3).map((d) => d.decisionId)).size, 3);
    assert.ok(outcomes[3] instanceof KynaraError);
    assert.equal(outcomes[3].code, INVALID_REQUEST);
    assert.equal(outcomes[3].field, 'items[3].resource.kind');
  });

  test('a batch item with no wire form fails before sending, naming its index', async () => {
    await assert.rejects(
      client.decideBatch([
        { action: REFUND, ...refund('rf_b5', 1) },
        { action: REFUND, ...refund('rf_b6', null) },
      ]),
      (err) =>
        err instanceof TypeError && err.message.startsWith('items[1]: resource.attributes.amount:'),
    );
    await assert.rejects(client.decideBatch([7]), /^TypeError: items\[0\]: expected \{action/);
  });

  test('a wait ends approved once carol approves, and the grant allows once', async () => {
    const asked = await client.decide(REFUND, refund('rf_w1', 60000));
    const { id } = asked.approval;
    const waiting = client.waitApproval(id, { timeoutMs: 60_000, decisionId: asked.decisionId });
    await daemon.approve(id);
    const update = await waiting;
    assert.equal(update.approvalId, id);
    assert.equal(update.state, 'approved');
    assert.deepEqual(update.reviewers, ['carol']);
    assert.equal(update.approvals, 1);
    assert.equal(update.approvalsNeeded, 1);

    const granted = await client.decide(REFUND, refund('rf_w1', 60000, { approvalId: id }));
    assert.equal(granted.decision, 'allow');
    assert.equal(granted.reasonCode, 'approval_granted');
    assert.equal(granted.approval.state, 'used');
    const again = await client.decide(REFUND, refund('rf_w1', 60000, { approvalId: id }));
    assert.equal(again.decision, 'deny');
    assert.equal(again.reasonCode, 'approval_used');
    await assert.rejects(client.waitApproval(id, { timeoutMs: 5000 }), (err) => {
      assert.ok(err instanceof ApprovalError);
      assert.equal(err.code, APPROVAL_USED);
      assert.equal(err.approvalId, id);
      return true;
    });
  });

  test('a wait that runs out is ApprovalTimeout, leaving it open to a rejection', async () => {
    const asked = await client.decide(REFUND, refund('rf_w2', 60000));
    const { id } = asked.approval;
    await assert.rejects(
      client.waitApproval(id, { timeoutMs: 1000, decisionId: asked.decisionId }),
      (err) => {
        assert.ok(err instanceof ApprovalTimeout);
        assert.equal(err.code, APPROVAL_TIMEOUT);
        assert.equal(err.approvalId, id);
        assert.equal(err.decisionId, asked.decisionId);
        // The last state seen, if the first one came before the deadline.
        assert.ok(err.update === null || err.update.state === 'pending', String(err.update?.state));
        return true;
      },
    );
    const rejected = assert.rejects(
      client.waitApproval(id, { timeoutMs: 60_000, decisionId: asked.decisionId }),
      (err) => {
        assert.ok(err instanceof ApprovalRejected);
        assert.equal(err.code, APPROVAL_REJECTED);
        assert.equal(err.decisionId, asked.decisionId);
        assert.equal(err.update.comment, 'over the limit');
        return true;
      },
    );
    await daemon.reject(id, 'over the limit');
    await rejected;
  });

  test("a wait on an id that names no approval is the daemon's not_found", async () => {
    await assert.rejects(
      client.waitApproval('apr_unknown', { timeoutMs: 5000, decisionId: 'd-1' }),
      (err) => {
        assert.ok(err instanceof ApprovalError);
        assert.equal(err.code, 'not_found');
        assert.equal(err.approvalId, 'apr_unknown');
        assert.equal(err.decisionId, 'd-1');
        return true;
      },
    );
    await assert.rejects(client.waitApproval('', {}), TypeError);
  });

  test("actingFor gives the subject to every call inside; a call's own wins", async () => {
    const ask = (extra = {}) =>
      client.decide(REFUND, {
        resourceKind: 'payments.refund',
        resourceId: 'rf_s1',
        attributes: { amount: 5 },
        ...extra,
      });
    await assert.rejects(
      ask(),
      (err) => err.code === INVALID_REQUEST && err.field === 'asserted_chain',
    );
    const chains = await actingFor({ user: 'alice' }, async () => {
      assert.deepEqual(currentSubject().chain, ['alice']);
      const outer = await ask();
      const inner = await actingFor({ chain: ['bob'] }, () => ask());
      const own = await ask({ user: 'bob' });
      const after = await new Promise((resolve) => setTimeout(() => resolve(ask()), 1));
      return [outer, inner, own, after].map((d) => d.chain);
    });
    assert.deepEqual(chains, [
      ['alice', 'support-bot'],
      ['bob', 'support-bot'],
      ['bob', 'support-bot'],
      ['alice', 'support-bot'],
    ]);
    assert.equal(currentSubject(), null);
    assert.throws(() => actingFor({}, () => 1), /expected one of user, chain or token/);
    assert.throws(() => actingFor({ user: 'alice', token: 't' }, () => 1), /at most one/);
  });

  test('a duration travels as a duration the daemon accepts', async () => {
    const decision = await client.decide(
      REFUND,
      refund('rf_d1', 5, { context: { window: Duration.ofMillis(90_500) } }),
    );
    assert.equal(decision.decision, 'allow');
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

  test('batches and waits without a daemon are daemon_unreachable too', async () => {
    const client = new Client({
      target: 'unix:///nonexistent-kynara-dir/agent.sock',
      timeoutMs: 2000,
    });
    try {
      await assert.rejects(
        client.decideBatch([{ action: REFUND, ...refund('rf_15', 1) }]),
        KynaraUnavailable,
      );
      await assert.rejects(client.waitApproval('apr_x', { timeoutMs: 2000 }), (err) => {
        assert.ok(err instanceof KynaraUnavailable);
        assert.equal(err.code, DAEMON_UNREACHABLE);
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
