// Starts a real Kynara daemon for the tests: the repository's shipped config
// and policies, with its sockets, audit log, key and witness in a temp dir,
// and carol as a reviewer on its admin socket so a test can approve or
// reject with `kynara-sidecar approvals`.

import { execFile, execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { after, before } from 'node:test';

import { Client, DAEMON_UNREACHABLE } from '../src/index.js';

export const REPO = fileURLToPath(new URL('../../../', import.meta.url));
const PYTHON = process.env.KYNARA_PYTHON || join(REPO, '.venv/bin/python');
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 10_000;
const CLI_TIMEOUT_MS = 60_000;

/** The reviewer the daemon knows (config/policies/directory.yaml). */
export const REVIEWER = 'carol';
const REVIEWER_SECRET = 'carol-reviewer-secret-0123456789';

/** A free loopback TCP port (closed again before the daemon binds it). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/**
 * Start `kynara_sidecar.cli run` and wait until it answers on its Unix socket.
 * `extraSettings(workdir)` returns more `--set` settings (after the defaults),
 * written for the temp dir the daemon runs in.
 * Returns { unixTarget, tcpTarget, workdir, stop() }.
 */
export async function startDaemon(extraSettings = () => []) {
  const workdir = mkdtempSync(join(tmpdir(), 'kynara-ts-'));
  const port = await freePort();
  const secretFile = join(workdir, 'carol.secret');
  writeFileSync(secretFile, REVIEWER_SECRET, { mode: 0o600 });
  const adminSettings = [
    `admin.socket=${join(workdir, 'admin.sock')}`,
    `admin.credentials=${JSON.stringify({ [REVIEWER]: { secret_file: secretFile, roles: ['reviewer'] } })}`,
  ];
  const settings = [
    ...adminSettings,
    `agent.socket=${join(workdir, 'agent.sock')}`,
    `agent.fast_socket=${join(workdir, 'agent.fast.sock')}`,
    'agent.host=127.0.0.1',
    `agent.port=${port}`,
    'health.port=0',
    'http.host=127.0.0.1',
    'http.port=0',
    `audit.path=${join(workdir, 'audit')}`,
    `audit.signing_key=${join(workdir, 'keys', 'audit.pem')}`,
    `audit.witness_path=${join(workdir, 'witness')}`,
    ...extraSettings(workdir),
  ];
  const argv = ['-m', 'kynara_sidecar.cli', 'run', '--config', 'config/kynara.yaml'];
  for (const setting of settings) {
    argv.push('--set', setting);
  }
  const child = spawn(PYTHON, argv, { cwd: REPO, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk) => {
    stderr = (stderr + chunk).slice(-4000);
  });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  // A test process that dies before stop() (a crash, an unhandled
  // rejection) must not leave its daemon running.
  const orphaned = () => child.kill('SIGTERM');
  process.once('exit', orphaned);
  const daemon = {
    workdir,
    unixTarget: `unix://${join(workdir, 'agent.sock')}`,
    tcpTarget: `127.0.0.1:${port}`,
    /** Approve an approval as carol; resolves with the CLI's JSON. */
    approve(approvalId) {
      return reviewerCli(['approve', approvalId], adminSettings, secretFile);
    },
    /** Reject an approval as carol, with `comment`. */
    reject(approvalId, comment) {
      return reviewerCli(['reject', approvalId, '--comment', comment], adminSettings, secretFile);
    },
    async stop() {
      process.removeListener('exit', orphaned);
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
        await exited;
        clearTimeout(timer);
      }
      rmSync(workdir, { recursive: true, force: true });
    },
  };
  try {
    await waitAnswering(daemon.unixTarget, exited, () => stderr);
  } catch (err) {
    await daemon.stop();
    throw err;
  }
  return daemon;
}

function reviewerCli(args, adminSettings, secretFile) {
  const argv = ['-m', 'kynara_sidecar.cli', 'approvals', ...args, '--config', 'config/kynara.yaml'];
  for (const setting of adminSettings) {
    argv.push('--set', setting);
  }
  argv.push('--credential-file', secretFile);
  return new Promise((resolve, reject) => {
    execFile(PYTHON, argv, { cwd: REPO, timeout: CLI_TIMEOUT_MS }, (err, stdout, stderr) => {
      if (err) {
        reject(
          new Error(`kynara-sidecar approvals ${args.join(' ')} failed: ${err.message}\n${stderr}`),
        );
        return;
      }
      resolve(JSON.parse(stdout));
    });
  });
}

/**
 * Write test certificates into `directory` with the repository's
 * tests/tls_support.py (a real CA): ca.crt, server.crt/.key for the loopback
 * addresses, agent.crt/.key (a client certificate with the URI SAN `uri`)
 * and stranger.crt/.key (the same URI, from another CA).
 */
export function writeCertificates(directory, uri) {
  const script = `
import pathlib, sys
sys.path.insert(0, "tests")
from tls_support import Authority, write_pair
out, uri = pathlib.Path(sys.argv[1]), sys.argv[2]
ca = Authority("kynara agents CA")
(out / "ca.crt").write_bytes(ca.pem)
write_pair(out, ca.issue(), "server")
write_pair(out, ca.issue_client(uri), "agent")
write_pair(out, Authority("another CA").issue_client(uri), "stranger")
`;
  execFileSync(PYTHON, ['-c', script, directory, uri], { cwd: REPO, timeout: CLI_TIMEOUT_MS });
}

async function waitAnswering(target, exited, stderr) {
  let gone = null;
  exited.then((code) => {
    gone = code;
  });
  const deadline = Date.now() + START_TIMEOUT_MS;
  const client = new Client({ target, timeoutMs: 1000 });
  try {
    while (Date.now() < deadline) {
      if (gone !== null) {
        throw new Error(`the daemon exited (${gone}) before answering:\n${stderr()}`);
      }
      try {
        await client.decide('payments.refund.issue', {
          resourceKind: 'payments.refund',
          resourceId: 'rf_probe',
          attributes: { amount: 1 },
          user: 'alice',
        });
        return;
      } catch (err) {
        if (err.code !== DAEMON_UNREACHABLE) {
          throw err;
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    throw new Error(
      `the daemon did not answer at ${target} within ${START_TIMEOUT_MS} ms:\n${stderr()}`,
    );
  } finally {
    client.close();
  }
}

export const REFUND = 'payments.refund.issue';

/** Decide options for alice's refund `id` of `amount` cents. */
export function refund(id, amount, extra = {}) {
  return {
    resourceKind: 'payments.refund',
    resourceId: id,
    attributes: { amount },
    user: 'alice',
    ...extra,
  };
}

/**
 * In a describe block: start a daemon and a Client on its Unix socket before
 * the block's tests (handed to `ready(daemon, client)`), close both after.
 */
export function useDaemon(ready) {
  let daemon;
  let client;
  before(async () => {
    daemon = await startDaemon();
    client = new Client({ target: daemon.unixTarget });
    ready(daemon, client);
  });
  after(async () => {
    client?.close();
    await daemon?.stop();
  });
}
