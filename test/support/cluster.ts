/**
 * Driving `mxkeys serve --workers N` (and several mxkeys processes) in tests: config files, one
 * request per new connection (so the cluster hands each to the next worker in turn), and finding
 * out from the request log which worker served a request.
 */
import { request as httpRequest } from 'node:http';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from './backends.js';
import { SHARED_SECRET } from './client.js';
import type { ServerProcess } from './process.js';
import type { DatabaseConfig } from '../../src/storage/index.js';

/**
 * A config file for `mxkeys serve --config`: every request logged (with the worker that served
 * it), cheap password hashes. `extra` adds top-level keys (JSON, which is valid YAML).
 */
export function writeClusterConfig(database: DatabaseConfig, extra: Record<string, unknown> = {}, dir = tempDir()): string {
  const path = join(dir, 'mxkeys.yaml');
  const db = database.postgres ? { postgres: database.postgres, pool_size: database.pool_size ?? 10 } : { sqlite: database.sqlite };
  const config: Record<string, unknown> = {
    server_name: 'test.local',
    database: db,
    signing_key_path: join(dir, 'signing.key'),
    registration_shared_secret: SHARED_SECRET,
    log_requests: true,
    password_hashing: { scrypt_log_n: 10 },
    ...extra,
  };
  writeFileSync(path, Object.entries(config).map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join('\n') + '\n');
  return path;
}

export interface FreshResult {
  readonly status: number;
  readonly text: string;
  readonly body: Record<string, unknown>;
}

/** One HTTP request on a connection of its own (closed afterwards). Rejects if the connection fails. */
export function freshRequest(base: string, method: string, path: string, options: { token?: string; body?: unknown } = {}): Promise<FreshResult> {
  const body = options.body === undefined ? undefined : JSON.stringify(options.body);
  const headers: Record<string, string> = { connection: 'close' };
  if (options.token) headers['authorization'] = `Bearer ${options.token}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  return new Promise((resolve, reject) => {
    const req = httpRequest(base + path, { method, headers, agent: false }, (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += c.toString()));
      res.on('end', () => {
        let parsed: unknown;
        try {
          parsed = JSON.parse(text);
        } catch {
          parsed = undefined;
        }
        resolve({ status: res.statusCode ?? 0, text, body: (parsed ?? {}) as Record<string, unknown> });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    // A connection the cluster handed to a worker that was being killed may never be answered
    // nor closed (node:cluster drops it): after a long silence, count it as failed.
    req.setTimeout(15_000, () => req.destroy(new Error('no answer on this connection within 15 s')));
    req.end(body);
  });
}

let probes = 0;

/** A query parameter that marks one request in the request log. */
export function newProbe(): string {
  return `probe=${process.pid}-${++probes}`;
}

/** Log lines of a process, parsed (lines that are not JSON are skipped). */
export function logLines(p: ServerProcess): Record<string, unknown>[] {
  return p
    .output()
    .split('\n')
    .flatMap((line) => {
      try {
        return [JSON.parse(line) as Record<string, unknown>];
      } catch {
        return [];
      }
    });
}

/** Waits until `find` returns something for the process's log. */
export async function inLog<T>(p: ServerProcess, what: string, find: (lines: Record<string, unknown>[]) => T | undefined): Promise<T> {
  for (let i = 0; ; i++) {
    const found = find(logLines(p));
    if (found !== undefined) return found;
    if (p.child.exitCode !== null || p.child.signalCode !== null) throw new Error(`the process ended before the log showed ${what}:\n${p.output()}`);
    // The log line of a request is written as its response finishes, so it may trail the answer a little.
    if (i > 2000) throw new Error(`the log never showed ${what}:\n${p.output()}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Which worker (slot and pid) served the request marked with `probe`. */
export function servedBy(p: ServerProcess, probe: string): Promise<{ worker: number; pid: number }> {
  return inLog(p, `the request ${probe}`, (lines) => {
    const l = lines.find((x) => x['msg'] === 'request' && typeof x['url'] === 'string' && (x['url'] as string).includes(probe));
    return l ? { worker: l['worker'] as number, pid: l['pid'] as number } : undefined;
  });
}

/** The pid of each worker slot, from the supervisor's "started a worker" lines (the latest per slot). */
export function workerPids(p: ServerProcess): Map<number, number> {
  const pids = new Map<number, number>();
  for (const l of logLines(p)) if (l['msg'] === 'started a worker') pids.set(l['worker'] as number, l['worker_pid'] as number);
  return pids;
}

/** Appends `probe` to a path's query string. */
export function withProbe(path: string, probe: string): string {
  return `${path}${path.includes('?') ? '&' : '?'}${probe}`;
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
