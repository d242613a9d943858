#!/usr/bin/env node
// `npm pack` hooks. prepack: the release carries the exact dependency versions of
// package-lock.json as npm-shrinkwrap.json (package-lock.json itself is never packed), so that
// `npm ci --omit=dev` in the unpacked release, and `npm install -g` of it, install what CI tested.
// postpack: removes that copy again.
import { copyFileSync, rmSync } from 'node:fs';

if (process.argv[2] === 'prepack') copyFileSync('package-lock.json', 'npm-shrinkwrap.json');
else if (process.argv[2] === 'postpack') rmSync('npm-shrinkwrap.json', { force: true });
else {
  process.stderr.write('usage: node scripts/pack.mjs prepack|postpack\n');
  process.exit(2);
}
