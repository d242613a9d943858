/**
 * One test body, both databases. SQLite always; PostgreSQL when MXKEYS_TEST_POSTGRES holds a
 * connection URL (e.g. postgres://postgres@127.0.0.1/postgres). Every call to freshDatabase() gets
 * an empty database of its own: a new SQLite file, or a new PostgreSQL schema, dropped afterwards.
 */
import { describe, after, type TestContext } from 'node:test';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import type { DatabaseConfig } from '../../src/storage/index.js';

export const POSTGRES_URL = process.env['MXKEYS_TEST_POSTGRES'] || undefined;

export interface Backend {
  readonly name: 'sqlite' | 'postgres';
  /** A database nobody else uses, removed when the test (or the file's tests) end. */
  freshDatabase(t?: TestContext): Promise<DatabaseConfig>;
  /**
   * Waits until a change one process committed counts in every other process's answers: at once
   * on SQLite; on PostgreSQL, the read caches' staleness bound (database.cache_staleness_bound).
   */
  settle(): Promise<void>;
}

/** database.cache_staleness_bound's default, which the servers of the tests keep. */
export const CACHE_STALENESS_BOUND_MS = 500;

const tempDirs: string[] = [];
let adminPool: pg.Pool | undefined;
const schemas: string[] = [];

export function tempDir(prefix = 'mxkeys-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  tempDirs.push(dir);
  return dir;
}

after(async () => {
  for (const dir of tempDirs.splice(0)) rmSync(dir, { recursive: true, force: true });
  if (adminPool) {
    for (const s of schemas.splice(0)) await adminPool.query(`DROP SCHEMA IF EXISTS ${s} CASCADE`).catch(() => undefined);
    await adminPool.end();
    adminPool = undefined;
  }
});

const sqlite: Backend = {
  name: 'sqlite',
  async freshDatabase() {
    return { sqlite: join(tempDir(), 'mxkeys.db') };
  },
  settle: async () => undefined,
};

/** A connection URL whose sessions use `schema` for everything. */
export function postgresUrlWithSchema(base: string, schema: string): string {
  const url = new URL(base);
  url.searchParams.set('options', `-c search_path=${schema}`);
  return url.toString();
}

const postgres: Backend = {
  name: 'postgres',
  async freshDatabase() {
    if (!POSTGRES_URL) throw new Error('MXKEYS_TEST_POSTGRES is not set');
    adminPool ??= new pg.Pool({ connectionString: POSTGRES_URL, max: 2 });
    const schema = `mxt_${randomBytes(6).toString('hex')}`;
    await adminPool.query(`CREATE SCHEMA ${schema}`);
    schemas.push(schema);
    return { postgres: postgresUrlWithSchema(POSTGRES_URL, schema), pool_size: 10 };
  },
  settle: () => new Promise((resolve) => setTimeout(resolve, CACHE_STALENESS_BOUND_MS)),
};

export const backends: readonly Backend[] = POSTGRES_URL ? [sqlite, postgres] : [sqlite];

/** Runs `body` once per available backend, inside a suite named `<title> [<backend>]`. */
export function describeEachBackend(title: string, body: (backend: Backend) => void): void {
  for (const backend of backends) describe(`${title} [${backend.name}]`, () => body(backend));
}
