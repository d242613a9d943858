#!/usr/bin/env node
// `npm install` / `npm ci` of mxkeys itself: builds dist/ when TypeScript is installed (a clone
// with dev dependencies). Production installs (`npm ci --omit=dev` in an unpacked release) have
// no TypeScript and use the dist/ the release ships; without either, say what to do.
import { existsSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';

const root = process.cwd();
const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');

if (existsSync(tsc)) {
  const r = spawnSync(process.execPath, [tsc, '-p', 'tsconfig.build.json'], { cwd: root, stdio: 'inherit' });
  process.exit(r.status ?? 1);
}
if (existsSync(join(root, 'dist', 'main.js'))) process.exit(0);
process.stderr.write(
  'mxkeys: dist/ is missing and TypeScript (a dev dependency) is not installed, so it cannot be built.\n' +
    'Either install with dev dependencies ("npm ci", then "npm run build"), or install a release built by\n' +
    '"npm pack", which ships dist/ (docs/operations.md, "Installing for production").\n',
);
process.exit(1);
