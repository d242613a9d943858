import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const SRC = fileURLToPath(new URL('../../src', import.meta.url));

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : [];
  });
}

// Import rules are checked by dependency-cruiser in `npm test`; this one is about a call.
test('only the CLI calls process.exit, so embedding mxkeys as a library never kills the host', () => {
  const offenders = sources(SRC)
    .filter((f) => /process\.exit\s*\(/.test(readFileSync(f, 'utf8')))
    .map((f) => relative(SRC, f))
    .filter((f) => !f.startsWith('cli/'));
  assert.deepEqual(offenders, []);
});
