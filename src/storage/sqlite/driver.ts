/**
 * SQLite through better-sqlite3 (v12; v13 crashes on Node 20), in WAL mode.
 *
 * better-sqlite3 is synchronous, so a single statement is atomic with respect to every other
 * request in this process. An async transaction body, though, yields between statements; to keep
 * other requests' statements out of an open transaction, statements issued outside it wait until
 * it ends. Other processes (or other connections) sharing the file are kept out by SQLite's own
 * locking: BEGIN IMMEDIATE takes the write lock. While someone else holds it we wait briefly in
 * SQLite, then retry from the event loop, so two connections in one process cannot deadlock.
 */
import Database from 'better-sqlite3';
import { closeSync, existsSync, mkdirSync, openSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { writeMovesDataGeneration, type Queryable, type SqlDatabase, type SqlValue } from '../sql.js';
import { WalIndexHeader } from './wal-index.js';
import { Checkpointer, CHECKPOINT_FRAMES } from './checkpointer.js';

type Statement = Database.Statement<unknown[]>;
/** A prepared statement, and whether running it moves the data generation on (sql.ts). */
interface Prepared {
  readonly st: Statement;
  readonly movesGeneration: boolean;
}

function bind(params: readonly SqlValue[] | undefined): readonly unknown[] {
  if (!params) return [];
  for (const p of params) if (typeof p === 'boolean') return params.map((v) => (typeof v === 'boolean' ? (v ? 1 : 0) : v));
  return params;
}

export interface SqliteOptions {
  readonly path: string;
  /** How long to wait for another connection's write lock before failing, in ms. */
  readonly busyTimeoutMs?: number;
}

/** Synchronous wait inside SQLite per attempt: short, since it blocks this process's event loop. */
const SYNC_BUSY_MS = 5;
/** The same while the database is being opened. */
const STARTUP_BUSY_MS = 5_000;

function isBusy(e: unknown): boolean {
  const code = (e as { code?: string }).code;
  return code === 'SQLITE_BUSY' || code === 'SQLITE_LOCKED';
}

export class SqliteDatabase implements SqlDatabase {
  readonly dialect = 'sqlite' as const;
  private readonly db: Database.Database;
  private readonly statements = new Map<string, Prepared>();
  /** Moves on with every write statement here and every commit elsewhere (dataGeneration). */
  private generation = 0;
  /** How commits by other connections are noticed: the wal-index header, or data_version. */
  private readonly otherCommits: () => boolean;
  /** Checkpoints the WAL in a worker thread (WAL mode with a wal-index to read). */
  private readonly checkpointer: Checkpointer | undefined;
  /** Resolves when the transaction currently open (and every one queued before it) has ended. */
  private txTail: Promise<void> = Promise.resolve();
  private txOpen = false;
  /** afterCommit callbacks of the open transaction. */
  private commitCallbacks: (() => void)[] = [];
  private readonly direct: Queryable;
  private readonly busyTimeoutMs: number;
  statementCount = 0;
  /** The WAL file synced after commits (undefined: SQLite syncs inside COMMIT itself). */
  private readonly walPath: string | undefined;
  private walFile: Promise<FileHandle> | undefined;
  /** Write statements run so far, and how many of them are known to be on disk. */
  private writes = 0;
  private syncedWrites = 0;
  private syncing: Promise<void> | undefined;
  /** WAL syncs done (for tests). */
  walSyncs = 0;

  /** Checkpoint passes made by the worker thread, and how many this connection finished (for tests). */
  get checkpoints(): { passes: number; finished: number } {
    return { passes: this.checkpointer?.passesDone ?? 0, finished: this.checkpointer?.finished ?? 0 };
  }

  constructor(options: SqliteOptions) {
    if (options.path !== ':memory:') {
      mkdirSync(dirname(options.path), { recursive: true });
      // The database holds password and access-token hashes: readable by the owner only, as the
      // signing key. SQLite gives the -wal and -shm files the database file's permissions.
      if (!existsSync(options.path)) closeSync(openSync(options.path, 'a', 0o600));
    }
    this.busyTimeoutMs = options.busyTimeoutMs ?? 15_000;
    // Opening waits longer for locks: two processes starting on a new file both switch it to WAL
    // (which needs the file to themselves), and nothing else is being served yet.
    this.db = new Database(options.path, { timeout: STARTUP_BUSY_MS });
    const wal = this.db.pragma('journal_mode = WAL', { simple: true }) === 'wal' && options.path !== ':memory:';
    // Every write is answered only once it is on disk, so a claimed one-time key stays claimed
    // even across power loss. In WAL mode that means an fsync of the WAL file after the commit:
    // SQLite's synchronous=FULL would do it inside COMMIT, blocking the event loop for the whole
    // fsync; with NORMAL, SQLite syncs only around checkpoints (made in a worker thread,
    // checkpointer.ts) and this driver syncs the WAL in the thread pool after each commit (one
    // sync shared by the commits made meanwhile, see durable()). Without WAL (an unusual file
    // system), FULL.
    this.walPath = wal ? `${options.path}-wal` : undefined;
    this.db.pragma(wal ? 'synchronous = NORMAL' : 'synchronous = FULL');
    this.db.pragma('foreign_keys = ON');
    // SQLite's default page cache is 2 MiB; with millions of one-time keys the hot index pages
    // no longer fit, and claims start reading pages from the OS. 16 MiB holds them (claims on
    // 10^6 keys as fast as on a small database, measured); 64 MiB only added resident memory.
    this.db.pragma('cache_size = -16384');
    const { otherCommits, walIndex } = this.commitWatch(options.path);
    this.otherCommits = otherCommits;
    if (walIndex) {
      this.db.pragma('wal_autocheckpoint = 0');
      this.checkpointer = new Checkpointer(options.path, {
        walFrames: () => walIndex.frames(),
        finish: () => void this.checkpointHere(),
        checkpointItself: () => this.db.open && this.db.pragma(`wal_autocheckpoint = ${CHECKPOINT_FRAMES}`),
      });
    }
    this.db.pragma(`busy_timeout = ${SYNC_BUSY_MS}`);
    this.direct = {
      dialect: 'sqlite',
      all: async <T extends object>(sql: string, params?: readonly SqlValue[]) => this.prepare(sql).all(...bind(params)) as T[],
      get: async <T extends object>(sql: string, params?: readonly SqlValue[]) => this.prepare(sql).get(...bind(params)) as T | undefined,
      run: async (sql: string, params?: readonly SqlValue[]) => this.prepare(sql).run(...bind(params)).changes,
      exec: async (script: string) => {
        this.generation++;
        this.writes++;
        this.db.exec(script);
      },
      afterCommit: (fn: () => void) => {
        this.commitCallbacks.push(fn);
      },
    };
  }

  /**
   * The statement of `sql` (prepared once per process), about to run: counted, and a write moves
   * the generation on unless it writes only tables no read cache reads (commitWatch tells this
   * connection's commits from other connections', so those stay unnoticed).
   */
  private prepare(sql: string): Statement {
    this.statementCount++;
    let p = this.statements.get(sql);
    if (!p) {
      const st = this.db.prepare(sql);
      p = { st, movesGeneration: !st.readonly && writeMovesDataGeneration(sql) };
      this.statements.set(sql, p);
    }
    if (!p.st.readonly) {
      if (p.movesGeneration) this.generation++;
      this.writes++;
    }
    return p.st;
  }

  /**
   * Resolves once every write made so far is on disk: the WAL file is fsynced (fdatasync) in the
   * thread pool; commits made while a sync runs share the next one. An fsync flushes the file,
   * whichever descriptor wrote to it, so SQLite's writes are covered by this driver's own handle.
   */
  private async durable(): Promise<void> {
    if (this.walPath === undefined) return;
    const upTo = this.writes;
    while (this.syncedWrites < upTo) {
      if (this.syncing) {
        await this.syncing;
        continue;
      }
      const covered = this.writes;
      this.syncing = (async () => {
        this.walFile ??= open(this.walPath!, 'r');
        await (await this.walFile).datasync();
        this.walSyncs++;
        this.syncedWrites = Math.max(this.syncedWrites, covered);
        if (this.db.open) this.checkpointer?.wrote();
      })().finally(() => (this.syncing = undefined));
      await this.syncing;
    }
  }

  /**
   * `op`, a run of `sql`: at once if `sql` is known to only read, else once what it wrote is on
   * disk. (Not prepared yet, because it waits for a transaction or failed: treated as a write.)
   */
  private answer<T>(sql: string, op: Promise<T>): Promise<T> {
    if (this.statements.get(sql)?.st.readonly) return op;
    return op.then(async (result) => {
      await this.durable();
      return result;
    });
  }

  /**
   * The data_version seen first in the current run of this process's job queue stands for the
   * whole run: a run (one I/O or timer callback with the ticks and promise jobs it sets off)
   * takes in nothing from outside, so every request handled in it arrived before the check, and
   * every commit made before such a request was sent is seen. Forgotten when the run ends.
   */
  private versionChecked = false;
  private readonly forgetVersionCheck = () => {
    // A job of this microtask checkpoint; the tick it queues runs once the checkpoint is drained.
    process.nextTick(() => (this.versionChecked = false));
  };

  readonly dataGeneration = (): number => {
    // Commits by other connections are looked for once per run; this connection's own writes
    // are counted in prepare() and exec().
    if (!this.versionChecked) {
      this.versionChecked = true;
      queueMicrotask(this.forgetVersionCheck);
      if (this.otherCommits()) this.generation++;
    }
    return this.generation;
  };

  /** How other connections' commits are noticed, and the wal-index header when there is one. */
  private commitWatch(path: string): { otherCommits: () => boolean; walIndex?: WalIndexHeader } {
    const mode = this.db.pragma('journal_mode', { simple: true });
    // A first read transaction creates the -shm file when this is the only connection.
    this.db.pragma('schema_version');
    // data_version moves with other connections' commits only ("unchanged for changes committed
    // on the same database connection", sqlite.org/pragma.html#pragma_data_version).
    const dataVersion = this.db.prepare<[], number>('PRAGMA data_version').pluck();
    let last = dataVersion.get()!;
    const otherCommitted = (): boolean => {
      const version = dataVersion.get()!;
      if (version === last) return false;
      last = version;
      return true;
    };
    if (mode === 'wal' && path !== ':memory:') {
      try {
        const header = new WalIndexHeader(`${path}-shm`);
        this.closeWatch = () => header.close();
        // The header moves with every commit, this connection's too; data_version, which costs
        // a read transaction, is asked only when it moved. Read after the header, it covers
        // every commit the header showed, so a commit elsewhere is never taken for our own.
        return { otherCommits: () => header.changed() && otherCommitted(), walIndex: header };
      } catch {
        // No -shm file to read (an unusual file system): data_version alone.
      }
    }
    return { otherCommits: otherCommitted };
  }

  private closeWatch = () => {};

  /** A PASSIVE checkpoint on this connection, outside any transaction of ours (checkpointer.ts). */
  private async checkpointHere(): Promise<void> {
    if (this.txOpen) await this.outsideTransaction();
    if (!this.db.open) return;
    try {
      this.db.pragma('wal_checkpoint(PASSIVE)');
    } catch {
      // Locked elsewhere: the next one will do.
    }
  }

  private async outsideTransaction(): Promise<void> {
    while (this.txOpen) await this.txTail;
  }

  /** Runs `op` outside any open transaction of ours, retrying while another connection holds the lock. */
  private retrying<T>(op: () => T): Promise<T> {
    // The common case, synchronously: no transaction of ours open, no lock held elsewhere.
    if (!this.txOpen) {
      try {
        return Promise.resolve(op());
      } catch (e) {
        if (!isBusy(e)) return Promise.reject(e as Error);
      }
    }
    return this.retryingSlowly(op);
  }

  private async retryingSlowly<T>(op: () => T): Promise<T> {
    if (this.txOpen) await this.outsideTransaction();
    try {
      return op();
    } catch (e) {
      if (!isBusy(e)) throw e;
    }
    const deadline = Date.now() + this.busyTimeoutMs;
    for (let delay = 1; ; delay = Math.min(delay * 2, 50)) {
      await new Promise((r) => setTimeout(r, delay));
      if (this.txOpen) await this.outsideTransaction();
      try {
        return op();
      } catch (e) {
        if (!isBusy(e) || Date.now() > deadline) throw e;
      }
    }
  }

  all<T extends object>(sql: string, params?: readonly SqlValue[]): Promise<T[]> {
    return this.answer(sql, this.retrying(() => this.prepare(sql).all(...bind(params)) as T[]));
  }

  get<T extends object>(sql: string, params?: readonly SqlValue[]): Promise<T | undefined> {
    return this.answer(sql, this.retrying(() => this.prepare(sql).get(...bind(params)) as T | undefined));
  }

  run(sql: string, params?: readonly SqlValue[]): Promise<number> {
    return this.answer(sql, this.retrying(() => this.prepare(sql).run(...bind(params)).changes));
  }

  async transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T> {
    const previous = this.txTail;
    let release!: () => void;
    this.txTail = new Promise<void>((resolve) => (release = resolve));
    await previous;
    let result: T;
    let writesBefore = 0;
    const callbacks: (() => void)[] = [];
    try {
      // txOpen must be set in the same synchronous step as BEGIN: any gap would let another
      // request's statement run inside this transaction (and be rolled back with it).
      await this.retrying(() => {
        this.db.exec('BEGIN IMMEDIATE');
        this.txOpen = true;
      });
      this.commitCallbacks = callbacks;
      writesBefore = this.writes;
      try {
        result = await fn(this.direct);
        this.db.exec('COMMIT');
      } catch (e) {
        if (this.db.inTransaction) this.db.exec('ROLLBACK');
        throw e;
      } finally {
        this.commitCallbacks = [];
      }
    } finally {
      this.txOpen = false;
      release();
    }
    for (const cb of callbacks) cb();
    // The next transaction may run while this one's commit is being synced.
    if (this.writes !== writesBefore) await this.durable();
    return result;
  }

  afterCommit(fn: () => void): void {
    queueMicrotask(fn);
  }

  async exec(script: string): Promise<void> {
    this.generation++;
    this.writes++;
    await this.retrying(() => this.db.exec(script));
    await this.durable();
  }

  async withExclusiveLock<T>(fn: () => Promise<T>): Promise<T> {
    return fn();
  }

  async close(): Promise<void> {
    await this.outsideTransaction();
    await this.syncing;
    await this.checkpointer?.close();
    if (this.walFile) await (await this.walFile.catch(() => undefined))?.close();
    this.walFile = undefined;
    if (this.db.open) {
      this.closeWatch();
      this.db.close();
    }
  }
}
