/**
 * Background work runs once for all the processes sharing a database (the workers of
 * `mxkeys serve --workers`, or nodes on one PostgreSQL), not once per process: federation
 * housekeeping and the sweep of expired registration nonces are each done by the one process
 * holding their lease, and another takes over when it stops.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describeEachBackend, tempDir } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { registerUser, SHARED_SECRET } from '../support/client.js';

type Db = { get<T>(sql: string, params?: unknown[]): Promise<T>; run(sql: string, params?: unknown[]): Promise<number> };
const dbOf = (s: TestServer) => (s.mx.store as unknown as { db: Db }).db;

describeEachBackend('background work across processes sharing a database', (backend) => {
  async function twoServers(): Promise<[TestServer, TestServer]> {
    const database = (await backend.freshDatabase()) as Record<string, unknown>;
    const signingKeyPath = join(tempDir(), 'signing.key');
    const config = { registration_shared_secret: SHARED_SECRET };
    return [await startServer({ backend, database, signingKeyPath, config }), await startServer({ backend, database, signingKeyPath, config })];
  }

  test('federation housekeeping is done by one process round after round, and by another once it stops', async () => {
    const [a, b] = await twoServers();
    const user = (await registerUser(a, 'u')).userId;
    // A subscription that has lapsed: the next housekeeping round deletes it.
    const lapsed = async () => {
      await b.mx.store.federation.subscribe('remote.example', [user], 1, 0);
      const count = async () => (await dbOf(b).get<{ n: number }>('SELECT COUNT(*) AS n FROM device_list_subscriptions'))!.n;
      assert.equal(await count(), 1);
      return count;
    };
    let count = await lapsed();
    await a.mx.federation.maintenance.runOnce();
    assert.equal(await count(), 0, 'A did a round: the lapsed subscription is gone');

    count = await lapsed();
    await b.mx.federation.maintenance.runOnce();
    assert.equal(await count(), 1, 'B does no round while A keeps the housekeeping');
    await a.mx.federation.maintenance.runOnce();
    assert.equal(await count(), 0, "A's next round");

    count = await lapsed();
    await a.close();
    await b.mx.federation.maintenance.runOnce();
    assert.equal(await count(), 0, 'once A has stopped, B does the rounds');
  });

  test('expired registration nonces are swept by one process, not by each', async () => {
    const [a, b] = await twoServers();
    const nonces = async () => (await dbOf(a).get<{ n: number }>('SELECT COUNT(*) AS n FROM registration_nonces'))!.n;
    // A sweeps on its first nonce request, and holds the sweep from then on.
    assert.equal((await http(a.url, 'GET', '/_synapse/admin/v1/register')).status, 200);
    await dbOf(a).run('INSERT INTO registration_nonces (nonce, created_ts) VALUES (?, ?)', ['expired', 0]);
    assert.equal((await http(b.url, 'GET', '/_synapse/admin/v1/register')).status, 200);
    assert.equal(await nonces(), 3, "B's first nonce request does not sweep: A holds the sweep");
    await a.close();
    await dbOf(b).run("UPDATE leases SET expires_ts = 0 WHERE name = 'job:auth-state-sweep'");
    const c = await startServer({ backend, database: b.config.database as unknown as Record<string, unknown>, signingKeyPath: b.config.signing_key_path, config: { registration_shared_secret: SHARED_SECRET } });
    assert.equal((await http(c.url, 'GET', '/_synapse/admin/v1/register')).status, 200);
    const left = (await dbOf(b).get<{ n: number }>("SELECT COUNT(*) AS n FROM registration_nonces WHERE nonce = 'expired'"))!.n;
    assert.equal(left, 0, 'once the lease has lapsed, another process sweeps');
  });
});
