/**
 * Background work runs once for all the processes sharing a database (the workers of
 * `mxkeys serve --workers`, or nodes on one PostgreSQL), not once per process: federation
 * housekeeping, the sweep of expired registration nonces and the purge of deleted key backups are
 * each done by the one process holding their lease, and another takes over when it stops.
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

  test('the keys of deleted key backup versions are purged by one process, not by each', async () => {
    const [a, b] = await twoServers();
    // Both purgers swept as their server started; the first to sweep keeps the purging.
    let reader = a;
    const holder = async () => (await dbOf(reader).get<{ owner: string }>("SELECT owner FROM leases WHERE name = 'job:backup-purge'"))?.owner;
    for (let i = 0; (await holder()) === undefined; i++) {
      assert.ok(i < 500, 'no process took the purge lease');
      await new Promise((r) => setTimeout(r, 10));
    }
    const [purger, other] = (await holder()) === a.mx.federation.sender.owner ? [a, b] : [b, a];
    reader = other;
    assert.equal(await holder(), purger.mx.federation.sender.owner);

    const alice = await registerUser(a, 'alice');
    const call = (s: TestServer, method: string, path: string, body?: unknown) => http(s.url, method, `/_matrix/client/v3${path}`, { token: alice.accessToken, ...(body === undefined ? {} : { body }) });
    /** A backup version of two keys, made and deleted through `through`. */
    const deletedVersion = async (through: TestServer) => {
      const v = (await call(through, 'POST', '/room_keys/version', { algorithm: 'm.megolm_backup.v1.curve25519-aes-sha2', auth_data: { public_key: 'k', signatures: {} } })).body['version'] as string;
      const session = { first_message_index: 0, forwarded_count: 0, is_verified: false, session_data: { ephemeral: 'e', ciphertext: 'c', mac: 'm' } };
      assert.equal((await call(through, 'PUT', `/room_keys/keys?version=${v}`, { rooms: { '!r:test.local': { sessions: { s1: session, s2: session } } } })).status, 200);
      assert.equal((await call(through, 'DELETE', `/room_keys/version/${v}`)).status, 200);
    };
    const keysLeft = async () => (await dbOf(other).get<{ n: number }>('SELECT COUNT(*) AS n FROM e2e_room_keys'))!.n;

    // Deleted through the process that does not purge: it leaves the keys to the one that does.
    await deletedVersion(other);
    await other.mx.backupPurger.drain();
    assert.equal(Number(await keysLeft()), 2, 'the other process does not purge');
    await purger.mx.backupPurger.drain();
    assert.equal(Number(await keysLeft()), 0, 'the process holding the lease purges');

    // Once it stops (releasing the lease), the other takes the purging over.
    await deletedVersion(other);
    await purger.close();
    await other.mx.backupPurger.drain();
    assert.equal(Number(await keysLeft()), 0, 'once the first has stopped, the other purges');
    assert.equal(await holder(), other.mx.federation.sender.owner);
  });
});
