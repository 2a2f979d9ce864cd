// The client with a client certificate against a real daemon whose TCP port
// serves mutual TLS (agent.tls): certificates from a real test CA.

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { Client, DAEMON_UNREACHABLE } from '../src/index.js';
import { REFUND, refund, startDaemon, writeCertificates } from './daemon.js';

const AGENT_URI = 'spiffe://kynara.test/agent/support-bot';

describe('Client over mutual TLS', () => {
  let daemon;
  before(async () => {
    daemon = await startDaemon((workdir) => {
      writeCertificates(workdir, AGENT_URI);
      const tls = {
        cert_file: join(workdir, 'server.crt'),
        key_file: join(workdir, 'server.key'),
        client_ca_file: join(workdir, 'ca.crt'),
      };
      return [`agent.tls=${JSON.stringify(tls)}`];
    });
  });
  after(async () => {
    await daemon?.stop();
  });

  function tlsClient(stem) {
    return new Client({
      target: daemon.tcpTarget,
      certFile: join(daemon.workdir, `${stem}.crt`),
      keyFile: join(daemon.workdir, `${stem}.key`),
      caFile: join(daemon.workdir, 'ca.crt'),
      timeoutMs: 10_000,
    });
  }

  test('a client certificate the CA signed gets answers on the TLS port', async () => {
    const client = tlsClient('agent');
    try {
      const answer = await client.decide(REFUND, refund('rf_tls', 1200));
      assert.equal(answer.decision, 'allow');
      assert.deepEqual(answer.chain, ['alice', 'support-bot']);
    } finally {
      client.close();
    }
  });

  test("another CA's certificate fails the handshake: daemon_unreachable", async () => {
    const client = tlsClient('stranger');
    try {
      await assert.rejects(client.decide(REFUND, refund('rf_tls_2', 1200)), (err) => {
        assert.equal(err.code, DAEMON_UNREACHABLE);
        return true;
      });
    } finally {
      client.close();
    }
  });

  test('half a pair, or TLS to a Unix socket, is refused before dialling', () => {
    const certFile = join(daemon.workdir, 'agent.crt');
    assert.throws(() => new Client({ target: daemon.tcpTarget, certFile }), /keyFile: expected/);
    assert.throws(
      () => new Client({ target: daemon.unixTarget, certFile, keyFile: certFile }),
      /Unix socket carries no TLS/,
    );
  });
});
