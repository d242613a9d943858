import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadOrCreateSigningKeys, parseSigningKeys, writeNewSigningKeyFile } from '../../src/federation/signing-key-file.js';

/**
 * A separate Node process that reads `path` in a tight loop and prints the first content it finds
 * (the file may not exist yet). It prints `ready` first so the writer starts only once it spins.
 */
function watchForFirstContent(path: string): { ready: Promise<void>; firstContent: Promise<string> } {
  const script =
    `const { readFileSync } = await import('node:fs');` +
    `process.stdout.write('ready\\n');` +
    `const deadline = Date.now() + 10000;` +
    `for (;;) {` +
    `  try { process.stdout.write('seen:' + readFileSync(${JSON.stringify(path)}, 'utf8')); break; }` +
    `  catch (e) { if (e.code !== 'ENOENT' || Date.now() > deadline) { process.stdout.write('error:' + e.message); break; } }` +
    `}`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  let markReady: () => void;
  const ready = new Promise<void>((resolve) => (markReady = resolve));
  child.stdout.on('data', (d: Buffer) => {
    out += d.toString();
    if (out.startsWith('ready\n')) markReady();
  });
  const firstContent = new Promise<string>((resolve) => child.on('close', () => resolve(out.replace(/^ready\n/, ''))));
  return { ready, firstContent };
}

describe('signing key file', () => {
  test('a process reading the key file while another creates it sees no file or the whole key, never an empty one', async () => {
    // Before the fix the file was created empty and filled afterwards: the watcher saw it empty in
    // 19 of 20 rounds. Now the complete file is linked into place in one step.
    for (let round = 0; round < 20; round++) {
      const dir = mkdtempSync(join(tmpdir(), 'mxkeys-keyfile-'));
      try {
        const path = join(dir, 'signing.key');
        const watcher = watchForFirstContent(path);
        await watcher.ready;
        await new Promise((r) => setTimeout(r, 20));
        const written = writeNewSigningKeyFile(path);
        const seen = await watcher.firstContent;
        assert.ok(seen.startsWith('seen:'), `round ${round}: the watcher failed: ${seen}`);
        const keys = parseSigningKeys(seen.slice('seen:'.length), path);
        assert.equal(keys[0]!.publicKey, written.publicKey, `round ${round}`);
        assert.deepEqual(readdirSync(dir), ['signing.key'], 'no temporary file is left behind');
        assert.equal(statSync(path).mode & 0o777, 0o600);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  });

  test('an existing key file is read, never replaced', () => {
    const dir = mkdtempSync(join(tmpdir(), 'mxkeys-keyfile-'));
    try {
      const path = join(dir, 'signing.key');
      const written = writeNewSigningKeyFile(path);
      assert.throws(() => writeNewSigningKeyFile(path), /already exists; refusing to overwrite/);
      const loaded = loadOrCreateSigningKeys(path);
      assert.equal(loaded.created, false);
      assert.equal(loaded.keys[0]!.publicKey, written.publicKey);
      assert.deepEqual(readdirSync(dir), ['signing.key']);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
