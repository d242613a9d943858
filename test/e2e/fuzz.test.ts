import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';
import { login, registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { TestCrossSigning, TestDevice } from '../support/keys.js';
import { listRoutes } from '../../src/http/app.js';
import { Agent, request } from 'node:http';

// Every route the app serves, enumerated from the app itself, gets generated bodies, path
// parameters and query strings: wrong types, huge and deeply nested values, invalid UTF-8,
// duplicate keys, `__proto__` and friends, and near-valid bodies with one part broken. Each answer
// must be a 2xx, or a 4xx with an errcode; never a 5xx. A fixed seed makes every run the same;
// MXKEYS_TEST_FUZZ_SEED and MXKEYS_TEST_FUZZ_CASES explore further by hand (a failure prints the
// case to replay), MXKEYS_TEST_FUZZ_STATS=1 prints what each route answered.

const SEED = Number(process.env['MXKEYS_TEST_FUZZ_SEED'] ?? 0x6d786b);
const CASES_PER_ROUTE = Number(process.env['MXKEYS_TEST_FUZZ_CASES'] ?? 16);

type Json = Record<string, unknown>;

/** mulberry32: a small seeded PRNG, so a failure can be replayed. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Field names of the APIs under test: random objects use them so the checks behind them are reached. */
const FIELDS = [
  'device_keys', 'one_time_keys', 'fallback_keys', 'master_key', 'self_signing_key', 'user_signing_key', 'auth', 'identifier',
  'user', 'password', 'type', 'session', 'device_id', 'initial_device_display_name', 'display_name', 'devices', 'timeout',
  'server_keys', 'minimum_valid_until_ts', 'nonce', 'username', 'mac', 'admin', 'user_type', 'inhibit_login', 'keys',
  'signatures', 'usage', 'user_id', 'algorithms', 'unsigned', 'key', 'fallback', 'from', 'to', 'medium', 'address',
];
const NASTY_KEYS = ['__proto__', 'constructor', 'prototype', 'toString', 'hasOwnProperty', '', ' ', '\u0000', 'ed25519:', 'signed_curve25519:AAAA', '@alice:test.local'];
const NASTY_STRINGS = [
  '', ' ', '\u0000', 'a\u0000b', '\ud800', '\udfff', '\u{1F600}', '\u202e', '\ufeff', '%00', '%ff', '../..', 'null', 'true', '0',
  '@alice:test.local', '@:', '@a:b:c', '@alice:other.example', 'ed25519:AAAA', 'curve25519:X', 'signed_curve25519:AAAAAQ',
  'm.login.password', 'm.login.dummy', 'm.id.user', 'x'.repeat(256), 'x'.repeat(5000),
];
const NUMBERS = [0, -0, 1, -1, 42, 2 ** 31, 2 ** 53 - 1, 2 ** 53 + 2, -(2 ** 63), 0.5, 1e308, -1e-308, 12345678901234567890];

class Gen {
  readonly next: () => number;

  constructor(seed: number) {
    this.next = prng(seed);
  }

  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }

  chance(p: number): boolean {
    return this.next() < p;
  }

  string(): string {
    if (this.chance(0.6)) return this.pick(NASTY_STRINGS);
    let s = '';
    const n = this.int(20);
    for (let i = 0; i < n; i++) s += String.fromCharCode(this.chance(0.8) ? 32 + this.int(95) : this.int(0xffff));
    return s;
  }

  key(): string {
    const r = this.next();
    return r < 0.6 ? this.pick(FIELDS) : r < 0.85 ? this.pick(NASTY_KEYS) : this.string();
  }

  value(depth: number): unknown {
    const r = this.int(depth > 0 ? 9 : 6);
    switch (r) {
      case 0:
        return null;
      case 1:
        return this.chance(0.5);
      case 2:
        return this.pick(NUMBERS);
      case 3:
      case 4:
        return this.string();
      case 5:
        return this.chance(0.01) ? 'y'.repeat(200_000) : this.string();
      case 6:
        return Array.from({ length: this.int(4) }, () => this.value(depth - 1));
      default:
        return this.object(depth - 1);
    }
  }

  object(depth: number): Json {
    const o: Json = {};
    const n = this.int(5);
    for (let i = 0; i < n; i++) Object.defineProperty(o, this.key(), { value: this.value(depth), enumerable: true, configurable: true, writable: true });
    return o;
  }

  /** `template` with one part replaced, removed or given a hostile sibling. */
  mutate(template: unknown): unknown {
    const copy = JSON.parse(JSON.stringify(template)) as unknown;
    if (typeof copy !== 'object' || copy === null) return this.value(2);
    const paths: (string | number)[][] = [];
    const walk = (v: unknown, path: (string | number)[]) => {
      paths.push(path);
      if (Array.isArray(v)) v.forEach((x, i) => walk(x, [...path, i]));
      else if (typeof v === 'object' && v !== null) for (const [k, x] of Object.entries(v)) walk(x, [...path, k]);
    };
    walk(copy, []);
    const path = this.pick(paths.slice(1).length > 0 ? paths.slice(1) : paths);
    if (path.length === 0) return this.value(2);
    let parent = copy as Record<string | number, unknown>;
    for (const p of path.slice(0, -1)) parent = parent[p] as Record<string | number, unknown>;
    const last = path[path.length - 1]!;
    const action = this.int(4);
    if (action === 0) delete parent[last];
    else if (action === 1) parent[last] = this.value(2);
    else if (action === 2) parent[last] = this.wrongType(parent[last]);
    else Object.defineProperty(parent, this.pick(NASTY_KEYS), { value: this.value(2), enumerable: true, configurable: true, writable: true });
    return copy;
  }

  /** A value of another JSON type than `v` (a number for a string, a string for an object, …). */
  wrongType(v: unknown): unknown {
    const kind = v === null ? 'null' : Array.isArray(v) ? 'array' : typeof v;
    const others: (() => unknown)[] = [
      ...(kind !== 'string' ? [() => this.string()] : []),
      ...(kind !== 'number' ? [() => this.pick(NUMBERS)] : []),
      ...(kind !== 'boolean' ? [() => this.chance(0.5)] : []),
      ...(kind !== 'null' ? [() => null] : []),
      ...(kind !== 'array' ? [() => [this.value(1)]] : []),
      ...(kind !== 'object' ? [() => this.object(1)] : []),
    ];
    return this.pick(others)();
  }

  /** A body as raw bytes that JSON.stringify cannot make. */
  raw(): string | Buffer {
    switch (this.int(10)) {
      case 0:
        return Buffer.from([0x7b, 0x22, 0x61, 0x22, 0x3a, 0x22, 0xff, 0xfe, 0x22, 0x7d]); // {"a":"\xff\xfe"}
      case 1:
        return Buffer.from([0xef, 0xbb, 0xbf, 0x7b, 0x7d]); // BOM + {}
      case 2:
        return `{"${this.pick(FIELDS)}":{},"${this.pick(FIELDS)}":[],"device_keys":1,"device_keys":{}}`;
      case 3:
        return `${'['.repeat(70)}${']'.repeat(70)}`;
      case 4:
        return `${'{"a":'.repeat(70)}1${'}'.repeat(70)}`;
      case 5:
        return '{"__proto__":{"admin":true,"polluted":1},"constructor":{"prototype":{"polluted":1}}}';
      case 6:
        return `{"timeout":1e400,"one_time_keys":{"signed_curve25519:A":{"key":"x","n":-1e400}}}`;
      case 7:
        return `{"device_keys":{"@alice:test.local":["${'\\ud800'.repeat(10)}"]}}`;
      case 8:
        return `{"password":"${'z'.repeat(2 * 1024 * 1024)}"}`;
      default:
        return '{} trailing';
    }
  }
}

/** One request with node:http (fetch refuses GET bodies, which clients can send all the same). */
function send(agent: Agent, base: string, method: string, path: string, headers: Record<string, string>, body: string | Buffer | undefined): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = request(base + path, { method, headers: { ...headers, ...(body !== undefined ? { 'content-length': String(Buffer.byteLength(body)) } : {}) }, agent }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (d: Buffer) => chunks.push(d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

interface Context {
  readonly server: TestServer;
  readonly remote: FakeHomeserver;
  readonly session: Session;
  readonly templates: Readonly<Record<string, unknown>>;
}

function templatesFor(session: Session, serverName: string): Record<string, unknown> {
  const device = new TestDevice(session.userId, session.deviceId);
  const cross = new TestCrossSigning(session.userId);
  const C = '/_matrix/client/v3';
  return {
    [`POST ${C}/login`]: { type: 'm.login.password', identifier: { type: 'm.id.user', user: 'alice' }, password: 'pw-alice', device_id: 'FUZZ' },
    [`POST ${C}/register`]: { username: 'fuzzer', password: 'pw', auth: { type: 'm.login.dummy' }, inhibit_login: true },
    [`POST /_synapse/admin/v1/register`]: { nonce: 'n', username: 'u', password: 'p', mac: '00', admin: false },
    [`POST ${C}/keys/upload`]: { device_keys: device.deviceKeys(), one_time_keys: device.oneTimeKeys(2), fallback_keys: { 'signed_curve25519:F': device.fallbackKey() } },
    [`POST ${C}/keys/query`]: { device_keys: { [session.userId]: [session.deviceId] }, timeout: 10 },
    [`POST ${C}/keys/claim`]: { one_time_keys: { [session.userId]: { [session.deviceId]: 'signed_curve25519' } } },
    [`POST /_matrix/federation/v1/user/keys/query`]: { device_keys: { [session.userId]: [] } },
    [`POST /_matrix/federation/v1/user/keys/claim`]: { one_time_keys: { [session.userId]: { [session.deviceId]: 'signed_curve25519' } } },
    [`POST ${C}/keys/device_signing/upload`]: { ...cross.upload(), auth: { type: 'm.login.password', identifier: { type: 'm.id.user', user: session.userId }, password: session.password } },
    [`POST ${C}/keys/signatures/upload`]: { [session.userId]: { [session.deviceId]: device.deviceKeys() } },
    [`PUT ${C}/devices/:deviceId`]: { display_name: 'phone' },
    [`DELETE ${C}/devices/:deviceId`]: { auth: { type: 'm.login.password', identifier: { type: 'm.id.user', user: session.userId }, password: 'wrong', session: 'abc' } },
    [`POST ${C}/delete_devices`]: { devices: [session.deviceId], auth: { type: 'm.login.password', password: 'wrong' } },
    [`POST /_matrix/key/v2/query`]: { server_keys: { [serverName]: { 'ed25519:x': { minimum_valid_until_ts: 1 } } } },
  };
}

/** An Authorization header that is broken in some way (printable ASCII only: anything else cannot be sent). */
function hostileAuthorization(g: Gen, origin: string): string {
  const ascii = g.string().replace(/[^\x20-\x7e]/g, '');
  return g.pick([
    `Bearer ${ascii}`,
    'Bearer',
    `Bearer ${'a'.repeat(5000)}`,
    ascii,
    `X-Matrix ${ascii}`,
    `X-Matrix origin="${origin}",key="ed25519:fake1",sig="${ascii}"`,
    `X-Matrix origin="${ascii}",destination="test.local",key="ed25519:${ascii}",sig="AAAA"`,
    'X-Matrix origin="a,key=b',
    `X-Matrix origin=${origin},origin=other.example,key="ed25519:fake1",sig="x",`,
  ]);
}

/** Every path into `v` (as keys), down to `depth` levels. */
function pathsOf(v: unknown, depth: number, path: (string | number)[] = []): (string | number)[][] {
  if (depth === 0 || typeof v !== 'object' || v === null) return [];
  const entries: [string | number, unknown][] = Array.isArray(v) ? v.map((x, i) => [i, x]) : Object.entries(v);
  return entries.flatMap(([k, x]) => [[...path, k], ...pathsOf(x, depth - 1, [...path, k])]);
}

/**
 * `template` with one field at a time (down to three levels) missing, or holding each JSON type it
 * should not: the systematic part of the fuzzing, so that every check of a known field is tried.
 */
function typeConfusions(template: unknown): unknown[] {
  const out: unknown[] = [];
  const values = [null, true, 7, 'text', [], {}];
  for (const path of pathsOf(template, 3)) {
    const at = (copy: unknown) => {
      let parent = copy as Record<string | number, unknown>;
      for (const p of path.slice(0, -1)) parent = parent[p] as Record<string | number, unknown>;
      return { parent, last: path[path.length - 1]! };
    };
    const removed = JSON.parse(JSON.stringify(template)) as unknown;
    const r = at(removed);
    delete r.parent[r.last];
    out.push(removed);
    const original = at(template).parent[at(template).last];
    const kind = (x: unknown) => (x === null ? 'null' : Array.isArray(x) ? 'array' : typeof x);
    for (const value of values) {
      if (kind(value) === kind(original) && JSON.stringify(value) === JSON.stringify(original)) continue;
      const copy = JSON.parse(JSON.stringify(template)) as unknown;
      const c = at(copy);
      c.parent[c.last] = value;
      out.push(copy);
    }
  }
  return out;
}

/** Query strings the route reads, fuzzed. */
function queryFor(url: string, g: Gen): string {
  const q = (params: Record<string, string>) => `?${new URLSearchParams(params).toString()}`;
  if (url.endsWith('/keys/changes')) return g.chance(0.3) ? '' : q({ from: g.string(), ...(g.chance(0.5) ? { to: g.string() } : {}) });
  if (url.endsWith('/sync')) return q({ timeout: '0', ...(g.chance(0.7) ? { since: g.string() } : {}) }); // never a long poll here
  if (url.endsWith('/register/available')) return g.chance(0.2) ? '' : q({ username: g.string() });
  if (url.endsWith('/register')) return g.chance(0.5) ? '' : q({ kind: g.pick(['user', 'guest', g.string()]) });
  if (url.includes('/key/v2/query/')) return g.chance(0.5) ? '' : q({ minimum_valid_until_ts: g.pick([g.string(), '99999999999999999', '1']) });
  return g.chance(0.1) ? `?${g.pick(['%zz', 'a=%ff', 'x&&&', '=='])}` : '';
}

/** Percent-encoding that also takes lone surrogates (as the bytes of their CESU-8 form, which is not UTF-8). */
function encode(s: string): string {
  try {
    return encodeURIComponent(s);
  } catch {
    return '%ED%A0%80';
  }
}

/** The path with its parameters: valid ones without `g`, else usually valid ones and sometimes hostile. */
function pathFor(url: string, ctx: Context, g?: Gen): string {
  const valid: Record<string, string> = { userId: ctx.session.userId, deviceId: ctx.session.deviceId, serverName: ctx.server.config.server_name, keyId: 'ed25519:x' };
  return url.replace(/:(\w+)/g, (_, name: string) => {
    if (!g || g.chance(0.6)) return encode(valid[name] ?? 'x');
    return g.pick([encode(g.string()), '%FF', '%00', '%E0%A4%A', '..', 'x'.repeat(1500), encode(ctx.remote.serverName)]);
  });
}

describeEachBackend('fuzzing every route', (backend) => {
  test('generated bodies, parameters and query strings on every route get a 2xx or a 4xx with an errcode, never a 5xx', async () => {
    const remote = await FakeHomeserver.start();
    const server = await startServer({
      backend,
      config: {
        registration_shared_secret: SHARED_SECRET,
        enable_registration: true,
        federation: { resolve: { [remote.serverName]: remote.url }, rate_limit: { per_second: 10_000, burst_count: 100_000 } },
        rc_login: { failed_attempts: { per_second: 1000, burst_count: 100_000 } },
      },
    });
    await registerUser(server, 'alice', 'pw-alice');
    const routes = listRoutes(server.mx.app).filter((r) => r.method !== 'HEAD');
    assert.ok(routes.length >= 30, `found ${routes.length} routes`);
    const g = new Gen(SEED);
    const failures: string[] = [];
    let requests = 0;
    const stats = new Map<string, number>();
    const agent = new Agent({ keepAlive: true, maxSockets: 4 });

    for (const route of routes) {
      // A session of its own per route: logout routes end theirs.
      const session = await login(server, 'alice', 'pw-alice');
      const ctx: Context = { server, remote, session, templates: templatesFor(session, remote.serverName) };
      const template = ctx.templates[`${route.method} ${route.url}`];
      const federation = route.url.startsWith('/_matrix/federation/v1/user/');
      const systematic = template === undefined ? [] : typeConfusions(template);
      for (let i = 0; i < systematic.length + CASES_PER_ROUTE; i++) {
        const path = i < systematic.length ? pathFor(route.url, ctx) : pathFor(route.url, ctx, g) + queryFor(route.url, g);
        const kind = g.int(10);
        let body: unknown;
        let raw: string | Buffer | undefined;
        if (i < systematic.length) body = systematic[i];
        else if (kind < 3) body = g.object(4);
        else if (kind < 4) body = g.value(3);
        else if (kind < 5) raw = g.raw();
        else body = template !== undefined ? g.mutate(kind < 8 ? template : g.mutate(template)) : g.object(3);
        const withAuth = i < systematic.length || g.chance(0.75);

        const payload = raw ?? (body === undefined ? undefined : JSON.stringify(body));
        const headers: Record<string, string> = payload !== undefined ? { 'content-type': 'application/json' } : {};
        if (g.chance(0.1)) headers['authorization'] = hostileAuthorization(g, remote.serverName);
        else if (withAuth && federation) headers['authorization'] = remote.authorization(route.method, path, server.config.server_name, raw === undefined ? { body } : {});
        else if (withAuth) headers['authorization'] = `Bearer ${session.accessToken}`;
        const { status, text } = await send(agent, server.url, route.method, path, headers, payload);
        let parsed: Json | undefined;
        try {
          parsed = JSON.parse(text) as Json;
        } catch {
          parsed = undefined;
        }
        requests++;
        // The one 4xx without an errcode: user-interactive auth's first 401, which is the flows.
        const uia = status === 401 && Array.isArray(parsed?.['flows']);
        const ok = status < 500 && (status < 400 || typeof parsed?.['errcode'] === 'string' || uia);
        const outcome = `${route.method} ${route.url} ${status} ${String(parsed?.['errcode'] ?? '')}`;
        stats.set(outcome, (stats.get(outcome) ?? 0) + 1);
        if (!ok) {
          const shown = raw !== undefined ? String(raw).slice(0, 200) : JSON.stringify(body)?.slice(0, 200);
          failures.push(`${route.method} ${path.slice(0, 120)} (case ${i}) ${shown} → ${status} ${text.slice(0, 300)}`);
        }
      }
    }
    agent.destroy();
    if (process.env['MXKEYS_TEST_FUZZ_STATS']) console.log(`${requests} requests\n${[...stats].sort().map(([k, n]) => `${n}\t${k}`).join('\n')}`);
    assert.deepEqual(failures, [], `${failures.length} of ${requests} requests failed`);
    const alive = await http(server.url, 'GET', '/_matrix/client/versions');
    assert.equal(alive.status, 200, 'the server is still up');
  });
});
