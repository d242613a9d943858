/**
 * The federation benchmark: POST /_matrix/federation/v1/user/keys/query, every request with its
 * own X-Matrix signature (a distinct `?n=` in the signed URI), all signed before the load starts
 * so the load generator only sends. Nothing can be answered from a cached verification: each
 * request costs mxkeys one Ed25519 verification.
 *
 * In the same run it measures (1) the raw node:crypto Ed25519 verification rate of one core, on
 * messages of the same shape, and (2) the bare node:http baseline answering the same requests
 * with the captured bytes of a real mxkeys answer. Target: mxkeys ≥ 70 % of the verification rate.
 *
 *   npm run bench:federation -- [--backend sqlite|postgres] [--duration S] [--warmup S] [--rounds N] [--json FILE] [--cpu-prof DIR]
 *
 * mxkeys inherits the environment: `UV_THREADPOOL_SIZE=1 npm run bench:federation` measures it
 * with one libuv thread (where verification runs); the report says which size was used.
 */
import { parseArgs } from 'node:util';
import { createServer } from 'node:http';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir, cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { verify, generateKeyPairSync, sign } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { runLoad, type LoadResult, type PreparedRequest } from './load.js';
import { formatSummary, summarizeProfile } from './profile.js';
import { benchConfig, BenchCrossSigning, BenchDevice, buildSnapshot, Ed25519Key, freePort, ok, registerUser, startBaseline, startMxkeys } from './support.js';
import { median, postgresSchema, runHarness } from './harness.js';
import { canonical } from '../test/support/keys.js';

const { values: argv } = parseArgs({
  options: {
    backend: { type: 'string', default: 'sqlite' },
    duration: { type: 'string', default: '10' },
    warmup: { type: 'string', default: '3' },
    rounds: { type: 'string', default: '3' },
    connections: { type: 'string', default: '16' },
    postgres: { type: 'string', default: process.env['BENCH_POSTGRES'] ?? 'postgres://postgres@127.0.0.1/postgres' },
    json: { type: 'string' },
    'cpu-prof': { type: 'string' },
  },
});
const opts = {
  backend: argv.backend === 'postgres' ? 'postgres' : 'sqlite',
  duration: Number(argv.duration),
  warmup: Number(argv.warmup),
  rounds: Math.max(1, Number(argv.rounds)),
  connections: Number(argv.connections),
};
const log = (msg: string) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
const SECRET = 'bench-shared-secret';
const SERVER = 'bench.local';
const PATH = '/_matrix/federation/v1/user/keys/query';

/** A remote server: its name, its key, and /_matrix/key/v2/server answered from this process. */
async function startOrigin(): Promise<{ name: string; url: string; key: Ed25519Key; stop: () => void }> {
  const key = new Ed25519Key();
  const server = createServer((req, res) => {
    const body = { server_name: name, valid_until_ts: Date.now() + 3_600_000, verify_keys: { 'ed25519:bench': { key: key.publicKey } }, old_verify_keys: {} };
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(key.sign(body, name, 'ed25519:bench')));
    void req;
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  const name = `origin-${port}.example`;
  return { name, url: `http://127.0.0.1:${port}`, key, stop: () => server.close() };
}

/** `count` requests, each signed over its own URI. */
function presign(origin: { name: string; key: Ed25519Key }, body: string, count: number, offset: number): PreparedRequest[] {
  const content = JSON.parse(body) as unknown;
  const out: PreparedRequest[] = [];
  for (let i = offset; i < offset + count; i++) {
    const uri = `${PATH}?n=${i}`;
    const sig = origin.key.signText(canonical({ content, destination: SERVER, method: 'POST', origin: origin.name, uri }));
    out.push({ path: uri, body, headers: { authorization: `X-Matrix origin="${origin.name}",destination="${SERVER}",key="ed25519:bench",sig="${sig}"` } });
  }
  return out;
}

/** Ed25519 verifications per second on one core (this process, nothing else running), over distinct messages of the request's shape. */
function verifyRate(seconds: number, sampleUri: string): number {
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  const msgs: Buffer[] = [];
  const sigs: Buffer[] = [];
  for (let i = 0; i < 4000; i++) {
    const m = Buffer.from(canonical({ content: { device_keys: { [`@one:${SERVER}`]: [] } }, destination: SERVER, method: 'POST', origin: 'origin.example', uri: `${sampleUri}?n=${i}` }));
    msgs.push(m);
    sigs.push(sign(null, m, privateKey));
  }
  for (let i = 0; i < 1000; i++) verify(null, msgs[i]!, publicKey, sigs[i]!);
  let n = 0;
  const start = performance.now();
  const end = start + seconds * 1000;
  while (performance.now() < end) {
    for (let i = 0; i < 200; i++, n++) if (!verify(null, msgs[n % msgs.length]!, publicKey, sigs[n % sigs.length]!)) throw new Error('verification failed');
  }
  return n / ((performance.now() - start) / 1000);
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'mxkeys-bench-fed-'));
  const pgSchema = opts.backend === 'postgres' ? await postgresSchema(argv.postgres!, 'benchfed') : undefined;
  const database: Record<string, unknown> = pgSchema?.database ?? { sqlite: join(dir, 'mxkeys.db') };
  const build = buildSnapshot(join(dir, 'build'));
  log(`measuring ${build.code}`);
  const origin = await startOrigin();
  const { configFile, port } = await benchConfig(dir, 'mxkeys', {
    database,
    secret: SECRET,
    // The limiter would otherwise be what is measured.
    extra: { federation: { resolve: { [origin.name]: origin.url }, rate_limit: { per_second: 1e9, burst_count: 1e9 } } },
  });


  try {
    const rounds: { verify: number; baseline: LoadResult; mxkeys: LoadResult }[] = [];
    let mx = await startMxkeys(build, configFile, port);
    const session = await registerUser(mx.url, SECRET, 'one');
    const device = new BenchDevice(session);
    await ok(mx.url, 'POST', '/_matrix/client/v3/keys/upload', { token: session.accessToken, body: { device_keys: device.deviceKeys() } });
    const xs = new BenchCrossSigning(session.userId);
    await ok(mx.url, 'POST', '/_matrix/client/v3/keys/device_signing/upload', { token: session.accessToken, body: xs.upload() });
    await ok(mx.url, 'POST', '/_matrix/client/v3/keys/signatures/upload', { token: session.accessToken, body: { [session.userId]: { [session.deviceId]: xs.signDevice(device.deviceKeys()) } } });
    const body = JSON.stringify({ device_keys: { [session.userId]: [] } });

    // Capture a real answer for the baseline (and make mxkeys fetch the origin's key once).
    const [first] = presign(origin, body, 1, -1);
    const captured = await fetch(mx.url + first!.path, { method: 'POST', headers: { ...first!.headers, 'content-type': 'application/json' }, body: first!.body });
    const answer = await captured.text();
    if (captured.status !== 200) throw new Error(`federation query failed: ${captured.status} ${answer}`);
    const headers: Record<string, string> = {};
    captured.headers.forEach((v, k) => {
      if (!['date', 'connection', 'keep-alive', 'content-length', 'transfer-encoding'].includes(k)) headers[k] = v;
    });
    const bodyFile = join(dir, 'answer.body');
    writeFileSync(bodyFile, answer);
    await mx.stop();

    let offset = 0;
    for (let round = 1; round <= opts.rounds; round++) {
      const rate = verifyRate(3, PATH);
      // Enough distinct requests for warm-up and window even at the full verification rate.
      const count = Math.ceil(rate * (opts.warmup + opts.duration) * 1.2);
      const t0 = Date.now();
      const prepared = presign(origin, body, count, offset);
      offset += count;
      log(`round ${round}: verify ${rate.toFixed(0)}/s; signed ${count} requests in ${((Date.now() - t0) / 1000).toFixed(1)} s`);

      const spec = { url: '', path: PATH, token: '', bodies: [body], connections: opts.connections, duration: opts.duration, prepared };
      const baselinePort = await freePort();
      const baseline = await startBaseline(baselinePort, bodyFile, headers);
      await runLoad({ ...spec, url: baseline.url }, opts.warmup);
      const b = await runLoad({ ...spec, url: baseline.url });
      await baseline.stop();

      const prof = argv['cpu-prof'] ? { dir: argv['cpu-prof'], name: `federation-${opts.backend}-${round}.cpuprofile` } : undefined;
      mx = await startMxkeys(build, configFile, port, prof);
      await runLoad({ ...spec, url: mx.url }, opts.warmup);
      // The measured window gets requests nobody has sent yet.
      const fresh = presign(origin, body, count, offset);
      offset += count;
      const m = await runLoad({ ...spec, url: mx.url, prepared: fresh });
      await mx.stop();
      if (prof) process.stdout.write(`${formatSummary(summarizeProfile(join(prof.dir, prof.name)))}\n`);
      if (m.non2xx > 0 || m.errors > 0) log(`  WARNING: mxkeys answered ${m.non2xx} non-2xx and had ${m.errors} errors: ${JSON.stringify(m.statuses)}`);
      log(`  baseline ${b.rps.toFixed(0)} req/s, mxkeys ${m.rps.toFixed(0)} req/s (${((m.rps / rate) * 100).toFixed(0)} % of verification)`);
      rounds.push({ verify: rate, baseline: b, mxkeys: m });
    }

    const v = median(rounds.map((r) => r.verify));
    const b = median(rounds.map((r) => r.baseline.rps));
    const m = median(rounds.map((r) => r.mxkeys.rps));
    const p50 = median(rounds.map((r) => r.mxkeys.latency.p50));
    const p99 = median(rounds.map((r) => r.mxkeys.latency.p99));
    const table = [
      `Federation POST /user/keys/query (1 user × 1 device, distinct X-Matrix signature per request), ${opts.backend}, ${opts.connections} connections, median of ${opts.rounds} × ${opts.duration} s; mxkeys with UV_THREADPOOL_SIZE=${process.env['UV_THREADPOOL_SIZE'] ?? 'unset (libuv default: 4)'}; load sent by bench/load.ts's own client:`,
      '',
      '| measure | req/s |',
      '|---|---|',
      `| node:crypto Ed25519 verifications, one core | ${v.toFixed(0)} |`,
      `| bare node:http baseline | ${b.toFixed(0)} |`,
      `| mxkeys | ${m.toFixed(0)} (p50 ${p50.toFixed(2)} ms, p99 ${p99.toFixed(2)} ms) |`,
      '',
      `mxkeys / verification rate: ${((m / v) * 100).toFixed(1)} % (target ≥ 70 %: ${m / v >= 0.7 ? 'met' : 'NOT met'}); mxkeys / baseline: ${((m / b) * 100).toFixed(1)} %`,
    ].join('\n');
    process.stdout.write(`${table}\n`);
    if (argv.json) {
      writeFileSync(argv.json, JSON.stringify({ opts, machine: { cpu: cpus()[0]?.model, cores: cpus().length, memory: totalmem(), node: process.version }, rounds }, null, 2));
    }
  } finally {
    origin.stop();
    await pgSchema?.drop();
    rmSync(dir, { recursive: true, force: true });
  }
}

runHarness(main);
