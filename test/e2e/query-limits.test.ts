/**
 * What one key query or claim may ask for, and what it may leave behind: per-request caps with a
 * 400 that names the setting, a query-answer cache bounded by size, and no stored rows for users
 * this server cannot answer for (hardening review, findings 1 and 3).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { backends, describeEachBackend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { expectMatrixError, registerUser, SHARED_SECRET } from '../support/client.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';
import { ANSWER_CACHE_BUDGET_BYTES } from '../../src/keys/service.js';
import type { SqlDatabase } from '../../src/storage/sql.js';

const C = '/_matrix/client/v3';
const F = '/_matrix/federation/v1';

const dbOf = (s: TestServer) => (s.mx.store as unknown as { db: SqlDatabase }).db;
const trackedRows = async (s: TestServer) => (await dbOf(s).get<{ n: number }>('SELECT COUNT(*) AS n FROM e2e_tracked_users'))!.n;

describeEachBackend('limits of key queries and claims', (backend) => {
  test('a query or claim naming more users or devices than the limits allow is refused with 400 naming the setting', async () => {
    const fake = await FakeHomeserver.start();
    const s = await startServer({
      backend,
      config: { registration_shared_secret: SHARED_SECRET, max_key_query_users: 3, max_key_query_device_ids: 4, max_key_claim_devices: 2, federation: { resolve: { [fake.serverName]: fake.url } } },
    });
    const alice = await registerUser(s, 'alice');
    const users = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`@u${i}:test.local`, [] as string[]]));

    const ok = await http(s.url, 'POST', `${C}/keys/query`, { token: alice.accessToken, body: { device_keys: users(3) } });
    assert.equal(ok.status, 200, ok.text);
    expectMatrixError(await http(s.url, 'POST', `${C}/keys/query`, { token: alice.accessToken, body: { device_keys: users(4) } }), 400, 'M_INVALID_PARAM', /4 users.*max_key_query_users/);
    expectMatrixError(
      await http(s.url, 'POST', `${C}/keys/query`, { token: alice.accessToken, body: { device_keys: { '@u:test.local': ['A', 'B', 'C', 'D', 'E'] } } }),
      400,
      'M_INVALID_PARAM',
      /5 device IDs.*max_key_query_device_ids/,
    );
    expectMatrixError(
      await http(s.url, 'POST', `${C}/keys/claim`, { token: alice.accessToken, body: { one_time_keys: { '@u:test.local': { A: 'signed_curve25519', B: 'x', C: 'y' } } } }),
      400,
      'M_INVALID_PARAM',
      /3 devices.*max_key_claim_devices/,
    );
    // Over federation too.
    const federated = await fake.request(s.url, 'test.local', 'POST', `${F}/user/keys/query`, { body: { device_keys: users(4) } });
    expectMatrixError(federated, 400, 'M_INVALID_PARAM', /max_key_query_users/);
    assert.equal(await trackedRows(s), 0, 'the refused queries stored nothing');
  });

  test('queries naming users that do not exist here, or on servers that cannot answer, store no tracking rows', async () => {
    const s = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET, federation: { resolve: { 'nowhere.example': 'http://127.0.0.1:9' } } } });
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    const invented = Object.fromEntries(Array.from({ length: 300 }, (_, i) => [i % 2 ? `@ghost${i}:test.local` : `@ghost${i}:nowhere.example`, [] as string[]]));
    const r = await http(s.url, 'POST', `${C}/keys/query`, { token: alice.accessToken, body: { device_keys: { ...invented, [bob.userId]: [] }, timeout: 2000 } });
    assert.equal(r.status, 200, r.text);
    assert.ok((r.body['failures'] as Record<string, unknown>)['nowhere.example']);
    assert.equal(await trackedRows(s), 1, 'only bob, who exists, is tracked');
  });
});

// Only SQLite keeps query answers (it can tell cheaply that nothing changed).
describe('the query-answer cache [sqlite]', () => {
  test('never holds more than its budget, however large and many the requests', async () => {
    const s = await startServer({ backend: backends[0]! });
    const keys = s.mx.keys;
    const viewer = { userId: '@alice:test.local' };
    // Requests of ~4,000 characters with tiny answers: the kind that used to pin memory.
    const bigRequest = (i: number) => ({ device_keys: { [`@nobody${i}:test.local`]: Array.from({ length: 250 }, (_, j) => `D${i}x${j}`) } });
    for (let i = 0; i < (ANSWER_CACHE_BUDGET_BYTES / 6000) * 1.5; i++) {
      await keys.query(viewer, bigRequest(i), { displayNames: true, clientApi: true });
      assert.ok(keys.answerCacheBytes() <= ANSWER_CACHE_BUDGET_BYTES, `the cache holds ${keys.answerCacheBytes()} bytes after ${i + 1} queries`);
    }
    // A request too large to be worth keeping is not kept at all.
    const before = keys.answerCacheBytes();
    await keys.query(viewer, { device_keys: { '@x:test.local': Array.from({ length: 5000 }, (_, j) => `DEVICE${j}`) } }, { displayNames: true, clientApi: true });
    assert.equal(keys.answerCacheBytes(), before);
  });
});
