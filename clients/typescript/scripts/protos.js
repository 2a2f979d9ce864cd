// Copies the repository's protos (../../protos/kynara/**.proto) into the
// package's protos/ before `npm pack` / `npm publish` (prepack), and removes
// the copy again afterwards (postpack), so that in a checkout the client
// always loads the repository's current protos, never a stale copy.
//
//   node scripts/protos.js copy | clean

import { cpSync, existsSync, rmSync, statSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const source = fileURLToPath(new URL('../../../protos/kynara/', import.meta.url));
const packageRoot = fileURLToPath(new URL('../protos/', import.meta.url));
const target = `${packageRoot}kynara/`;

const mode = process.argv[2];
if (mode === 'copy') {
  if (!existsSync(`${source}v1/decision.proto`)) {
    console.error(`protos.js: no ${source}v1/decision.proto; run it from the Kynara repository`);
    process.exit(1);
  }
  rmSync(packageRoot, { recursive: true, force: true });
  cpSync(source, target, {
    recursive: true,
    filter: (path) => statSync(path).isDirectory() || path.endsWith('.proto'),
  });
} else if (mode === 'clean') {
  rmSync(packageRoot, { recursive: true, force: true });
} else {
  console.error(`protos.js: expected 'copy' or 'clean', got ${mode}`);
  process.exit(2);
}
