import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import pino from 'pino';
import { tempDir } from '../support/backends.js';

test('mxkeys can be embedded as a library: load a config in code, start, answer, close', async () => {
  const mxkeys = await import('../../src/index.js');
  const dir = tempDir();
  const config = mxkeys.loadConfig({
    env: {},
    overrides: { server_name: 'embedded.example', listen: { host: '127.0.0.1', port: 0 }, database: { sqlite: join(dir, 'keys.db') }, signing_key_path: join(dir, 'signing.key') },
  });
  const mx = await mxkeys.createMxkeys(config, { logger: pino({ level: 'silent' }) });
  const url = await mx.listen();
  const keys = (await (await fetch(`${url}/_matrix/key/v2/server`)).json()) as Record<string, unknown>;
  assert.equal(keys['server_name'], 'embedded.example');
  assert.equal(mxkeys.canonicalJson({ b: 1, a: [true] }), '{"a":[true],"b":1}');
  await mx.close();
  await assert.rejects(fetch(`${url}/_matrix/key/v2/server`), 'closed');
});
