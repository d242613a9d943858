/**
 * The README's tour runs: examples/tour.ts against a started server, so the example cannot rot.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describeEachBackend } from '../support/backends.js';
import { startServer } from '../support/server.js';
import { childEnv } from '../support/process.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

describeEachBackend('examples/tour.ts', (backend) => {
  test('registers two users, uploads their keys, claims a one-time key and decrypts an Olm message', async () => {
    const server = await startServer({ backend, config: { enable_registration: true } });
    const result = await new Promise<{ code: number | null; out: string }>((resolve) => {
      const child = spawn(process.execPath, ['--import', 'tsx', 'examples/tour.ts', server.url], { cwd: ROOT, env: childEnv() });
      let out = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()));
      child.stderr.on('data', (d: Buffer) => (out += d.toString()));
      child.on('exit', (code) => resolve({ code, out }));
    });
    assert.equal(result.code, 0, result.out);
    assert.match(result.out, /^registered @alice-[a-z0-9]+:test\.local \(device [A-Z]+\) and @bob-[a-z0-9]+:test\.local$/m);
    assert.match(result.out, /^alice's device uploaded its keys: [1-9]\d* one-time keys on the server$/m);
    assert.match(result.out, /^bob claimed alice's one-time key signed_curve25519:\S+$/m);
    assert.match(result.out, /^alice decrypted: hello alice, from bob$/m);
  });
});
