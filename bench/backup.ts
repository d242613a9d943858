/**
 * The key backup benchmark: one user uploads 10,000 room-key sessions to a new backup version in
 * batches of 1,000 (PUT /room_keys/keys, as a client restoring or backing up a long history
 * would), downloads the whole backup (GET /room_keys/keys), re-sends one batch that changes
 * nothing, and deletes the version. Each round uses a new version; the medians over the rounds
 * are reported, per database. Sessions look like real ones: 43-character session IDs, spread
 * over 200 rooms, with `session_data` of the size matrix-sdk-crypto produces.
 *
 *   npm run bench:backup -- [--backend sqlite|postgres|both] [--sessions N] [--batch N] [--rounds N] [--json FILE]
 */
import { parseArgs } from 'node:util';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir, cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import Database from 'better-sqlite3';
import { benchConfig, buildSnapshot, machineBusy, ok, registerUser, startMxkeys, type Session } from './support.js';
import { median, postgresSchema, runHarness, type PostgresSchema } from './harness.js';

const { values: argv } = parseArgs({
  options: {
    backend: { type: 'string', default: 'both' },
    sessions: { type: 'string', default: '10000' },
    batch: { type: 'string', default: '1000' },
    rounds: { type: 'string', default: '3' },
    rooms: { type: 'string', default: '200' },
    postgres: { type: 'string', default: process.env['BENCH_POSTGRES'] ?? 'postgres://postgres@127.0.0.1/postgres' },
    json: { type: 'string' },
    help: { type: 'boolean', default: false },
  },
});
if (argv.help) {
  process.stdout.write('npm run bench:backup -- [--backend sqlite|postgres|both] [--sessions 10000] [--batch 1000] [--rounds 3] [--rooms 200] [--postgres URL] [--json FILE]\n');
  process.exit(0);
}
const opts = { sessions: Number(argv.sessions), batch: Number(argv.batch), rounds: Math.max(1, Number(argv.rounds)), rooms: Number(argv.rooms) };
const backends = argv.backend === 'both' ? ['sqlite', 'postgres'] : [argv.backend === 'postgres' ? 'postgres' : 'sqlite'];
const log = (msg: string) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
const SECRET = 'bench-shared-secret';
const C = '/_matrix/client/v3';

const b64 = (bytes: number) => randomBytes(bytes).toString('base64').replace(/=+$/, '');

/** `batches` request bodies of `{rooms: {…}}`, together holding `sessions` distinct sessions. */
function backupBodies(): string[] {
  const bodies: string[] = [];
  for (let start = 0; start < opts.sessions; start += opts.batch) {
    const rooms: Record<string, { sessions: Record<string, unknown> }> = {};
    for (let i = start; i < Math.min(opts.sessions, start + opts.batch); i++) {
      const room = `!room${i % opts.rooms}:bench.local`;
      (rooms[room] ??= { sessions: {} }).sessions[b64(32)] = {
        first_message_index: i % 7,
        forwarded_count: 0,
        is_verified: i % 3 === 0,
        // The sizes of a real m.megolm_backup.v1.curve25519-aes-sha2 session_data.
        session_data: { ephemeral: b64(32), ciphertext: b64(400), mac: b64(8) },
      };
    }
    bodies.push(JSON.stringify({ rooms }));
  }
  return bodies;
}

interface Round {
  /** Milliseconds of each upload request, in order. */
  readonly uploads: number[];
  readonly uploadTotal: number;
  readonly download: number;
  readonly downloadBytes: number;
  /** A batch sent again: every key already stored, nothing written. */
  readonly resend: number;
  readonly deleteVersion: number;
}

async function timed<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const t = performance.now();
  const value = await fn();
  return [value, performance.now() - t];
}

async function oneRound(url: string, session: Session, bodies: string[]): Promise<Round> {
  const token = session.accessToken;
  const created = await ok<{ version: string }>(url, 'POST', `${C}/room_keys/version`, {
    token,
    body: { algorithm: 'm.megolm_backup.v1.curve25519-aes-sha2', auth_data: { public_key: b64(32), signatures: {} } },
  });
  const version = created.body.version;
  const uploads: number[] = [];
  for (const body of bodies) {
    const [r, ms] = await timed(() => ok<{ count: number }>(url, 'PUT', `${C}/room_keys/keys?version=${version}`, { token, rawBody: body, headers: { 'content-type': 'application/json' } }));
    uploads.push(ms);
    if (r.body.count > opts.sessions) throw new Error(`count ${r.body.count} after an upload: more than was sent`);
  }
  const [all, download] = await timed(() => ok<{ rooms: Record<string, { sessions: object }> }>(url, 'GET', `${C}/room_keys/keys?version=${version}`, { token }));
  const got = Object.values(all.body.rooms).reduce((n, r) => n + Object.keys(r.sessions).length, 0);
  if (got !== opts.sessions) throw new Error(`downloaded ${got} sessions, uploaded ${opts.sessions}`);
  const [again, resend] = await timed(() => ok<{ count: number }>(url, 'PUT', `${C}/room_keys/keys?version=${version}`, { token, rawBody: bodies[0]!, headers: { 'content-type': 'application/json' } }));
  if (again.body.count !== opts.sessions) throw new Error(`count ${again.body.count} after re-sending a batch`);
  const [, deleteVersion] = await timed(() => ok(url, 'DELETE', `${C}/room_keys/version/${version}`, { token }));
  return { uploads, uploadTotal: uploads.reduce((a, b) => a + b, 0), download, downloadBytes: Buffer.byteLength(all.text), resend, deleteVersion };
}

/** Bytes the e2e_room_keys table takes, with its index. */
async function tableBytes(database: Record<string, unknown>, pgSchema: PostgresSchema | undefined): Promise<number | undefined> {
  if (pgSchema) {
    const r = await pgSchema.query<{ n: string }>(`SELECT pg_total_relation_size('${pgSchema.schema}.e2e_room_keys') AS n`);
    return Number(r.rows[0]!.n);
  }
  const db = new Database(database['sqlite'] as string, { readonly: true });
  try {
    return (db.prepare("SELECT SUM(pgsize) AS n FROM dbstat WHERE name LIKE '%e2e_room_keys' OR name LIKE 'sqlite_autoindex_e2e_room_keys_%'").get() as { n: number }).n;
  } catch {
    return undefined;
  } finally {
    db.close();
  }
}

async function runBackend(backend: string, dir: string, build: ReturnType<typeof buildSnapshot>): Promise<{ rounds: Round[]; bytesPerSession: number | undefined }> {
  const pgSchema = backend === 'postgres' ? await postgresSchema(argv.postgres!, 'benchbackup') : undefined;
  const database: Record<string, unknown> = pgSchema?.database ?? { sqlite: join(dir, `${backend}.db`) };
  const { configFile, port } = await benchConfig(dir, backend, { database, secret: SECRET });
  const mx = await startMxkeys(build, configFile, port);
  try {
    const session = await registerUser(mx.url, SECRET, `user${randomBytes(3).toString('hex')}`);
    const bodies = backupBodies();
    log(`${backend}: ${bodies.length} request bodies of ${opts.batch} sessions, ${(bodies.reduce((n, b) => n + b.length, 0) / opts.sessions).toFixed(0)} bytes per session`);
    // Size first, on tables nothing was deleted from yet: one upload, measured, then deleted.
    const token = session.accessToken;
    const sized = await ok<{ version: string }>(mx.url, 'POST', `${C}/room_keys/version`, { token, body: { algorithm: 'm.megolm_backup.v1.curve25519-aes-sha2', auth_data: {} } });
    for (const body of bodies) await ok(mx.url, 'PUT', `${C}/room_keys/keys?version=${sized.body.version}`, { token, rawBody: body, headers: { 'content-type': 'application/json' } });
    const bytes = await tableBytes(database, pgSchema);
    const bytesPerSession = bytes === undefined ? undefined : bytes / opts.sessions;
    await ok(mx.url, 'DELETE', `${C}/room_keys/version/${sized.body.version}`, { token });
    // Warm-up: one round not counted (JIT, prepared statements, the tables' first pages).
    await oneRound(mx.url, session, bodies);
    const rounds: Round[] = [];
    for (let i = 1; i <= opts.rounds; i++) {
      const busy = await machineBusy(1000);
      if (busy > 10) log(`  machine busy (${busy.toFixed(0)} % of all cores) before round ${i}`);
      const round = await oneRound(mx.url, session, bodies);
      log(`  round ${i}: upload ${round.uploadTotal.toFixed(0)} ms, download ${round.download.toFixed(0)} ms, re-send ${round.resend.toFixed(0)} ms, delete ${round.deleteVersion.toFixed(0)} ms`);
      rounds.push(round);
    }
    return { rounds, bytesPerSession };
  } finally {
    await mx.stop();
    await pgSchema?.drop();
  }
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'mxkeys-bench-backup-'));
  try {
    const build = buildSnapshot(join(dir, 'build'));
    log(`measuring ${build.code}`);
    const results: Record<string, { rounds: Round[]; bytesPerSession: number | undefined }> = {};
    for (const backend of backends) results[backend] = await runBackend(backend, dir, build);

    const batches = Math.ceil(opts.sessions / opts.batch);
    const lines = [
      `Key backup, code ${build.code}: ${opts.sessions} sessions in ${batches} PUT /room_keys/keys of ${opts.batch}, one GET of the whole backup; median of ${opts.rounds} rounds (after one warm-up round), one client, one request at a time.`,
      '',
      '| database | upload, all batches | per batch (median / slowest) | sessions/s stored | download | downloaded | re-send a batch (no change) | delete version | table size per session |',
      '|---|---|---|---|---|---|---|---|---|',
    ];
    for (const [backend, { rounds, bytesPerSession }] of Object.entries(results)) {
      const upload = median(rounds.map((r) => r.uploadTotal));
      const perBatch = median(rounds.flatMap((r) => r.uploads));
      const slowest = median(rounds.map((r) => Math.max(...r.uploads)));
      const download = median(rounds.map((r) => r.download));
      lines.push(
        `| ${backend} | ${(upload / 1000).toFixed(2)} s | ${perBatch.toFixed(0)} / ${slowest.toFixed(0)} ms | ${((opts.sessions / upload) * 1000).toFixed(0)} | ${download.toFixed(0)} ms | ${(rounds[0]!.downloadBytes / 1e6).toFixed(1)} MB | ${median(rounds.map((r) => r.resend)).toFixed(0)} ms | ${median(rounds.map((r) => r.deleteVersion)).toFixed(0)} ms | ${bytesPerSession === undefined ? 'n/a' : `${bytesPerSession.toFixed(0)} B`} |`,
      );
    }
    process.stdout.write(`${lines.join('\n')}\n`);
    if (argv.json) writeFileSync(argv.json, JSON.stringify({ opts, code: build.code, machine: { cpu: cpus()[0]?.model, cores: cpus().length, memory: totalmem(), node: process.version }, results }, null, 2));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

runHarness(main);
