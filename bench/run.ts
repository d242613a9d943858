/**
 * The load harness. For each database it builds a data set over HTTP, then for each scenario
 * measures a baseline (a bare node:http server answering the captured bytes of a real mxkeys
 * answer, bench/baseline-server.mjs) and then mxkeys, with the same autocannon settings, and
 * reports mxkeys as a ratio of the baseline. Latencies with a small database are then compared
 * with latencies after loading 10^6 one-time keys. Results go to standard output (Markdown
 * tables) and, with --json, to a file. docs/benchmarks.md records the figures.
 *
 *   npm run bench -- [--backend sqlite|postgres|both] [--duration S] [--warmup S] [--quick] …
 *   node --import tsx bench/run.ts --help
 *
 * mxkeys and the baseline each run as their own child process; autocannon runs in this process.
 * mxkeys runs from src/ compiled at the start into a directory of the harness's own (not dist/,
 * which `npm test` may rebuild meanwhile), and the commit is recorded with the figures. A fresh
 * mxkeys process serves each measurement, so one scenario's garbage or JIT state does not carry
 * into the next.
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync, writeFileSync, mkdirSync, existsSync } from 'node:fs';
import { tmpdir, cpus, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import pg from 'pg';
import { runLoad, type LoadResult } from './load.js';
import { median } from './harness.js';
import { formatSummary, summarizeProfile } from './profile.js';
import {
  BenchCrossSigning,
  BenchDevice,
  cpuShare,
  cpuSnapshot,
  freePort,
  inParallel,
  machineBusy,
  killChildren,
  login,
  ok,
  registerUser,
  startBaseline,
  startMxkeys,
  buildSnapshot,
  fsyncMs,
  type Build,
  writeConfig,
  type Child,
  type CpuShare,
  type Session,
} from './support.js';

// ---------------------------------------------------------------------------------------------
// Options

const USAGE = `usage: node --import tsx bench/run.ts [options]   (or: npm run bench -- [options])

  --backend B        sqlite, postgres or both (default: sqlite; env BENCH_BACKEND)
  --duration S       measured seconds per run (default 10; env BENCH_DURATION)
  --warmup S         warm-up seconds before each measured run (default 3; env BENCH_WARMUP)
  --connections N    connections for the throughput runs (default 16)
  --large-keys N     one-time keys stored for the large-database runs (default 1000000)
  --skip-large       skip loading the large database and its runs
  --rounds N         repeat every measurement N times, alternating baseline and mxkeys, and
                     report medians (default 3; env BENCH_ROUNDS)
  --only IDS         only these scenarios, comma-separated: query-1x1, claim-1, query-100x3,
                     claim-100 (the large-database runs need query-1x1 or claim-1)
  --quick            iterate quickly: --duration 3 --warmup 1 --rounds 1 --large-keys 100000
  --postgres URL     PostgreSQL server (default postgres://postgres@127.0.0.1/postgres;
                     env BENCH_POSTGRES). A fresh schema is created and dropped afterwards.
  --cpu-prof DIR     run every mxkeys process under node --cpu-prof, write the .cpuprofile
                     files to DIR and print each one's top self-time functions (the profiler
                     costs throughput: figures from such a run are for finding where time
                     goes, not for docs/benchmarks.md)
  --json FILE        also write all results as JSON
  --build DIR        compile src/ into DIR and keep it, or reuse what an earlier run compiled
                     there (to profile exactly the code that was measured). Without it, src/ is
                     compiled into a temporary directory that is removed afterwards.
`;

const { values: argv } = parseArgs({
  options: {
    backend: { type: 'string' },
    duration: { type: 'string' },
    warmup: { type: 'string' },
    connections: { type: 'string' },
    'large-keys': { type: 'string' },
    'skip-large': { type: 'boolean' },
    rounds: { type: 'string' },
    only: { type: 'string' },
    quick: { type: 'boolean' },
    postgres: { type: 'string' },
    'cpu-prof': { type: 'string' },
    json: { type: 'string' },
    build: { type: 'string' },
    help: { type: 'boolean', short: 'h' },
  },
});
if (argv.help) {
  process.stdout.write(USAGE);
  process.exit(0);
}

function num(name: string, value: string | undefined, fallback: number): number {
  if (value === undefined || value === '') return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0) {
    process.stderr.write(`--${name}: expected a number, found ${JSON.stringify(value)}\n${USAGE}`);
    process.exit(2);
  }
  return n;
}

const quick = argv.quick === true;
const opts = {
  backends: ((argv.backend ?? process.env['BENCH_BACKEND'] ?? 'sqlite') === 'both' ? ['sqlite', 'postgres'] : [argv.backend ?? process.env['BENCH_BACKEND'] ?? 'sqlite']) as (
    | 'sqlite'
    | 'postgres'
  )[],
  duration: num('duration', argv.duration ?? process.env['BENCH_DURATION'], quick ? 3 : 10),
  warmup: num('warmup', argv.warmup ?? process.env['BENCH_WARMUP'], quick ? 1 : 3),
  connections: num('connections', argv.connections, 16),
  largeKeys: num('large-keys', argv['large-keys'], quick ? 100_000 : 1_000_000),
  skipLarge: argv['skip-large'] === true,
  rounds: Math.max(1, Math.round(num('rounds', argv.rounds ?? process.env['BENCH_ROUNDS'], quick ? 1 : 3))),
  only: argv.only?.split(',').map((x) => x.trim()),
  postgres: argv.postgres ?? process.env['BENCH_POSTGRES'] ?? 'postgres://postgres@127.0.0.1/postgres',
  cpuProf: argv['cpu-prof'] ? resolve(argv['cpu-prof']) : undefined,
  json: argv.json,
  build: argv.build ? resolve(argv.build) : undefined,
};
for (const b of opts.backends) {
  if (b !== 'sqlite' && b !== 'postgres') {
    process.stderr.write(`--backend: expected sqlite, postgres or both, found ${JSON.stringify(b)}\n`);
    process.exit(2);
  }
}
const SCENARIO_IDS = ['query-1x1', 'claim-1', 'query-100x3', 'claim-100'];
for (const id of opts.only ?? []) {
  if (!SCENARIO_IDS.includes(id)) {
    process.stderr.write(`--only: unknown scenario ${JSON.stringify(id)}; choose from ${SCENARIO_IDS.join(', ')}\n`);
    process.exit(2);
  }
}

if (opts.cpuProf) mkdirSync(opts.cpuProf, { recursive: true });

const SECRET = 'bench-shared-secret';
/** Per-device one-time key limit in the bench config (the default, 10000, is below what we store). */
const MAX_KEYS_PER_DEVICE = 50_000;
/** Keys per upload request. */
const UPLOAD_BATCH = 10_000;
const ALG = 'signed_curve25519';
/** Keys each claimed device gives up to the probe that estimates a claim scenario's rate. */
const PROBE_KEYS_PER_DEVICE = 300;

const log = (msg: string) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${msg}\n`);

// ---------------------------------------------------------------------------------------------
// The data set

interface World {
  readonly querier: Session;
  /** The 1 user × 1 device of the small query. */
  readonly one: BenchDevice;
  /** 100 users × 3 devices; the first device of each is a target of the 100-device claim. */
  readonly many: BenchDevice[][];
  /** 16 devices of one user, the targets of the single-key claim (taken in turn). */
  readonly claimDevices: BenchDevice[];
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

async function userWithDevices(url: string, name: string, count: number): Promise<BenchDevice[]> {
  const first = await registerUser(url, SECRET, name);
  const sessions = [first];
  for (let i = 1; i < count; i++) sessions.push(await login(url, first));
  return sessions.map((s) => new BenchDevice(s));
}

async function buildWorld(url: string): Promise<World> {
  const querier = await registerUser(url, SECRET, 'querier');
  const [one] = await userWithDevices(url, 'one', 1);
  await uploadDeviceKeys(url, one!, false);
  await crossSign(url, [one!]);

  const many = await inParallel(
    Array.from({ length: 100 }, (_, i) => `many${String(i).padStart(3, '0')}`),
    4,
    async (name) => {
      const devices = await userWithDevices(url, name, 3);
      for (const [i, d] of devices.entries()) await uploadDeviceKeys(url, d, i === 0);
      await crossSign(url, devices);
      return devices;
    },
  );

  const claimDevices = await userWithDevices(url, 'claimee', 16);
  for (const d of claimDevices) await uploadDeviceKeys(url, d, true);
  await crossSign(url, claimDevices);
  return { querier, one: one!, many, claimDevices };
}

/** Uploads `n` fresh one-time keys to a device, ≤ UPLOAD_BATCH per request. Returns the device's count. */
async function uploadOneTimeKeys(url: string, d: BenchDevice, n: number): Promise<number> {
  let count = 0;
  for (let left = n; left > 0; left -= UPLOAD_BATCH) {
    const b = Math.min(UPLOAD_BATCH, left);
    const r = await ok<{ one_time_key_counts: Record<string, number> }>(url, 'POST', '/_matrix/client/v3/keys/upload', {
      token: d.session.accessToken,
      rawBody: `{"one_time_keys":${d.oneTimeKeysText(b)}}`,
    });
    count = r.body.one_time_key_counts[ALG] ?? 0;
  }
  return count;
}

/** The device's unclaimed signed_curve25519 keys, from its own /sync. */
async function keyCount(url: string, d: BenchDevice): Promise<number> {
  const r = await ok<{ device_one_time_keys_count: Record<string, number> }>(url, 'GET', '/_matrix/client/v3/sync', { token: d.session.accessToken });
  return r.body.device_one_time_keys_count[ALG] ?? 0;
}

async function keyCounts(url: string, devices: readonly BenchDevice[]): Promise<number[]> {
  return inParallel(devices, 8, (d) => keyCount(url, d));
}

/** Tops every device up to at least `perDevice` keys. Returns how many keys were uploaded. */
async function stock(url: string, devices: readonly BenchDevice[], perDevice: number): Promise<number> {
  const target = Math.min(perDevice, MAX_KEYS_PER_DEVICE);
  const counts = await keyCounts(url, devices);
  const adds = counts.map((c) => Math.max(0, target - c));
  await inParallel(devices, 2, (d, i) => (adds[i]! > 0 ? uploadOneTimeKeys(url, d, adds[i]!) : Promise.resolve(0)));
  return adds.reduce((a, b) => a + b, 0);
}

// ---------------------------------------------------------------------------------------------
// Databases

interface Backend {
  readonly name: 'sqlite' | 'postgres';
  readonly database: Record<string, unknown>;
  readonly version: string;
  countKeys(): Promise<number>;
  /** PostgreSQL: pids of mxkeys' connections and of the server's background processes. */
  databasePids(): Promise<number[]>;
  cleanup(): Promise<void>;
}

async function openBackend(name: 'sqlite' | 'postgres', dir: string): Promise<Backend> {
  if (name === 'sqlite') {
    const file = join(dir, 'mxkeys.db');
    const mem = new Database(':memory:');
    const version = `SQLite ${(mem.prepare('SELECT sqlite_version() AS v').get() as { v: string }).v} (better-sqlite3; WAL, synchronous=FULL)`;
    mem.close();
    return {
      name,
      database: { sqlite: file },
      version,
      async countKeys() {
        const db = new Database(file, { readonly: true, fileMustExist: true });
        try {
          return (db.prepare('SELECT COUNT(*) AS n FROM e2e_one_time_keys').get() as { n: number }).n;
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
  const admin = new pg.Client({ connectionString: opts.postgres });
  await admin.connect();
  const version = ((await admin.query<{ v: string }>("SELECT current_setting('server_version') AS v")).rows[0]!.v).split(' ')[0]!;
  const schema = `bench_${randomBytes(5).toString('hex')}`;
  await admin.query(`CREATE SCHEMA ${schema}`);
  const url = new URL(opts.postgres);
  url.searchParams.set('options', `-c search_path=${schema}`);
  // Tells mxkeys' connections apart from other clients of the same server (CPU accounting).
  url.searchParams.set('application_name', schema);
  return {
    name,
    database: { postgres: url.toString() },
    version: `PostgreSQL ${version} (same machine, 127.0.0.1; pool_size 10)`,
    async countKeys() {
      return Number((await admin.query<{ n: string }>(`SELECT COUNT(*) AS n FROM ${schema}.e2e_one_time_keys`)).rows[0]!.n);
    },
    async databasePids() {
      const r = await admin.query<{ pid: number }>(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 OR backend_type NOT IN ('client backend', 'walsender')",
        [schema],
      );
      return r.rows.map((x) => Number(x.pid));
    },
    async cleanup() {
      await admin.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`);
      await admin.end();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Scenarios

interface Scenario {
  readonly id: string;
  readonly title: string;
  readonly path: string;
  readonly bodies: readonly string[];
  /** Throughput target: mxkeys req/s ≥ ratio × baseline req/s. */
  readonly target?: number;
  /** Claim scenarios: the devices keys are taken from, and how many devices one request names. */
  readonly claim?: { readonly devices: readonly BenchDevice[]; readonly perRequest: number };
  /** A real mxkeys answer (body and headers), captured before measuring; the baseline serves it. */
  captured?: { body: string; headers: Record<string, string> };
}

const QUERY = '/_matrix/client/v3/keys/query';
const CLAIM = '/_matrix/client/v3/keys/claim';

function scenarios(w: World): Record<'query1' | 'claim1' | 'query100' | 'claim100', Scenario> {
  return {
    query1: { id: 'query-1x1', title: 'POST /keys/query, 1 user × 1 device', path: QUERY, bodies: [JSON.stringify({ device_keys: { [w.one.userId]: [] } })], target: 0.5 },
    claim1: {
      id: 'claim-1',
      title: 'POST /keys/claim, 1 fresh key per request',
      path: CLAIM,
      bodies: w.claimDevices.map((d) => JSON.stringify({ one_time_keys: { [d.userId]: { [d.deviceId]: ALG } } })),
      target: 0.15,
      claim: { devices: w.claimDevices, perRequest: 1 },
    },
    query100: {
      id: 'query-100x3',
      title: 'POST /keys/query, 100 users × 3 devices',
      path: QUERY,
      bodies: [JSON.stringify({ device_keys: Object.fromEntries(w.many.map((ds) => [ds[0]!.userId, []])) })],
    },
    claim100: {
      id: 'claim-100',
      title: 'POST /keys/claim, 100 devices per request',
      path: CLAIM,
      bodies: [JSON.stringify({ one_time_keys: Object.fromEntries(w.many.map((ds) => [ds[0]!.userId, { [ds[0]!.deviceId]: ALG }])) })],
      claim: { devices: w.many.map((ds) => ds[0]!), perRequest: 100 },
    },
  };
}

const SKIP_HEADERS = new Set(['date', 'connection', 'keep-alive', 'content-length', 'transfer-encoding']);

/** Sends one real request and keeps the answer for the baseline to serve. */
async function capture(url: string, token: string, sc: Scenario): Promise<void> {
  const r = await ok(url, 'POST', sc.path, { token, rawBody: sc.bodies[0]! });
  const headers: Record<string, string> = {};
  r.headers.forEach((v, k) => {
    if (!SKIP_HEADERS.has(k)) headers[k] = v;
  });
  if (sc.claim) {
    const got = JSON.stringify(r.body).match(/signed_curve25519:AAAA/g)?.length ?? 0;
    if (got !== sc.claim.perRequest) throw new Error(`${sc.id}: capture claimed ${got} one-time keys, expected ${sc.claim.perRequest}: ${r.text.slice(0, 300)}`);
  }
  sc.captured = { body: r.text, headers };
}

interface Measurement {
  readonly scenario: string;
  readonly server: 'baseline' | 'mxkeys';
  readonly connections: number;
  readonly result: LoadResult;
  readonly cpu: CpuShare;
  /** One-time keys stored in the database when the measured window began. */
  readonly storedKeys?: number;
  /** Claim scenarios: keys deleted during the window and the fewest left on any device after it. */
  readonly claims?: { readonly deleted: number; readonly minLeft: number; readonly answered: number };
  readonly profile?: string;
  /** Milliseconds of a 4 KiB write + fdatasync next to the database, just before the window. */
  readonly fsyncMs?: number;
  /** Measured again this many times because something else used the CPU. */
  readonly retries?: number;
}

interface Context {
  readonly build: Build;
  readonly backend: Backend;
  readonly dir: string;
  readonly configFile: string;
  readonly port: number;
  readonly token: string;
}

function profName(ctx: Context, what: string): { dir: string; name: string } | undefined {
  return opts.cpuProf ? { dir: opts.cpuProf, name: `${ctx.backend.name}-${what}-${Date.now()}.cpuprofile` } : undefined;
}

async function measured(ctx: Context, server: Child, sc: Scenario, connections: number): Promise<{ result: LoadResult; cpu: CpuShare }> {
  const spec = { url: server.url, path: sc.path, token: ctx.token, bodies: sc.bodies, connections, duration: opts.duration };
  if (opts.warmup > 0) await runLoad(spec, opts.warmup);
  const roles = { server: server.pid, loadgen: process.pid, postgres: await ctx.backend.databasePids() };
  const before = cpuSnapshot([roles.server, roles.loadgen, ...roles.postgres]);
  const result = await runLoad(spec);
  const after = cpuSnapshot([roles.server, roles.loadgen, ...roles.postgres]);
  return { result, cpu: cpuShare(before, after, roles) };
}

async function measureBaseline(ctx: Context, sc: Scenario, connections: number): Promise<Measurement> {
  if (!sc.captured) throw new Error(`${sc.id}: nothing captured`);
  const bodyFile = join(ctx.dir, `${sc.id}.body`);
  writeFileSync(bodyFile, sc.captured.body);
  const port = await freePort();
  const server = await startBaseline(port, bodyFile, sc.captured.headers);
  try {
    const { result, cpu } = await measured(ctx, server, sc, connections);
    return { scenario: sc.id, server: 'baseline', connections, result, cpu };
  } finally {
    await server.stop();
  }
}

async function measureMxkeys(ctx: Context, sc: Scenario, connections: number, label: string): Promise<Measurement> {
  const prof = profName(ctx, `${sc.id}-c${connections}-${label}`);
  const server = await startMxkeys(ctx.build, ctx.configFile, ctx.port, prof);
  let m: Measurement;
  try {
    if (sc.claim) {
      // A short probe of a fixed number of claims to learn the rate, then enough keys on every
      // device for the warm-up and the measured window twice over, so that every claim in the
      // window takes a real one-time key (checked afterwards).
      const { devices, perRequest } = sc.claim;
      const probeRequests = Math.max(connections * 4, Math.ceil((PROBE_KEYS_PER_DEVICE * devices.length) / perRequest));
      await stock(server.url, devices, PROBE_KEYS_PER_DEVICE + 50);
      const probe = await runLoad({ url: server.url, path: sc.path, token: ctx.token, bodies: sc.bodies, connections, duration: opts.duration }, opts.duration, probeRequests);
      const perDevice = Math.ceil((probe.rps * (opts.warmup + opts.duration) * perRequest * 2) / devices.length) + 200;
      const t0 = Date.now();
      const uploaded = await stock(server.url, devices, perDevice);
      log(`  ${sc.id}: probe ${probe.rps.toFixed(0)} req/s → ${perDevice} keys per device (${uploaded} uploaded in ${((Date.now() - t0) / 1000).toFixed(1)} s)`);
      if (perDevice > MAX_KEYS_PER_DEVICE) log(`  ${sc.id}: WARNING: capped at ${MAX_KEYS_PER_DEVICE} keys per device; the window may run out`);
    }
    const spec = { url: server.url, path: sc.path, token: ctx.token, bodies: sc.bodies, connections, duration: opts.duration };
    if (opts.warmup > 0) await runLoad(spec, opts.warmup);
    const countsBefore = sc.claim ? await keyCounts(server.url, sc.claim.devices) : [];
    const storedKeys = await ctx.backend.countKeys();
    const fsync = fsyncMs(ctx.dir);
    const roles = { server: server.pid, loadgen: process.pid, postgres: await ctx.backend.databasePids() };
    const before = cpuSnapshot([roles.server, roles.loadgen, ...roles.postgres]);
    const result = await runLoad(spec);
    const after = cpuSnapshot([roles.server, roles.loadgen, ...roles.postgres]);
    const cpu = cpuShare(before, after, roles);
    let claims: Measurement['claims'];
    if (sc.claim) {
      const countsAfter = await keyCounts(server.url, sc.claim.devices);
      const deleted = countsBefore.reduce((a, b) => a + b, 0) - countsAfter.reduce((a, b) => a + b, 0);
      claims = { deleted, minLeft: Math.min(...countsAfter), answered: result.ok * sc.claim.perRequest };
    }
    m = { scenario: sc.id, server: 'mxkeys', connections, result, cpu, storedKeys, fsyncMs: fsync, ...(claims ? { claims } : {}) };
  } finally {
    const code = await server.stop();
    if (code !== 0) log(`  mxkeys exited with ${code}:\n${server.output().slice(-2000)}`);
  }
  if (prof) {
    const file = join(prof.dir, prof.name);
    if (existsSync(file)) {
      const summary = formatSummary(summarizeProfile(file, 25));
      log(`  profile ${file}\n${summary}`);
      m = { ...m, profile: summary };
    }
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Rounds and medians

/** The same measurement repeated; reported as medians. */
type Series = Measurement[];


interface Summary {
  readonly rps: number;
  readonly p50: number;
  readonly p99: number;
  readonly cpu: CpuShare;
  readonly storedKeys: number | undefined;
  readonly claims: { answered: number; deleted: number; minLeft: number } | undefined;
  readonly non2xx: number;
  readonly errors: number;
}

function summarize(series: Series): Summary {
  const med = (f: (m: Measurement) => number) => median(series.map(f));
  const withClaims = series.filter((m) => m.claims);
  const stored = series.map((m) => m.storedKeys).filter((n): n is number => n !== undefined);
  return {
    rps: med((m) => m.result.rps),
    p50: med((m) => m.result.latency.p50),
    p99: med((m) => m.result.latency.p99),
    cpu: {
      server: med((m) => m.cpu.server),
      loadgen: med((m) => m.cpu.loadgen),
      postgres: med((m) => m.cpu.postgres),
      other: med((m) => m.cpu.other),
      steal: med((m) => m.cpu.steal),
      irq: med((m) => m.cpu.irq),
      machine: med((m) => m.cpu.machine),
    },
    storedKeys: stored.length ? median(stored) : undefined,
    claims: withClaims.length
      ? {
          answered: withClaims.reduce((a, m) => a + m.claims!.answered, 0),
          deleted: withClaims.reduce((a, m) => a + m.claims!.deleted, 0),
          minLeft: Math.min(...withClaims.map((m) => m.claims!.minLeft)),
        }
      : undefined,
    non2xx: series.reduce((a, m) => a + m.result.non2xx, 0),
    errors: series.reduce((a, m) => a + m.result.errors, 0),
  };
}

// ---------------------------------------------------------------------------------------------
// Reporting

const f0 = (n: number) => (Number.isFinite(n) ? n.toFixed(0) : '–');
const f2 = (n: number) => (Number.isFinite(n) ? n.toFixed(2) : '–');
const ms = (n: number) => (Number.isFinite(n) ? (n < 10 ? n.toFixed(2) : n.toFixed(1)) : '–');
const pct = (n: number) => (Number.isFinite(n) ? `${(n * 100).toFixed(1)} %` : '–');
const count = (n: number | undefined) => (n === undefined ? '–' : Math.round(n).toLocaleString('en'));

function describe(m: Measurement): string {
  const r = m.result;
  const bad = r.non2xx || r.errors ? ` non2xx=${r.non2xx} errors=${r.errors} ${JSON.stringify(r.statuses)}` : '';
  const claims = m.claims ? ` claimed=${m.claims.answered} deleted=${m.claims.deleted} minLeft=${m.claims.minLeft}` : '';
  const stored = m.storedKeys !== undefined ? ` stored=${m.storedKeys}` : '';
  const fsync = m.fsyncMs !== undefined ? ` fsync=${m.fsyncMs.toFixed(3)}ms` : '';
  return (
    `${m.server.padEnd(8)} ${m.scenario} c=${m.connections}: ${f0(r.rps)} req/s, p50 ${ms(r.latency.p50)} ms, p99 ${ms(r.latency.p99)} ms` +
    ` | cpu server ${f0(m.cpu.server)}% loadgen ${f0(m.cpu.loadgen)}% postgres ${f0(m.cpu.postgres)}% irq ${f0(m.cpu.irq)}% other ${f0(m.cpu.other)}% steal ${f0(m.cpu.steal)}%${fsync}${stored}${claims}${bad}`
  );
}

function cpuCell(c: CpuShare, postgres: boolean): string {
  return `${f0(c.server)} / ${f0(c.loadgen)}${postgres ? ` / ${f0(c.postgres)}` : ''} / ${f0(c.other + c.steal)}`;
}

interface BackendReport {
  readonly backend: string;
  readonly version: string;
  readonly throughput: { sc: Scenario; baseline: Series; mxkeys: Series }[];
  readonly latency: { sc: Scenario; connections: number; small: Series; large?: Series; control?: Series }[];
  readonly load?: { keys: number; seconds: number; stored: number };
  readonly setupSeconds: number;
}

function markdown(r: BackendReport): string {
  const isPg = r.backend === 'postgres';
  const out: string[] = [];
  out.push(`### ${r.backend === 'sqlite' ? 'SQLite' : 'PostgreSQL'}: ${r.version}`, '');
  out.push(
    `Throughput: ${opts.connections} connections; medians of ${opts.rounds} round(s), each round the baseline then mxkeys, ${opts.duration} s measured after ${opts.warmup} s warm-up. ` +
      `CPU = % of one core used by the server (mxkeys or baseline) / autocannon${isPg ? ' / PostgreSQL' : ''} / anything else on the machine, during the mxkeys runs.`,
    '',
  );
  out.push('| Scenario | Baseline req/s | mxkeys req/s | Ratio (range over rounds) | Target | Result | mxkeys p50 / p99 ms | Baseline p50 / p99 ms | CPU % (mxkeys runs) |');
  out.push('|---|---:|---:|---:|---:|---|---:|---:|---|');
  for (const { sc, baseline, mxkeys } of r.throughput) {
    const b = summarize(baseline);
    const m = summarize(mxkeys);
    const ratio = m.rps / b.rps;
    const perRound = mxkeys.map((x, i) => x.result.rps / (baseline[i]?.result.rps ?? NaN));
    const range = perRound.length > 1 ? ` (${pct(Math.min(...perRound))} – ${pct(Math.max(...perRound))})` : '';
    const target = sc.target !== undefined ? `≥ ${(sc.target * 100).toFixed(0)} %` : 'report';
    const result = sc.target !== undefined ? (ratio >= sc.target ? '**pass**' : `**FAIL** (${(sc.target / ratio).toFixed(1)}× short)`) : '–';
    const errs = m.non2xx || m.errors ? ` ⚠ ${m.non2xx} non-2xx, ${m.errors} errors` : '';
    out.push(
      `| ${sc.title}${errs} | ${f0(b.rps)} | ${f0(m.rps)} | ${pct(ratio)}${range} | ${target} | ${result} | ${ms(m.p50)} / ${ms(m.p99)} | ${ms(b.p50)} / ${ms(b.p99)} | ${cpuCell(m.cpu, isPg)} |`,
    );
  }
  const claimRows = [...r.throughput.map((t) => ({ sc: t.sc, connections: opts.connections, series: t.mxkeys, phase: 'small' })), ...r.latency.flatMap((l) => [
    ...(l.connections !== opts.connections ? [{ sc: l.sc, connections: l.connections, series: l.small, phase: 'small' }] : []),
    ...(l.large ? [{ sc: l.sc, connections: l.connections, series: l.large, phase: 'large' }] : []),
  ])].filter((x) => x.sc.claim);
  if (claimRows.length) {
    out.push('', 'Claims in the measured windows (all rounds): every answer must carry a real one-time key, never the fallback key.', '');
    out.push('| Scenario | Conns | Database | Keys claimed (answers × devices) | Keys deleted (count before − after) | Fewest keys left on a device | All real one-time keys |');
    out.push('|---|---:|---|---:|---:|---:|---|');
    for (const x of claimRows) {
      const c = summarize(x.series).claims!;
      out.push(`| ${x.sc.title} | ${x.connections} | ${x.phase} | ${count(c.answered)} | ${count(c.deleted)} | ${count(c.minLeft)} | ${c.minLeft > 0 && c.deleted >= c.answered ? 'yes' : '**no**'} |`);
    }
  }
  if (r.latency.length) {
    out.push(
      '',
      r.load
        ? `Latency: small database vs. ${count(r.load.stored)} stored one-time keys (target: large ≤ 1.5 × small, judged on both p50 and p99; medians of ${opts.rounds} round(s)):`
        : 'Latency, small database:',
      '',
    );
    out.push('| Scenario | Conns | Stored keys small / large | Small p50 / p99 ms | Large p50 / p99 ms | Ratio p50 / p99 | Result | Small / large req/s |');
    out.push('|---|---:|---:|---:|---:|---:|---|---:|');
    for (const l of r.latency) {
      const s = summarize(l.small);
      const L = l.large ? summarize(l.large) : undefined;
      const rp50 = L ? L.p50 / s.p50 : NaN;
      const rp99 = L ? L.p99 / s.p99 : NaN;
      const pass = L ? (rp50 <= 1.5 && rp99 <= 1.5 ? '**pass**' : '**FAIL**') : '–';
      out.push(
        `| ${l.sc.title} | ${l.connections} | ${count(s.storedKeys)} / ${count(L?.storedKeys)} | ${ms(s.p50)} / ${ms(s.p99)} | ${L ? `${ms(L.p50)} / ${ms(L.p99)}` : '–'} | ${f2(rp50)} / ${f2(rp99)} | ${pass} | ${f0(s.rps)} / ${L ? f0(L.rps) : '–'} |`,
      );
    }
  }
  if (r.load) {
    out.push(
      '',
      `Loading the large database: ${count(r.load.keys)} one-time keys over HTTP (/keys/upload, ${UPLOAD_BATCH} keys per request, ${r.load.keys / 10_000} devices, 2 uploads in flight) took ${r.load.seconds.toFixed(0)} s (${f0(r.load.keys / r.load.seconds)} keys/s, generating and signing the keys in the harness included).`,
    );
    for (const l of r.latency.filter((x) => x.control)) {
      const base = r.throughput.find((t) => t.sc.id === l.sc.id)?.baseline;
      if (base) out.push(`Control: the baseline for ${l.sc.id} ran at ${f0(summarize(base).rps)} req/s before loading and ${f0(summarize(l.control!).rps)} req/s after.`);
    }
  }
  const all = [...r.throughput.flatMap((t) => [...t.baseline, ...t.mxkeys]), ...r.latency.flatMap((l) => [...l.small, ...(l.large ?? []), ...(l.control ?? [])])];
  const fsyncs = all.map((m) => m.fsyncMs).filter((x): x is number => x !== undefined);
  if (fsyncs.length) {
    out.push('', `Disk: a 4 KiB write + fdatasync next to the database took ${ms(median(fsyncs))} ms (median; ${ms(Math.min(...fsyncs))}–${ms(Math.max(...fsyncs))} ms) just before the mxkeys runs.`);
  }
  const retried = all.filter((m) => m.retries).length;
  const stillDisturbed = all.filter((m) => disturbance(m) > DISTURBED_PCT);
  out.push(
    '',
    `Setup (accounts, device keys, cross-signing, over HTTP) took ${r.setupSeconds.toFixed(0)} s. ` +
      `${all.length} measured runs; ${retried} had to be repeated because other processes used more than ${DISTURBED_PCT} % of a core` +
      (stillDisturbed.length ? `; ${stillDisturbed.length} stayed disturbed after ${MAX_RETRIES} retries (${stillDisturbed.map((m) => `${m.server} ${m.scenario} c=${m.connections}`).join(', ')}).` : '; none is left disturbed.'),
  );
  return out.join('\n');
}

// ---------------------------------------------------------------------------------------------
// Main

/** Something else used more than this (% of one core) during a run: measure again. */
const DISTURBED_PCT = 10;
const MAX_RETRIES = 4;

function disturbance(m: Measurement): number {
  return m.cpu.other + m.cpu.steal;
}

/** Waits (up to 3 minutes) until the machine is nearly idle before a measurement. */
async function quiet(): Promise<void> {
  const deadline = Date.now() + 180_000;
  let busy = await machineBusy(1000);
  if (busy < 10) return;
  log(`  machine busy (${busy.toFixed(0)} % of all cores) before a run: waiting for it to go quiet`);
  while (busy >= 10 && Date.now() < deadline) busy = await machineBusy(2000);
  log(busy < 10 ? '  quiet again' : `  still ${busy.toFixed(0)} % busy after 3 minutes: measuring anyway`);
}

/** One measurement on a quiet machine, repeated (up to MAX_RETRIES times) if something else ran meanwhile. */
async function undisturbed(what: () => Promise<Measurement>): Promise<Measurement> {
  for (let retries = 0; ; retries++) {
    await quiet();
    const m = await what();
    log(describe(m));
    if (disturbance(m) <= DISTURBED_PCT || retries >= MAX_RETRIES) return retries ? { ...m, retries } : m;
    const pause = 15 * (retries + 1);
    log(`  disturbed: other processes (or the hypervisor) took ${disturbance(m).toFixed(0)} % of a core; measuring again in ${pause} s`);
    await new Promise((r) => setTimeout(r, pause * 1000));
  }
}

async function rounds(what: (round: number) => Promise<Measurement>): Promise<Series> {
  const out: Series = [];
  for (let i = 0; i < opts.rounds; i++) out.push(await undisturbed(() => what(i)));
  return out;
}

/** What to undo if the harness is interrupted. */
const cleanups = new Set<() => Promise<void>>();

async function runBackend(name: 'sqlite' | 'postgres', build: Build): Promise<BackendReport> {
  const dir = mkdtempSync(join(tmpdir(), `mxkeys-bench-${name}-`));
  const backend = await openBackend(name, dir);
  const cleanup = async () => {
    cleanups.delete(cleanup);
    await backend.cleanup().catch((e: unknown) => log(`cleanup failed: ${String(e)}`));
    rmSync(dir, { recursive: true, force: true });
  };
  cleanups.add(cleanup);
  try {
    const port = await freePort();
    const configFile = join(dir, 'mxkeys.yaml');
    writeConfig(configFile, { port, database: backend.database, signingKeyPath: join(dir, 'signing.key'), secret: SECRET, maxOneTimeKeys: MAX_KEYS_PER_DEVICE });
    log(`${name}: ${backend.version}; setting up`);

    const t0 = Date.now();
    const setup = await startMxkeys(build, configFile, port);
    let world: World;
    let sc: ReturnType<typeof scenarios>;
    try {
      world = await buildWorld(setup.url);
      sc = scenarios(world);
      await stock(setup.url, world.claimDevices, 10);
      await stock(setup.url, world.many.map((ds) => ds[0]!), 10);
      for (const s of Object.values(sc)) await capture(setup.url, world.querier.accessToken, s);
    } finally {
      await setup.stop();
    }
    const setupSeconds = (Date.now() - t0) / 1000;
    log(`${name}: setup done in ${setupSeconds.toFixed(0)} s; answers: ${Object.values(sc).map((s) => `${s.id} ${s.captured!.body.length} B`).join(', ')}`);
    const ctx: Context = { build, backend, dir, configFile, port, token: world.querier.accessToken };
    const selected = (s: Scenario) => opts.only === undefined || opts.only.includes(s.id);

    const throughput: BackendReport['throughput'] = [];
    const latency: BackendReport['latency'] = [];
    // Each round: the baseline, then mxkeys.
    const both = async (s: Scenario) => {
      const baseline: Series = [];
      const mxkeys: Series = [];
      for (let i = 0; i < opts.rounds; i++) {
        baseline.push(await undisturbed(() => measureBaseline(ctx, s, opts.connections)));
        mxkeys.push(await undisturbed(() => measureMxkeys(ctx, s, opts.connections, 'small')));
      }
      throughput.push({ sc: s, baseline, mxkeys });
      return mxkeys;
    };

    // Small database: the two targets with ratios, plus single-connection latency.
    for (const s of [sc.query1, sc.claim1].filter(selected)) {
      latency.push({ sc: s, connections: opts.connections, small: await both(s) });
      if (opts.connections !== 1) latency.push({ sc: s, connections: 1, small: await rounds(() => measureMxkeys(ctx, s, 1, 'small')) });
    }
    // The big requests: figures only.
    for (const s of [sc.query100, sc.claim100].filter(selected)) await both(s);

    let load: BackendReport['load'];
    if (!opts.skipLarge && opts.largeKeys > 0 && latency.length > 0) {
      const server = await startMxkeys(build, configFile, port);
      try {
        const devicesNeeded = Math.ceil(opts.largeKeys / 10_000);
        log(`${name}: loading ${opts.largeKeys} one-time keys onto ${devicesNeeded} devices`);
        const bulk = await inParallel(
          Array.from({ length: Math.ceil(devicesNeeded / 4) }, (_, i) => `bulk${String(i).padStart(3, '0')}`),
          4,
          (u) => userWithDevices(server.url, u, 4),
        );
        const devices = bulk.flat().slice(0, devicesNeeded);
        const t1 = Date.now();
        let done = 0;
        await inParallel(devices, 2, async (d, i) => {
          const n = Math.min(10_000, opts.largeKeys - i * 10_000);
          await uploadOneTimeKeys(server.url, d, n);
          done += n;
          if ((i + 1) % 10 === 0) log(`  ${done} keys loaded, ${(done / ((Date.now() - t1) / 1000)).toFixed(0)} keys/s`);
        });
        const seconds = (Date.now() - t1) / 1000;
        load = { keys: opts.largeKeys, seconds, stored: await backend.countKeys() };
        log(`${name}: loaded ${opts.largeKeys} keys in ${seconds.toFixed(0)} s; ${load.stored} stored`);
      } finally {
        await server.stop();
      }
      for (const l of latency) {
        l.large = await rounds(() => measureMxkeys(ctx, l.sc, l.connections, 'large'));
        if (l.connections === opts.connections) l.control = await rounds(() => measureBaseline(ctx, l.sc, l.connections));
      }
    }
    return { backend: name, version: backend.version, throughput, latency, ...(load ? { load } : {}), setupSeconds };
  } finally {
    await cleanup();
  }
}

process.on('SIGINT', () => {
  killChildren();
  log('interrupted: removing the bench database');
  void Promise.allSettled([...cleanups].map((c) => c())).then(() => process.exit(130));
});

const started = new Date();
const buildDir = opts.build ?? mkdtempSync(join(tmpdir(), 'mxkeys-bench-build-'));
log(`compiling src/ into ${buildDir}`);
const build = buildSnapshot(buildDir);
log(`code under test: ${build.code}`);
if (!opts.build) cleanups.add(async () => rmSync(buildDir, { recursive: true, force: true }));
const cpu = cpus()[0]?.model ?? 'unknown CPU';
const header = [
  `## Run of ${started.toISOString()}`,
  '',
  `Code: ${build.code}.`,
  `Machine: ${cpu}, ${cpus().length} cores, ${(totalmem() / 2 ** 30).toFixed(1)} GiB RAM; Node ${process.version}. autocannon runs in the harness process; mxkeys and the baseline each in their own process.`,
  `Settings: ${opts.connections} connections, ${opts.rounds} round(s), ${opts.warmup} s warm-up + ${opts.duration} s measured per run${opts.cpuProf ? '; **mxkeys under --cpu-prof (slower; not for the record)**' : ''}.`,
  '',
].join('\n');
process.stdout.write(`\n${header}\n`);
const reports: BackendReport[] = [];
try {
  for (const b of opts.backends) {
    const report = await runBackend(b, build);
    reports.push(report);
    process.stdout.write(`${markdown(report)}\n\n`);
  }
} catch (e) {
  killChildren();
  throw e;
} finally {
  if (!opts.build) rmSync(buildDir, { recursive: true, force: true });
}
if (opts.json) {
  const plain = (s: Scenario) => ({ id: s.id, title: s.title, target: s.target, answerBytes: s.captured?.body.length });
  writeFileSync(
    opts.json,
    JSON.stringify(
      {
        started,
        opts,
        code: build.code,
        machine: { cpu, cores: cpus().length, memory: totalmem(), node: process.version },
        reports: reports.map((r) => ({ ...r, throughput: r.throughput.map((t) => ({ ...t, sc: plain(t.sc) })), latency: r.latency.map((l) => ({ ...l, sc: plain(l.sc) })) })),
      },
      null,
      2,
    ),
  );
}
