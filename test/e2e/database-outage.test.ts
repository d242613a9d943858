import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect, type Server, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import pg from 'pg';
import pino from 'pino';
import { backends, POSTGRES_URL } from '../support/backends.js';
import { http, startServer } from '../support/server.js';
import { registerUser, SHARED_SECRET, expectMatrixError } from '../support/client.js';
import { eventually } from '../support/federation.js';

const postgres = backends.find((b) => b.name === 'postgres');
const C = '/_matrix/client/v3';

/**
 * A TCP relay in front of the real PostgreSQL, so a test can make the database go away and come
 * back on the same address, as a server restart does, without touching the machine's PostgreSQL.
 */
class Relay {
  private server: Server | undefined;
  private readonly sockets = new Set<Socket>();
  port = 0;

  constructor(private readonly target: { host: string; port: number }) {}

  async open(): Promise<void> {
    this.server = createServer((client) => {
      const upstream = connect(this.target.port, this.target.host);
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on('close', () => this.sockets.delete(s));
        s.on('error', () => undefined);
      }
      client.pipe(upstream).pipe(client);
    });
    await new Promise<void>((resolve) => this.server!.listen(this.port, '127.0.0.1', resolve));
    this.port = (this.server.address() as AddressInfo).port;
  }

  /** Drops every connection and refuses new ones. */
  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server!.close(() => resolve()));
  }
}

function logLines(): { lines: Record<string, unknown>[]; logger: pino.Logger } {
  const lines: Record<string, unknown>[] = [];
  return { lines, logger: pino({ level: 'info' }, { write: (line: string) => lines.push(JSON.parse(line) as Record<string, unknown>) }) };
}

describe('a lost PostgreSQL connection', { skip: postgres ? false : 'PostgreSQL tests are off (set MXKEYS_TEST_POSTGRES)' }, () => {
  test('is answered 503 M_UNKNOWN with Retry-After, logged once as a warning, and the server recovers by itself', async () => {
    const database = await postgres!.freshDatabase();
    const url = new URL(database.postgres!);
    const relay = new Relay({ host: url.hostname, port: Number(url.port || 5432) });
    await relay.open();
    url.host = `127.0.0.1:${relay.port}`;
    const { lines, logger } = logLines();
    const s = await startServer({ backend: postgres!, database: { ...database, postgres: url.toString() }, config: { registration_shared_secret: SHARED_SECRET }, logger });
    const alice = await registerUser(s, 'alice');
    assert.equal((await http(s.url, 'GET', `${C}/account/whoami`, { token: alice.accessToken })).status, 200);

    await relay.close();
    // Until then, what the server read just before may still be answered from its read caches.
    await postgres!.settle();
    for (const [method, path, body] of [
      ['GET', `${C}/account/whoami`, undefined],
      ['POST', `${C}/keys/query`, { device_keys: { [alice.userId]: [] } }],
      ['POST', `${C}/keys/upload`, { one_time_keys: {} }],
    ] as const) {
      const r = await http(s.url, method, path, { token: alice.accessToken, ...(body ? { body } : {}) });
      expectMatrixError(r, 503, 'M_UNKNOWN', /database/);
      assert.ok(Number(r.headers.get('retry-after')) >= 1, `${path}: Retry-After ${r.headers.get('retry-after')}`);
    }

    // (A new server signing key is announced at warn level too; it is not about the database.)
    const warnings = lines.filter((l) => l['level'] === 40 && !String(l['msg']).startsWith('created a new server signing key'));
    assert.equal(warnings.length, 1, JSON.stringify(warnings));
    assert.match(String(warnings[0]!['msg']), /lost the database connection/);
    assert.ok(!lines.some((l) => (l['level'] as number) >= 50), 'no request was logged as an unexpected error');

    await relay.open();
    assert.equal((await http(s.url, 'GET', `${C}/account/whoami`, { token: alice.accessToken })).status, 200);
    assert.ok(lines.some((l) => /database answers again/.test(String(l['msg']))), 'the recovery is logged');
    await s.close();
    await relay.close();
  });

  test('backends ended by pg_terminate_backend cost at most a 503 for the requests that were using them, never a 500', async () => {
    const database = await postgres!.freshDatabase();
    const url = new URL(database.postgres!);
    const name = `mxkeys_outage_${process.pid}_${Date.now()}`;
    url.searchParams.set('application_name', name);
    const s = await startServer({ backend: postgres!, database: { ...database, postgres: url.toString() }, config: { registration_shared_secret: SHARED_SECRET } });
    const bob = await registerUser(s, 'bob');
    const admin = new pg.Client({ connectionString: POSTGRES_URL });
    await admin.connect();
    try {
      const statuses: number[] = [];
      for (let round = 0; round < 3; round++) {
        // Claims: never answered from a cache, so every one of them uses a connection.
        const inFlight = Array.from({ length: 10 }, () =>
          http(s.url, 'POST', `${C}/keys/claim`, { token: bob.accessToken, body: { one_time_keys: { [bob.userId]: { [bob.deviceId]: 'signed_curve25519' } } } }),
        );
        // The last round ended every connection: the server may not have opened a new one yet.
        await eventually('a connection of the server to end', async () => {
          const ended = await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1', [name]);
          return ended.rowCount! > 0 ? true : undefined;
        }, 5_000);
        for (const r of await Promise.all(inFlight)) {
          statuses.push(r.status);
          if (r.status !== 200) expectMatrixError(r, 503, 'M_UNKNOWN');
        }
      }
      assert.ok(statuses.every((st) => st === 200 || st === 503), statuses.join(' '));
      assert.equal((await http(s.url, 'GET', `${C}/account/whoami`, { token: bob.accessToken })).status, 200, 'the next request is served');
    } finally {
      await admin.end();
    }
  });
});
