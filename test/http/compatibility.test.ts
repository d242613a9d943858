import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, http, type TestServer } from '../support/server.js';
import { backends } from '../support/backends.js';
import { registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';

// What other servers' clients and test suites expect where the spec leaves room: these follow Synapse.
describe('compatibility with what clients and test suites expect of a Matrix server', () => {
  let server: TestServer;
  let alice: Session;
  let remote: FakeHomeserver;

  before(async () => {
    remote = await FakeHomeserver.start();
    server = await startServer({
      backend: backends[0]!,
      config: { registration_shared_secret: SHARED_SECRET, max_request_body_bytes: 4096, federation: { resolve: { [remote.serverName]: remote.url } } },
    });
    alice = await registerUser(server, 'alice');
  });
  after(() => server.close());

  test('every JSON answer, successful or not, Fastify route or direct route, says exactly "Content-Type: application/json"', async () => {
    const token = alice.accessToken;
    const requests: [string, string, Parameters<typeof http>[3]?][] = [
      ['GET', '/_matrix/client/versions'],
      ['GET', '/_matrix/client/v3/login'],
      ['GET', '/_matrix/client/v3/account/whoami', { token }],
      ['POST', '/_matrix/client/v3/keys/upload', { token, body: {} }],
      ['POST', '/_matrix/client/v3/keys/query', { token, body: { device_keys: { [alice.userId]: [] } } }],
      ['POST', '/_matrix/client/v3/keys/claim', { token, body: { one_time_keys: {} } }],
      ['POST', '/_matrix/client/v3/keys/claim', { body: { one_time_keys: {} } }],
      ['POST', '/_matrix/client/v3/keys/query', { token, rawBody: '{"device_keys":' }],
      ['POST', '/_matrix/federation/v1/user/keys/query', { body: {} }],
      ['GET', '/_matrix/client/v3/room_keys/version', { token }],
      ['GET', '/_matrix/client/v3/no/such/endpoint'],
      ['DELETE', '/_matrix/client/v3/login'],
      ['POST', '/_matrix/client/v3/keys/upload', { token, rawBody: 'not json' }],
      ['POST', '/_matrix/client/v3/keys/upload', { token, body: { pad: 'x'.repeat(5000) } }],
      ['OPTIONS', '/_matrix/client/v3/keys/upload'],
      ['GET', '/_matrix/key/v2/server'],
      ['GET', '/_matrix/key/v2/query/test.local'],
      ['GET', '/_matrix/federation/v1/version'],
    ];
    const statuses = new Set<number>();
    for (const [method, path, options] of requests) {
      const r = await http(server.url, method, path, options);
      statuses.add(r.status);
      assert.equal(r.headers.get('content-type'), 'application/json', `${method} ${path} → ${r.status}`);
      assert.ok(r.body !== undefined, `${method} ${path} answers JSON`);
    }
    assert.deepEqual([...statuses].sort(), [200, 400, 401, 404, 405, 413], 'answers of every kind were looked at');
  });

  test('GET /_matrix/key/v2/query/{serverName}/{keyId}, the older notary form, is answered like /query/{serverName}', async () => {
    const plain = await http<{ server_keys: Record<string, unknown>[] }>(server.url, 'GET', '/_matrix/key/v2/query/test.local');
    const keyId = Object.keys(plain.body.server_keys[0]!['verify_keys'] as object)[0]!;
    for (const id of [keyId, 'ed25519:unknown']) {
      const r = await http<{ server_keys: Record<string, unknown>[] }>(server.url, 'GET', `/_matrix/key/v2/query/test.local/${encodeURIComponent(id)}`);
      assert.equal(r.status, 200, r.text);
      assert.equal(r.body.server_keys.length, 1, 'every key is returned, whatever key ID is asked for');
      assert.deepEqual(r.body.server_keys[0]!['verify_keys'], plain.body.server_keys[0]!['verify_keys']);
      assert.equal(r.body.server_keys[0]!['server_name'], 'test.local');
    }
    const theirs = await http<{ server_keys: Record<string, unknown>[] }>(server.url, 'GET', `/_matrix/key/v2/query/${remote.serverName}/ed25519:${remote.verifyKeys[0]!.version}?minimum_valid_until_ts=0`);
    assert.equal(theirs.status, 200, theirs.text);
    assert.equal(theirs.body.server_keys[0]?.['server_name'], remote.serverName);
  });
});
