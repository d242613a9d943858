/**
 * Federation outward: how fast mxkeys asks other servers, and how fast it tells them.
 *
 * 1. Fan-out latency: one client /keys/query naming a user on each of 10 servers that each take
 *    200 ms to answer (each user new, so every server is asked). Asked in parallel the answer takes
 *    a little over 200 ms; asked one after another it would take 2 s. Also the same query again,
 *    answered from the device-list cache.
 * 2. Propagation: 10 users with 10 devices each, every user subscribed by 100 servers; 1,000
 *    device changes (renames), then the time until every server has the newest update of every
 *    user, the EDUs per second, and the largest transaction.
 *
 * mxkeys runs as a child process built from src/; the fake servers run in another child process.
 *
 *   npm run bench:federation-out -- [--backend sqlite|postgres] [--rounds N] [--json FILE]
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import Database from 'better-sqlite3';
import { benchConfig, buildSnapshot, inParallel, killChildren, login, ok, registerUser, startMxkeys, type Session } from './support.js';
import { startFakes } from './harness.js';

const { values: argv } = parseArgs({
  options: {
    backend: { type: 'string', default: 'sqlite' },
    rounds: { type: 'string', default: '5' },
    postgres: { type: 'string', default: process.env['BENCH_POSTGRES'] ?? 'postgres://postgres@127.0.0.1/postgres' },
    json: { type: 'string' },
  },
});
const backend = argv.backend === 'postgres' ? 'postgres' : 'sqlite';
const rounds = Math.max(1, Number(argv.rounds));
const log = (msg: string) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
const SECRET = 'bench-shared-secret';
const SERVER = 'bench.local';
const C = '/_matrix/client/v3';
type Json = Record<string, unknown>;

/** The newest device-list stream_id of each user, read from mxkeys' database. */
const LATEST = 'SELECT user_id, MAX(stream_id) AS s FROM device_lists_stream WHERE device_id IS NOT NULL AND private_to IS NULL GROUP BY user_id';

async function database(dir: string): Promise<{ config: Json; latestStreams: () => Promise<Map<string, number>>; drop: () => Promise<void> }> {
  if (backend === 'sqlite') {
    const path = join(dir, `mxkeys-${Date.now().toString(36)}.db`);
    return {
      config: { sqlite: path },
      latestStreams: async () => {
        const db = new Database(path, { readonly: true });
        try {
          return new Map((db.prepare(LATEST).all() as { user_id: string; s: number }[]).map((r) => [r.user_id, r.s]));
        } finally {
          db.close();
        }
      },
      drop: async () => undefined,
    };
  }
  const schema = `bench_fed_${Date.now().toString(36)}`;
  const admin = new pg.Pool({ connectionString: argv.postgres, max: 1 });
  await admin.query(`CREATE SCHEMA ${schema}`);
  const url = new URL(argv.postgres!);
  url.searchParams.set('options', `-c search_path=${schema}`);
  return {
    config: { postgres: url.toString() },
    latestStreams: async () => {
      const client = new pg.Client({ connectionString: url.toString() });
      await client.connect();
      try {
        return new Map((await client.query<{ user_id: string; s: string }>(LATEST)).rows.map((r) => [r.user_id, Number(r.s)]));
      } finally {
        await client.end();
      }
    },
    drop: async () => {
      await admin.query(`DROP SCHEMA ${schema} CASCADE`);
      await admin.end();
    },
  };
}

async function startServer(dir: string, resolve: Record<string, string>, db: Json) {
  const { configFile, port } = await benchConfig(dir, `mxkeys-${Date.now().toString(36)}`, { database: db, secret: SECRET, extra: { federation: { resolve, allow_device_name_lookup: true } } });
  return startMxkeys(buildSnapshot(join(dir, 'build')), configFile, port);
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function fanOut(dir: string): Promise<Json> {
  const fakes = await startFakes(10, 200);
  const db = await database(dir);
  const mx = await startServer(dir, fakes.servers, db.config);
  try {
    const alice = await registerUser(mx.url, SECRET, 'alice');
    const names = Object.keys(fakes.servers);
    const first: number[] = [];
    const cached: number[] = [];
    for (let round = 0; round < rounds; round++) {
      const body = { device_keys: Object.fromEntries(names.map((n) => [`@user${round}:${n}`, []])) };
      let t = performance.now();
      const r = await ok(mx.url, 'POST', `${C}/keys/query`, { token: alice.accessToken, body });
      first.push(performance.now() - t);
      if (Object.keys(r.body['failures'] as Json).length > 0) throw new Error(`failures: ${JSON.stringify(r.body['failures'])}`);
      if (Object.keys(r.body['device_keys'] as Json).length !== names.length) throw new Error('not every user was answered');
      t = performance.now();
      await ok(mx.url, 'POST', `${C}/keys/query`, { token: alice.accessToken, body });
      cached.push(performance.now() - t);
    }
    log(`fan-out: first query ${first.map((x) => x.toFixed(0)).join(', ')} ms; from the cache ${cached.map((x) => x.toFixed(1)).join(', ')} ms`);
    return { servers: names.length, serverDelayMs: 200, firstQueryMs: first, firstQueryMedianMs: median(first), cachedQueryMs: cached, cachedQueryMedianMs: median(cached) };
  } finally {
    await mx.stop();
    fakes.stop();
    await db.drop();
  }
}

async function propagation(dir: string): Promise<Json> {
  const fakes = await startFakes(100, 0);
  const db = await database(dir);
  const mx = await startServer(dir, fakes.servers, db.config);
  try {
    const users: Session[][] = [];
    for (let u = 0; u < 10; u++) {
      const first = await registerUser(mx.url, SECRET, `user${u}`);
      const devices = [first, ...(await inParallel(Array.from({ length: 9 }), 3, () => login(mx.url, first)))];
      users.push(devices);
    }
    const userIds = users.map((d) => d[0]!.userId);
    const t0 = performance.now();
    await ok(fakes.control, 'POST', '/subscribe', { body: { mxkeys: mx.url, destination: SERVER, users: userIds } });
    log(`100 servers subscribed to 10 users in ${((performance.now() - t0) / 1000).toFixed(1)} s`);

    const changes = users.flatMap((devices) => devices.flatMap((d) => Array.from({ length: 10 }, (_, i) => ({ d, name: `${d.deviceId} #${i}` }))));
    const start = Date.now();
    await inParallel(changes, 8, ({ d, name }) => ok(mx.url, 'PUT', `${C}/devices/${d.deviceId}`, { token: d.accessToken, body: { display_name: name } }));
    const changesDone = Date.now();
    const latest = await db.latestStreams();
    // Done when every server has, for every user, an update at least as new as the user's last change.
    let progress: Json;
    for (;;) {
      progress = (await ok<Json>(fakes.control, 'GET', '/progress')).body;
      const servers = Object.values(progress['servers'] as Record<string, Record<string, number>>);
      if (servers.every((seen) => userIds.every((u) => (seen[u] ?? 0) >= latest.get(u)!))) break;
      if (Date.now() - start > 300_000) throw new Error('propagation did not finish within 5 minutes');
      await new Promise((r) => setTimeout(r, 100));
    }
    const lastEduAt = progress['lastEduAt'] as number;
    const seconds = (lastEduAt - start) / 1000;
    const result = {
      servers: 100,
      users: 10,
      devicesPerUser: 10,
      changes: changes.length,
      changesSeconds: (changesDone - start) / 1000,
      untilAllDeliveredSeconds: seconds,
      edusDelivered: progress['edus'],
      transactions: progress['transactions'],
      edusPerSecond: Math.round((progress['edus'] as number) / seconds),
      largestTransactionEdus: progress['largestTransaction'],
    };
    log(`propagation: ${JSON.stringify(result)}`);
    return result;
  } finally {
    await mx.stop();
    fakes.stop();
    await db.drop();
  }
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'mxkeys-bench-fed-'));
  process.on('SIGINT', () => {
    killChildren();
    process.exit(130);
  });
  try {
    const result = { backend, fanOut: await fanOut(dir), propagation: await propagation(dir) };
    process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
    if (argv.json) writeFileSync(argv.json, JSON.stringify(result, null, 2));
  } finally {
    killChildren();
    rmSync(dir, { recursive: true, force: true });
  }
}

void main();
