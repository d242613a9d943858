/**
 * The load harness (`npm run bench`). For each database it builds a data set over HTTP, then for
 * each workload measures, with wrk (bench/load.ts, one thread and 16 connections by default), a
 * baseline — a bare node:http server answering the captured bytes of a real mxkeys answer
 * (bench/baseline-server.mjs) — and mxkeys with one worker and with two (`serve --workers 2`),
 * and reports mxkeys as a ratio of the baseline and the two-worker factor. A memory job then adds
 * 10^5 devices and 10^6 one-time keys to the database (bench/bulk.ts), runs the 1 × 1 query and
 * the claim again on it, and reads the resident memory of one process after sweeping queries and
 * claims over the new devices.
 *
 *   npm run bench -- [--backend sqlite|postgres|both] [--quick] [--only IDS] [--workers 1,2] …
 *   npm run bench -- --help
 *
 * Results go to bench/results/latest.json (--json FILE) and, as Markdown tables, to standard
 * output; `npm run bench:report` turns the JSON into docs/benchmarks.svg and the tables of
 * docs/benchmarks.md. mxkeys runs from src/ compiled at the start into a directory of the
 * harness's own (not dist/, which `npm test` may rebuild meanwhile); a fresh mxkeys process
 * serves each measurement.
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync, writeFileSync, mkdirSync, existsSync } from 'node:fs';
import { tmpdir, cpus, totalmem } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { spawnSync } from 'node:child_process';
import Database from 'better-sqlite3';
import { runLoad, startLoad, wrk, writeRequests, socketErrors, UNIQUE_MARKER, type BenchRequest, type LoadResult } from './load.js';
import { median, postgresSchema } from './harness.js';
import { formatSummary, summarizeProfile } from './profile.js';
import { presign, startOrigin, type Origin } from './xmatrix.js';
import { addOneTimeKeys, cloneUser, openBulk } from './bulk.js';
import { TARGETS, WORKLOAD_IDS, type BackendName, type BackendResult, type MemoryResult, type Results, type RunRecord, type WorkloadId, type WorkloadResult } from './results.js';
import { markdownReport } from './report.js';
import {
  BenchCrossSigning,
  BenchDevice,
  benchConfig,
  buildSnapshot,
  cpuShare,
  cpuSnapshot,
  freePort,
  fsyncMs,
  inParallel,
  killChildren,
  login,
  machineBusy,
  ok,
  processTree,
  registerUser,
  residentMemory,
  startBaseline,
  startMxkeys,
  type Build,
  type Child,
  type MxkeysOptions,
  type Session,
} from './support.js';

// ---------------------------------------------------------------------------------------------
// Options

const MEMORY = 'memory';
const DEFAULT_JSON = 'bench/results/latest.json';

const USAGE = `usage: npm run bench -- [options]   (or: node --import tsx bench/run.ts [options])

  --backend B        sqlite, postgres or both (default both, with --quick sqlite; env
                     BENCH_BACKEND)
  --only IDS         only these, comma-separated: ${WORKLOAD_IDS.join(', ')}, ${MEMORY}
                     (default: all)
  --workers LIST     mxkeys worker counts to measure, comma-separated (default 1,2); the factor
                     reported is the highest count over 1
  --duration S       measured seconds per run (default 6; env BENCH_DURATION)
  --warmup S         warm-up seconds before each measured run, at least 1 (default 2)
  --connections N    wrk connections (default 16)
  --threads N        wrk threads (default 1)
  --rounds N         repeat every measurement N times, baseline and mxkeys alternating, and
                     report medians (default 1)
  --memory-devices N devices added for the memory job (default 100000)
  --memory-keys N    one-time keys added for the memory job (default 1000000)
  --quick            a rough pass of about 3 minutes: SQLite only (unless --backend says
                     otherwise), --duration 2 --warmup 1, no query-1000x3 (unless --only names
                     it), the memory job with 10^4 devices and 10^5 keys
  --no-wait          measure at once even if other processes keep the machine busy (by default
                     each run waits up to a minute for a quiet machine and is repeated, up to
                     twice, if something else used more than 10 % of a core during it)
  --count-statuses   count every answer's status in wrk's Lua response() callback (exact, but
                     costs wrk CPU per answer; by default wrk's own count of statuses >= 400)
  --postgres URL     PostgreSQL server (default postgres://postgres@127.0.0.1:5432/postgres;
                     env BENCH_POSTGRES). A fresh schema is created and dropped afterwards.
  --json FILE        where to write the results (default ${DEFAULT_JSON})
  --note TEXT        a remark stored with the results and shown in the report
  --cpu-prof DIR     run the one-worker mxkeys processes under node --cpu-prof, write the
                     .cpuprofile files to DIR and print each one's top functions (slower:
                     such figures are for finding where time goes, not for the record)
  --build DIR        compile src/ into DIR and keep it, or reuse what an earlier run compiled
                     there. Without it, src/ is compiled into a temporary directory.

wrk must be installed (Debian/Ubuntu: apt-get install wrk).
`;

const { values: argv } = parseArgs({
  options: {
    backend: { type: 'string' },
    only: { type: 'string' },
    workers: { type: 'string' },
    duration: { type: 'string' },
    warmup: { type: 'string' },
    connections: { type: 'string' },
    threads: { type: 'string' },
    rounds: { type: 'string' },
    'memory-devices': { type: 'string' },
    'memory-keys': { type: 'string' },
    quick: { type: 'boolean' },
    'no-wait': { type: 'boolean' },
    'count-statuses': { type: 'boolean' },
    postgres: { type: 'string' },
    json: { type: 'string' },
    note: { type: 'string' },
    'cpu-prof': { type: 'string' },
    build: { type: 'string' },
    help: { type: 'boolean', short: 'h' },
  },
});
if (argv.help) {
  process.stdout.write(USAGE);
  process.exit(0);
}

function usageError(message: string): never {
  process.stderr.write(`${message}\n\n${USAGE}`);
  process.exit(2);
}

function num(name: string, value: string | undefined, fallback: number, min = 0): number {
  if (value === undefined || value === '') return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n < min) usageError(`--${name}: expected a number of at least ${min}, found ${JSON.stringify(value)}`);
  return n;
}

const quick = argv.quick === true;
const backendArg = argv.backend ?? process.env['BENCH_BACKEND'] ?? (quick ? 'sqlite' : 'both');
if (!['sqlite', 'postgres', 'both'].includes(backendArg)) usageError(`--backend: expected sqlite, postgres or both, found ${JSON.stringify(backendArg)}`);
const only = argv.only?.split(',').map((x) => x.trim());
for (const id of only ?? []) {
  if (id !== MEMORY && !(WORKLOAD_IDS as readonly string[]).includes(id)) usageError(`--only: unknown ${JSON.stringify(id)}; choose from ${[...WORKLOAD_IDS, MEMORY].join(', ')}`);
}
const workers = (argv.workers ?? '1,2').split(',').map((x) => num('workers', x.trim(), 1, 1));
if (!workers.includes(1)) usageError('--workers: the list must include 1 (ratios and factors are taken against one worker)');

const opts = {
  backends: (backendArg === 'both' ? ['sqlite', 'postgres'] : [backendArg]) as BackendName[],
  only,
  workers: [...new Set(workers)].sort((a, b) => a - b),
  duration: num('duration', argv.duration ?? process.env['BENCH_DURATION'], quick ? 2 : 6, 1),
  warmup: num('warmup', argv.warmup, quick ? 1 : 2, 1),
  connections: num('connections', argv.connections, 16, 1),
  threads: num('threads', argv.threads, 1, 1),
  rounds: Math.round(num('rounds', argv.rounds, 1, 1)),
  memoryDevices: Math.round(num('memory-devices', argv['memory-devices'], quick ? 10_000 : 100_000, 4)),
  memoryKeys: Math.round(num('memory-keys', argv['memory-keys'], quick ? 100_000 : 1_000_000, 1)),
  wait: argv['no-wait'] !== true,
  countStatuses: argv['count-statuses'] === true,
  postgres: argv.postgres ?? process.env['BENCH_POSTGRES'] ?? 'postgres://postgres@127.0.0.1:5432/postgres',
  json: resolve(argv.json ?? DEFAULT_JSON),
  note: argv.note,
  cpuProf: argv['cpu-prof'] ? resolve(argv['cpu-prof']) : undefined,
  build: argv.build ? resolve(argv.build) : undefined,
};
if (opts.threads > opts.connections) usageError('--threads: wrk needs at least one connection per thread');
const selected = (id: WorkloadId | typeof MEMORY) => (opts.only === undefined ? !(quick && id === 'query-1000x3') : opts.only.includes(id));

const SECRET = 'bench-shared-secret';
const SERVER = 'bench.local';
/** Per-device one-time key limit in the bench config (the default, 10000, is below what claims need). */
const MAX_KEYS_PER_DEVICE = 50_000;
/** Keys per upload request. */
const UPLOAD_BATCH = 10_000;
const ALG = 'signed_curve25519';
const CLAIM_DEVICES = 16;
const LARGE = { 'query-10x3': 10, 'query-100x3': 100, 'query-1000x3': 1000 } as const;
const DEVICES_PER_LARGE_USER = 3;
/** The memory job's load: each list of requests for at most this long. */
const MEMORY_LOAD_SECONDS = 30;
/** Users of the large queries made over HTTP; the others are copies of them (bench/bulk.ts). */
const HTTP_USERS = 100;
const manyUser = (i: number) => `@many${String(i).padStart(4, '0')}:${SERVER}`;
const memUser = (i: number) => `@mem${String(i).padStart(7, '0')}:${SERVER}`;

const log = (msg: string) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${msg}\n`);

// ---------------------------------------------------------------------------------------------
// The data set, over HTTP

interface World {
  readonly querier: Session;
  /** The 1 user × 1 device of the small queries (client and federation). */
  readonly one: BenchDevice;
  /** Devices of one user, the targets of the claims (taken in turn). */
  readonly claimDevices: BenchDevice[];
  /** Users with 3 devices each, made over HTTP; the large queries name them and their copies. */
  readonly many: BenchDevice[][];
}

async function uploadDeviceKeys(url: string, d: BenchDevice, fallback: boolean): Promise<void> {
  await ok(url, 'POST', '/_matrix/client/v3/keys/upload', {
    token: d.session.accessToken,
    body: { device_keys: d.deviceKeys(), ...(fallback ? { fallback_keys: d.fallbackKey() } : {}) },
  });
}

/** Master and self-signing keys for the user, and the self-signing key's signature on each device. */
async function crossSign(url: string, devices: readonly BenchDevice[]): Promise<void> {
  const first = devices[0]!;
  const xs = new BenchCrossSigning(first.userId);
  await ok(url, 'POST', '/_matrix/client/v3/keys/device_signing/upload', { token: first.session.accessToken, body: xs.upload() });
  const signed = Object.fromEntries(devices.map((d) => [d.deviceId, xs.signDevice(d.deviceKeys())]));
  const r = await ok(url, 'POST', '/_matrix/client/v3/keys/signatures/upload', { token: first.session.accessToken, body: { [first.userId]: signed } });
  if (Object.keys((r.body['failures'] as object | undefined) ?? {}).length > 0) throw new Error(`signature upload failed: ${r.text}`);
}

/** A user with `count` devices, each with device keys (the first also a fallback key), cross-signed. */
async function crossSignedUser(url: string, name: string, count: number, nonceFrom?: string): Promise<BenchDevice[]> {
  const first = await registerUser(url, SECRET, name, nonceFrom);
  const sessions = [first];
  for (let i = 1; i < count; i++) sessions.push(await login(url, first));
  const devices = sessions.map((s) => new BenchDevice(s));
  for (const [i, d] of devices.entries()) await uploadDeviceKeys(url, d, i === 0 || count === CLAIM_DEVICES);
  await crossSign(url, devices);
  return devices;
}

async function buildWorld(url: string, manyUsers: number): Promise<World> {
  const querier = await registerUser(url, SECRET, 'querier');
  const [one] = await crossSignedUser(url, 'one', 1);
  const claimDevices = await crossSignedUser(url, 'claimee', CLAIM_DEVICES);
  let done = 0;
  const t0 = Date.now();
  const many = await inParallel(
    Array.from({ length: manyUsers }, (_, i) => manyUser(i).slice(1, -SERVER.length - 1)),
    6,
    async (name, i) => {
      // mxkeys hands out 20 registration nonces at once per client address: 15 users per address.
      const from = `127.0.${1 + Math.floor(i / 15 / 250)}.${1 + (Math.floor(i / 15) % 250)}`;
      const devices = await crossSignedUser(url, name, DEVICES_PER_LARGE_USER, from);
      if (++done % 25 === 0) log(`  ${done} of ${manyUsers} users with ${DEVICES_PER_LARGE_USER} devices each (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
      return devices;
    },
  );
  return { querier, one: one!, claimDevices, many };
}

/** Uploads `n` fresh one-time keys to a device, ≤ UPLOAD_BATCH per request. */
async function uploadOneTimeKeys(url: string, d: BenchDevice, n: number): Promise<void> {
  for (let left = n; left > 0; left -= UPLOAD_BATCH) {
    await ok(url, 'POST', '/_matrix/client/v3/keys/upload', { token: d.session.accessToken, rawBody: `{"one_time_keys":${d.oneTimeKeysText(Math.min(UPLOAD_BATCH, left))}}` });
  }
}

/** The device's unclaimed signed_curve25519 keys, from its own /sync. */
async function keyCount(url: string, d: BenchDevice): Promise<number> {
  const r = await ok<{ device_one_time_keys_count: Record<string, number> }>(url, 'GET', '/_matrix/client/v3/sync', { token: d.session.accessToken });
  return r.body.device_one_time_keys_count[ALG] ?? 0;
}

function keyCounts(url: string, devices: readonly BenchDevice[]): Promise<number[]> {
  return inParallel(devices, 8, (d) => keyCount(url, d));
}

/** Tops every device up to at least `perDevice` keys (at most the configured limit). Returns how many keys were uploaded. */
async function stock(url: string, devices: readonly BenchDevice[], perDevice: number): Promise<number> {
  const target = Math.min(Math.ceil(perDevice), MAX_KEYS_PER_DEVICE);
  const counts = await keyCounts(url, devices);
  const adds = counts.map((c) => Math.max(0, target - c));
  await inParallel(devices, 2, (d, i) => (adds[i]! > 0 ? uploadOneTimeKeys(url, d, adds[i]!) : Promise.resolve()));
  return adds.reduce((a, b) => a + b, 0);
}

// ---------------------------------------------------------------------------------------------
// Databases

interface Backend {
  readonly name: BackendName;
  readonly database: { sqlite: string } | { postgres: string };
  readonly version: string;
  countRows(): Promise<{ oneTimeKeys: number; devices: number }>;
  /** PostgreSQL: pids of mxkeys' connections and of the server's background processes. */
  databasePids(): Promise<number[]>;
  cleanup(): Promise<void>;
}

async function openBackend(name: BackendName, dir: string): Promise<Backend> {
  const COUNT = 'SELECT (SELECT COUNT(*) FROM e2e_one_time_keys) AS k, (SELECT COUNT(*) FROM devices) AS d';
  if (name === 'sqlite') {
    const file = join(dir, 'mxkeys.db');
    const mem = new Database(':memory:');
    const version = `SQLite ${(mem.prepare('SELECT sqlite_version() AS v').get() as { v: string }).v} (better-sqlite3; WAL, fsync before each answer)`;
    mem.close();
    return {
      name,
      database: { sqlite: file },
      version,
      async countRows() {
        const db = new Database(file, { readonly: true, fileMustExist: true });
        try {
          const r = db.prepare(COUNT).get() as { k: number; d: number };
          return { oneTimeKeys: r.k, devices: r.d };
        } finally {
          db.close();
        }
      },
      async databasePids() {
        return [];
      },
      async cleanup() {},
    };
  }
  const schema = await postgresSchema(opts.postgres, 'bench');
  const admin = schema;
  const version = ((await admin.query<{ v: string }>("SELECT current_setting('server_version') AS v")).rows[0]!.v).split(' ')[0]!;
  // Tells mxkeys' connections apart from other clients of the same server (CPU accounting).
  const url = new URL(schema.database.postgres);
  url.searchParams.set('application_name', schema.schema);
  return {
    name,
    database: { postgres: url.toString() },
    version: `PostgreSQL ${version} (same machine, 127.0.0.1; pool_size 10 per process)`,
    async countRows() {
      const r = (await admin.query<{ k: string; d: string }>(COUNT.replaceAll('FROM ', `FROM ${schema.schema}.`))).rows[0]!;
      return { oneTimeKeys: Number(r.k), devices: Number(r.d) };
    },
    async databasePids() {
      const r = await admin.query<{ pid: number }>(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 OR backend_type NOT IN ('client backend', 'walsender')",
        [schema.schema],
      );
      return r.rows.map((x) => Number(x.pid));
    },
    cleanup: () => schema.drop(),
  };
}

// ---------------------------------------------------------------------------------------------
// Workloads

interface Workload {
  readonly id: WorkloadId;
  readonly title: string;
  readonly target?: number;
  /** Requests for the baseline and the warm-ups, and for the measured windows unless `fresh`. */
  readonly file: string;
  /** A file of `count` requests never sent before (federation: each a new signature). */
  readonly fresh?: (count: number) => string;
  /** Claims: the devices the keys come from. */
  readonly claim?: readonly BenchDevice[];
  readonly captured: { readonly body: string; readonly headers: Record<string, string> };
  readonly requestBytes: number;
}

const QUERY = '/_matrix/client/v3/keys/query';
const CLAIM = '/_matrix/client/v3/keys/claim';
const FED_QUERY = '/_matrix/federation/v1/user/keys/query';
const SKIP_HEADERS = new Set(['date', 'connection', 'keep-alive', 'content-length', 'transfer-encoding']);

/** The answer to one real request, for the baseline to send. */
async function capture(url: string, r: BenchRequest, check?: (text: string) => void): Promise<Workload['captured']> {
  const body = r.body.replace(UNIQUE_MARKER, 'capture'.padEnd(UNIQUE_MARKER.length, '0'));
  const res = await fetch(url + r.path, { method: 'POST', headers: { 'content-type': 'application/json', ...r.headers }, body });
  const text = await res.text();
  if (res.status !== 200) throw new Error(`POST ${r.path}: ${res.status} ${text.slice(0, 500)}`);
  check?.(text);
  const headers: Record<string, string> = {};
  res.headers.forEach((v, k) => {
    if (!SKIP_HEADERS.has(k)) headers[k] = v;
  });
  return { body: text, headers };
}

async function prepareWorkloads(url: string, dir: string, backend: BackendName, w: World, origin: Origin): Promise<Workload[]> {
  const auth = { Authorization: `Bearer ${w.querier.accessToken}` };
  const out: Workload[] = [];
  const file = (id: string, requests: BenchRequest[]) => {
    const f = join(dir, `${id}.requests`);
    writeRequests(f, requests);
    return f;
  };
  const client = async (id: WorkloadId, title: string, path: string, bodies: string[], extra: Partial<Workload> = {}, check?: (text: string) => void) => {
    if (!selected(id)) return;
    const requests = bodies.map((body) => ({ path, headers: auth, body }));
    const target = TARGETS[backend][id];
    out.push({ id, title, file: file(id, requests), captured: await capture(url, requests[0]!, check), requestBytes: Buffer.byteLength(bodies[0]!), ...(target ? { target } : {}), ...extra });
  };

  await client('query-1x1', 'POST /keys/query, 1 user × 1 device', QUERY, [JSON.stringify({ device_keys: { [w.one.userId]: [] } })]);
  await client(
    'claim-1',
    `POST /keys/claim, 1 key per request (${CLAIM_DEVICES} devices in turn)`,
    CLAIM,
    w.claimDevices.map((d) => JSON.stringify({ one_time_keys: { [d.userId]: { [d.deviceId]: ALG } } })),
    { claim: w.claimDevices },
    (text) => {
      if (!text.includes(`"${ALG}:AAAA`)) throw new Error(`claim-1: the captured claim carried no one-time key: ${text.slice(0, 300)}`);
    },
  );
  if (selected('fed-query')) {
    const body = JSON.stringify({ device_keys: { [w.one.userId]: [] } });
    const [first] = presign(origin, SERVER, FED_QUERY, body, 1);
    const target = TARGETS[backend]['fed-query'];
    let n = 0;
    out.push({
      id: 'fed-query',
      title: 'federation POST /user/keys/query, 1 × 1, a new X-Matrix signature per request',
      // Warm-ups and the baseline cycle through these; every measured window of mxkeys gets fresh ones.
      file: file('fed-query', presign(origin, SERVER, FED_QUERY, body, 2000)),
      fresh: (count) => file(`fed-query-${++n}`, presign(origin, SERVER, FED_QUERY, body, count)),
      captured: await capture(url, first!),
      requestBytes: Buffer.byteLength(body),
      ...(target ? { target } : {}),
    });
  }
  for (const [id, n] of Object.entries(LARGE) as [WorkloadId, number][]) {
    // N users × 3 devices, plus a user no request names twice, so no cached answer can serve it.
    const users = Array.from({ length: n }, (_, i) => manyUser(i));
    const body = JSON.stringify({ device_keys: Object.fromEntries([...users, `@u${UNIQUE_MARKER}:${SERVER}`].map((u) => [u, []])) });
    await client(id, `POST /keys/query, ${n} users × 3 devices + 1 new user each time`, QUERY, [body]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Measurements

interface Context {
  readonly build: Build;
  readonly backend: Backend;
  readonly dir: string;
  readonly configFile: string;
  readonly port: number;
}

const fmt0 = (n: number) => (Number.isFinite(n) ? n.toFixed(0) : '–');
const fmtMs = (n: number) => (Number.isFinite(n) ? (n < 10 ? n.toFixed(2) : n.toFixed(1)) : '–');

function describe(what: string, r: RunRecord): string {
  const x = r.result;
  const errs = socketErrors(x);
  const bad = x.non2xx || errs ? ` | non-2xx ${x.non2xx}, socket errors ${errs}${x.statuses ? ` ${JSON.stringify(x.statuses)}` : ''}` : '';
  const claims = r.claims ? ` | claimed ${r.claims.answered}, deleted ${r.claims.deleted}, fewest left ${r.claims.minLeft}` : '';
  const repeated = r.distinctRequests !== undefined && x.built > r.distinctRequests ? ` | ${x.built - r.distinctRequests} requests sent twice` : '';
  const c = r.cpu;
  return `${what}: ${fmt0(x.rps)} req/s, p50 ${fmtMs(x.latency.p50)} ms, p99 ${fmtMs(x.latency.p99)} ms | cpu % server ${fmt0(c.server)} wrk ${fmt0(c.loadgen)} postgres ${fmt0(c.postgres)} other ${fmt0(c.other + c.steal)}${claims}${repeated}${bad}`;
}

/** One measured wrk run against `url`, with the CPU each party used meanwhile. */
async function measureWindow(ctx: Context, url: string, serverPids: number[], file: string, duration: number): Promise<Pick<RunRecord, 'result' | 'cpu'>> {
  const postgres = await ctx.backend.databasePids();
  const load = startLoad({ url, requests: file, connections: opts.connections, threads: opts.threads, duration, countStatuses: opts.countStatuses });
  const roles = { server: serverPids, loadgen: load.pid, postgres };
  const pids = [...serverPids, load.pid, ...postgres];
  const before = cpuSnapshot(pids);
  // Read before wrk ends: a process that has exited has no CPU figures left to read.
  const after = await new Promise<ReturnType<typeof cpuSnapshot>>((r) => setTimeout(() => r(cpuSnapshot(pids)), Math.max(100, duration * 1000 - 300)));
  const result = await load.done;
  return { result, cpu: cpuShare(before, after, roles) };
}

function warmUp(url: string, file: string): Promise<LoadResult> {
  return runLoad({ url, requests: file, connections: opts.connections, threads: opts.threads, duration: opts.warmup });
}

async function measureBaseline(ctx: Context, w: Workload): Promise<RunRecord> {
  const bodyFile = join(ctx.dir, `${w.id}.answer`);
  writeFileSync(bodyFile, w.captured.body);
  const server = await startBaseline(await freePort(), bodyFile, w.captured.headers);
  try {
    await warmUp(server.url, w.file);
    return { server: 'baseline', workers: 1, ...(await measureWindow(ctx, server.url, [server.pid], w.file, opts.duration)) };
  } finally {
    await server.stop();
  }
}

async function measureMxkeys(ctx: Context, w: Workload, count: number, baselineRps: number): Promise<RunRecord> {
  const prof = opts.cpuProf && count === 1 ? { dir: opts.cpuProf, name: `${ctx.backend.name}-${w.id}-${Date.now()}.cpuprofile` } : undefined;
  const server = await startServer(ctx, { cpuProf: prof, workers: count });
  let record: RunRecord;
  try {
    const pids = processTree(server.pid);
    if (count > 1 && pids.length < count + 1) throw new Error(`mxkeys --workers ${count}: only ${pids.length - 1} workers found under ${server.pid}`);
    // Claims: enough keys that the warm-up, even at the ceiling's rate, takes real one-time keys.
    if (w.claim) await stock(server.url, w.claim, (baselineRps * opts.warmup * 1.2) / w.claim.length + 50);
    const warm = await warmUp(server.url, w.file);
    // Then enough for the window. Fresh requests (each costs the harness a signature): as many as
    // the ceiling answers, or 3 × the warm-up's rate if more, since a warm-up on a busy machine
    // can be far slower than the window. Keys: 3 × what the warm-up claimed (it includes the
    // start-up), at most at the ceiling's rate.
    const fresh = w.fresh ? Math.ceil(Math.max(baselineRps, warm.rps * 3) * opts.duration) + 1000 : 0;
    const file = w.fresh ? w.fresh(fresh) : w.file;
    if (w.claim) await stock(server.url, w.claim, (Math.min(Math.max(warm.rps, 100) * 3, Math.max(baselineRps, warm.rps * 1.5)) * opts.duration + 1000) / w.claim.length + 50);
    const countsBefore = w.claim ? await keyCounts(server.url, w.claim) : [];
    const fsync = ctx.backend.name === 'sqlite' ? fsyncMs(ctx.dir) : undefined;
    const measured = await measureWindow(ctx, server.url, pids, file, opts.duration);
    let claims: RunRecord['claims'];
    if (w.claim) {
      const countsAfter = await keyCounts(server.url, w.claim);
      claims = { answered: measured.result.ok, deleted: countsBefore.reduce((a, b) => a + b, 0) - countsAfter.reduce((a, b) => a + b, 0), minLeft: Math.min(...countsAfter) };
    }
    record = {
      server: 'mxkeys',
      workers: count,
      ...measured,
      ...(w.fresh ? { distinctRequests: fresh } : {}),
      ...(claims ? { claims } : {}),
      ...(fsync !== undefined ? { fsyncMs: fsync } : {}),
    };
  } finally {
    const code = await server.stop();
    if (code !== 0) log(`  mxkeys exited with ${code}:\n${server.output().slice(-2000)}`);
  }
  if (prof && existsSync(join(prof.dir, prof.name))) {
    const profile = formatSummary(summarizeProfile(join(prof.dir, prof.name), 25));
    log(`  profile ${join(prof.dir, prof.name)}\n${profile}`);
    record = { ...record, profile };
  }
  return record;
}

/**
 * startMxkeys, tried again a few times when PostgreSQL has no connection left (other clients of
 * the same server may hold them for a while).
 */
async function startServer(ctx: Context, options: MxkeysOptions = {}): Promise<Child> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startMxkeys(ctx.build, ctx.configFile, ctx.port, options);
    } catch (e) {
      if (attempt >= 6 || !/too many (connections|clients)/i.test(String(e))) throw e;
      log(`  PostgreSQL has no connection left for mxkeys (other clients hold them); trying again in 10 s`);
      await new Promise((r) => setTimeout(r, 10_000));
    }
  }
}

/** Something else used more than this (% of one core) during a run: measure again. */
const DISTURBED_PCT = 10;
const MAX_RETRIES = 2;

/** Waits (up to a minute) until the machine is nearly idle. */
async function quiet(): Promise<void> {
  const deadline = Date.now() + 60_000;
  let busy = await machineBusy(1000);
  if (busy < 10) return;
  log(`  machine busy (${busy.toFixed(0)} % of all cores) before a run: waiting for it to go quiet`);
  while (busy >= 10 && Date.now() < deadline) busy = await machineBusy(2000);
  log(busy < 10 ? '  quiet again' : `  still ${busy.toFixed(0)} % busy after a minute: measuring anyway`);
}

/** One measurement; unless --no-wait, on a quiet machine and repeated if something else ran meanwhile. */
async function undisturbed(what: string, measure: () => Promise<RunRecord>): Promise<RunRecord> {
  for (let retries = 0; ; retries++) {
    if (opts.wait) await quiet();
    const r = await measure();
    log(describe(what, r));
    const disturbance = r.cpu.other + r.cpu.steal;
    if (!opts.wait || disturbance <= DISTURBED_PCT || retries >= MAX_RETRIES) return retries ? { ...r, retries } : r;
    log(`  disturbed: other processes took ${disturbance.toFixed(0)} % of a core; measuring again`);
  }
}

// ---------------------------------------------------------------------------------------------
// The memory job

async function memoryJob(ctx: Context, world: World, workloads: Workload[], results: WorkloadResult[]): Promise<MemoryResult> {
  const { backend } = ctx;
  const template = world.many[0];
  if (!template) throw new Error('the memory job copies the users of the large queries: select one of them too');
  const users = Math.ceil(opts.memoryDevices / template.length);
  const perDevice = Math.ceil(opts.memoryKeys / (users * template.length));
  log(`${backend.name}: memory job: adding ${users} users × ${template.length} devices, ${perDevice} one-time keys each`);
  const t0 = performance.now();
  const db = await openBulk(backend.database);
  let keys = 0;
  try {
    await db.transaction(async () => {
      await cloneUser(db, template[0]!.userId, { prefix: '@mem', width: 7, suffix: `:${SERVER}`, count: users, stride: 1, offset: 0 });
      keys = await addOneTimeKeys(db, '@mem', perDevice);
    });
  } finally {
    await db.close();
  }
  const added = { users, devices: users * template.length, oneTimeKeys: keys, seconds: (performance.now() - t0) / 1000 };
  log(`  added ${added.users} users, ${added.devices} devices, ${added.oneTimeKeys} keys in ${added.seconds.toFixed(1)} s`);

  // The small query and the claim again, on the large database, one worker.
  const largeDatabase: MemoryResult['largeDatabase'] = [];
  for (const id of ['query-1x1', 'claim-1'] as const) {
    const w = workloads.find((x) => x.id === id);
    const small = results.find((x) => x.id === id)?.mxkeys['1']?.[0];
    const baseline = results.find((x) => x.id === id)?.baseline[0];
    if (!w || !small || !baseline) continue;
    const large = await undisturbed(`mxkeys   ${id} on the large database`, () => measureMxkeys(ctx, w, 1, baseline.result.rps));
    largeDatabase.push({ id, small, large });
  }

  const stored = await backend.countRows();
  const server = await startServer(ctx);
  try {
    const start = residentMemory(server.pid);
    const auth = { Authorization: `Bearer ${world.querier.accessToken}` };
    const queries: BenchRequest[] = [];
    for (let i = 0; i < users; i += 100) {
      const named = Array.from({ length: Math.min(100, users - i) }, (_, k) => memUser(i + k));
      queries.push({ path: QUERY, headers: auth, body: JSON.stringify({ device_keys: Object.fromEntries(named.map((u) => [u, []])) }) });
    }
    // A claim names every device of 4 users, as a client starting conversations with them would.
    const claims: BenchRequest[] = [];
    const deviceMap = Object.fromEntries(template.map((d) => [d.deviceId, ALG]));
    for (let i = 0; i < users; i += 4) {
      const named = Array.from({ length: Math.min(4, users - i) }, (_, k) => memUser(i + k));
      claims.push({ path: CLAIM, headers: auth, body: JSON.stringify({ one_time_keys: Object.fromEntries(named.map((u) => [u, deviceMap])) }) });
    }
    // Each list is sent whole (in wrk runs of --duration seconds, each taking up where the last
    // stopped), so that every added user is queried and a key claimed from every added device,
    // unless that takes more than MEMORY_LOAD_SECONDS.
    const loads: MemoryResult['loads'] = [];
    for (const [title, requests] of [
      [`POST /keys/query, 100 users × ${template.length} devices, each of the ${users} users once`, queries],
      [`POST /keys/claim, 4 users × ${template.length} devices, a key from each of the ${added.devices} devices once`, claims],
    ] as const) {
      const file = join(ctx.dir, 'memory.requests');
      const started = performance.now();
      const runs: LoadResult[] = [];
      let next = 0;
      while (next < requests.length && performance.now() - started < MEMORY_LOAD_SECONDS * 1000) {
        writeRequests(file, requests.slice(next));
        const result = await runLoad({ url: server.url, requests: file, connections: opts.connections, threads: opts.threads, duration: opts.duration });
        runs.push(result);
        next += Math.max(1, result.built);
      }
      const ok = runs.reduce((a, r) => a + r.ok, 0);
      const seconds = runs.reduce((a, r) => a + r.seconds, 0);
      const load = { title, sent: Math.min(next, requests.length), of: requests.length, ok, non2xx: runs.reduce((a, r) => a + r.non2xx, 0), seconds, rps: ok / seconds, p50: median(runs.map((r) => r.latency.p50)) };
      log(`  memory job load: ${title}: ${load.sent} of ${load.of} requests sent, ${fmt0(load.rps)} req/s, p50 ${fmtMs(load.p50)} ms (median of ${runs.length} runs), non-2xx ${load.non2xx}`);
      loads.push(load);
    }
    const end = residentMemory(server.pid);
    log(`  resident memory: ${(start.rss / 2 ** 20).toFixed(0)} MiB after start, ${(end.rss / 2 ** 20).toFixed(0)} MiB after the load, peak ${(end.peak / 2 ** 20).toFixed(0)} MiB`);
    return { added, stored, rssStart: start.rss, rssEnd: end.rss, rssPeak: end.peak, loads, largeDatabase };
  } finally {
    await server.stop();
  }
}

// ---------------------------------------------------------------------------------------------
// Main

/** What to undo if the harness is interrupted. */
const cleanups = new Set<() => Promise<void>>();

async function runBackend(name: BackendName, build: Build, origin: Origin): Promise<BackendResult> {
  const dir = mkdtempSync(join(tmpdir(), `mxkeys-bench-${name}-`));
  const backend = await openBackend(name, dir);
  const cleanup = async () => {
    cleanups.delete(cleanup);
    await backend.cleanup().catch((e: unknown) => log(`cleanup failed: ${String(e)}`));
    rmSync(dir, { recursive: true, force: true });
  };
  cleanups.add(cleanup);
  try {
    const { configFile, port } = await benchConfig(dir, 'mxkeys', {
      database: backend.database,
      secret: SECRET,
      extra: {
        // info: `serve --workers N` says "mxkeys is listening" once every worker serves.
        log_level: 'info',
        max_one_time_keys_per_device: MAX_KEYS_PER_DEVICE,
        // Registration and logins of the data set hash passwords; the default cost takes ~0.5 s each.
        password_hashing: { scrypt_log_n: 10 },
        // The limiter would otherwise be what is measured.
        federation: { resolve: { [origin.name]: origin.url }, rate_limit: { per_second: 1e9, burst_count: 1e9 } },
      },
    });
    const ctx: Context = { build, backend, dir, configFile, port };
    log(`${name}: ${backend.version}; setting up`);
    const t0 = Date.now();
    const manyUsers = Math.max(0, ...Object.entries(LARGE).map(([id, n]) => (selected(id as WorkloadId) ? n : 0)));
    const httpUsers = Math.min(manyUsers, HTTP_USERS);
    let setup = await startServer(ctx);
    let world: World;
    try {
      world = await buildWorld(setup.url, selected(MEMORY) ? Math.max(httpUsers, 1) : httpUsers);
      await stock(setup.url, world.claimDevices, 10);
    } finally {
      await setup.stop();
    }
    if (manyUsers > httpUsers) {
      // The users HTTP_USERS … manyUsers − 1: copies of the first HTTP_USERS, user i of user i mod HTTP_USERS.
      const db = await openBulk(backend.database);
      try {
        await db.transaction(async () => {
          for (let t = 0; t < httpUsers; t++) {
            const count = Math.ceil((manyUsers - httpUsers - t) / httpUsers);
            if (count > 0) await cloneUser(db, manyUser(t), { prefix: '@many', width: 4, suffix: `:${SERVER}`, count, stride: httpUsers, offset: httpUsers + t });
          }
        });
      } finally {
        await db.close();
      }
      log(`${name}: copied ${httpUsers} users to ${manyUsers} users`);
    }
    let workloads: Workload[];
    setup = await startServer(ctx);
    try {
      workloads = await prepareWorkloads(setup.url, dir, name, world, origin);
    } finally {
      await setup.stop();
    }
    const setupSeconds = (Date.now() - t0) / 1000;
    log(`${name}: setup done in ${setupSeconds.toFixed(0)} s; answers: ${workloads.map((w) => `${w.id} ${w.captured.body.length} B`).join(', ')}`);

    const results: WorkloadResult[] = [];
    for (const w of workloads) {
      const r: WorkloadResult = {
        id: w.id,
        title: w.title,
        answerBytes: Buffer.byteLength(w.captured.body),
        requestBytes: w.requestBytes,
        ...(w.target !== undefined ? { target: w.target } : {}),
        baseline: [],
        mxkeys: Object.fromEntries(opts.workers.map((n) => [String(n), []])),
      };
      for (let round = 0; round < opts.rounds; round++) {
        const baseline = await undisturbed(`baseline ${w.id}`, () => measureBaseline(ctx, w));
        r.baseline.push(baseline);
        for (const n of opts.workers) {
          r.mxkeys[String(n)]!.push(await undisturbed(`mxkeys   ${w.id} workers=${n}`, () => measureMxkeys(ctx, w, n, baseline.result.rps)));
        }
      }
      results.push(r);
    }
    const memory = selected(MEMORY) ? await memoryJob(ctx, world, workloads, results) : undefined;
    return { backend: name, version: backend.version, setupSeconds, workloads: results, ...(memory ? { memory } : {}) };
  } finally {
    await cleanup();
  }
}

process.on('SIGINT', () => {
  killChildren();
  log('interrupted: removing the bench databases');
  void Promise.allSettled([...cleanups].map((c) => c())).then(() => process.exit(130));
});

async function main(): Promise<void> {
  let wrkBinary: string;
  try {
    wrkBinary = wrk();
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n`);
    process.exit(2);
  }
  const wrkVersion = (spawnSync(wrkBinary, ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0] ?? '').replace(/ Copyright.*/, '').trim();
  const started = new Date();
  const buildDir = opts.build ?? mkdtempSync(join(tmpdir(), 'mxkeys-bench-build-'));
  if (!opts.build) cleanups.add(async () => rmSync(buildDir, { recursive: true, force: true }));
  log(`compiling src/ into ${buildDir}`);
  const build = buildSnapshot(buildDir);
  log(`code under test: ${build.code}; load from ${wrkVersion}, ${opts.threads} thread(s), ${opts.connections} connections`);
  const origin = await startOrigin();
  const backends: BackendResult[] = [];
  try {
    for (const b of opts.backends) backends.push(await runBackend(b, build, origin));
  } finally {
    origin.stop();
    if (!opts.build) rmSync(buildDir, { recursive: true, force: true });
  }
  const results: Results = {
    format: 1,
    started: started.toISOString(),
    finished: new Date().toISOString(),
    code: build.code,
    machine: { cpu: cpus()[0]?.model ?? 'unknown CPU', cores: cpus().length, memoryBytes: totalmem(), node: process.version, wrk: wrkVersion },
    settings: {
      duration: opts.duration,
      warmup: opts.warmup,
      connections: opts.connections,
      threads: opts.threads,
      rounds: opts.rounds,
      workers: opts.workers,
      waitedForQuiet: opts.wait,
      ...(opts.note ? { note: opts.note } : {}),
    },
    backends,
  };
  mkdirSync(dirname(opts.json), { recursive: true });
  writeFileSync(opts.json, `${JSON.stringify(results, null, 1)}\n`);
  process.stdout.write(`${markdownReport(results)}\n`);
  log(`results written to ${opts.json}; \`npm run bench:report -- --json ${opts.json}\` makes the chart and the tables of docs/benchmarks.md from them`);
}

main().catch((e: unknown) => {
  killChildren();
  process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
  void Promise.allSettled([...cleanups].map((c) => c())).then(() => process.exit(1));
});

