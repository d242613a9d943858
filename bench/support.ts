/**
 * Harness plumbing: child processes (mxkeys and the bare baseline server), a small HTTP client,
 * Matrix accounts over HTTP, and key material signed with node:crypto's Ed25519 (fast enough to
 * sign a million one-time keys in well under a minute).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { generateKeyPairSync, randomBytes, sign, type KeyObject } from 'node:crypto';
import { createServer } from 'node:net';
import { get as httpGet } from 'node:http';
import { closeSync, copyFileSync, existsSync, fdatasyncSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { withSignature } from '../test/support/keys.js';
import { registrationMac, type Session } from '../test/support/client.js';

export type { Session };
import { http, type HttpResult, type RequestOptions } from '../test/support/http.js';

export const ROOT = fileURLToPath(new URL('..', import.meta.url));
export const BASELINE = fileURLToPath(new URL('./baseline-server.mjs', import.meta.url));

type Json = Record<string, unknown>;

// ---------------------------------------------------------------------------------------------
// Processes

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => resolve(port));
    });
  });
}

export interface Child {
  readonly url: string;
  readonly pid: number;
  /** Everything the process wrote so far (stdout and stderr). */
  output(): string;
  /** SIGTERM, then wait for exit (SIGKILL after 20 s). Resolves to the exit code. */
  stop(): Promise<number | null>;
}

const live = new Set<ChildProcess>();
/** Kills children we started if the harness itself is interrupted. */
export function killChildren(): void {
  for (const c of live) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
}

async function waitUntilAnswering(url: string, path: string, child: ChildProcess, out: () => string): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`process exited (${child.exitCode ?? child.signalCode}) before answering:\n${out()}`);
    try {
      const r = await fetch(url + path);
      await r.arrayBuffer();
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`no answer from ${url} within 30 s:\n${out()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

async function startChild(args: string[], port: number, readyPath: string, readyLine?: string): Promise<Child> {
  const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: childEnv() });
  live.add(child);
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => (live.delete(child), resolve(code))));
  const url = `http://127.0.0.1:${port}`;
  await waitUntilAnswering(url, readyPath, child, () => out);
  if (readyLine) {
    const deadline = Date.now() + 60_000;
    while (!out.includes(readyLine)) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`process exited (${child.exitCode ?? child.signalCode}) before logging "${readyLine}":\n${out}`);
      if (Date.now() > deadline) throw new Error(`no "${readyLine}" in the log within 60 s:\n${out}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return {
    url,
    pid: child.pid!,
    output: () => out,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
      const code = await exited;
      clearTimeout(timer);
      return code;
    },
  };
}

/** Our environment minus MXKEYS_* settings, which would override the bench config. */
function childEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !k.startsWith('MXKEYS_')) env[k] = v;
  return env;
}

export interface CpuProfile {
  readonly dir: string;
  readonly name: string;
}

/**
 * The code under test: src/ compiled into a directory of the harness's own, so that a rebuild of
 * dist/ while the harness runs (npm test builds it) cannot change the server halfway through.
 */
export interface Build {
  readonly dir: string;
  readonly main: string;
  /** `git rev-parse --short HEAD`, with "+ uncommitted changes in src/" when src/ differs from it. */
  readonly code: string;
}

function git(...args: string[]): string {
  const r = spawnSync('git', args, { cwd: ROOT, encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : '';
}

/** Compiles src/ into `dir` (kept when reused), or reuses a build made there before. */
export function buildSnapshot(dir: string): Build {
  const main = join(dir, 'dist', 'main.js');
  const describe = () => {
    const commit = git('rev-parse', '--short', 'HEAD') || 'unknown commit';
    return git('status', '--porcelain', '--', 'src') ? `${commit} + uncommitted changes in src/` : commit;
  };
  const codeFile = join(dir, 'CODE');
  if (existsSync(main) && existsSync(codeFile)) return { dir, main, code: readFileSync(codeFile, 'utf8') };
  mkdirSync(dir, { recursive: true });
  for (let attempt = 0; ; attempt++) {
    const before = `${describe()} ${git('diff', 'HEAD', '--', 'src')}`;
    const tsc = join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
    const r = spawnSync(process.execPath, [tsc, '-p', 'tsconfig.build.json', '--outDir', join(dir, 'dist'), '--declaration', 'false', '--sourceMap', 'false'], {
      cwd: ROOT,
      encoding: 'utf8',
    });
    if (r.status !== 0) throw new Error(`compiling src/ failed:\n${r.stdout}${r.stderr}`);
    // Compiled while someone edited src/? Compile again.
    if (before === `${describe()} ${git('diff', 'HEAD', '--', 'src')}` || attempt >= 3) break;
  }
  const code = describe();
  // dist/ finds its packages through node_modules next to it, and reads package.json (ESM, version).
  copyFileSync(join(ROOT, 'package.json'), join(dir, 'package.json'));
  if (!existsSync(join(dir, 'node_modules'))) symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'), 'dir');
  writeFileSync(codeFile, code);
  return { dir, main, code };
}

export interface MxkeysOptions {
  /** Run under node --cpu-prof (one process only). */
  readonly cpuProf?: CpuProfile | undefined;
  /**
   * `serve --workers N`. With more than one, startMxkeys waits for the supervisor's
   * "mxkeys is listening" (every worker serving), so the config's log_level must be info or lower.
   */
  readonly workers?: number | undefined;
}

/** `node <build>/dist/main.js serve --config FILE [--workers N]`, optionally under the V8 CPU profiler. */
export function startMxkeys(build: Build, configFile: string, port: number, options: MxkeysOptions = {}): Promise<Child> {
  const { cpuProf, workers = 1 } = options;
  const prof = cpuProf ? ['--cpu-prof', '--cpu-prof-dir', cpuProf.dir, '--cpu-prof-name', cpuProf.name] : [];
  const args = [...prof, build.main, 'serve', '--config', configFile, ...(workers > 1 ? ['--workers', String(workers)] : [])];
  return startChild(args, port, '/_matrix/federation/v1/version', workers > 1 ? '"msg":"mxkeys is listening"' : undefined);
}

/** `pid` and every process below it (the workers of `serve --workers N`), from /proc. */
export function processTree(pid: number): number[] {
  const out = [pid];
  for (let i = 0; i < out.length; i++) {
    try {
      for (const task of readdirSync(`/proc/${out[i]}/task`)) {
        const children = readFileSync(`/proc/${out[i]}/task/${task}/children`, 'utf8').trim();
        if (children) out.push(...children.split(/\s+/).map(Number));
      }
    } catch {
      // The process ended meanwhile.
    }
  }
  return out;
}

/** VmRSS (resident now) and VmHWM (the peak) of a process, in bytes, from /proc/<pid>/status. */
export function residentMemory(pid: number): { rss: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (field: string) => {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status);
    if (!m) throw new Error(`no ${field} in /proc/${pid}/status`);
    return Number(m[1]) * 1024;
  };
  return { rss: kib('VmRSS'), peak: kib('VmHWM') };
}

/** Average milliseconds of a 4 KiB write + fdatasync in `dir`: what a durable SQLite commit waits for. */
export function fsyncMs(dir: string, n = 200): number {
  const file = join(dir, 'fsync-probe');
  const fd = openSync(file, 'w');
  const buf = Buffer.alloc(4096, 1);
  const t = performance.now();
  try {
    for (let i = 0; i < n; i++) {
      writeSync(fd, buf, 0, buf.length, (i % 16) * 4096);
      fdatasyncSync(fd);
    }
  } finally {
    closeSync(fd);
    rmSync(file, { force: true });
  }
  return (performance.now() - t) / n;
}

/** The bare node:http server answering every request with `bodyFile`'s bytes and `headers`. */
export function startBaseline(port: number, bodyFile: string, headers: Record<string, string>, cpuProf?: CpuProfile): Promise<Child> {
  const prof = cpuProf ? ['--cpu-prof', '--cpu-prof-dir', cpuProf.dir, '--cpu-prof-name', cpuProf.name] : [];
  return startChild([...prof, BASELINE, String(port), bodyFile, JSON.stringify(headers)], port, '/');
}

/**
 * A config file `<dir>/<name>.json` for an mxkeys of server name `bench.local` on a free port,
 * logging warnings only (or at BENCH_LOG), with `extra` settings on top: its path and port.
 */
export async function benchConfig(dir: string, name: string, settings: { database: Json; secret: string; extra?: Json }): Promise<{ configFile: string; port: number }> {
  const port = await freePort();
  const configFile = join(dir, `${name}.json`);
  const config = {
    server_name: 'bench.local',
    listen: { host: '127.0.0.1', port },
    database: settings.database,
    signing_key_path: join(dir, 'signing.key'),
    registration_shared_secret: settings.secret,
    log_level: process.env['BENCH_LOG'] ?? 'warn',
    ...settings.extra,
  };
  // JSON is YAML.
  writeFileSync(configFile, JSON.stringify(config, null, 2));
  return { configFile, port };
}

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc, to see whether anything else competed for the 2 cores.

export interface CpuSnapshot {
  readonly at: number;
  /** Busy jiffies of the whole machine. */
  readonly busy: number;
  readonly total: number;
  /** Time the hypervisor gave our virtual CPUs to someone else. */
  readonly steal: number;
  /** Interrupt and softirq time (loopback TCP is mostly processed there, outside any process). */
  readonly irq: number;
  /** Jiffies per watched pid (absent: the process was gone). */
  readonly pids: Map<number, number>;
}

function procJiffies(pid: number): number | undefined {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    // Fields after "(comm) ": state=0 … utime=11, stime=12.
    return Number(f[11]) + Number(f[12]);
  } catch {
    return undefined;
  }
}

export function cpuSnapshot(pids: readonly number[]): CpuSnapshot {
  const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!;
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  const idle = (v[3] ?? 0) + (v[4] ?? 0);
  const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
  const map = new Map<number, number>();
  for (const pid of pids) {
    const j = procJiffies(pid);
    if (j !== undefined) map.set(pid, j);
  }
  return { at: Date.now(), busy: total - idle, total, steal: v[7] ?? 0, irq: (v[5] ?? 0) + (v[6] ?? 0), pids: map };
}

export interface CpuShare {
  /** Percent of one core, per role. */
  readonly server: number;
  readonly loadgen: number;
  /** Our PostgreSQL backends (mxkeys' connections) and PostgreSQL's own background processes. */
  readonly postgres: number;
  /** Everything else that ran: other programs, other clients' PostgreSQL backends. */
  readonly other: number;
  /** Stolen by the hypervisor (counted in neither of the above). */
  readonly steal: number;
  /** Interrupts and softirqs, not attributed to any process (mostly loopback networking). */
  readonly irq: number;
  /** Machine busy, percent of all cores. */
  readonly machine: number;
}

export interface CpuRoles {
  /** The server's processes (with --workers: the supervisor and its workers). */
  readonly server: readonly number[];
  readonly loadgen: number;
  readonly postgres: readonly number[];
}

export function cpuShare(a: CpuSnapshot, b: CpuSnapshot, roles: CpuRoles): CpuShare {
  const seconds = (b.at - a.at) / 1000;
  const hz = 100; // USER_HZ on Linux
  const pct = (j: number) => (100 * j) / hz / seconds;
  // A process started meanwhile counts from 0; one that ended is lost (and left in "other").
  const used = (pid: number) => (b.pids.has(pid) ? b.pids.get(pid)! - (a.pids.get(pid) ?? 0) : 0);
  const server = roles.server.reduce((sum, pid) => sum + used(pid), 0);
  const loadgen = used(roles.loadgen);
  const postgres = roles.postgres.reduce((sum, pid) => sum + used(pid), 0);
  const steal = b.steal - a.steal;
  const irq = b.irq - a.irq;
  const busy = b.busy - a.busy - steal - irq;
  return {
    server: pct(server),
    loadgen: pct(loadgen),
    postgres: pct(postgres),
    other: Math.max(0, pct(busy - server - loadgen - postgres)),
    steal: pct(steal),
    irq: pct(irq),
    machine: (100 * (b.busy - a.busy)) / Math.max(1, b.total - a.total),
  };
}

/** Machine-wide busy percent (all cores) over `ms`. */
export async function machineBusy(ms: number): Promise<number> {
  const a = cpuSnapshot([]);
  await new Promise((r) => setTimeout(r, ms));
  const b = cpuSnapshot([]);
  return (100 * (b.busy - a.busy)) / Math.max(1, b.total - a.total);
}

// ---------------------------------------------------------------------------------------------
// HTTP and Matrix accounts

/** Like http(), but anything but 200 is an error naming the request. */
export async function ok<T = Json>(base: string, method: string, path: string, options: RequestOptions = {}): Promise<HttpResult<T>> {
  const r = await http<T>(base, method, path, options);
  if (r.status !== 200) throw new Error(`${method} ${path}: ${r.status} ${r.text.slice(0, 500)}`);
  return r;
}

/** GET `path` from a given local address (another 127.x.y.z: a client of its own for per-address rate limits). */
function getFrom(localAddress: string, base: string, path: string): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = httpGet(new URL(path, base), { localAddress, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
    });
    req.on('error', reject);
  });
}

/**
 * Synapse's shared-secret registration (GET nonce, POST with the HMAC-SHA1 mac). mxkeys hands out
 * 2 nonces a second per client address (20 at once): a harness registering many users gives each
 * batch of them its own `nonceFrom` address on the loopback network (127.0.0.0/8).
 */
export async function registerUser(base: string, secret: string, username: string, nonceFrom?: string): Promise<Session> {
  const password = `pw-${username}`;
  let nonce: string;
  if (nonceFrom) {
    const r = await getFrom(nonceFrom, base, '/_synapse/admin/v1/register');
    if (r.status !== 200) throw new Error(`GET /_synapse/admin/v1/register from ${nonceFrom}: ${r.status} ${r.text.slice(0, 500)}`);
    nonce = (JSON.parse(r.text) as { nonce: string }).nonce;
  } else {
    nonce = (await ok<{ nonce: string }>(base, 'GET', '/_synapse/admin/v1/register')).body.nonce;
  }
  const mac = registrationMac(secret, nonce, username, password, false);
  const r = await ok(base, 'POST', '/_synapse/admin/v1/register', { body: { nonce, username, password, admin: false, mac } });
  return { userId: r.body['user_id'] as string, deviceId: r.body['device_id'] as string, accessToken: r.body['access_token'] as string, password };
}

/** Another device of an existing user. */
export async function login(base: string, session: Session): Promise<Session> {
  const r = await ok(base, 'POST', '/_matrix/client/v3/login', {
    body: { type: 'm.login.password', identifier: { type: 'm.id.user', user: session.userId }, password: session.password },
  });
  return { userId: r.body['user_id'] as string, deviceId: r.body['device_id'] as string, accessToken: r.body['access_token'] as string, password: session.password };
}

// ---------------------------------------------------------------------------------------------
// Key material (node:crypto Ed25519; canonical JSON from the test helpers)

const b64 = (bytes: Uint8Array) => Buffer.from(bytes).toString('base64').replace(/=+$/, '');

export class Ed25519Key {
  private readonly privateKey: KeyObject;
  readonly publicKey: string;

  constructor() {
    const pair = generateKeyPairSync('ed25519');
    this.privateKey = pair.privateKey;
    this.publicKey = b64(Buffer.from(pair.publicKey.export({ format: 'jwk' }).x!, 'base64url'));
  }

  signText(text: string): string {
    return b64(sign(null, Buffer.from(text), this.privateKey));
  }

  sign<T extends Json>(obj: T, entity: string, keyId: string): T {
    return withSignature(obj, entity, keyId, (text) => this.signText(text));
  }
}

/** A logged-in device with its identity keys and a counter for one-time key IDs. */
export class BenchDevice {
  readonly ed25519 = new Ed25519Key();
  readonly curve25519 = b64(randomBytes(32));
  private nextKey = 0;

  constructor(readonly session: Session) {}

  get userId(): string {
    return this.session.userId;
  }

  get deviceId(): string {
    return this.session.deviceId;
  }

  deviceKeys(): Json {
    const { userId, deviceId } = this;
    return this.ed25519.sign(
      {
        user_id: userId,
        device_id: deviceId,
        algorithms: ['m.olm.v1.curve25519-aes-sha2', 'm.megolm.v1.aes-sha2'],
        keys: { [`curve25519:${deviceId}`]: this.curve25519, [`ed25519:${deviceId}`]: this.ed25519.publicKey },
      },
      userId,
      `ed25519:${deviceId}`,
    );
  }

  /**
   * The JSON text of a `one_time_keys` map with `n` fresh signed keys, built as text (a million keys
   * go through here). Key IDs have a fixed width so every claim answer has the same size.
   */
  oneTimeKeysText(n: number): string {
    const parts: string[] = [];
    const sigKey = JSON.stringify(`ed25519:${this.deviceId}`);
    const user = JSON.stringify(this.userId);
    for (let i = 0; i < n; i++) {
      const id = `AAAA${(this.nextKey++).toString(36).padStart(8, '0')}`;
      const key = b64(randomBytes(32));
      const sig = this.ed25519.signText(`{"key":"${key}"}`);
      parts.push(`"signed_curve25519:${id}":{"key":"${key}","signatures":{${user}:{${sigKey}:"${sig}"}}}`);
    }
    return `{${parts.join(',')}}`;
  }

  fallbackKey(): Json {
    return { 'signed_curve25519:FALLBACK0000': this.ed25519.sign({ key: b64(randomBytes(32)), fallback: true }, this.userId, `ed25519:${this.deviceId}`) };
  }
}

/** A user's master and self-signing keys; the self-signing key signs the user's devices. */
export class BenchCrossSigning {
  readonly master = new Ed25519Key();
  readonly selfSigning = new Ed25519Key();

  constructor(readonly userId: string) {}

  upload(): Json {
    const master = { user_id: this.userId, usage: ['master'], keys: { [`ed25519:${this.master.publicKey}`]: this.master.publicKey } };
    const ssk = this.master.sign(
      { user_id: this.userId, usage: ['self_signing'], keys: { [`ed25519:${this.selfSigning.publicKey}`]: this.selfSigning.publicKey } },
      this.userId,
      `ed25519:${this.master.publicKey}`,
    );
    return { master_key: master, self_signing_key: ssk };
  }

  /** The device keys object signed by the self-signing key, for /keys/signatures/upload. */
  signDevice(deviceKeys: Json): Json {
    return this.selfSigning.sign(deviceKeys, this.userId, `ed25519:${this.selfSigning.publicKey}`);
  }
}

/** Runs `fn` over `items` with at most `limit` in flight. */
export async function inParallel<T, R>(items: readonly T[], limit: number, fn: (item: T, index: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    for (;;) {
      const i = next++;
      if (i >= items.length) return;
      out[i] = await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}
