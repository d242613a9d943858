import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import { SqliteDatabase } from '../../src/storage/sqlite/driver.js';
import { ReadCache } from '../../src/storage/read-cache.js';
import { tempDir } from '../support/backends.js';

/** Lets the current run of the job queue end, so a generation check is not reused. */
const nextRun = () => new Promise((resolve) => setImmediate(resolve));

describe('the SQLite data generation', () => {
  const open: SqliteDatabase[] = [];
  const database = (path: string) => {
    const db = new SqliteDatabase({ path });
    open.push(db);
    return db;
  };
  after(async () => {
    for (const db of open) await db.close();
  });
  /** Two connections to one new file with a table `t`, the first run after its creation begun. */
  const twoConnections = async () => {
    const path = join(tempDir(), 'shared.db');
    const writer = database(path);
    const reader = database(path);
    await writer.exec('CREATE TABLE t (x INTEGER)');
    await nextRun();
    return { writer, reader };
  };

  test('moves on when another connection commits, and not for reads', async () => {
    const { writer, reader } = await twoConnections();
    const g0 = reader.dataGeneration();
    await reader.all('SELECT * FROM t');
    await writer.all('SELECT * FROM t');
    await nextRun();
    assert.equal(reader.dataGeneration(), g0, 'reads by anyone leave it alone');
    await writer.run('INSERT INTO t VALUES (1)');
    await nextRun();
    const g1 = reader.dataGeneration();
    assert.notEqual(g1, g0, "the other connection's commit is noticed");
    await writer.transaction(async (tx) => {
      await tx.run('INSERT INTO t VALUES (2)');
      await tx.run('INSERT INTO t VALUES (3)');
    });
    await nextRun();
    assert.notEqual(reader.dataGeneration(), g1, 'so is a transaction of several statements');
  });

  test("moves on at once with this connection's own writes", async () => {
    const db = database(join(tempDir(), 'own.db'));
    await db.exec('CREATE TABLE t (x INTEGER)');
    const g0 = db.dataGeneration();
    await db.run('INSERT INTO t VALUES (1)');
    assert.notEqual(db.dataGeneration(), g0, 'no need to wait for the next run');
    const g1 = db.dataGeneration();
    await db.all('DELETE FROM t RETURNING x');
    assert.notEqual(db.dataGeneration(), g1, 'a write that returns rows counts too');
  });

  test("this connection's claims (writes to one-time-key tables only) leave it alone; another connection's do not", async () => {
    const path = join(tempDir(), 'claims.db');
    const own = database(path);
    const other = database(path);
    await own.exec('CREATE TABLE e2e_one_time_keys (id INTEGER PRIMARY KEY, k TEXT); CREATE TABLE t (x INTEGER)');
    await own.run("INSERT INTO e2e_one_time_keys (k) VALUES ('a'), ('b'), ('c'), ('d')");
    await nextRun();
    const g0 = own.dataGeneration();
    await own.all('DELETE FROM e2e_one_time_keys WHERE id = (SELECT min(id) FROM e2e_one_time_keys) RETURNING k');
    await own.transaction(async (tx) => {
      await tx.all('DELETE FROM e2e_one_time_keys WHERE id = (SELECT min(id) FROM e2e_one_time_keys) RETURNING k');
    });
    assert.equal(own.dataGeneration(), g0, 'at once');
    await nextRun();
    assert.equal(own.dataGeneration(), g0, 'nor in the next run, though the wal-index header moved');
    // Our claim and another connection's commit between two looks: the other is still seen.
    await own.all('DELETE FROM e2e_one_time_keys WHERE id = (SELECT min(id) FROM e2e_one_time_keys) RETURNING k');
    await other.run('INSERT INTO t VALUES (1)');
    await nextRun();
    const g1 = own.dataGeneration();
    assert.notEqual(g1, g0, "the other connection's commit is noticed");
    await other.all('DELETE FROM e2e_one_time_keys WHERE id = (SELECT min(id) FROM e2e_one_time_keys) RETURNING k');
    await nextRun();
    assert.notEqual(own.dataGeneration(), g1, "another connection's claim counts as a change: this one cannot tell what it wrote");
    const g2 = own.dataGeneration();
    await own.run('INSERT INTO t VALUES (2)');
    assert.notEqual(own.dataGeneration(), g2, 'a write to any other table moves it at once');
  });

  test('looks at other connections once per run of the job queue, then again in the next', async () => {
    const { writer, reader } = await twoConnections();
    const g0 = reader.dataGeneration();
    // Another process's commit arriving while this run goes on (simulated by a second connection,
    // whose statement runs at once; its answer waits for the WAL flush, in a later run).
    const written = writer.run('INSERT INTO t VALUES (1)');
    assert.equal(reader.dataGeneration(), g0, 'within the run the first look stands');
    await written;
    await nextRun();
    assert.notEqual(reader.dataGeneration(), g0, 'the next run sees the commit');
  });

  test('works without a -shm file to read, through PRAGMA data_version', async () => {
    const db = database(':memory:');
    await db.exec('CREATE TABLE t (x INTEGER)');
    await nextRun();
    const g0 = db.dataGeneration();
    await nextRun();
    assert.equal(db.dataGeneration(), g0);
    await db.run('INSERT INTO t VALUES (1)');
    assert.notEqual(db.dataGeneration(), g0);
  });

  test('a file that is not a database is refused as before, not mistaken for a wal-index', async () => {
    const path = join(tempDir(), 'junk.db');
    writeFileSync(path, 'this is not an SQLite database, just some text that is long enough to have a header');
    assert.throws(() => database(path), /not a database|file is not a database/i);
  });
});

describe('ReadCache', () => {
  test('serves a value until the generation moves on, then reads again', async () => {
    let generation = 1;
    let reads = 0;
    const cache = new ReadCache<string>(() => generation);
    const read = async () => `v${++reads}`;
    assert.equal(await cache.get('k', read), 'v1');
    assert.equal(await cache.get('k', read), 'v1');
    generation++;
    assert.equal(await cache.get('k', read), 'v2');
    assert.equal(reads, 2);
  });

  test('does not keep undefined (nothing found is looked up again)', async () => {
    let reads = 0;
    const cache = new ReadCache<string>(() => 1);
    await cache.get('k', async () => (reads++, undefined));
    await cache.get('k', async () => (reads++, undefined));
    assert.equal(reads, 2);
  });

  test('a value read while another caller already saw a newer generation is not kept', async () => {
    let generation = 1;
    const cache = new ReadCache<string>(() => generation);
    let finishSlowRead!: (v: string) => void;
    const slow = cache.get('k', () => new Promise<string>((resolve) => (finishSlowRead = resolve)));
    generation++;
    assert.equal(await cache.get('other', async () => 'x'), 'x');
    finishSlowRead('old');
    assert.equal(await slow, 'old');
    assert.equal(await cache.get('k', async () => 'new'), 'new', 'the old value was not kept for the new generation');
  });

  test('getMany reads only the missing keys, in one read', async () => {
    const cache = new ReadCache<string>(() => 1);
    const asked: string[][] = [];
    const readMany = async (missing: string[]) => (asked.push(missing), new Map(missing.map((k) => [k, k.toUpperCase()])));
    assert.deepEqual([...(await cache.getMany(['a', 'b'], readMany))], [['a', 'A'], ['b', 'B']]);
    assert.deepEqual([...(await cache.getMany(['a', 'c'], readMany)).entries()].sort(), [['a', 'A'], ['c', 'C']]);
    assert.deepEqual(asked, [['a', 'b'], ['c']]);
  });

  test('stays within its size by starting over', async () => {
    let reads = 0;
    const cache = new ReadCache<number>(() => 1, { maxEntries: 2 });
    for (const k of ['a', 'b', 'c']) await cache.get(k, async () => ++reads);
    await cache.get('a', async () => ++reads);
    assert.equal(reads, 4, '"a" was dropped when the cache was full');
  });

  test('stays within its bytes, as its size function counts them, by starting over', async () => {
    const reads: string[] = [];
    const cache = new ReadCache<string>(() => 1, { maxBytes: 10, sizeOf: (v) => v.length });
    const read = (v: string) => async () => (reads.push(v), v);
    await cache.get('a', read('aaaa'));
    await cache.get('b', read('bbbbbb'));
    await cache.get('a', read('aaaa'));
    assert.deepEqual(reads, ['aaaa', 'bbbbbb'], '4 + 6 bytes fit');
    await cache.get('c', read('c'));
    await cache.get('a', read('aaaa'));
    assert.deepEqual(reads, ['aaaa', 'bbbbbb', 'c', 'aaaa'], 'one more byte did not: "a" was dropped');
  });
});
