import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { migrateDatabase, openStore, postgresMigrations, SchemaTooNewError, sqliteMigrations } from '../../src/storage/index.js';
import { SqliteDatabase } from '../../src/storage/sqlite/driver.js';
import { PostgresDatabase } from '../../src/storage/postgres/driver.js';
import type { SqlDatabase } from '../../src/storage/sql.js';
import { migrate } from '../../src/storage/migrations.js';
import type { DatabaseConfig } from '../../src/storage/index.js';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../support/backends.js';

test('the SQLite and PostgreSQL migration sets declare the same versions', () => {
  const versions = (ms: readonly { version: number }[]) => ms.map((m) => m.version);
  assert.deepEqual(versions(sqliteMigrations), versions(postgresMigrations));
  assert.deepEqual(
    versions(sqliteMigrations),
    sqliteMigrations.map((_, i) => i + 1),
    'versions are numbered 1, 2, 3, … without gaps',
  );
  assert.deepEqual(sqliteMigrations.map((m) => m.name), postgresMigrations.map((m) => m.name));
});

function rawDatabase(config: DatabaseConfig): SqlDatabase {
  return config.postgres ? new PostgresDatabase({ connectionString: config.postgres }) : new SqliteDatabase({ path: config.sqlite! });
}

test('a new SQLite database, with its -wal and -shm files, is readable and writable by its owner only', async () => {
  const path = join(tempDir(), 'private', 'mxkeys.db');
  const store = await openStore({ sqlite: path });
  try {
    for (const file of [path, `${path}-wal`, `${path}-shm`]) assert.equal((statSync(file).mode & 0o777).toString(8), '600', file);
  } finally {
    await store.close();
  }
});

test('on SQLite a write is answered only once the WAL file holding it is flushed to disk, and writes made together share one flush', async () => {
  const db = new SqliteDatabase({ path: join(tempDir(), 'durable.db') });
  try {
    // SQLite itself no longer syncs inside COMMIT (NORMAL); the driver does, off the event loop.
    assert.equal(await db.get<{ synchronous: number }>('PRAGMA synchronous').then((r) => r?.synchronous), 1);
    await db.exec('CREATE TABLE t (n INTEGER)');
    const flushedWhenAnswered: boolean[] = [];
    const before = db.walSyncs;
    await Promise.all(
      Array.from({ length: 50 }, (_, n) =>
        db.run('INSERT INTO t (n) VALUES (?)', [n]).then(() => flushedWhenAnswered.push(db.walSyncs > before)),
      ),
    );
    assert.deepEqual(flushedWhenAnswered, new Array<boolean>(50).fill(true), 'every insert was answered after a flush');
    assert.ok(db.walSyncs - before < 50, `50 inserts made together shared flushes (${db.walSyncs - before} flushes)`);
    const inTransaction = db.walSyncs;
    await db.transaction(async (tx) => {
      await tx.run('INSERT INTO t (n) VALUES (?)', [50]);
      assert.equal(db.walSyncs, inTransaction, 'nothing is flushed before the commit');
    });
    assert.equal(db.walSyncs, inTransaction + 1, 'a transaction is answered after its commit is flushed');
    const reads = db.walSyncs;
    await db.all('SELECT n FROM t');
    await db.transaction((tx) => tx.all('SELECT n FROM t'));
    assert.equal(db.walSyncs, reads, 'reads flush nothing');
  } finally {
    await db.close();
  }
});

test('on SQLite the WAL is checkpointed by a worker thread, starts over instead of growing without end under constant writes, and loses nothing', async () => {
  const path = join(tempDir(), 'checkpoints.db');
  const db = new SqliteDatabase({ path });
  const page = 'x'.repeat(3000); // a row of its own on each 4 KiB page
  const rows = 24_000;
  try {
    assert.equal(await db.get<{ wal_autocheckpoint: number }>('PRAGMA wal_autocheckpoint').then((r) => r?.wal_autocheckpoint), 0, 'commits on the event loop never checkpoint');
    await db.exec('CREATE TABLE t (n INTEGER, filler TEXT)');
    // Writes keep coming while checkpoints run: 40 rows (pages) per commit, one after the other.
    for (let n = 0; n < rows; n += 40) {
      await db.transaction(async (tx) => {
        for (let i = n; i < n + 40; i++) await tx.run('INSERT INTO t (n, filler) VALUES (?, ?)', [i, page]);
      });
    }
    const { passes, finished } = db.checkpoints;
    assert.ok(passes >= 8, `the worker checkpointed as the WAL grew (${passes} passes)`);
    assert.ok(finished >= 1, `and the WAL started over (${finished} times)`);
    const walBytes = statSync(`${path}-wal`).size;
    assert.ok(walBytes < (rows * 4096) / 2, `the WAL file (${walBytes} bytes) stayed well under the ${rows * 4096} bytes written`);
  } finally {
    await db.close();
  }
  const reopened = new SqliteDatabase({ path });
  try {
    const r = await reopened.get<{ count: number; total: number }>('SELECT count(*) AS count, sum(n) AS total FROM t');
    assert.deepEqual(r, { count: rows, total: (rows * (rows - 1)) / 2 }, 'every row is there after closing and reopening');
  } finally {
    await reopened.close();
  }
});

const insertJson = "INSERT INTO server_key_responses (server_name, key_id, from_server, valid_until_ts, fetched_ts, key_json) VALUES (?, 'ed25519:k', ?, ?, ?, ?)";

describeEachBackend('storage', (backend) => {
  test('opening a fresh database applies every migration and records it', async () => {
    const config = await backend.freshDatabase();
    const store = await openStore(config);
    await store.close();
    const db = rawDatabase(config);
    try {
      const rows = await db.all<{ version: number }>('SELECT version FROM mxkeys_schema ORDER BY version');
      assert.deepEqual(rows.map((r) => r.version), sqliteMigrations.map((m) => m.version));
    } finally {
      await db.close();
    }
  });

  test('migrating twice changes nothing the second time', async () => {
    const config = await backend.freshDatabase();
    const first = await migrateDatabase(config);
    assert.equal(first.from, 0);
    assert.equal(first.applied.length, sqliteMigrations.length);
    const second = await migrateDatabase(config);
    assert.equal(second.applied.length, 0);
    assert.equal(second.from, second.to);
  });

  test('concurrent migrations from several connections apply each version once', async () => {
    const config = await backend.freshDatabase();
    const results = await Promise.all([migrateDatabase(config), migrateDatabase(config), migrateDatabase(config)]);
    assert.equal(results.reduce((n, r) => n + r.applied.length, 0), sqliteMigrations.length);
  });

  test('the server refuses a schema newer than the code, and says so', async () => {
    const config = await backend.freshDatabase();
    await migrateDatabase(config);
    const db = rawDatabase(config);
    await db.run('INSERT INTO mxkeys_schema (version, name, applied_ts) VALUES (?, ?, ?)', [999, 'from the future', Date.now()]);
    await db.close();
    await assert.rejects(openStore(config), (e: unknown) => e instanceof SchemaTooNewError && /version 999/.test(e.message) && /newer mxkeys/.test(e.message));
    await assert.rejects(openStore(config, { migrate: false }), SchemaTooNewError);
  });

  test('a failed transaction leaves nothing behind', async () => {
    const config = await backend.freshDatabase();
    await migrateDatabase(config);
    const db = rawDatabase(config);
    try {
      await assert.rejects(
        db.transaction(async (tx) => {
          await tx.run(insertJson, ['a.example', 'a.example', 1, 1, '{}']);
          throw new Error('boom');
        }),
        /boom/,
      );
      assert.equal((await db.all('SELECT * FROM server_key_responses')).length, 0);
    } finally {
      await db.close();
    }
  });

  test('statements from other requests never see or join an open transaction', async () => {
    const config = await backend.freshDatabase();
    await migrateDatabase(config);
    const db = rawDatabase(config);
    try {
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      const tx = db.transaction(async (t) => {
        await t.run(insertJson, ['b.example', 'b.example', 1, 1, '{}']);
        await gate;
        throw new Error('rolled back');
      });
      await new Promise((r) => setTimeout(r, 20));
      // Issued while the transaction is open; must neither see its row nor be rolled back with it.
      const read = db.all<{ server_name: string }>('SELECT server_name FROM server_key_responses');
      const write = db.run(insertJson, ['c.example', 'c.example', 1, 1, '{}']);
      await new Promise((r) => setTimeout(r, 20));
      release();
      await assert.rejects(tx, /rolled back/);
      assert.ok(!(await read).some((r) => r.server_name === 'b.example'), 'the uncommitted row was visible outside its transaction');
      assert.equal(await write, 1);
      const names = (await db.all<{ server_name: string }>('SELECT server_name FROM server_key_responses')).map((r) => r.server_name);
      assert.deepEqual(names, ['c.example']);
    } finally {
      await db.close();
    }
  });

  test('a write issued at any moment around the start of a failing transaction is never rolled back with it', async () => {
    const config = await backend.freshDatabase();
    await migrateDatabase(config);
    const db = rawDatabase(config);
    try {
      // The outside write is issued after 0, 1, 2, … microtask turns, so it lands at every point
      // of the transaction's start-up in one of the trials.
      for (let depth = 0; depth < 12; depth++) {
        const tx = db.transaction(async (t) => {
          await t.run(insertJson, [`tx${depth}.example`, 'x', 1, 1, '{}']);
          throw new Error('rolled back');
        });
        let turn: Promise<unknown> = Promise.resolve();
        for (let i = 0; i < depth; i++) turn = turn.then(() => undefined);
        const outside = turn.then(() => db.run(insertJson, [`out${depth}.example`, 'x', 1, 1, '{}']));
        await assert.rejects(tx, /rolled back/);
        assert.equal(await outside, 1);
      }
      const names = new Set((await db.all<{ server_name: string }>('SELECT server_name FROM server_key_responses')).map((r) => r.server_name));
      for (let depth = 0; depth < 12; depth++) {
        assert.ok(names.has(`out${depth}.example`), `the write issued after ${depth} microtask turns was lost`);
        assert.ok(!names.has(`tx${depth}.example`));
      }
    } finally {
      await db.close();
    }
  });

  test('the per-key server key responses migration keeps the stored response of each server for each of its current keys', async () => {
    const config = await backend.freshDatabase();
    const db = rawDatabase(config);
    const all = config.postgres ? postgresMigrations : sqliteMigrations;
    try {
      const perKey = all.find((m) => m.sql.includes('CREATE TABLE server_key_responses'))!.version;
      await migrate(db, all.filter((m) => m.version < perKey));
      await db.run('INSERT INTO server_keys_json (server_name, from_server, valid_until_ts, fetched_ts, key_json) VALUES (?, ?, ?, ?, ?)', ['r.example', 'r.example', 100, 10, '{"v":1}']);
      for (const [keyId, expired] of [['ed25519:a', null], ['ed25519:b', null], ['ed25519:old', 5]] as const) {
        await db.run('INSERT INTO server_signing_keys (server_name, key_id, verify_key, valid_until_ts, expired_ts, fetched_ts) VALUES (?, ?, ?, ?, ?, ?)', ['r.example', keyId, 'AAAA', 100, expired, 10]);
      }
      await migrate(db, all);
      const rows = await db.all<{ key_id: string; key_json: string; valid_until_ts: number }>('SELECT key_id, key_json, valid_until_ts FROM server_key_responses ORDER BY key_id');
      assert.deepEqual(rows.map((r) => [r.key_id, r.key_json, Number(r.valid_until_ts)]), [
        ['ed25519:a', '{"v":1}', 100],
        ['ed25519:b', '{"v":1}', 100],
      ]);
    } finally {
      await db.close();
    }
  });

  test('the key backup size migration counts the bytes of session data each existing version holds', async () => {
    const config = await backend.freshDatabase();
    const db = rawDatabase(config);
    const all = config.postgres ? postgresMigrations : sqliteMigrations;
    try {
      const sized = all.find((m) => m.sql.includes('ADD COLUMN key_bytes'))!.version;
      await migrate(db, all.filter((m) => m.version < sized));
      const insertVersion = 'INSERT INTO e2e_room_keys_versions (user_id, version, algorithm, auth_data, key_count, created_ts) VALUES (?, ?, ?, ?, ?, ?)';
      await db.run(insertVersion, ['@a:x', 1, 'alg', '{}', 2, 1]);
      await db.run(insertVersion, ['@a:x', 2, 'alg', '{}', 0, 1]);
      await db.run(insertVersion, ['@b:x', 1, 'alg', '{}', 1, 1]);
      const insertKey = 'INSERT INTO e2e_room_keys (user_id, version, room_id, session_id, first_message_index, forwarded_count, is_verified, session_data, ts) VALUES (?, ?, ?, ?, 0, 0, ?, ?, 1)';
      await db.run(insertKey, ['@a:x', 1, '!r:x', 's1', false, '{"c":"x"}']);
      await db.run(insertKey, ['@a:x', 1, '!r:x', 's2', false, '{"c":"é"}']);
      await db.run(insertKey, ['@b:x', 1, '!r:x', 's1', false, '{}']);
      await migrate(db, all);
      const rows = await db.all<{ user_id: string; version: number; key_bytes: number }>('SELECT user_id, version, key_bytes FROM e2e_room_keys_versions ORDER BY user_id, version');
      assert.deepEqual(rows.map((r) => [r.user_id, Number(r.version), Number(r.key_bytes)]), [
        ['@a:x', 1, 9 + Buffer.byteLength('{"c":"é"}')],
        ['@a:x', 2, 0],
        ['@b:x', 1, 2],
      ]);
    } finally {
      await db.close();
    }
  });

  test('devices with few one-time keys are counted from keys stored before the upgrade, then through uploads, claims and device deletion', async () => {
    const config = await backend.freshDatabase();
    const db = rawDatabase(config);
    const all = config.postgres ? postgresMigrations : sqliteMigrations;
    const counted = all.find((m) => m.sql.includes('CREATE TABLE e2e_one_time_key_counts'))!.version;
    const otk = "INSERT INTO e2e_one_time_keys (user_id, device_id, algorithm, key_id, key_json, ts) VALUES (?, ?, 'signed_curve25519', ?, '{}', 0)";
    try {
      await migrate(db, all.filter((m) => m.version < counted));
      // Before the upgrade: A has device keys and 3 one-time keys, B device keys only, C 2 one-time keys only.
      for (const d of ['A', 'B']) await db.run("INSERT INTO e2e_device_keys (user_id, device_id, key_json, ts) VALUES ('@u:x', ?, '{}', 0)", [d]);
      for (const [d, n] of [['A', 3], ['C', 2]] as const) for (let i = 0; i < n; i++) await db.run(otk, ['@u:x', d, `k${i}`]);
      await migrate(db, all);
    } finally {
      await db.close();
    }
    const store = await openStore(config);
    try {
      assert.deepEqual(await store.stats.devicesWithFewOneTimeKeys([1, 3, 10]), [1, 2, 3], 'fewer than 1: B; fewer than 3: B and C; fewer than 10: all three');

      assert.equal(await store.accounts.createUser({ userId: '@d:x', passwordHash: null, admin: false, createdTs: 0 }, { tokenHash: 'h', deviceId: 'D', displayName: null, ts: 0, ip: null }), true);
      await store.keys.transaction(async (tx) => {
        await tx.putDeviceKeys('@d:x', 'D', '{}');
        await tx.addOneTimeKeys('@d:x', 'D', Array.from({ length: 60 }, (_, i) => ({ algorithm: 'signed_curve25519', keyId: `AAAA${i}`, json: '{}' })));
      });
      assert.deepEqual(await store.stats.devicesWithFewOneTimeKeys([1, 10, 50]), [1, 3, 3], 'D, with 60 keys, is in no bucket');
      const claim = { userId: '@d:x', deviceId: 'D', algorithm: 'signed_curve25519' };
      // Claims naming D with other devices, concurrently (on PostgreSQL they lock the same rows).
      const claimed = await Promise.all(Array.from({ length: 15 }, () => store.keys.claimKeys([{ ...claim, userId: '@u:x', deviceId: 'A' }, claim, { ...claim, userId: '@u:x', deviceId: 'C' }])));
      assert.equal(claimed.flat().filter((k) => k.deviceId === 'D').length, 15);
      assert.deepEqual(await store.stats.devicesWithFewOneTimeKeys([1, 10, 50]), [3, 3, 4], '45 left on D; A and C are empty now');
      // Claims of one device each, concurrently (on PostgreSQL one statement each).
      const single = await Promise.all(Array.from({ length: 40 }, () => store.keys.claimKeys([claim])));
      assert.equal(new Set(single.flat().map((k) => k.keyId)).size, 40, '40 different keys');
      assert.deepEqual(await store.stats.devicesWithFewOneTimeKeys([1, 10, 50]), [3, 4, 4], '5 left on D');
      await store.accounts.deleteDevices('@d:x', ['D']);
      assert.deepEqual(await store.stats.devicesWithFewOneTimeKeys([1, 10, 50]), [3, 3, 3], 'a deleted device is no longer counted');
    } finally {
      await store.close();
    }
  });

  test('claims made together share out a device\'s last keys: each key once, oldest first, then its fallback key to the rest', async () => {
    const store = await openStore(await backend.freshDatabase());
    try {
      const alg = 'signed_curve25519';
      for (const d of ['A', 'B']) {
        await store.keys.transaction(async (tx) => {
          await tx.putDeviceKeys('@s:x', d, '{}');
          await tx.addOneTimeKeys('@s:x', d, [0, 1, 2].map((i) => ({ algorithm: alg, keyId: `${d}${i}`, json: `{"n":${i}}` })));
        });
      }
      await store.keys.transaction((tx) => tx.putFallbackKey('@s:x', 'A', { algorithm: alg, keyId: 'FA', json: '{"fallback":true}', used: false }));
      const a = { userId: '@s:x', deviceId: 'A', algorithm: alg };
      const b = { ...a, deviceId: 'B' };
      // Five claims in one turn of the event loop: they are done as one batch.
      const results = await Promise.all([[a], [a, b], [b, a], [a], [a, b]].map((c) => store.keys.claimKeys(c)));
      const ofA = results.map((r) => r.find((k) => k.deviceId === 'A')?.keyId);
      assert.deepEqual(ofA, ['A0', 'A1', 'A2', 'FA', 'FA'], "A's three keys in order, then its fallback key");
      const ofB = results.map((r) => r.find((k) => k.deviceId === 'B')?.keyId);
      assert.deepEqual(ofB, [undefined, 'B0', 'B1', undefined, 'B2']);
      assert.equal(results[3]!.find((k) => k.deviceId === 'A')!.fallback, true);
      assert.deepEqual(await store.keys.oneTimeKeyCounts('@s:x', 'A'), {});
      assert.deepEqual(await store.stats.devicesWithFewOneTimeKeys([1]), [2], 'both devices counted as out of keys');
    } finally {
      await store.close();
    }
  });

  test('a one-time key that becomes visible below the last one claimed is still handed out before the fallback key', async () => {
    const config = await backend.freshDatabase();
    const store = await openStore(config);
    const raw = rawDatabase(config);
    try {
      const alg = 'signed_curve25519';
      const claim = [{ userId: '@l:x', deviceId: 'L', algorithm: alg }];
      await store.keys.transaction(async (tx) => {
        await tx.putDeviceKeys('@l:x', 'L', '{}');
        await tx.putFallbackKey('@l:x', 'L', { algorithm: alg, keyId: 'F', json: '{}', used: false });
      });
      // A key whose upload committed late (ids are taken at insert) or whose claim rolled back:
      // taken out of the table while a newer key is claimed, then put back with its old id.
      const late = async (keyId: string, newer: string[], takeNewer: () => Promise<unknown>): Promise<void> => {
        await store.keys.transaction((tx) => tx.addOneTimeKeys('@l:x', 'L', [keyId, ...newer].map((k) => ({ algorithm: alg, keyId: k, json: '{}' }))));
        const row = (await raw.get<{ id: number; key_json: string; ts: number }>('SELECT id, key_json, ts FROM e2e_one_time_keys WHERE key_id = ?', [keyId]))!;
        await raw.run('DELETE FROM e2e_one_time_keys WHERE key_id = ?', [keyId]);
        await takeNewer();
        await raw.run('INSERT INTO e2e_one_time_keys (id, user_id, device_id, algorithm, key_id, key_json, ts) VALUES (?, ?, ?, ?, ?, ?, ?)', [row.id, '@l:x', 'L', alg, keyId, row.key_json, row.ts]);
      };
      const one = async () => (await store.keys.claimKeys(claim))[0]?.keyId;
      await late('late1', ['new1', 'new2'], async () => assert.equal(await one(), 'new1'));
      // PostgreSQL searches above the last key taken first (new2, late1), SQLite takes the oldest.
      const next = [await one(), await one(), await one()];
      assert.deepEqual([...next.slice(0, 2)].sort(), ['late1', 'new2'], 'one claim at a time: the key below the last one taken is still found');
      assert.equal(next[2], 'F');
      await late('late2', ['new3', 'new4'], async () => assert.equal(await one(), 'new3'));
      // Three claims in one turn of the event loop: one statement for all of them.
      const together = await Promise.all([claim, claim, claim].map((c) => store.keys.claimKeys(c)));
      assert.deepEqual(together.map((r) => r[0]?.keyId), ['late2', 'new4', 'F'], 'claims made together: the key above the last one taken, then the one below it');
    } finally {
      await raw.close();
      await store.close();
    }
  });

  test('a device deleted while keys are being uploaded to it leaves none of them behind', async () => {
    const store = await openStore(await backend.freshDatabase());
    try {
      assert.equal(await store.accounts.createUser({ userId: '@r:x', passwordHash: null, admin: false, createdTs: 0 }, { tokenHash: 'h', deviceId: 'R', displayName: null, ts: 0, ip: null }), true);
      let inside!: () => void;
      const uploading = new Promise<void>((resolve) => (inside = resolve));
      let finish!: () => void;
      const finished = new Promise<void>((resolve) => (finish = resolve));
      const upload = store.keys.transaction(async (tx) => {
        assert.equal(await tx.lockDevice('@r:x', 'R'), true);
        await tx.addOneTimeKeys('@r:x', 'R', [{ algorithm: 'signed_curve25519', keyId: 'orphan', json: '"x"' }]);
        inside();
        await finished;
      });
      await uploading;
      // The deletion starts while the upload is open; the upload then commits.
      const deletion = store.accounts.deleteDevices('@r:x', ['R']);
      await new Promise((r) => setTimeout(r, 50));
      finish();
      await upload;
      assert.deepEqual(await deletion, ['R']);
      assert.deepEqual(await store.keys.claimKeys([{ userId: '@r:x', deviceId: 'R', algorithm: 'signed_curve25519' }]), [], 'the uploaded key went with its device');
      assert.deepEqual(await store.stats.devicesWithFewOneTimeKeys([1000]), [0]);
    } finally {
      await store.close();
    }
  });

  test('server keys round-trip; a later response keeps old keys and their responses, but retires the current ones it no longer lists', async () => {
    const store = await openStore(await backend.freshDatabase());
    try {
      await store.serverKeys.storeServerKeys({
        serverName: 'remote.example',
        fromServer: 'remote.example',
        keyJson: '{"server_name":"remote.example"}',
        validUntilTs: 1000,
        fetchedTs: 10,
        keys: [
          { keyId: 'ed25519:a', verifyKey: 'AAAA', expiredTs: null },
          { keyId: 'ed25519:old', verifyKey: 'BBBB', expiredTs: 5 },
        ],
      });
      await store.serverKeys.storeServerKeys({
        serverName: 'remote.example',
        fromServer: 'notary.example',
        keyJson: '{"server_name":"remote.example","v":2}',
        validUntilTs: 2000,
        fetchedTs: 20,
        keys: [{ keyId: 'ed25519:b', verifyKey: 'CCCC', expiredTs: null }],
      });
      const keys = (await store.serverKeys.getServerKeys('remote.example')).sort((a, b) => a.keyId.localeCompare(b.keyId));
      assert.deepEqual(keys.map((k) => [k.keyId, k.verifyKey, k.validUntilTs, k.expiredTs]), [
        ['ed25519:a', 'AAAA', 1000, 20],
        ['ed25519:b', 'CCCC', 2000, null],
        ['ed25519:old', 'BBBB', 1000, 5],
      ]);
      // Each current key keeps the newest response that listed it: the first response still
      // vouches for ed25519:a, which the second no longer lists.
      const responses = (await store.serverKeys.getServerKeyResponses('remote.example')).sort((a, b) => a.keyId.localeCompare(b.keyId));
      assert.deepEqual(responses.map((r) => [r.keyId, r.fromServer, r.keyJson, r.validUntilTs, r.fetchedTs]), [
        ['ed25519:a', 'remote.example', '{"server_name":"remote.example"}', 1000, 10],
        ['ed25519:b', 'notary.example', '{"server_name":"remote.example","v":2}', 2000, 20],
      ]);
      assert.deepEqual(await store.serverKeys.getServerKeyResponses('unknown.example'), []);
    } finally {
      await store.close();
    }
  });
});
