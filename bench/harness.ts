/**
 * What the benchmark scripts share besides processes and accounts (support.ts): their entry point
 * (children killed on an interrupt or a failure), a PostgreSQL schema of their own, and medians.
 */
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import pg from 'pg';
import { killChildren } from './support.js';

/** The median of the finite values (NaN when there is none). */
export function median(xs: readonly number[]): number {
  const v = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return NaN;
  const mid = v.length >> 1;
  return v.length % 2 ? v[mid]! : (v[mid - 1]! + v[mid]!) / 2;
}

export interface PostgresSchema {
  readonly schema: string;
  /** The `database` config of an mxkeys using only this schema. */
  readonly database: { postgres: string };
  /**
   * One statement on a connection of its own, outside the schema (so that another client of the
   * same server terminating connections cannot take the harness down with it).
   */
  query<R extends pg.QueryResultRow = pg.QueryResultRow>(text: string, params?: unknown[]): Promise<pg.QueryResult<R>>;
  /** Drops the schema. */
  drop(): Promise<void>;
}

/** A new schema `<prefix>_<random>` on the PostgreSQL server at `url`. */
export async function postgresSchema(url: string, prefix: string): Promise<PostgresSchema> {
  const query = async <R extends pg.QueryResultRow>(text: string, params?: unknown[]) => {
    const client = new pg.Client({ connectionString: url });
    client.on('error', () => undefined);
    await client.connect();
    try {
      return await client.query<R>(text, params);
    } finally {
      await client.end().catch(() => undefined);
    }
  };
  const schema = `${prefix}_${randomBytes(5).toString('hex')}`;
  await query(`CREATE SCHEMA ${schema}`);
  const withSchema = new URL(url);
  withSchema.searchParams.set('options', `-c search_path=${schema}`);
  return {
    schema,
    database: { postgres: withSchema.toString() },
    query,
    async drop() {
      await query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`);
    },
  };
}

/** Runs a harness's main function: exit code 1 on failure, 130 on Ctrl-C, children killed either way. */
export function runHarness(main: () => Promise<void>): void {
  process.on('SIGINT', () => {
    killChildren();
    process.exit(130);
  });
  main().catch((e: unknown) => {
    killChildren();
    process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  });
}

/**
 * `count` fake remote homeservers in a child process of their own (fake-servers.ts), each answering
 * after `delayMs`: their control URL, their names and URLs (for `federation.resolve`), and a stop.
 */
export async function startFakes(count: number, delayMs: number): Promise<{ control: string; servers: Record<string, string>; stop: () => void }> {
  const child = spawn(process.execPath, ['--import', 'tsx', new URL('./fake-servers.ts', import.meta.url).pathname, String(count), String(delayMs)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: child.stdout! }).once('line', resolve);
    child.once('exit', (code) => reject(new Error(`fake servers exited with ${code}`)));
  });
  return { ...(JSON.parse(line) as { control: string; servers: Record<string, string> }), stop: () => child.kill() };
}
