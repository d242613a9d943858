/**
 * A small driver-neutral SQL surface, so the store's logic and most of its SQL are written once.
 * Statements use `?` placeholders; the PostgreSQL driver rewrites them to `$1…$n`. Booleans are
 * bound as 0/1 on SQLite; rows come back with plain JS numbers for integer columns on both.
 */

export type SqlValue = string | number | boolean | null | Buffer;
export type Dialect = 'sqlite' | 'postgres';

export interface Queryable {
  readonly dialect: Dialect;
  /** All rows of a query. */
  all<T extends object>(sql: string, params?: readonly SqlValue[]): Promise<T[]>;
  /** The first row of a query, if any. */
  get<T extends object>(sql: string, params?: readonly SqlValue[]): Promise<T | undefined>;
  /** Runs a statement and returns the number of rows it changed. */
  run(sql: string, params?: readonly SqlValue[]): Promise<number>;
  /** Runs a script of several statements without parameters (migrations). */
  exec(script: string): Promise<void>;
  /**
   * Runs `fn` once what was written through this queryable is committed: at the end of the
   * transaction (never, if it rolls back), or soon when there is no transaction (autocommit).
   */
  afterCommit(fn: () => void): void;
}

export interface SqlDatabase extends Queryable {
  /** Statements executed so far by this process on this database (for metrics and tests). */
  readonly statementCount: number;
  /** Statements and transactions run again after a deadlock or serialization conflict (PostgreSQL). */
  readonly retryCount?: number;
  /**
   * Runs `fn` in one transaction on one connection: committed when it resolves, rolled back when
   * it throws. `fn` must only await statements on `tx` (no network calls): on SQLite the whole
   * database is locked for its duration.
   */
  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T>;
  /**
   * Runs `fn` while no other process runs `withExclusiveLock` on the same database (migrations).
   * PostgreSQL: a session advisory lock. SQLite: nothing extra, since every transaction there
   * already holds the database's write lock.
   */
  withExclusiveLock<T>(fn: () => Promise<T>): Promise<T>;
  /**
   * A number that moves on whenever data in the database may have changed — a write statement of
   * this process, or a commit by any other connection (SQLite: PRAGMA data_version or the WAL
   * index; PostgreSQL: LISTEN/NOTIFY, within a staleness bound, see postgres/change-listener.ts).
   * Read caches (read-cache.ts) key on it. Absent: no read caches.
   */
  readonly dataGeneration?: () => number;
  close(): Promise<void>;
}

/**
 * Tables no read cache reads (one-time keys, fallback keys and their counts: claimed and uploaded
 * all the time, and never part of a cached answer). A statement that writes only these leaves the
 * data generation alone, so a claim does not empty the caches of token lookups and key queries.
 */
const UNCACHED_TABLES = new Set(['e2e_one_time_keys', 'e2e_fallback_keys', 'e2e_one_time_key_counts']);
/** The table after INSERT INTO, DELETE FROM or UPDATE (not FOR UPDATE or DO UPDATE). */
const WRITE_TARGET = /\b(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|DELETE\s+FROM|(?<!\b(?:FOR|DO)\s+)UPDATE)\s+(\w+)/gi;

/**
 * Whether a write statement may change what a read cache holds: true unless every table it
 * writes to is named and none is read by a cache. Anything it cannot tell (DDL, a function call)
 * counts as a change.
 */
export function writeMovesDataGeneration(sql: string): boolean {
  const targets = [...sql.matchAll(WRITE_TARGET)].map((m) => m[1]!.toLowerCase());
  return targets.length === 0 || targets.some((t) => !UNCACHED_TABLES.has(t));
}

/** Rows per multi-row statement: well below SQLite's 32766 and PostgreSQL's 65535 parameters. */
export const CHUNK = 500;

/** `items` in slices of at most `size`, for multi-row statements. */
export function chunks<T>(items: readonly T[], size = CHUNK): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

/** `(?, ?, ?), (?, ?, ?)`: a VALUES list of `rows` tuples of `width` placeholders. */
export function valuesList(rows: number, width: number): string {
  const tuple = `(${new Array<string>(width).fill('?').join(', ')})`;
  return new Array<string>(rows).fill(tuple).join(', ');
}

/** `?, ?, ?`: placeholders for an IN list. */
export function placeholders(n: number): string {
  return new Array<string>(n).fill('?').join(', ');
}
