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
 *   npm run bench:federation -- [--backend sqlite|postgres] [--duration S] [--warmup S] [--rounds N] [--connections N] [--threads N] [--json FILE] [--cpu-prof DIR]
 *
 * Load comes from wrk (bench/load.ts): the requests are signed before the load starts and written
 * to a file that wrk's Lua script sends in turn.
 *
 * mxkeys inherits the environment: `UV_THREADPOOL_SIZE=1 npm run bench:federation` measures it
 * with one libuv thread (where verification runs); the report says which size was used.
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir, cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { verify, generateKeyPairSync, sign } from 'node:crypto';
import { runLoad, socketErrors, wrk, writeRequests, type LoadResult } from './load.js';
import { formatSummary, summarizeProfile } from './profile.js';
import { benchConfig, BenchCrossSigning, BenchDevice, buildSnapshot, freePort, ok, registerUser, startBaseline, startMxkeys } from './support.js';
import { median, postgresSchema, runHarness } from './harness.js';
import { presign, startOrigin } from './xmatrix.js';
import { canonical } from '../test/support/keys.js';

const { values: argv } = parseArgs({
  options: {
    backend: { type: 'string', default: 'sqlite' },
    duration: { type: 'string', default: '10' },
    warmup: { type: 'string', default: '3' },
    rounds: { type: 'string', default: '3' },
    connections: { type: 'string', default: '16' },
    threads: { type: 'string', default: '1' },
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
  threads: Number(argv.threads),
};
const log = (msg: string) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
const SECRET = 'bench-shared-secret';
const SERVER = 'bench.local';
const PATH = '/_matrix/federation/v1/user/keys/query';

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
  wrk(); // fails at once, saying how to install it, when wrk is missing
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
    const [first] = presign(origin, SERVER, PATH, body, 1);
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

    const file = (name: string, count: number) => {
      const f = join(dir, `${name}.requests`);
      writeRequests(f, presign(origin, SERVER, PATH, body, count));
      return f;
    };
    for (let round = 1; round <= opts.rounds; round++) {
      const rate = verifyRate(3, PATH);
      // Enough distinct requests for warm-up and window even at the full verification rate.
      const count = Math.ceil(rate * (opts.warmup + opts.duration) * 1.2);
      const t0 = Date.now();
      const prepared = file(`round${round}`, count);
      log(`round ${round}: verify ${rate.toFixed(0)}/s; signed ${count} requests in ${((Date.now() - t0) / 1000).toFixed(1)} s`);

      const load = { connections: opts.connections, threads: opts.threads, requests: prepared };
      const baseline = await startBaseline(await freePort(), bodyFile, headers);
      await runLoad({ ...load, url: baseline.url, duration: opts.warmup });
      const b = await runLoad({ ...load, url: baseline.url, duration: opts.duration });
      await baseline.stop();

      const prof = argv['cpu-prof'] ? { dir: argv['cpu-prof'], name: `federation-${opts.backend}-${round}.cpuprofile` } : undefined;
      mx = await startMxkeys(build, configFile, port, { cpuProf: prof });
      await runLoad({ ...load, url: mx.url, duration: opts.warmup });
      // The measured window gets requests nobody has sent yet.
      const m = await runLoad({ ...load, url: mx.url, duration: opts.duration, requests: file(`round${round}-fresh`, count) });
      await mx.stop();
      if (prof) process.stdout.write(`${formatSummary(summarizeProfile(join(prof.dir, prof.name)))}\n`);
      const errors = socketErrors(m);
      if (m.non2xx > 0 || errors > 0) log(`  WARNING: mxkeys answered ${m.non2xx} non-2xx and had ${errors} socket errors`);
      if (m.built > count) log(`  WARNING: the window needed more than the ${count} distinct requests signed for it; ${m.built - count} were sent twice`);
      log(`  baseline ${b.rps.toFixed(0)} req/s, mxkeys ${m.rps.toFixed(0)} req/s (${((m.rps / rate) * 100).toFixed(0)} % of verification)`);
      rounds.push({ verify: rate, baseline: b, mxkeys: m });
    }

    const v = median(rounds.map((r) => r.verify));
    const b = median(rounds.map((r) => r.baseline.rps));
    const m = median(rounds.map((r) => r.mxkeys.rps));
    const p50 = median(rounds.map((r) => r.mxkeys.latency.p50));
    const p99 = median(rounds.map((r) => r.mxkeys.latency.p99));
    const table = [
      `Federation POST /user/keys/query (1 user × 1 device, distinct X-Matrix signature per request), ${opts.backend}, ${opts.connections} connections, median of ${opts.rounds} × ${opts.duration} s; mxkeys with UV_THREADPOOL_SIZE=${process.env['UV_THREADPOOL_SIZE'] ?? 'unset (libuv default: 4)'}; load from wrk (${opts.threads} thread(s)):`,
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
