/**
 * Load from wrk (the C load generator, Debian package `wrk`): one measurement is one wrk run with
 * bench/load.lua, which sends a list of requests in turn (one body, several, or fully prepared
 * requests such as federation requests each with its own X-Matrix signature) and reports its
 * figures as JSON from its done() callback. wrk is a separate process, so its CPU is accounted
 * separately from the harness's, and it is fast enough that the bare node:http baseline, not the
 * load generator, is what limits the ceiling.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { accessSync, constants, writeFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const SCRIPT = fileURLToPath(new URL('./load.lua', import.meta.url));

/** In a request body: replaced by a value (of the same length) no other request of the run has. */
export const UNIQUE_MARKER = '@@@MXKEYS-UNIQUE@@@@';

export interface BenchRequest {
  readonly method?: string;
  readonly path: string;
  readonly headers: Readonly<Record<string, string>>;
  readonly body: string;
}

/** Writes requests in load.lua's format: "METHOD PATH_BYTES HEADER_BYTES BODY_BYTES\n" + the three parts. */
export function writeRequests(file: string, requests: readonly BenchRequest[]): void {
  const parts: Buffer[] = [];
  for (const r of requests) {
    const path = Buffer.from(r.path);
    const headers = Buffer.from(
      Object.entries({ 'Content-Type': 'application/json', ...r.headers })
        .map(([k, v]) => `${k}: ${v}\n`)
        .join(''),
    );
    const body = Buffer.from(r.body);
    parts.push(Buffer.from(`${r.method ?? 'POST'} ${path.length} ${headers.length} ${body.length}\n`), path, headers, body);
  }
  writeFileSync(file, Buffer.concat(parts));
}

export interface LoadSpec {
  /** Base URL of the server under load, e.g. http://127.0.0.1:8448. */
  readonly url: string;
  /** A file written by writeRequests(). */
  readonly requests: string;
  readonly connections: number;
  readonly threads: number;
  /** Seconds. */
  readonly duration: number;
  /** Count every status in a Lua response() callback (exact, but costs wrk CPU per answer). */
  readonly countStatuses?: boolean;
}

export interface Latency {
  /** Milliseconds. */
  readonly mean: number;
  readonly p50: number;
  readonly p90: number;
  readonly p99: number;
  readonly max: number;
}

export interface LoadResult {
  /** Answers received. */
  readonly requests: number;
  /** 2xx answers (wrk counts answers above 399 as errors; mxkeys sends no 1xx or 3xx here). */
  readonly ok: number;
  readonly non2xx: number;
  /** Socket errors: connect, read, write, timeout. */
  readonly errors: { readonly connect: number; readonly read: number; readonly write: number; readonly timeout: number };
  readonly seconds: number;
  /** 2xx answers per second. */
  readonly rps: number;
  /** Of every answer. */
  readonly latency: Latency;
  /** Requests the script built (for lists of distinct requests: more than the list means some were sent twice); -1 for wrk's static request. */
  readonly built: number;
  /** With countStatuses: answers per status. */
  readonly statuses?: Record<string, number>;
}

export function socketErrors(r: LoadResult): number {
  return r.errors.connect + r.errors.read + r.errors.write + r.errors.timeout;
}

let wrkBinary: string | undefined;

/** The wrk executable, or an error saying how to install it. */
export function wrk(): string {
  if (wrkBinary) return wrkBinary;
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    const candidate = join(dir || '.', 'wrk');
    try {
      accessSync(candidate, constants.X_OK);
      return (wrkBinary = candidate);
    } catch {
      // Not in this directory.
    }
  }
  throw new Error('wrk, the load generator of the benchmarks, is not installed (no wrk on the PATH): install it with `apt-get install wrk` (Debian, Ubuntu) or your system\'s package of wrk, then run the benchmark again');
}

export interface RunningLoad {
  readonly pid: number;
  readonly done: Promise<LoadResult>;
}

/** Starts one wrk run; `done` resolves with its figures when it ends. */
export function startLoad(spec: LoadSpec): RunningLoad {
  const nonce = randomBytes(4).toString('hex');
  const args = [
    `-t${spec.threads}`,
    `-c${spec.connections}`,
    `-d${spec.duration}s`,
    '--timeout',
    '30s',
    '-s',
    SCRIPT,
    spec.url,
    '--',
    spec.requests,
    nonce,
    String(spec.threads),
  ];
  const child = spawn(wrk(), args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, MXKEYS_WRK_STATUSES: spec.countStatuses ? '1' : '0' },
  });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const done = new Promise<LoadResult>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code, signal) => {
      const line = out.split('\n').find((l) => l.startsWith('MXKEYS_WRK '));
      if (code !== 0 || !line) {
        reject(new Error(`wrk ${args.join(' ')} ended with ${code ?? signal} without a result:\n${out.slice(-2000)}`));
        return;
      }
      resolve(parseResult(JSON.parse(line.slice('MXKEYS_WRK '.length)) as WrkJson));
    });
  });
  return { pid: child.pid!, done };
}

export function runLoad(spec: LoadSpec): Promise<LoadResult> {
  return startLoad(spec).done;
}

interface WrkJson {
  requests: number;
  non2xx: number;
  connect: number;
  read: number;
  write: number;
  timeout: number;
  durationUs: number;
  latencyUs: { mean: number; p50: number; p90: number; p99: number; max: number };
  built: number;
  statuses: Record<string, number>;
}

function parseResult(j: WrkJson): LoadResult {
  const seconds = j.durationUs / 1e6;
  const ok = j.requests - j.non2xx;
  const ms = (us: number) => us / 1000;
  return {
    requests: j.requests,
    ok,
    non2xx: j.non2xx,
    errors: { connect: j.connect, read: j.read, write: j.write, timeout: j.timeout },
    seconds,
    rps: ok / seconds,
    latency: { mean: ms(j.latencyUs.mean), p50: ms(j.latencyUs.p50), p90: ms(j.latencyUs.p90), p99: ms(j.latencyUs.p99), max: ms(j.latencyUs.max) },
    built: j.built,
    ...(Object.keys(j.statuses).length > 0 ? { statuses: j.statuses } : {}),
  };
}
