import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import type { Mxkeys } from '../../src/compose.js';
import { createTestMxkeys, http } from '../support/server.js';
import { backends } from '../support/backends.js';
import { expectMatrixError, registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';

// The key query and claim routes are served on node:http ahead of Fastify (src/http/direct.ts).
// A client must not be able to tell: the same errors, headers, limits and metrics as every route.
const CLIENT = ['/_matrix/client/v3/keys/query', '/_matrix/client/v3/keys/claim'];
const FEDERATION = ['/_matrix/federation/v1/user/keys/query', '/_matrix/federation/v1/user/keys/claim'];

describe('the key query and claim routes behave like every other route', () => {
  let mx: Mxkeys;
  let base: string;
  let alice: Session;
  let remote: FakeHomeserver;
  const logged: Record<string, unknown>[] = [];

  before(async () => {
    remote = await FakeHomeserver.start();
    const logger = pino({ level: 'warn' }, { write: (line: string) => logged.push(JSON.parse(line) as Record<string, unknown>) });
    mx = await createTestMxkeys({
      backend: backends[0]!,
      logger,
      config: {
        max_request_body_bytes: 4096,
        registration_shared_secret: SHARED_SECRET,
        allow_access_token_in_query: true,
        metrics: { enabled: true, port: 0 },
        federation: { resolve: { [remote.serverName]: remote.url } },
      },
    });
    base = await mx.listen();
    alice = await registerUser({ url: base, mx, config: mx.config, close: () => mx.close() }, 'alice');
  });
  after(() => mx.close());

  const asAlice = (path: string, body: unknown) => http(base, 'POST', path, { token: alice.accessToken, body });
  const fromRemote = (path: string, body: unknown) => remote.request(base, 'test.local', 'POST', path, { body });

  test('a valid request gets 200 JSON with the CORS headers, on the client and the federation API', async () => {
    for (const r of [
      await asAlice(CLIENT[0]!, { device_keys: { [alice.userId]: [] } }),
      await asAlice(CLIENT[1]!, { one_time_keys: {} }),
    ]) {
      assert.equal(r.status, 200, r.text);
      assert.equal(r.headers.get('content-type'), 'application/json');
      assert.equal(r.headers.get('access-control-allow-origin'), '*');
      assert.match(r.headers.get('access-control-allow-headers') ?? '', /Authorization/);
    }
    const q = await fromRemote(FEDERATION[0]!, { device_keys: { [alice.userId]: [] } });
    assert.equal(q.status, 200, q.text);
    assert.deepEqual(Object.keys(q.body), ['device_keys', 'master_keys', 'self_signing_keys']);
    const c = await fromRemote(FEDERATION[1]!, { one_time_keys: {} });
    assert.deepEqual(c.body, { one_time_keys: {} });
  });

  test('the wrong method is 405 naming POST, and OPTIONS is the CORS pre-flight', async () => {
    for (const path of [...CLIENT, ...FEDERATION]) {
      const r = await http(base, 'GET', path, { token: alice.accessToken });
      expectMatrixError(r, 405, 'M_UNRECOGNIZED');
      assert.equal(r.headers.get('allow'), 'POST', path);
      const pre = await http(base, 'OPTIONS', path);
      assert.equal(pre.status, 200, path);
      assert.equal(pre.headers.get('access-control-allow-origin'), '*');
    }
  });

  test('no credentials is 401: a missing token on the client API, a missing signature on federation', async () => {
    for (const path of CLIENT) expectMatrixError(await http(base, 'POST', path, { body: { device_keys: {} } }), 401, 'M_MISSING_TOKEN');
    for (const path of CLIENT) expectMatrixError(await http(base, 'POST', path, { token: 'nope', body: { device_keys: {} } }), 401, 'M_UNKNOWN_TOKEN');
    for (const path of FEDERATION) expectMatrixError(await http(base, 'POST', path, { body: { device_keys: {} } }), 401, 'M_UNAUTHORIZED', /Authorization/);
  });

  test('the access token is taken from the query string when allow_access_token_in_query is on', async () => {
    const r = await http(base, 'POST', `${CLIENT[0]}?access_token=${encodeURIComponent(alice.accessToken)}`, { body: { device_keys: {} } });
    assert.equal(r.status, 200, r.text);
  });

  test('bodies that are not JSON, not an object, or of the wrong shape are 400s naming what is wrong', async () => {
    for (const path of CLIENT) {
      expectMatrixError(await http(base, 'POST', path, { token: alice.accessToken, rawBody: '{"device_keys":' }), 400, 'M_NOT_JSON');
      expectMatrixError(await http(base, 'POST', path, { token: alice.accessToken, rawBody: Buffer.from([0x7b, 0xff, 0x7d]) }), 400, 'M_NOT_JSON');
      expectMatrixError(await http(base, 'POST', path, { token: alice.accessToken }), 400, 'M_BAD_JSON', /request body must be an object/);
      expectMatrixError(await asAlice(path, ['device_keys']), 400, 'M_BAD_JSON', /request body must be an object/);
      expectMatrixError(await asAlice(path, {}), 400, 'M_MISSING_PARAM', /(device_keys|one_time_keys)/);
      expectMatrixError(await http(base, 'POST', path, { token: alice.accessToken, rawBody: '['.repeat(100) + ']'.repeat(100) }), 400, 'M_BAD_JSON', /nested/);
    }
    expectMatrixError(await asAlice(CLIENT[0]!, { device_keys: { [alice.userId]: [] }, timeout: '10' }), 400, 'M_BAD_JSON', /timeout/);
    expectMatrixError(await asAlice(CLIENT[1]!, { one_time_keys: {}, timeout: -1 }), 400, 'M_BAD_JSON', /timeout/);
    expectMatrixError(await asAlice(CLIENT[1]!, { one_time_keys: { [alice.userId]: 'x' } }), 400, 'M_BAD_JSON', /one_time_keys/);
    expectMatrixError(await fromRemote(FEDERATION[0]!, { device_keys: { [alice.userId]: 'all' } }), 400, 'M_BAD_JSON', /device_keys/);
    expectMatrixError(await fromRemote(FEDERATION[1]!, {}), 400, 'M_MISSING_PARAM', /one_time_keys/);
  });

  test('a body over max_request_body_bytes is 413 M_TOO_LARGE, and the server keeps answering', async () => {
    const big = { device_keys: { [alice.userId]: ['x'.repeat(5000)] } };
    for (const path of CLIENT) {
      const r = await asAlice(path, big);
      expectMatrixError(r, 413, 'M_TOO_LARGE', /max_request_body_bytes/);
      assert.equal(r.headers.get('access-control-allow-origin'), '*');
    }
    expectMatrixError(await fromRemote(FEDERATION[0]!, big), 413, 'M_TOO_LARGE');
    const lengthOnly = await http(base, 'POST', CLIENT[0]!, { token: alice.accessToken, rawBody: 'x'.repeat(5000) });
    expectMatrixError(lengthOnly, 413, 'M_TOO_LARGE');
    assert.equal((await asAlice(CLIENT[0]!, { device_keys: {} })).status, 200);
  });

  test('the metrics count answers on these routes by route and status', async () => {
    await asAlice(CLIENT[1]!, { one_time_keys: {} });
    await asAlice(CLIENT[1]!, {});
    const text = await (await fetch(mx.metricsUrl()!)).text();
    const count = (status: number) =>
      Number(new RegExp(`mxkeys_http_requests_total\\{[^}]*route="/_matrix/client/v3/keys/claim"[^}]*status="${status}"[^}]*\\} (\\d+)`).exec(text)?.[1] ?? 0);
    assert.ok(count(200) >= 1, text);
    assert.ok(count(400) >= 1, text);
  });

  test('an unexpected failure is 500 M_UNKNOWN with a request id, and the log has the details', async () => {
    // A query for a user whose ID the database cannot hold would be a client error; a closed
    // database is ours: the statement fails below the key rules.
    const broken = await createTestMxkeys({ backend: backends[0]!, logger: pino({ level: 'warn' }, { write: (l: string) => logged.push(JSON.parse(l) as Record<string, unknown>) }), config: { registration_shared_secret: SHARED_SECRET } });
    const url = await broken.listen();
    const bob = await registerUser({ url, mx: broken, config: broken.config, close: () => broken.close() }, 'bob');
    await broken.store.close();
    try {
      const r = await http(url, 'POST', CLIENT[0]!, { token: bob.accessToken, body: { device_keys: {} } });
      expectMatrixError(r, 500, 'M_UNKNOWN');
      const requestId = /request id (\S+)/.exec(String(r.body['error']))?.[1];
      assert.ok(requestId, r.text);
      assert.ok(logged.some((l) => l['reqId'] === requestId && l['url'] === CLIENT[0]), 'logged under the request id');
    } finally {
      await broken.app.close();
    }
  });
});
