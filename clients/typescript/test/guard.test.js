// guard() against a real daemon: the body runs only on allow; deny, approval
// (throw, and wait then approve, reject or run out) and an unreachable daemon
// all throw before it, each error with the decision id when the daemon
// answered; failOpen lets a call through only without an answer, and says so.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  APPROVAL_REJECTED,
  ApprovalRejected,
  ApprovalRequired,
  ApprovalTimeout,
  Client,
  DAEMON_UNREACHABLE,
  INVALID_REQUEST,
  KynaraError,
  KynaraUnavailable,
  PermissionDenied,
  actingFor,
  currentDecision,
  guard,
} from '../src/index.js';
import { REFUND, useDaemon } from './daemon.js';

const NOWHERE = 'unix:///nonexistent-kynara-dir/agent.sock';

/** A refund tool taking one plain object, and the calls its body saw. */
function refundTool(client, options = {}) {
  const ran = [];
  const issue = guard(REFUND, {
    resourceKind: 'payments.refund',
    resourceId: 'id',
    attributes: ['amount'],
    context: ['region'],
    client,
    ...options,
  })(async ({ id, amount }) => {
    ran.push({ id, amount, decision: currentDecision() });
    return `refund ${id} of ${amount} issued`;
  });
  return { issue, ran };
}

const asAlice = (fn) => actingFor({ user: 'alice' }, fn);

describe('guard against a real daemon', () => {
  let daemon;
  let client;
  useDaemon((started, made) => {
    daemon = started;
    client = made;
  });

  test('allow runs the body once, with the allow as currentDecision()', async () => {
    const { issue, ran } = refundTool(client);
    const result = await asAlice(() => issue({ id: 'rf_g1', amount: 1200 }));
    assert.equal(result, 'refund rf_g1 of 1200 issued');
    assert.equal(ran.length, 1);
    const { decision } = ran[0];
    assert.equal(decision.decision, 'allow');
    assert.equal(decision.reasonCode, 'rule_allowed');
    assert.match(decision.decisionId, /\S/);
    assert.deepEqual(decision.chain, ['alice', 'support-bot']);
    assert.equal(currentDecision(), null, 'outside the body there is none');
  });

  test('arguments map by functions too, and `this` is kept', async () => {
    const seen = [];
    const account = {
      owner: 'acme',
      refund: guard(REFUND, {
        resourceKind: 'payments.refund',
        client,
        resourceId: (id) => id,
        attributes: (id, amount) => ({ amount }),
        context: (id, amount, region) => ({ region }),
      })(async function refund(id, amount) {
        seen.push([this.owner, id, amount, currentDecision().decision]);
      }),
    };
    assert.equal(account.refund.name, 'refund');
    await asAlice(() => account.refund('rf_g2', 10, 'DE'));
    assert.deepEqual(seen, [['acme', 'rf_g2', 10, 'allow']]);
    await assert.rejects(
      asAlice(() => account.refund('rf_g3', 10, 'KP')),
      PermissionDenied,
    );
    assert.equal(seen.length, 1);
  });

  test('deny throws PermissionDenied with the decision id; the body never runs', async () => {
    const { issue, ran } = refundTool(client);
    await assert.rejects(
      asAlice(() => issue({ id: 'rf_g4', amount: 10, region: 'KP' })),
      (err) => {
        assert.ok(err instanceof PermissionDenied);
        assert.equal(err.code, 'permission_denied');
        assert.equal(err.reasonCode, 'rule_denied');
        assert.match(err.decisionId, /\S/);
        return true;
      },
    );
    assert.deepEqual(ran, []);
  });

  test('require_approval throws ApprovalRequired with the approval and decision id', async () => {
    const { issue, ran } = refundTool(client);
    await assert.rejects(
      asAlice(() => issue({ id: 'rf_g5', amount: 60000 })),
      (err) => {
        assert.ok(err instanceof ApprovalRequired);
        assert.match(err.decisionId, /\S/);
        assert.match(err.approvalId, /^apr_/);
        assert.match(err.approvalUrl, new RegExp(`/approvals/${err.approvalId}$`));
        return true;
      },
    );
    assert.deepEqual(ran, []);
  });

  test('wait: onWait gets the URL, carol approves, the body runs once on the grant', async () => {
    const told = [];
    const approvals = [];
    const { issue, ran } = refundTool(client, {
      onApproval: 'wait',
      approvalTimeoutMs: 60_000,
      onWait: async (decision) => {
        told.push(decision);
        // Approved while the guard waits: the wait sees pending, then approved.
        approvals.push(daemon.approve(decision.approval.id));
      },
    });
    const result = await asAlice(() => issue({ id: 'rf_g6', amount: 60000 }));
    await Promise.all(approvals);
    assert.equal(result, 'refund rf_g6 of 60000 issued');
    assert.equal(told.length, 1);
    assert.equal(told[0].decision, 'require_approval');
    assert.match(told[0].approval.url, /\/approvals\/apr_/);
    assert.equal(ran.length, 1);
    const { decision } = ran[0];
    assert.equal(decision.decision, 'allow');
    assert.equal(decision.reasonCode, 'approval_granted');
    assert.equal(decision.approval.id, told[0].approval.id);
    assert.deepEqual(decision.approval.reviewers, ['carol']);
    assert.notEqual(decision.decisionId, told[0].decisionId);
  });

  test('an already approved, unused grant is used at once: no onWait, no wait', async () => {
    const thrown = refundTool(client);
    const asked = await asAlice(() => thrown.issue({ id: 'rf_g7', amount: 70000 })).catch(
      (err) => err,
    );
    assert.ok(asked instanceof ApprovalRequired);
    await daemon.approve(asked.approvalId);

    const told = [];
    const { issue, ran } = refundTool(client, {
      onApproval: 'wait',
      // A wait would run out at once and throw: the retry must not wait.
      approvalTimeoutMs: 1,
      onWait: (decision) => told.push(decision),
    });
    assert.equal(
      await asAlice(() => issue({ id: 'rf_g7', amount: 70000 })),
      'refund rf_g7 of 70000 issued',
    );
    assert.deepEqual(told, []);
    assert.equal(ran[0].decision.reasonCode, 'approval_granted');
    assert.equal(ran[0].decision.approval.id, asked.approvalId);
  });

  test('wait: a rejection throws ApprovalRejected, a wait that runs out ApprovalTimeout', async () => {
    const rejections = [];
    const rejecting = refundTool(client, {
      onApproval: 'wait',
      approvalTimeoutMs: 60_000,
      onWait: (decision) => {
        rejections.push(daemon.reject(decision.approval.id, 'not this one'));
      },
    });
    await assert.rejects(
      asAlice(() => rejecting.issue({ id: 'rf_g8', amount: 80000 })),
      (err) => {
        assert.ok(err instanceof ApprovalRejected);
        assert.equal(err.code, APPROVAL_REJECTED);
        assert.match(err.decisionId, /\S/);
        assert.match(err.approvalId, /^apr_/);
        assert.equal(err.update.comment, 'not this one');
        return true;
      },
    );
    await Promise.all(rejections);
    assert.deepEqual(rejecting.ran, []);

    const waiting = refundTool(client, { onApproval: 'wait', approvalTimeoutMs: 500 });
    await assert.rejects(
      asAlice(() => waiting.issue({ id: 'rf_g9', amount: 90000 })),
      (err) => {
        assert.ok(err instanceof ApprovalTimeout);
        assert.match(err.decisionId, /\S/);
        assert.ok(err.update === null || err.update.state === 'pending', String(err.update?.state));
        return true;
      },
    );
    assert.deepEqual(waiting.ran, []);
  });

  test('onWait throwing ends the call before any wait; the body never runs', async () => {
    const { issue, ran } = refundTool(client, {
      onApproval: 'wait',
      onWait: () => {
        throw new Error('no reviewer reachable');
      },
    });
    await assert.rejects(
      asAlice(() => issue({ id: 'rf_g10', amount: 60000 })),
      /no reviewer reachable/,
    );
    assert.deepEqual(ran, []);
  });

  test('no subject, or a value with no wire form, throws and fails closed', async () => {
    const { issue, ran } = refundTool(client, {
      failOpen: true,
      logger: () => assert.fail('no warning'),
    });
    await assert.rejects(issue({ id: 'rf_g11', amount: 5 }), (err) => {
      assert.ok(err instanceof KynaraError);
      assert.equal(err.code, INVALID_REQUEST);
      return true;
    });
    await assert.rejects(
      asAlice(() => issue({ id: 'rf_g12', amount: null })),
      TypeError,
    );
    await assert.rejects(
      asAlice(() => issue('rf_g13', 5)),
      /one plain object argument/,
    );
    assert.deepEqual(ran, []);
  });

  test('failOpen never overrides an answer: a deny still throws, unlogged', async () => {
    const warned = [];
    const { issue, ran } = refundTool(client, {
      failOpen: true,
      logger: (line) => warned.push(line),
    });
    await assert.rejects(
      asAlice(() => issue({ id: 'rf_g14', amount: 5, region: 'KP' })),
      PermissionDenied,
    );
    await assert.rejects(
      asAlice(() => issue({ id: 'rf_g15', amount: 60000 })),
      ApprovalRequired,
    );
    assert.deepEqual(ran, []);
    assert.deepEqual(warned, []);
  });
});

describe('guard without a daemon', () => {
  test('an unreachable daemon throws daemon_unreachable; the body never runs', async () => {
    const client = new Client({ target: NOWHERE, timeoutMs: 2000 });
    try {
      const { issue, ran } = refundTool(client);
      await assert.rejects(
        asAlice(() => issue({ id: 'rf_g16', amount: 5 })),
        (err) => {
          assert.ok(err instanceof KynaraUnavailable);
          assert.equal(err.code, DAEMON_UNREACHABLE);
          assert.equal(err.decisionId, undefined);
          return true;
        },
      );
      assert.deepEqual(ran, []);
    } finally {
      client.close();
    }
  });

  test('failOpen lets it through with no decision, and logs the action and code', async () => {
    const client = new Client({ target: NOWHERE, timeoutMs: 2000 });
    try {
      const warned = [];
      const { issue, ran } = refundTool(client, {
        failOpen: true,
        logger: { warn: (line) => warned.push(line) },
      });
      assert.equal(
        await asAlice(() => issue({ id: 'rf_g17', amount: 5 })),
        'refund rf_g17 of 5 issued',
      );
      await asAlice(() => issue({ id: 'rf_g18', amount: 6 }));
      assert.deepEqual(
        ran.map((call) => [call.id, call.decision]),
        [
          ['rf_g17', null],
          ['rf_g18', null],
        ],
      );
      assert.equal(warned.length, 2, 'one warning per call let through');
      assert.match(warned[0], /payments\.refund\.issue/);
      assert.match(warned[0], /daemon_unreachable/);
    } finally {
      client.close();
    }
  });

  test('failOpen logs through console.warn unless a logger is given', async (t) => {
    const client = new Client({ target: NOWHERE, timeoutMs: 2000 });
    const warn = t.mock.method(console, 'warn', () => {});
    try {
      const { issue } = refundTool(client, { failOpen: true });
      await asAlice(() => issue({ id: 'rf_g19', amount: 5 }));
      assert.equal(warn.mock.callCount(), 1);
      assert.match(warn.mock.calls[0].arguments[0], /payments\.refund\.issue.*daemon_unreachable/);
    } finally {
      client.close();
    }
  });

  test('options are checked when the guard is made', () => {
    const make = (options) => guard(REFUND, { resourceKind: 'payments.refund', ...options });
    assert.throws(() => guard(REFUND, {}), /resourceKind expected/);
    assert.throws(() => make({ onApproval: 'ask' }), /onApproval expected 'throw' or 'wait'/);
    assert.throws(() => make({ onWait: () => {} }), /onWait expected onApproval: 'wait'/);
    assert.throws(() => make({ approvalTimeoutMs: 0 }), RangeError);
    assert.throws(() => make({ failOpen: 'yes' }), /failOpen expected true or false/);
    assert.throws(() => make({ logger: 'console' }), /logger expected a function/);
    assert.throws(() => make({ attributes: 'amount' }), /array of property names/);
    assert.throws(() => make({ client: {} }), /client expected a Client/);
    assert.throws(() => make({})(42), /expected a function to wrap/);
  });
});
