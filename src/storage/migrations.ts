/**
 * Numbered schema migrations, one list per backend (storage/sqlite/migrations.ts and
 * storage/postgres/migrations.ts, declaring the same versions). Each migration runs in its own
 * transaction and is recorded in `mxkeys_schema`; a database whose schema is newer than this code
 * is refused, since this code would not know how to use it.
 */
import type { SqlDatabase } from './sql.js';

export interface Migration {
  readonly version: number;
  readonly name: string;
  readonly sql: string;
}

export class SchemaTooNewError extends Error {
  constructor(readonly databaseVersion: number, readonly codeVersion: number) {
    super(
      `the database schema is at version ${databaseVersion}, but this mxkeys only knows versions up to ${codeVersion}; ` +
        'it was written by a newer mxkeys. Run that newer version, or restore a backup taken before the upgrade.',
    );
    this.name = 'SchemaTooNewError';
  }
}

const SCHEMA_TABLE = `CREATE TABLE IF NOT EXISTS mxkeys_schema (
  version INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  applied_ts BIGINT NOT NULL
)`;

export async function schemaVersion(db: SqlDatabase): Promise<number> {
  await db.exec(SCHEMA_TABLE);
  const row = await db.get<{ v: number | null }>('SELECT MAX(version) AS v FROM mxkeys_schema');
  return row?.v ?? 0;
}

export interface MigrationResult {
  readonly from: number;
  readonly to: number;
  readonly applied: readonly Migration[];
}

/** Applies every migration newer than the database's version. Safe to run from several processes at once. */
export async function migrate(db: SqlDatabase, migrations: readonly Migration[]): Promise<MigrationResult> {
  const latest = migrations.reduce((max, m) => Math.max(max, m.version), 0);
  return db.withExclusiveLock(async () => {
    const from = await schemaVersion(db);
    if (from > latest) throw new SchemaTooNewError(from, latest);
    const applied: Migration[] = [];
    for (const m of [...migrations].sort((a, b) => a.version - b.version)) {
      if (m.version <= from) continue;
      await db.transaction(async (tx) => {
        // Checked again inside the transaction: another process may have applied it meanwhile.
        const done = await tx.get('SELECT version FROM mxkeys_schema WHERE version = ?', [m.version]);
        if (done) return;
        await tx.exec(m.sql);
        await tx.run('INSERT INTO mxkeys_schema (version, name, applied_ts) VALUES (?, ?, ?)', [m.version, m.name, Date.now()]);
        applied.push(m);
      });
    }
    return { from, to: Math.max(from, latest), applied };
  });
}

/** Refuses to run on a schema newer than the code, without changing anything. */
export async function assertSchemaNotNewer(db: SqlDatabase, migrations: readonly Migration[]): Promise<number> {
  const latest = migrations.reduce((max, m) => Math.max(max, m.version), 0);
  const v = await schemaVersion(db);
  if (v > latest) throw new SchemaTooNewError(v, latest);
  return v;
}
