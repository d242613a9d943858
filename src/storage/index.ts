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
import { DeviceListWriter, SqlDeviceListsStore } from './device-lists.js';
import { SqlKeysStore } from './keys.js';
import { SqlFederationStore } from './federation.js';
import { SqlRemoteDeviceListsStore } from './remote-device-lists.js';
import { SqlBackupStore } from './backup.js';
import { SqlToDeviceStore } from './to-device.js';
import { SqlStatsStore } from './stats.js';
import { claimServerName } from './server-name.js';
import { DatabaseStartupError, describePostgresError, describeSqliteError } from './startup-errors.js';

export type { Store } from './store.js';
export * from './store.js';
export { SchemaTooNewError } from './migrations.js';
export { ServerNameMismatchError } from './server-name.js';
export { DatabaseStartupError } from './startup-errors.js';
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
   * The configured server name: recorded in a new database, and checked against the recorded one
   * (ServerNameMismatchError) otherwise. Left out, the database's name is neither set nor checked.
   */
  readonly serverName?: string;
  /** How long to wait for a PostgreSQL connection (database.connect_timeout); default 10 s. */
  readonly connectTimeoutMs?: number;
  /**
   * PostgreSQL (database.cache_staleness_bound): how old a change committed by another process
   * may be and still be missed by this process's read caches; default 500 ms, 0 for no caches.
   */
  readonly cacheStalenessBoundMs?: number;
  /**
   * PostgreSQL: told once when the database stops answering (with the reason) and once when it
   * answers again. Meanwhile statements fail with DatabaseUnavailableError.
   */
  readonly onAvailabilityChange?: (available: boolean, reason?: string) => void;
}

const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const DEFAULT_CACHE_STALENESS_BOUND_MS = 500;

function openDatabase(config: DatabaseConfig, options: OpenStoreOptions = {}): { db: SqlDatabase; migrations: readonly Migration[] } {
  if (config.postgres !== undefined) {
    return {
      db: new PostgresDatabase({
        connectionString: config.postgres,
        poolSize: config.pool_size ?? 10,
        connectTimeoutMs: options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS,
        cacheStalenessBoundMs: options.cacheStalenessBoundMs ?? DEFAULT_CACHE_STALENESS_BOUND_MS,
        ...(options.onAvailabilityChange ? { onAvailabilityChange: options.onAvailabilityChange } : {}),
      }),
      migrations: postgresMigrations,
    };
  }
  if (config.sqlite === undefined) throw new Error('database: set either "sqlite" or "postgres"');
  const path = config.sqlite;
  try {
    return { db: new SqliteDatabase({ path }), migrations: sqliteMigrations };
  } catch (e) {
    throw describeSqliteError(e, path);
  }
}

/** Our own refusals pass as they are; a driver's error becomes one that names the setting. */
function startupError(e: unknown, config: DatabaseConfig, connectTimeoutMs: number): unknown {
  if (!(e instanceof Error) || e.name === 'SchemaTooNewError' || e.name === 'ServerNameMismatchError' || e instanceof DatabaseStartupError) return e;
  if (config.postgres !== undefined) return describePostgresError(e, config.postgres, connectTimeoutMs);
  return describeSqliteError(e, config.sqlite ?? '');
}

class SqlStore implements Store {
  readonly backend;
  readonly serverKeys;
  readonly accounts;
  readonly deviceLists;
  readonly keys;
  readonly federation;
  readonly remoteDeviceLists;
  readonly backup;
  readonly toDevice;
  readonly stats;

  constructor(readonly db: SqlDatabase) {
    this.backend = db.dialect;
    const deviceListWriter = new DeviceListWriter();
    this.serverKeys = new SqlServerKeysStore(db);
    this.accounts = new SqlAccountsStore(db, deviceListWriter);
    this.deviceLists = new SqlDeviceListsStore(db, deviceListWriter);
    this.keys = new SqlKeysStore(db, deviceListWriter);
    this.federation = new SqlFederationStore(db);
    this.remoteDeviceLists = new SqlRemoteDeviceListsStore(db, deviceListWriter);
    this.backup = new SqlBackupStore(db);
    this.toDevice = new SqlToDeviceStore(db);
    this.stats = new SqlStatsStore(db);
  }

  statementCount(): number {
    return this.db.statementCount;
  }

  retryCount(): number {
    return this.db.retryCount ?? 0;
  }

  async tableNames(): Promise<string[]> {
    const rows =
      this.db.dialect === 'sqlite'
        ? await this.db.all<{ name: string }>("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        : await this.db.all<{ name: string }>('SELECT tablename AS name FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename');
    return rows.map((r) => r.name);
  }

  async ping(): Promise<void> {
    // A real table, so that SQLite reads the file too.
    await this.db.get('SELECT version FROM mxkeys_schema LIMIT 1');
  }

  close(): Promise<void> {
    return this.db.close();
  }
}

export async function openStore(config: DatabaseConfig, options: OpenStoreOptions = {}): Promise<Store> {
  const connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
  const { db, migrations } = openDatabase(config, options);
  try {
    if (options.migrate === false) await assertSchemaNotNewer(db, migrations);
    else await migrate(db, migrations);
    if (options.serverName !== undefined) await claimServerName(db, options.serverName);
  } catch (e) {
    await db.close().catch(() => undefined);
    throw startupError(e, config, connectTimeoutMs);
  }
  return new SqlStore(db);
}

/** Applies pending migrations and closes the database (`mxkeys migrate`). */
export async function migrateDatabase(config: DatabaseConfig, options: Pick<OpenStoreOptions, 'connectTimeoutMs'> = {}): Promise<MigrationResult> {
  const connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
  const { db, migrations } = openDatabase(config, options);
  try {
    return await migrate(db, migrations);
  } catch (e) {
    throw startupError(e, config, connectTimeoutMs);
  } finally {
    await db.close().catch(() => undefined);
  }
}

export { sqliteMigrations, postgresMigrations };
