/**
 * The settings every PostgreSQL connection of a process starts with (driver.ts, withoutJit).
 */
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { PostgresDatabase, withoutJit } from '../../src/storage/postgres/driver.js';
import { POSTGRES_URL, backends } from '../support/backends.js';

describe('PostgreSQL connections', () => {
  test('JIT compilation is switched off, after the startup options the connection string already gives', () => {
    const url = new URL(withoutJit('postgres://u:p%40ss@db.example:5433/keys?options=-c%20search_path%3Dmx&sslmode=require'));
    assert.equal(url.searchParams.get('options'), '-c search_path=mx -c jit=off');
    assert.equal(url.searchParams.get('sslmode'), 'require');
    assert.equal(url.password, 'p%40ss');
    assert.equal(url.pathname, '/keys');
    assert.equal(new URL(withoutJit('postgres://db.example/keys')).searchParams.get('options'), '-c jit=off');
  });

  describe('on a real server', { skip: POSTGRES_URL ? false : 'MXKEYS_TEST_POSTGRES is not set' }, () => {
    const databases: PostgresDatabase[] = [];
    after(async () => {
      for (const d of databases) await d.close();
    });

    test('every connection of the pool runs without JIT and in the schema its connection string names', async () => {
      const config = await backends.find((b) => b.name === 'postgres')!.freshDatabase();
      const schema = new URL(config.postgres!).searchParams.get('options')!.replace('-c search_path=', '');
      const db = new PostgresDatabase({ connectionString: config.postgres!, poolSize: 3 });
      databases.push(db);
      const rows = await Promise.all(
        Array.from({ length: 6 }, () => db.get<{ jit: string; schema: string }>(`SELECT current_setting('jit') AS jit, current_schema() AS schema, pg_sleep(0.05)::text`)),
      );
      for (const r of rows) assert.deepEqual({ jit: r!.jit, schema: r!.schema }, { jit: 'off', schema });
    });
  });
});
