/**
 * PostgreSQL through `pg`, pooled. Statements are written with `?` placeholders and rewritten to
 * `$1…$n` once per distinct SQL text; each one runs as a named prepared statement so the server
 * parses it once per connection.
 */
import pg from 'pg';
import { createHash } from 'node:crypto';
import { writeMovesDataGeneration, type Queryable, type SqlDatabase, type SqlValue } from '../sql.js';
import { DatabaseUnavailableError } from '../errors.js';
import { ChangeListener } from './change-listener.js';

const INT8_OID = 20;
// COUNT(*) and BIGINT columns come back as JS numbers: our values (timestamps, stream positions,
// counts) stay far below 2^53.
const types = {
  getTypeParser(oid: number, format?: string) {
    if (oid === INT8_OID) return (v: string) => Number(v);
    return pg.types.getTypeParser(oid, format as 'text');
  },
};

interface Prepared {
  readonly name: string;
  readonly text: string;
  /**
   * Whether running it moves the data generation on: a write, unless it writes only tables no
   * read cache reads (writeMovesDataGeneration). A query that writes nothing (SELECT, or
   * WITH … SELECT) never does.
   */
  readonly movesGeneration: boolean;
}

const WRITES = /\b(INSERT|DELETE|UPDATE\s+\w+\s+SET|pg_notify|nextval|setval)\b/i;

const preparedCache = new Map<string, Prepared>();
const MAX_NAMED_PARAMS = 16;

function prepared(sql: string): Prepared {
  let p = preparedCache.get(sql);
  if (!p) {
    let n = 0;
    const text = sql.replace(/\?/g, () => `$${++n}`);
    const readOnly = /^\s*(SELECT|WITH)\b/i.test(sql) && !WRITES.test(sql);
    p = { name: `mx_${createHash('sha1').update(sql).digest('hex').slice(0, 20)}`, text, movesGeneration: !readOnly && writeMovesDataGeneration(sql) };
    if (preparedCache.size >= 10_000) preparedCache.clear();
    preparedCache.set(sql, p);
  }
  return p;
}

/** Socket errors of a connection that could not be made or was lost. */
const NETWORK_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'ECONNABORTED']);

/**
 * What makes `e` a lost or refused connection rather than a failed statement, if it is one:
 * SQLSTATE class 08 (connection exception), 57P01–57P03 (the server is shutting down or starting,
 * or pg_terminate_backend), a socket error, or pg's own messages for a connection that ended.
 */
export function connectionProblem(e: unknown): string | undefined {
  if (!(e instanceof Error)) return undefined;
  const code = (e as { code?: unknown }).code;
  if (typeof code === 'string' && (NETWORK_CODES.has(code) || /^08[0-9A-Z]{3}$/.test(code) || /^57P0[123]$/.test(code))) return `${code}: ${e.message}`;
  if (/Connection terminated|not queryable|timeout exceeded when trying to connect/i.test(e.message)) return e.message;
  return undefined;
}

/** SQLSTATEs after which the whole transaction can safely be run again. */
const RETRYABLE = new Set(['40001', '40P01']);
const MAX_ATTEMPTS = 5;

/**
 * A statement of its own (autocommit) that lost a deadlock or serialization conflict was rolled
 * back whole, so it is run again, as transactions are.
 */
async function runAgainOnConflict(run: () => Promise<pg.QueryResult>, db: PostgresDatabase): Promise<pg.QueryResult> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await run();
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code === undefined || !RETRYABLE.has(code) || attempt >= MAX_ATTEMPTS) throw e;
      db.retryCount++;
    }
  }
}

/** What a transaction collects until it commits. */
interface TransactionState {
  /** afterCommit callbacks. */
  readonly callbacks: (() => void)[];
  /** Whether a statement in it may have changed what a read cache holds. */
  movesGeneration: boolean;
}

/** `tx` collects afterCommit callbacks inside a transaction; without it they run at once. */
function queryable(client: pg.Pool | pg.PoolClient, db: PostgresDatabase, tx?: TransactionState): Queryable {
  const q = async (sql: string, params?: readonly SqlValue[]): Promise<pg.QueryResult> => {
    db.statementCount++;
    const p = prepared(sql);
    const values = params ? [...params] : [];
    // Statements built for a list of N values exist once per N; preparing each of them on every
    // connection would pile up without bound, so only short parameter lists are named.
    const run = () => db.watch(client.query(values.length <= MAX_NAMED_PARAMS ? { name: p.name, text: p.text, values } : { text: p.text, values }));
    if (tx) {
      if (p.movesGeneration) tx.movesGeneration = true;
      return run();
    }
    if (p.movesGeneration) return db.writing(runAgainOnConflict(run, db));
    return runAgainOnConflict(run, db);
  };
  return {
    dialect: 'postgres',
    all: async <T extends object>(sql: string, params?: readonly SqlValue[]) => (await q(sql, params)).rows as T[],
    get: async <T extends object>(sql: string, params?: readonly SqlValue[]) => (await q(sql, params)).rows[0] as T | undefined,
    run: async (sql: string, params?: readonly SqlValue[]) => (await q(sql, params)).rowCount ?? 0,
    exec: async (script: string) => {
      if (tx) tx.movesGeneration = true;
      await db.writing(db.watch(client.query(script)));
    },
    afterCommit: (fn: () => void) => {
      if (tx) tx.callbacks.push(fn);
      else queueMicrotask(fn);
    },
  };
}

export interface PostgresOptions {
  readonly connectionString: string;
  readonly poolSize?: number;
  /** How long to wait for a connection: to open a new one, or for a free one in the pool. */
  readonly connectTimeoutMs?: number;
  /**
   * Called when the database stops answering (a connection refused or lost: `reason` says how)
   * and when it answers again, once per change, not per failed statement.
   */
  readonly onAvailabilityChange?: (available: boolean, reason?: string) => void;
  /**
   * Milliseconds (database.cache_staleness_bound): read caches are used, kept up to date through
   * LISTEN/NOTIFY (change-listener.ts), and never miss a change committed longer ago than this.
   * 0 or left out: no read caches on this database.
   */
  readonly cacheStalenessBoundMs?: number;
}

/**
 * The connection string with `-c jit=off` added to its startup options (after any it has, or
 * PGOPTIONS'). Every statement here is short, yet a claim of many devices is costed high enough for
 * PostgreSQL to JIT-compile it on each run: ~100 ms of CPU for a statement that takes a few (claims
 * fell to ~250 a second in a bench run, PostgreSQL using both cores).
 */
export function withoutJit(connectionString: string): string {
  let url: URL;
  try {
    url = new URL(connectionString);
  } catch {
    return connectionString;
  }
  const given = url.searchParams.get('options') ?? process.env['PGOPTIONS'];
  url.searchParams.set('options', given ? `${given} -c jit=off` : '-c jit=off');
  return url.toString();
}

export class PostgresDatabase implements SqlDatabase {
  readonly dialect = 'postgres' as const;
  private readonly pool: pg.Pool;
  private readonly direct: Queryable;
  statementCount = 0;
  /** Statements and transactions run again after a deadlock or serialization conflict. */
  retryCount = 0;
  private unavailable = false;
  /** Moved on by this process's writes and by changes other processes commit. */
  private generation = 0;
  private readonly listener: ChangeListener | undefined;
  /**
   * As on SQLite (sql.ts), with changes by other processes known through LISTEN/NOTIFY: while
   * the listener cannot vouch for them (change-listener.ts), a new value on every call, so caches
   * keep nothing.
   */
  readonly dataGeneration?: () => number;

  constructor(private readonly options: PostgresOptions) {
    // A server that accepts connections but never answers, or a wait for a free connection that
    // never ends, would hang start-up and requests silently: both fail after connect_timeout.
    const connectionString = withoutJit(options.connectionString);
    this.pool = new pg.Pool({
      connectionString,
      max: Math.max(2, options.poolSize ?? 10),
      types,
      connectionTimeoutMillis: options.connectTimeoutMs ?? 10_000,
    });
    // An idle connection that dies (server restart) must not take the process down; the pool
    // drops it and opens a new one when needed.
    this.pool.on('error', (e) => this.lost(connectionProblem(e) ?? e.message));
    this.direct = queryable(this.pool, this);
    const boundMs = options.cacheStalenessBoundMs ?? 0;
    if (boundMs > 0) {
      const listener = new ChangeListener({
        connectionString,
        boundMs,
        connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
        onChange: () => this.generation++,
      });
      this.listener = listener;
      this.dataGeneration = () => (listener.live() ? this.generation : ++this.generation);
    }
  }

  /**
   * Passes on what a write resolves to, moving the data generation on once it has been done (or
   * failed: it may have been committed all the same), so this process reads its own writes at
   * once rather than when their notification comes back.
   */
  writing<T>(operation: Promise<T>): Promise<T> {
    return operation.finally(() => this.generation++);
  }

  private lost(reason: string): void {
    if (this.unavailable) return;
    this.unavailable = true;
    this.options.onAvailabilityChange?.(false, reason);
  }

  /**
   * Passes on what `operation` resolves to, noting that the database answers again; turns a lost
   * or refused connection into DatabaseUnavailableError.
   */
  watch<T>(operation: Promise<T>): Promise<T> {
    // then() rather than an async function: this wraps every statement.
    return operation.then(
      (result) => {
        if (this.unavailable) {
          this.unavailable = false;
          this.options.onAvailabilityChange?.(true);
        }
        return result;
      },
      (e: unknown) => {
        const problem = connectionProblem(e);
        if (problem === undefined) throw e;
        this.lost(problem);
        throw new DatabaseUnavailableError(problem, { cause: e });
      },
    );
  }

  all<T extends object>(sql: string, params?: readonly SqlValue[]): Promise<T[]> {
    return this.direct.all<T>(sql, params);
  }

  get<T extends object>(sql: string, params?: readonly SqlValue[]): Promise<T | undefined> {
    return this.direct.get<T>(sql, params);
  }

  run(sql: string, params?: readonly SqlValue[]): Promise<number> {
    return this.direct.run(sql, params);
  }

  exec(script: string): Promise<void> {
    return this.direct.exec(script);
  }

  afterCommit(fn: () => void): void {
    this.direct.afterCommit(fn);
  }

  async transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      const client = await this.watch(this.pool.connect());
      let broken = false;
      const tx: TransactionState = { callbacks: [], movesGeneration: false };
      try {
        await this.watch(client.query('BEGIN'));
        const result = await fn(queryable(client, this, tx));
        const commit = this.watch(client.query('COMMIT'));
        await (tx.movesGeneration ? this.writing(commit) : commit);
        for (const cb of tx.callbacks) cb();
        return result;
      } catch (e) {
        try {
          await client.query('ROLLBACK');
        } catch {
          broken = true;
        }
        const code = (e as { code?: string }).code;
        if (code !== undefined && RETRYABLE.has(code) && attempt < MAX_ATTEMPTS) {
          this.retryCount++;
          continue;
        }
        throw e;
      } finally {
        client.release(broken);
      }
    }
  }

  async withExclusiveLock<T>(fn: () => Promise<T>): Promise<T> {
    const client = await this.watch(this.pool.connect());
    try {
      // One fixed key: "mxkeys migrations".
      await client.query('SELECT pg_advisory_lock(7352831)');
      try {
        return await fn();
      } finally {
        await client.query('SELECT pg_advisory_unlock(7352831)');
      }
    } finally {
      client.release();
    }
  }

  async close(): Promise<void> {
    await this.listener?.close();
    await this.pool.end();
  }
}
