/**
 * Bulk data for the load harness, written straight into mxkeys' tables while no mxkeys process
 * runs: copies of users made over HTTP (with their devices, device keys, fallback keys and
 * cross-signing keys and signatures) under new user IDs, and one-time keys for many devices at
 * once. The database generates the rows itself (a recursive CTE on SQLite, generate_series on
 * PostgreSQL), so a hundred thousand devices or a million keys take seconds, against many minutes
 * over HTTP (registration alone is rate-limited per client address).
 *
 * Copies take every column of the original rows, with the original user ID replaced by the new
 * one in every text column (the IDs inside the stored JSON included): the same size and shape as
 * real rows. Their signatures are not valid for the new IDs; nothing on the measured paths checks
 * stored keys again.
 */
import Database from 'better-sqlite3';
import pg from 'pg';

/** The tables holding a user's data that key queries and claims read, and the column naming the user. */
const USER_TABLES: readonly (readonly [table: string, userColumn: string])[] = [
  ['users', 'user_id'],
  ['devices', 'user_id'],
  ['e2e_device_keys', 'user_id'],
  ['e2e_fallback_keys', 'user_id'],
  ['e2e_cross_signing_keys', 'user_id'],
  ['e2e_cross_signing_signatures', 'target_user_id'],
];

interface Column {
  readonly name: string;
  readonly text: boolean;
  /** Filled by the database (an autoincrement key): left out of copies. */
  readonly generated: boolean;
}

/** SQL written once for both databases: parameters $1…$n, CAST for types. */
export interface BulkDb {
  readonly kind: 'sqlite' | 'postgres';
  columns(table: string): Promise<Column[]>;
  run(sql: string, params: readonly unknown[]): Promise<number>;
  all<T>(sql: string, params: readonly unknown[]): Promise<T[]>;
  /** FROM-clause item: the integers 0 … count − 1 as `s(i)`. */
  series(count: string): string;
  /** `expr` as a decimal string of at least `width` digits. */
  pad(expr: string, width: number): string;
  transaction(fn: () => Promise<void>): Promise<void>;
  close(): Promise<void>;
}

/** Column lists are read once per table. */
function cachedColumns(read: (table: string) => Promise<Column[]>): (table: string) => Promise<Column[]> {
  const seen = new Map<string, Promise<Column[]>>();
  return (table) => {
    let c = seen.get(table);
    if (!c) seen.set(table, (c = read(table)));
    return c;
  };
}

function sqliteDb(file: string): BulkDb {
  const db = new Database(file, { fileMustExist: true });
  db.pragma('busy_timeout = 10000');
  const bind = (params: readonly unknown[]) => Object.fromEntries(params.map((p, i) => [String(i + 1), p]));
  return {
    kind: 'sqlite',
    columns: cachedColumns(async (table) => {
      const rows = db.prepare(`PRAGMA table_info(${table})`).all() as { name: string; type: string; pk: number }[];
      return rows.map((r) => ({ name: r.name, text: /TEXT|CHAR/i.test(r.type), generated: r.pk === 1 && /^INTEGER$/i.test(r.type) && rows.filter((x) => x.pk > 0).length === 1 }));
    }),
    async run(sql, params) {
      return db.prepare(sql).run(bind(params)).changes;
    },
    async all<T>(sql: string, params: readonly unknown[]) {
      return db.prepare(sql).all(bind(params)) as T[];
    },
    series: (count) => `(WITH RECURSIVE r(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM r WHERE i + 1 < ${count}) SELECT i FROM r) AS s`,
    pad: (expr, width) => `printf('%0${width}d', ${expr})`,
    async transaction(fn) {
      db.exec('BEGIN');
      try {
        await fn();
        db.exec('COMMIT');
      } catch (e) {
        db.exec('ROLLBACK');
        throw e;
      }
    },
    async close() {
      db.pragma('wal_checkpoint(TRUNCATE)');
      db.close();
    },
  };
}

async function postgresDb(url: string): Promise<BulkDb> {
  const db = new pg.Client({ connectionString: url });
  // A terminated connection fails the statement in progress; without a listener it would end the process.
  db.on('error', () => undefined);
  await db.connect();
  return {
    kind: 'postgres',
    columns: cachedColumns(async (table) => {
      const r = await db.query<{ column_name: string; data_type: string; column_default: string | null; is_identity: string }>(
        'SELECT column_name, data_type, column_default, is_identity FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position',
        [table],
      );
      return r.rows.map((c) => ({ name: c.column_name, text: /text|char/i.test(c.data_type), generated: c.is_identity === 'YES' || (c.column_default ?? '').startsWith('nextval(') }));
    }),
    async run(sql, params) {
      return (await db.query(sql, [...params])).rowCount ?? 0;
    },
    async all<T>(sql: string, params: readonly unknown[]) {
      return (await db.query(sql, [...params])).rows as T[];
    },
    series: (count) => `generate_series(0, ${count} - 1) AS s(i)`,
    pad: (expr, width) => `lpad((${expr})::text, ${width}, '0')`,
    async transaction(fn) {
      await db.query('BEGIN');
      try {
        await fn();
        await db.query('COMMIT');
      } catch (e) {
        await db.query('ROLLBACK').catch(() => undefined);
        throw e;
      }
    },
    async close() {
      // What autovacuum would soon do after such a load: statistics for the planner.
      await db.query('ANALYZE');
      await db.end();
    },
  };
}

export function openBulk(database: { sqlite: string } | { postgres: string }): Promise<BulkDb> {
  return 'sqlite' in database ? Promise.resolve(sqliteDb(database.sqlite)) : postgresDb(database.postgres);
}

/** New user IDs `prefix` + number (zero-padded to `width`) + `suffix`, number = i × stride + offset for i = 0 … count − 1. */
export interface CloneIds {
  readonly prefix: string;
  readonly width: number;
  readonly suffix: string;
  readonly count: number;
  readonly stride: number;
  readonly offset: number;
}

/** Copies everything of `template` (USER_TABLES) `ids.count` times under new user IDs. Returns rows written. */
export async function cloneUser(db: BulkDb, template: string, ids: CloneIds): Promise<number> {
  const newId = `CAST($2 AS TEXT) || ${db.pad('s.i * CAST($4 AS INTEGER) + CAST($5 AS INTEGER)', ids.width)} || CAST($3 AS TEXT)`;
  let rows = 0;
  for (const [table, userColumn] of USER_TABLES) {
    const columns = (await db.columns(table)).filter((c) => !c.generated);
    if (!columns.some((c) => c.name === userColumn)) throw new Error(`bench/bulk.ts: table ${table} has no column ${userColumn}; the schema changed, update USER_TABLES`);
    const select = columns.map((c) => (c.text ? `replace(t.${c.name}, CAST($1 AS TEXT), ${newId})` : `t.${c.name}`));
    rows += await db.run(
      `INSERT INTO ${table} (${columns.map((c) => c.name).join(', ')}) SELECT ${select.join(', ')} FROM ${table} t, ${db.series('CAST($6 AS INTEGER)')} WHERE t.${userColumn} = CAST($1 AS TEXT)`,
      [template, ids.prefix, ids.suffix, ids.stride, ids.offset, ids.count],
    );
  }
  return rows;
}

/** A stored one-time key's JSON and its `key`, the model for generated keys. */
export async function oneTimeKeyTemplate(db: BulkDb): Promise<{ json: string; key: string }> {
  const [row] = await db.all<{ key_json: string }>("SELECT key_json FROM e2e_one_time_keys WHERE algorithm = 'signed_curve25519' LIMIT 1", []);
  if (!row) throw new Error('no stored one-time key to use as the model of generated ones');
  const key = (JSON.parse(row.key_json) as { key?: unknown }).key;
  if (typeof key !== 'string') throw new Error(`a stored one-time key without a "key": ${row.key_json.slice(0, 200)}`);
  return { json: row.key_json, key };
}

/**
 * `perDevice` signed_curve25519 one-time keys for every device of the users whose IDs start with
 * `userPrefix`, each with its own key ID and key. Returns the keys written.
 */
export async function addOneTimeKeys(db: BulkDb, userPrefix: string, perDevice: number): Promise<number> {
  const model = await oneTimeKeyTemplate(db);
  // A distinct key per row: the key's number, the device ID and the user ID's letters and digits, padded to the model's length.
  const key = `substr(${db.pad('s.i', 4)} || d.device_id || replace(replace(replace(d.user_id, '@', ''), ':', ''), '.', '') || CAST($4 AS TEXT), 1, ${model.key.length})`;
  return db.run(
    `INSERT INTO e2e_one_time_keys (user_id, device_id, algorithm, key_id, key_json, ts)
       SELECT d.user_id, d.device_id, 'signed_curve25519', 'BULK' || ${db.pad('s.i', 6)}, replace(CAST($2 AS TEXT), CAST($3 AS TEXT), ${key}), CAST($5 AS BIGINT)
       FROM devices d, ${db.series('CAST($6 AS INTEGER)')}
       WHERE d.user_id LIKE CAST($1 AS TEXT)`,
    [`${userPrefix}%`, model.json, model.key, 'A'.repeat(model.key.length), Date.now(), perDevice],
  );
}
