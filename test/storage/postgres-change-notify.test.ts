/**
 * Read caches on PostgreSQL, kept right across processes by LISTEN/NOTIFY (change-listener.ts):
 * two stores on one database stand for two processes (each has its own pool and its own
 * notification connection, as a process does).
 */
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { openStore, type Store } from '../../src/storage/index.js';
import { LISTENER_NAME } from '../../src/storage/postgres/change-listener.js';
import { POSTGRES_URL, backends } from '../support/backends.js';

const BOUND_MS = 300;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls `check` until it holds (for things with no bound of their own, e.g. a reconnection). */
async function eventually(what: string, check: () => Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > end) assert.fail(`${what}: not within ${timeoutMs} ms`);
    await sleep(25);
  }
}

describe('PostgreSQL read caches across processes', { skip: POSTGRES_URL ? false : 'MXKEYS_TEST_POSTGRES is not set' }, () => {
  const postgres = backends.find((b) => b.name === 'postgres')!;
  const stores: Store[] = [];
  let adminPool: pg.Pool | undefined;
  const admin = () => (adminPool ??= new pg.Pool({ connectionString: POSTGRES_URL, max: 1 }));
  after(async () => {
    for (const s of stores) await s.close();
    await adminPool?.end();
  });

  /** Two "processes" on one new database, with a user @u:x and a logged-in device. */
  async function twoProcesses(): Promise<{ a: Store; b: Store; schema: string }> {
    const config = await postgres.freshDatabase();
    const a = await openStore(config, { cacheStalenessBoundMs: BOUND_MS });
    const b = await openStore(config, { cacheStalenessBoundMs: BOUND_MS });
    stores.push(a, b);
    await b.accounts.createUser({ userId: '@u:x', passwordHash: null, admin: false, createdTs: 0 }, { tokenHash: 'T', deviceId: 'D', displayName: null, ts: 0, ip: null });
    await b.keys.transaction((tx) => tx.putDeviceKeys('@u:x', 'D', '{"v":1}'));
    const schema = new URL(config.postgres!).searchParams.get('options')!.replace('-c search_path=', '');
    return { a, b, schema };
  }

  /** Reads `read` until answers come from A's cache (no statement), within a few bounds. */
  async function cachedIn(store: Store, read: () => Promise<unknown>): Promise<void> {
    await eventually('answers come from the cache', async () => {
      await read();
      const before = store.statementCount();
      await read();
      return store.statementCount() === before;
    });
  }

  const keyJson = async (s: Store) => (await s.keys.getKeysOf(['@u:x'])).devices.map((d) => d.json).join();

  test("a device key change made by one process is in the other's cached answers within the bound", async () => {
    const { a, b } = await twoProcesses();
    await cachedIn(a, () => keyJson(a));
    assert.equal(await keyJson(a), '{"v":1}');
    await b.keys.transaction((tx) => tx.putDeviceKeys('@u:x', 'D', '{"v":2}'));
    await sleep(BOUND_MS);
    assert.equal(await keyJson(a), '{"v":2}', 'the change, committed a whole bound ago, is seen');
  });

  test('a logged-out access token is refused by every other process within the bound', async () => {
    const { a, b } = await twoProcesses();
    await cachedIn(a, () => a.accounts.getAccessToken('T'));
    assert.deepEqual(await a.accounts.getAccessToken('T'), { userId: '@u:x', deviceId: 'D' });
    await b.accounts.deleteDevices('@u:x', ['D']);
    await sleep(BOUND_MS);
    assert.equal(await a.accounts.getAccessToken('T'), undefined);
  });

  test('claims and one-time key uploads leave cached token lookups and key reads in place in the process that made them; a device key upload does not', async () => {
    const store = await openStore(await postgres.freshDatabase());
    try {
      await store.accounts.createUser({ userId: '@c:x', passwordHash: null, admin: false, createdTs: 0 }, { tokenHash: 'T', deviceId: 'D', displayName: null, ts: 0, ip: null });
      await store.keys.transaction(async (tx) => {
        await tx.putDeviceKeys('@c:x', 'D', '{"v":1}');
        await tx.addOneTimeKeys('@c:x', 'D', [{ algorithm: 'signed_curve25519', keyId: 'AAAA0', json: '{}' }]);
      });
      const reads = async () => {
        await store.accounts.getAccessToken('T');
        return (await store.keys.getKeysOf(['@c:x'])).devices.map((d) => d.json).join();
      };
      /** Whether the reads were answered from the caches (no statement). */
      const cached = async () => {
        const before = store.statementCount();
        await reads();
        return store.statementCount() === before;
      };
      // Cached only while the notification connection is up; it connects in the background.
      await eventually('the reads are cached', cached);
      const claimOne = () => store.keys.claimKeys([{ userId: '@c:x', deviceId: 'D', algorithm: 'signed_curve25519' }]);
      assert.equal((await claimOne()).length, 1);
      assert.equal((await claimOne()).length, 0, 'no key, no fallback key left');
      await store.keys.transaction((tx) => tx.addOneTimeKeys('@c:x', 'D', [{ algorithm: 'signed_curve25519', keyId: 'AAAA1', json: '{}' }]));
      await store.keys.claimKeys([{ userId: '@c:x', deviceId: 'D', algorithm: 'signed_curve25519' }, { userId: '@c:x', deviceId: 'E', algorithm: 'signed_curve25519' }]);
      assert.equal(await cached(), true, 'still cached after claims and an upload of one-time keys');
      await store.keys.transaction((tx) => tx.putDeviceKeys('@c:x', 'D', '{"v":2}'));
      assert.equal(await reads(), '{"v":2}', 'a device key change is read at once');
    } finally {
      await store.close();
    }
  });

  test('a process reads its own writes at once, before their notification comes back', async () => {
    const { a } = await twoProcesses();
    await cachedIn(a, () => keyJson(a));
    await a.keys.transaction((tx) => tx.putDeviceKeys('@u:x', 'D', '{"v":3}'));
    assert.equal(await keyJson(a), '{"v":3}');
  });

  test('one-time-key claims are never answered from a cache', async () => {
    const { a, b } = await twoProcesses();
    await b.keys.transaction((tx) => tx.addOneTimeKeys('@u:x', 'D', [{ algorithm: 'signed_curve25519', keyId: 'K1', json: '{"key":"1"}' }]));
    await cachedIn(a, () => keyJson(a));
    const claim = [{ userId: '@u:x', deviceId: 'D', algorithm: 'signed_curve25519' }];
    const [first, second] = await Promise.all([a.keys.claimKeys(claim), b.keys.claimKeys(claim)]);
    assert.equal(first.length + second.length, 1, 'the one key goes to one claimer');
    assert.deepEqual(await a.keys.claimKeys(claim), []);
  });

  test('when the notification connection is cut, caches are dropped and answers stay right, and caching comes back with the connection', async () => {
    const { a, b, schema } = await twoProcesses();
    await cachedIn(a, () => keyJson(a));
    const ofThisDatabase = `FROM pg_stat_activity WHERE application_name = '${LISTENER_NAME} (${schema})'`;
    const listeners = async () => Number((await admin().query<{ n: string }>(`SELECT COUNT(*) AS n ${ofThisDatabase}`)).rows[0]!.n);
    await eventually('both listeners are connected', async () => (await listeners()) === 2);
    const cut = await admin().query(`SELECT pg_terminate_backend(pid) ${ofThisDatabase}`);
    assert.equal(cut.rowCount, 2, 'both listeners were cut');
    // Right away, before anyone could have been told: B changes the keys, A must not miss it.
    await b.keys.transaction((tx) => tx.putDeviceKeys('@u:x', 'D', '{"v":4}'));
    await sleep(BOUND_MS);
    assert.equal(await keyJson(a), '{"v":4}');
    await eventually('the listeners are back', async () => (await listeners()) === 2);
    await cachedIn(a, () => keyJson(a));
    await b.keys.transaction((tx) => tx.putDeviceKeys('@u:x', 'D', '{"v":5}'));
    await sleep(BOUND_MS);
    assert.equal(await keyJson(a), '{"v":5}', 'and the cache, in use again, hears of changes again');
  });

  test('every table either notifies the read caches of changes or is one no cache reads', async () => {
    const { schema } = await twoProcesses();
    const rows = (
      await admin().query<{ table_name: string; notifies: boolean }>(
        `SELECT c.relname AS table_name, EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = 'mxkeys_notify_change') AS notifies
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r' ORDER BY 1`,
        [schema],
      )
    ).rows;
    const notifying = rows.filter((r) => r.notifies).map((r) => r.table_name);
    const silent = rows.filter((r) => !r.notifies).map((r) => r.table_name);
    assert.deepEqual(notifying, ['access_tokens', 'devices', 'e2e_cross_signing_keys', 'e2e_cross_signing_signatures', 'e2e_device_keys', 'users']);
    // A new table: if a cached read (read-cache.ts users, the query-answer cache) reads it, give it
    // the mxkeys_notify_change trigger in a migration; otherwise add it here.
    assert.deepEqual(silent, [
      'device_federation_inbox',
      'device_federation_outbox',
      'device_inbox',
      'device_list_outbound_last_sent',
      'device_list_outbound_pokes',
      'device_list_subscriptions',
      'device_lists_stream',
      'e2e_fallback_keys',
      'e2e_one_time_key_counts',
      'e2e_one_time_keys',
      'e2e_room_keys',
      'e2e_room_keys_versions',
      'e2e_tracked_users',
      'federation_destinations',
      'federation_inbound_transactions',
      'leases',
      'mxkeys_schema',
      'mxkeys_server',
      'registration_nonces',
      'remote_cross_signing_keys',
      'remote_device_lists',
      'remote_devices',
      'server_key_responses',
      'server_signing_keys',
      'to_device_txns',
      'uia_sessions',
    ]);
  });
});
