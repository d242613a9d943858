/**
 * To-device throughput: how fast mxkeys carries to-device messages, the channel room keys and
 * verifications travel on.
 *
 * 1. Local: 10,000 messages to 100 devices of this server (10 users × 10 devices), sent as 100
 *    PUT /sendToDevice of 100 messages each (one per device, as a client shares a room key), 4
 *    requests in flight; every device long-polls /sync the whole time, acknowledging as it goes.
 *    Measured: until every request is answered, and until every device has received all of its
 *    messages.
 * 2. Remote: 10,000 messages to 10 other servers (fake servers in a child process; 10 users × 10
 *    devices on each), sent the same way; measured until every server has received all of its
 *    messages in m.direct_to_device EDUs.
 *
 * Messages have the size of real Olm-encrypted ones (~1.2 KB). Each round checks that every
 * message arrived exactly once. mxkeys runs as a child process built from src/.
 *
 *   npm run bench:to-device -- [--backend sqlite|postgres|both] [--rounds N] [--json FILE]
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir, cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { benchConfig, buildSnapshot, inParallel, login, machineBusy, ok, registerUser, startMxkeys, type Build, type Session } from './support.js';
import { median, postgresSchema, runHarness, startFakes } from './harness.js';
import { http } from '../test/support/http.js';

const { values: argv } = parseArgs({
  options: {
    backend: { type: 'string', default: 'both' },
    rounds: { type: 'string', default: '3' },
    postgres: { type: 'string', default: process.env['BENCH_POSTGRES'] ?? 'postgres://postgres@127.0.0.1/postgres' },
    json: { type: 'string' },
    help: { type: 'boolean', default: false },
  },
});
if (argv.help) {
  process.stdout.write('npm run bench:to-device -- [--backend sqlite|postgres|both] [--rounds 3] [--postgres URL] [--json FILE]\n');
  process.exit(0);
}
const backends = argv.backend === 'both' ? ['sqlite', 'postgres'] : [argv.backend === 'postgres' ? 'postgres' : 'sqlite'];
const rounds = Math.max(1, Number(argv.rounds));
const log = (msg: string) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
const SECRET = 'bench-shared-secret';
const C = '/_matrix/client/v3';
const USERS = 10;
const DEVICES_PER_USER = 10;
const REQUESTS = 100;
const IN_FLIGHT = 4;
type Json = Record<string, unknown>;

const b64 = (bytes: number) => randomBytes(bytes).toString('base64').replace(/=+$/, '');

/** An m.room.encrypted to-device content of a real Olm message's size, tagged with where it belongs. */
function olmContent(request: number): Json {
  return {
    algorithm: 'm.olm.v1.curve25519-aes-sha2',
    sender_key: b64(32),
    ciphertext: { [b64(32)]: { type: 0, body: b64(800) } },
    'org.example.bench': request,
  };
}

/** One request per index: a message for every device of `recipients`. */
function requestBodies(recipients: readonly { userId: string; deviceIds: readonly string[] }[]): string[] {
  return Array.from({ length: REQUESTS }, (_, i) =>
    JSON.stringify({ messages: Object.fromEntries(recipients.map((r) => [r.userId, Object.fromEntries(r.deviceIds.map((d) => [d, olmContent(i)]))])) }),
  );
}

interface Round {
  readonly messages: number;
  /** From the first request sent until the last one answered. */
  readonly sendMs: number;
  /** From the first request sent until the last message arrived where it was going. */
  readonly deliveredMs: number;
  readonly extra: Json;
}

async function sendAll(url: string, alice: Session, bodies: readonly string[], txnPrefix: string): Promise<number> {
  const t0 = performance.now();
  await inParallel(bodies, IN_FLIGHT, (body, i) =>
    ok(url, 'PUT', `${C}/sendToDevice/m.room.encrypted/${txnPrefix}-${i}`, { token: alice.accessToken, rawBody: body, headers: { 'content-type': 'application/json' } }),
  );
  return performance.now() - t0;
}

/** A device that long-polls /sync until it has `expected` messages, checking that none comes twice. */
class SyncingDevice {
  since = '';
  received = new Set<number>();
  duplicates = 0;
  lastAt = 0;

  constructor(
    readonly url: string,
    readonly session: Session,
  ) {}

  async start(): Promise<void> {
    this.since = (await ok(this.url, 'GET', `${C}/sync`, { token: this.session.accessToken })).body['next_batch'] as string;
  }

  async until(expected: number): Promise<void> {
    while (this.received.size < expected) {
      const r = await http(this.url, 'GET', `${C}/sync?since=${this.since}&timeout=30000`, { token: this.session.accessToken });
      if (r.status !== 200) throw new Error(`/sync of ${this.session.deviceId}: ${r.status} ${r.text.slice(0, 300)}`);
      this.since = r.body['next_batch'] as string;
      for (const e of ((r.body['to_device'] as Json)['events'] as { content: Json }[])) {
        const n = e.content['org.example.bench'] as number;
        if (this.received.has(n)) this.duplicates++;
        this.received.add(n);
        this.lastAt = performance.now();
      }
    }
  }
}

async function localRound(url: string, alice: Session, devices: SyncingDevice[], round: number): Promise<Round> {
  const byUser = new Map<string, string[]>();
  for (const d of devices) byUser.set(d.session.userId, [...(byUser.get(d.session.userId) ?? []), d.session.deviceId]);
  const bodies = requestBodies([...byUser].map(([userId, deviceIds]) => ({ userId, deviceIds })));
  for (const d of devices) d.received = new Set();
  const receiving = Promise.all(devices.map((d) => d.until(REQUESTS)));
  const t0 = performance.now();
  const sendMs = await sendAll(url, alice, bodies, `local${round}`);
  await receiving;
  const deliveredMs = Math.max(...devices.map((d) => d.lastAt)) - t0;
  const duplicates = devices.reduce((n, d) => n + d.duplicates, 0);
  if (duplicates > 0) throw new Error(`${duplicates} messages arrived twice`);
  return { messages: REQUESTS * devices.length, sendMs, deliveredMs, extra: {} };
}

async function remoteRound(url: string, alice: Session, control: string, servers: readonly string[], round: number): Promise<Round> {
  // One user with 10 devices on each server: 100 messages per request, as locally.
  const recipients = servers.map((server) => ({ userId: `@user:${server}`, deviceIds: Array.from({ length: DEVICES_PER_USER }, (_, d) => `DEV${d}`) }));
  const perServer = (REQUESTS * recipients.reduce((n, r) => n + r.deviceIds.length, 0)) / servers.length;
  type Progress = { toDevice: Record<string, { messages: number; edus: number; repeated: number }>; lastToDeviceAt: number; transactions: number; largestTransaction: number };
  const before = (await ok<Progress>(control, 'GET', '/progress')).body;
  const t0 = performance.now();
  const start = Date.now();
  const sendMs = await sendAll(url, alice, requestBodies(recipients), `remote${round}`);
  let progress: Progress;
  for (;;) {
    progress = (await ok<Progress>(control, 'GET', '/progress')).body;
    if (servers.every((s) => progress.toDevice[s]!.messages - before.toDevice[s]!.messages >= perServer)) break;
    if (performance.now() - t0 > 300_000) throw new Error(`the remote servers did not get every message within 5 minutes: ${JSON.stringify(progress.toDevice)}, sent in ${sendMs.toFixed(0)} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const got = servers.map((s) => progress.toDevice[s]!.messages - before.toDevice[s]!.messages);
  if (got.some((n) => n !== perServer)) throw new Error(`messages per server: ${got.join(', ')} (expected ${perServer} each)`);
  const repeated = servers.reduce((n, s) => n + progress.toDevice[s]!.repeated - before.toDevice[s]!.repeated, 0);
  const edus = servers.reduce((n, s) => n + progress.toDevice[s]!.edus - before.toDevice[s]!.edus, 0);
  return {
    messages: perServer * servers.length,
    sendMs,
    deliveredMs: progress.lastToDeviceAt - start,
    extra: { edus, transactions: progress.transactions - before.transactions, largestTransaction: progress.largestTransaction, repeatedEdus: repeated },
  };
}

async function runBackend(backend: string, dir: string, build: Build): Promise<{ local: Round[]; remote: Round[] }> {
  const pgSchema = backend === 'postgres' ? await postgresSchema(argv.postgres!, 'benchtodevice') : undefined;
  const database: Json = pgSchema?.database ?? { sqlite: join(dir, `${backend}.db`) };
  const fakes = await startFakes(10, 0);
  const { configFile, port } = await benchConfig(dir, backend, { database, secret: SECRET, extra: { federation: { resolve: fakes.servers } } });
  const mx = await startMxkeys(build, configFile, port);
  try {
    const alice = await registerUser(mx.url, SECRET, 'alice');
    const devices: SyncingDevice[] = [];
    for (let u = 0; u < USERS; u++) {
      const first = await registerUser(mx.url, SECRET, `user${u}`);
      const sessions = [first, ...(await inParallel(Array.from({ length: DEVICES_PER_USER - 1 }), 3, () => login(mx.url, first)))];
      devices.push(...sessions.map((s) => new SyncingDevice(mx.url, s)));
    }
    await Promise.all(devices.map((d) => d.start()));
    const servers = Object.keys(fakes.servers);
    // Warm-up: one round of each, not counted (JIT, prepared statements, connections to the servers).
    const warmLocal = await localRound(mx.url, alice, devices, 0);
    log(`  ${backend} warm-up local: sent in ${warmLocal.sendMs.toFixed(0)} ms, all delivered after ${warmLocal.deliveredMs.toFixed(0)} ms`);
    const warmRemote = await remoteRound(mx.url, alice, fakes.control, servers, 0);
    log(`  ${backend} warm-up remote: sent in ${warmRemote.sendMs.toFixed(0)} ms, all delivered after ${warmRemote.deliveredMs.toFixed(0)} ms`);
    const local: Round[] = [];
    const remote: Round[] = [];
    for (let i = 1; i <= rounds; i++) {
      const busy = await machineBusy(1000);
      if (busy > 10) log(`  machine busy (${busy.toFixed(0)} % of all cores) before round ${i}`);
      const l = await localRound(mx.url, alice, devices, i);
      log(`  ${backend} round ${i} local: sent in ${l.sendMs.toFixed(0)} ms, all delivered after ${l.deliveredMs.toFixed(0)} ms`);
      const r = await remoteRound(mx.url, alice, fakes.control, servers, i);
      log(`  ${backend} round ${i} remote: sent in ${r.sendMs.toFixed(0)} ms, all delivered after ${r.deliveredMs.toFixed(0)} ms ${JSON.stringify(r.extra)}`);
      local.push(l);
      remote.push(r);
    }
    return { local, remote };
  } finally {
    await mx.stop();
    fakes.stop();
    await pgSchema?.drop();
  }
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'mxkeys-bench-to-device-'));
  try {
    const build = buildSnapshot(join(dir, 'build'));
    log(`measuring ${build.code}`);
    const results: Record<string, { local: Round[]; remote: Round[] }> = {};
    for (const backend of backends) results[backend] = await runBackend(backend, dir, build);
    const lines = [
      `To-device throughput, code ${build.code}: ${REQUESTS} PUT /sendToDevice of 100 messages (~1.2 KB each), ${IN_FLIGHT} in flight; median of ${rounds} rounds after a warm-up round.`,
      '',
      '| database | to | messages | all requests answered | all messages delivered | messages/s delivered |',
      '|---|---|---|---|---|---|',
    ];
    for (const [backend, r] of Object.entries(results)) {
      for (const [to, list] of [
        ['100 local devices (each long-polling /sync)', r.local],
        ['10 remote servers', r.remote],
      ] as const) {
        const delivered = median(list.map((x) => x.deliveredMs));
        lines.push(`| ${backend} | ${to} | ${list[0]!.messages} | ${(median(list.map((x) => x.sendMs)) / 1000).toFixed(2)} s | ${(delivered / 1000).toFixed(2)} s | ${Math.round((list[0]!.messages / delivered) * 1000)} |`);
      }
    }
    lines.push('', 'Per round, delivered in ms:');
    for (const [backend, r] of Object.entries(results)) {
      lines.push(`${backend}: local ${r.local.map((x) => x.deliveredMs.toFixed(0)).join(', ')}; remote ${r.remote.map((x) => `${x.deliveredMs.toFixed(0)} (${JSON.stringify(x.extra)})`).join(', ')}`);
    }
    process.stdout.write(`${lines.join('\n')}\n`);
    if (argv.json) writeFileSync(argv.json, JSON.stringify({ code: build.code, machine: { cpu: cpus()[0]?.model, cores: cpus().length, memory: totalmem(), node: process.version }, results }, null, 2));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

runHarness(main);
