#!/usr/bin/env node
// The test command (`npm test`): build, type-check (tests included), check the dependency rules,
// then run every test file with node:test. PostgreSQL tests run when MXKEYS_TEST_POSTGRES is set.
import { spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const bin = (name) => join(root, 'node_modules', '.bin', name);

function step(title, cmd, args, env = process.env) {
  process.stdout.write(`\n== ${title}\n`);
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', env });
  if (r.status !== 0) {
    process.stdout.write(`\n${title} failed (exit ${r.status ?? r.signal})\n`);
    process.exit(r.status || 1);
  }
}

function testFiles(dir) {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) return testFiles(p);
    return name.endsWith('.test.ts') ? [p] : [];
  });
}

// Optional filter: `npm test -- storage` runs only files whose path contains "storage".
const filters = process.argv.slice(2);
const files = testFiles(join(root, 'test'))
  .filter((f) => filters.length === 0 || filters.some((x) => f.includes(x)))
  .sort();

step('build (tsc -p tsconfig.build.json)', bin('tsc'), ['-p', 'tsconfig.build.json']);
step('type-check src, tests and bench (tsc --noEmit)', bin('tsc'), ['--noEmit', '-p', 'tsconfig.json']);
step('dependency rules (dependency-cruiser)', bin('depcruise'), ['src', '--config', '.dependency-cruiser.cjs', '--output-type', 'err']);

const pgUrl = process.env.MXKEYS_TEST_POSTGRES;
process.stdout.write(
  `\n== tests: ${files.length} files; storage and API tests run on SQLite` +
    (pgUrl ? ` and on PostgreSQL (${pgUrl})\n` : '; PostgreSQL is off (set MXKEYS_TEST_POSTGRES=postgres://postgres@127.0.0.1/postgres to include it)\n'),
);
step('node --test', process.execPath, ['--import', 'tsx', '--test', '--test-concurrency=3', '--test-reporter=spec', ...files]);
