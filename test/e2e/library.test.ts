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

test("an embedding server that hands requests to mx.app gets every route, the key query and claim included", async () => {
  const mxkeys = await import('../../src/index.js');
  const dir = tempDir();
  const config = mxkeys.loadConfig({
    env: {},
    overrides: {
      server_name: 'embedded.example',
      database: { sqlite: join(dir, 'keys.db') },
      signing_key_path: join(dir, 'signing.key'),
      registration_shared_secret: 'embedded-secret',
    },
  });
  const mx = await mxkeys.createMxkeys(config, { logger: pino({ level: 'silent' }) });
  try {
    // Never listening: requests go through Fastify alone, as from a homeserver's own HTTP server.
    await mx.app.ready();
    await mx.accounts.createUser('alice', 'pw-alice', false);
    const login = await mx.app.inject({
      method: 'POST',
      url: '/_matrix/client/v3/login',
      payload: { type: 'm.login.password', identifier: { type: 'm.id.user', user: 'alice' }, password: 'pw-alice' },
    });
    assert.equal(login.statusCode, 200, login.body);
    const { access_token: token, user_id: userId } = login.json() as { access_token: string; user_id: string };
    const query = await mx.app.inject({ method: 'POST', url: '/_matrix/client/v3/keys/query', headers: { authorization: `Bearer ${token}` }, payload: { device_keys: { [userId]: [] } } });
    assert.equal(query.statusCode, 200, query.body);
    assert.deepEqual((query.json() as { device_keys: unknown }).device_keys, { [userId]: {} });
    const claim = await mx.app.inject({ method: 'POST', url: '/_matrix/client/v3/keys/claim', headers: { authorization: `Bearer ${token}` }, payload: { one_time_keys: {} } });
    assert.equal(claim.statusCode, 200, claim.body);
    const refused = await mx.app.inject({ method: 'POST', url: '/_matrix/client/v3/keys/query', payload: { device_keys: {} } });
    assert.equal(refused.statusCode, 401);
    assert.equal((refused.json() as { errcode: string }).errcode, 'M_MISSING_TOKEN');
    const fed = await mx.app.inject({ method: 'POST', url: '/_matrix/federation/v1/user/keys/query', payload: { device_keys: {} } });
    assert.equal(fed.statusCode, 401);
  } finally {
    await mx.close();
  }
});
