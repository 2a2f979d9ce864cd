// The package carries its protos: `npm pack` lists them (the prepack step
// copies them in, postpack removes the copy), and an unpacked package,
// with no repository around it, loads them from its own protos/.
//
// npm packs a copy of the package laid out as in the repository (its
// protos/ beside it), so the copy prepack makes never appears in the real
// package directory while other test files load the protos from there.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';

import { REPO } from './daemon.js';

const run = promisify(execFile);
const PACKAGE = join(REPO, 'clients', 'typescript');
const PROTOS = [
  'protos/kynara/v1/approval.proto',
  'protos/kynara/v1/audit.proto',
  'protos/kynara/v1/decision.proto',
  'protos/kynara/v1/sync.proto',
];

let workdir;
let copy;

async function npmPack(...args) {
  const { stdout } = await run('npm', ['pack', '--json', ...args], { cwd: copy, timeout: 60_000 });
  const [packed] = JSON.parse(stdout);
  return packed;
}

before(() => {
  workdir = mkdtempSync(join(tmpdir(), 'kynara-ts-pack-'));
  copy = join(workdir, 'repo', 'clients', 'typescript');
  mkdirSync(copy, { recursive: true });
  for (const entry of ['package.json', 'README.md', 'index.d.ts', 'src', 'scripts']) {
    cpSync(join(PACKAGE, entry), join(copy, entry), { recursive: true });
  }
  symlinkSync(join(REPO, 'protos'), join(workdir, 'repo', 'protos'), 'dir');
});

after(() => {
  rmSync(workdir, { recursive: true, force: true });
});

test('npm pack --dry-run lists the .proto files, and leaves no copy behind', async () => {
  const packed = await npmPack('--dry-run');
  const paths = packed.files.map((file) => file.path);
  for (const proto of PROTOS) {
    assert.ok(paths.includes(proto), `${proto} in ${paths.join(', ')}`);
  }
  assert.ok(paths.includes('src/guard.js'));
  assert.ok(paths.includes('index.d.ts'));
  assert.ok(!paths.some((path) => path.startsWith('test/')), 'no tests shipped');
  assert.equal(existsSync(join(copy, 'protos')), false, 'postpack removed the copy');
});

test('an unpacked package loads the protos it carries', async () => {
  const packed = await npmPack('--pack-destination', workdir);
  await run('tar', ['-xzf', join(workdir, packed.filename), '-C', workdir]);
  const unpacked = join(workdir, 'package');
  // Its dependencies, as an install would put them beside it.
  symlinkSync(join(PACKAGE, 'node_modules'), join(unpacked, 'node_modules'), 'dir');
  const sdk = await import(pathToFileURL(join(unpacked, 'src', 'index.js')).href);
  assert.equal(sdk.resolveProtoRoot(), join(unpacked, 'protos') + '/');
  const client = new sdk.Client({
    target: 'unix:///nonexistent-kynara-dir/agent.sock',
    timeoutMs: 2000,
  });
  try {
    await assert.rejects(
      client.decide('payments.refund.issue', { resourceKind: 'payments.refund', user: 'alice' }),
      (err) => err.code === 'daemon_unreachable',
    );
  } finally {
    client.close();
  }
});

test('an explicit protoRoot must hold the protos', async () => {
  const { resolveProtoRoot } = await import('../src/index.js');
  assert.throws(() => resolveProtoRoot(workdir), /holds no kynara\/v1\/decision\.proto/);
  assert.equal(resolveProtoRoot(join(REPO, 'protos')), join(REPO, 'protos'));
});
