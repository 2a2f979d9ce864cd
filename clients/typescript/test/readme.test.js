// The README's JavaScript examples, copied out and run with node against a
// real daemon, as a reader would run them: what they print is checked.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';

import { useDaemon } from './daemon.js';

const PACKAGE = fileURLToPath(new URL('../', import.meta.url));
const INDEX = pathToFileURL(join(PACKAGE, 'src/index.js')).href;
// A bound on one example's run: it stops a hung run, it is not a speed check.
const RUN_TIMEOUT_MS = 30_000;

/** The body of the first ```js block under the README heading `heading`. */
function example(heading) {
  const readme = readFileSync(join(PACKAGE, 'README.md'), 'utf8');
  const section = readme.split(/^## /m).find((part) => part.startsWith(heading));
  assert.ok(section, `README has no section "## ${heading}"`);
  const block = /^```js\n([\s\S]*?)^```/m.exec(section);
  assert.ok(block, `README section "## ${heading}" has no js example`);
  return block[1];
}

/** Run `code` as an ES module (the package import pointed at this checkout). */
function run(code, workdir, env) {
  const file = join(workdir, `example-${process.hrtime.bigint()}.mjs`);
  writeFileSync(file, code.replaceAll("'@kynara/sdk'", `'${INDEX}'`));
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      [file],
      { env: { ...process.env, ...env }, timeout: RUN_TIMEOUT_MS },
      (err, stdout, stderr) => {
        rmSync(file, { force: true });
        if (err) {
          reject(new Error(`${err.message}\n${stderr}`));
        } else {
          resolve(stdout);
        }
      },
    );
  });
}

describe('README examples', () => {
  let daemon;
  useDaemon((started) => {
    daemon = started;
  });

  test('guard(): the refund example prints what the guarded body returned', async () => {
    const printed = await run(example('`guard()`'), daemon.workdir, {
      KYNARA_TARGET: daemon.unixTarget,
    });
    assert.equal(printed, 'refund rf_1 of 1200 issued\n');
  });
});
