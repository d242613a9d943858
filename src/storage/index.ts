/**
 * The one place a database backend is chosen: `openStore(config.database)`.
 */
import { SqliteDatabase } from './sqlite/driver.js';
import { PostgresDatabase } from './postgres/driver.js';
import { migrations as sqliteMigrations } from './sqlite/migrations.js';
import { migrations as postgresMigrations } from './postgres/migrations.js';
import { assertSchemaNotNewer, migrate, type Migration, type MigrationResult } from './migrations.js';
import type { SqlDatabase } from './sql.js';
import type { Store } from './store.js';
import { SqlServerKeysStore } from './server-keys.js';
import { SqlAccountsStore } from './accounts.js';
import { SqlDeviceListsStore } from './device-lists.js';
import { SqlKeysStore } from './keys.js';

export type { Store } from './store.js';
export * from './store.js';
export { SchemaTooNewError } from './migrations.js';
export { DatabaseUnavailableError } from './errors.js';

export interface DatabaseConfig {
  readonly sqlite?: string | undefined;
  readonly postgres?: string | undefined;
  readonly pool_size?: number | undefined;
}

export interface OpenStoreOptions {
  /** Apply pending migrations (default). When false, the schema must already be current. */
  readonly migrate?: boolean;
  /**
   * PostgreSQL: told once when the database stops answering (with the reason) and once when it
   * answers again. Meanwhile statements fail with DatabaseUnavailableError.
   */
  readonly onAvailabilityChange?: (available: boolean, reason?: string) => void;
}

function openDatabase(config: DatabaseConfig, options: OpenStoreOptions = {}): { db: SqlDatabase; migrations: readonly Migration[] } {
  if (config.postgres !== undefined) {
    return {
      db: new PostgresDatabase({
        connectionString: config.postgres,
        poolSize: config.pool_size ?? 10,
        ...(options.onAvailabilityChange ? { onAvailabilityChange: options.onAvailabilityChange } : {}),
      }),
      migrations: postgresMigrations,
    };
  }
  if (config.sqlite === undefined) throw new Error('database: set either "sqlite" or "postgres"');
  return { db: new SqliteDatabase({ path: config.sqlite }), migrations: sqliteMigrations };
}

class SqlStore implements Store {
  readonly backend;
  readonly serverKeys;
  readonly accounts;
  readonly deviceLists;
  readonly keys;

  constructor(readonly db: SqlDatabase) {
    this.backend = db.dialect;
    this.serverKeys = new SqlServerKeysStore(db);
    this.accounts = new SqlAccountsStore(db);
    this.deviceLists = new SqlDeviceListsStore(db);
    this.keys = new SqlKeysStore(db);
  }

  statementCount(): number {
    return this.db.statementCount;
  }

  async tableNames(): Promise<string[]> {
    const rows =
      this.db.dialect === 'sqlite'
        ? await this.db.all<{ name: string }>("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        : await this.db.all<{ name: string }>('SELECT tablename AS name FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename');
    return rows.map((r) => r.name);
  }

  close(): Promise<void> {
    return this.db.close();
  }
}

export async function openStore(config: DatabaseConfig, options: OpenStoreOptions = {}): Promise<Store> {
  const { db, migrations } = openDatabase(config, options);
  try {
    if (options.migrate === false) await assertSchemaNotNewer(db, migrations);
    else await migrate(db, migrations);
  } catch (e) {
    await db.close().catch(() => undefined);
    throw e;
  }
  return new SqlStore(db);
}

/** Applies pending migrations and closes the database (`mxkeys migrate`). */
export async function migrateDatabase(config: DatabaseConfig): Promise<MigrationResult> {
  const { db, migrations } = openDatabase(config);
  try {
    return await migrate(db, migrations);
  } finally {
    await db.close();
  }
}

export { sqliteMigrations, postgresMigrations };
