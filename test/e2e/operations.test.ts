/**
 * What an operator meets running mxkeys: /health, the logs (X-Forwarded-For warning, access log,
 * failed logins), shutdown with open /sync long-polls, and the server name a database belongs to.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect, type Socket, type Server } from 'node:net';
import pino from 'pino';
import { describeEachBackend, POSTGRES_URL, backends } from '../support/backends.js';
import { createTestMxkeys, http, startServer, type TestServer } from '../support/server.js';
import { registerUser, SHARED_SECRET } from '../support/client.js';
import { openStore, ServerNameMismatchError } from '../../src/storage/index.js';
import type { DatabaseConfig } from '../../src/storage/index.js';

const C = '/_matrix/client/v3';
type LogLine = { level: number; msg: string } & Record<string, unknown>;

/** A logger that keeps every line, for tests that read the log as an operator would. */
function capturingLogger(): { logger: pino.Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const logger = pino({ level: 'info' }, { write: (line: string) => void lines.push(JSON.parse(line) as LogLine) });
  return { logger, lines };
}

/** A TCP relay in front of PostgreSQL that can be cut, as a network failure or a stopped database would. */
async function relayTo(port: number): Promise<{ port: number; cut(): void }> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((client) => {
    const upstream = connect(port, '127.0.0.1');
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => s.destroy());
      s.on('close', () => sockets.delete(s));
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as { port: number }).port,
    cut() {
      server.close();
      for (const s of sockets) s.destroy();
    },
  };
}

describeEachBackend('GET /health', (backend) => {
  test('answers 200 "OK" in plain text while the database answers', async () => {
    const server = await startServer({ backend });
    const r = await http(server.url, 'GET', '/health');
    assert.equal(r.status, 200);
    assert.equal(r.text, 'OK');
    assert.match(r.headers.get('content-type') ?? '', /^text\/plain/);
  });
});

test('GET /health answers 503 once the database has gone away (SQLite closed)', async () => {
  const { logger, lines } = capturingLogger();
  const mx = await createTestMxkeys({ backend: backends[0]!, logger });
  const url = await mx.listen();
  try {
    assert.equal((await http(url, 'GET', '/health')).status, 200);
    await mx.store.close();
    const r = await http(url, 'GET', '/health');
    assert.equal(r.status, 503, r.text);
    assert.equal(r.body['errcode'], 'M_UNKNOWN');
    assert.ok(lines.some((l) => l.level === 40 && /health: the database does not answer/.test(l.msg)), 'the reason is in the log');
  } finally {
    await mx.close();
  }
});

test('GET /health answers 503 when PostgreSQL stops answering', { skip: !POSTGRES_URL && 'MXKEYS_TEST_POSTGRES is not set' }, async () => {
  const database = await backends.find((b) => b.name === 'postgres')!.freshDatabase();
  const url = new URL(database.postgres!);
  const relay = await relayTo(Number(url.port || 5432));
  url.hostname = '127.0.0.1';
  url.port = String(relay.port);
  const server = await startServer({ backend: backends[0]!, database: { postgres: url.toString(), pool_size: 2 } });
  assert.equal((await http(server.url, 'GET', '/health')).status, 200);
  relay.cut();
  const r = await http(server.url, 'GET', '/health');
  assert.equal(r.status, 503, r.text);
  await server.close().catch(() => undefined);
});

describe('the log', () => {
  const backend = backends[0]!;

  test('a request with X-Forwarded-For while listen.x_forwarded is off is warned about once, naming the setting', async () => {
    const { logger, lines } = capturingLogger();
    const mx = await createTestMxkeys({ backend, logger });
    const url = await mx.listen();
    try {
      await http(url, 'GET', '/health');
      assert.equal(lines.filter((l) => /X-Forwarded-For/.test(l.msg)).length, 0, 'no warning without the header');
      for (let i = 0; i < 3; i++) await http(url, 'GET', '/health', { headers: { 'x-forwarded-for': `203.0.113.${i}` } });
      const warnings = lines.filter((l) => /X-Forwarded-For/.test(l.msg));
      assert.equal(warnings.length, 1, 'warned once');
      assert.equal(warnings[0]!.level, 40);
      assert.match(warnings[0]!.msg, /listen\.x_forwarded/);
    } finally {
      await mx.close();
    }
  });

  test('with listen.x_forwarded on there is no warning, and failed logins are logged at info with the forwarded address', async () => {
    const { logger, lines } = capturingLogger();
    const mx = await createTestMxkeys({ backend, logger, config: { listen: { host: '127.0.0.1', port: 0, x_forwarded: true }, registration_shared_secret: SHARED_SECRET } });
    const url = await mx.listen();
    try {
      await registerUser({ url } as TestServer, 'alice');
      const r = await http(url, 'POST', `${C}/login`, {
        headers: { 'x-forwarded-for': '203.0.113.7' },
        body: { type: 'm.login.password', identifier: { type: 'm.id.user', user: 'alice' }, password: 'wrong' },
      });
      assert.equal(r.status, 403);
      await http(url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'nobody-here', password: 'x' } });
      assert.equal(lines.filter((l) => /X-Forwarded-For/.test(l.msg)).length, 0);
      const failed = lines.filter((l) => l.msg === 'failed login');
      assert.equal(failed.length, 2, JSON.stringify(lines));
      assert.deepEqual({ level: failed[0]!.level, user: failed[0]!['user'], address: failed[0]!['address'] }, { level: 30, user: '@alice:test.local', address: '203.0.113.7' });
      assert.equal(failed[1]!['user'], '@nobody-here:test.local');
    } finally {
      await mx.close();
    }
  });

  test('log_requests writes one line per request, with the access token in the URL redacted', async () => {
    const { logger, lines } = capturingLogger();
    const mx = await createTestMxkeys({ backend, logger, config: { log_requests: true, allow_access_token_in_query: true, registration_shared_secret: SHARED_SECRET } });
    const url = await mx.listen();
    try {
      const alice = await registerUser({ url } as TestServer, 'alice');
      await http(url, 'GET', `${C}/account/whoami?access_token=${alice.accessToken}`);
      // Percent-encoded names are still the token parameter.
      for (const name of ['access%5Ftoken', '%61ccess_token', 'access_t%6Fken']) {
        const r = await http(url, 'GET', `${C}/account/whoami?from=1&${name}=${alice.accessToken}`);
        assert.equal(r.status, 200, `${name} is taken as the access token`);
      }
      await http(url, 'POST', `${C}/keys/query`, { token: alice.accessToken, body: { device_keys: {} } });
      await new Promise((r) => setTimeout(r, 50)); // the line is written when the connection reports the response done
      const requests = lines.filter((l) => l.msg === 'request');
      const whoami = requests.find((l) => String(l['url']).startsWith(`${C}/account/whoami`));
      assert.ok(whoami, JSON.stringify(requests));
      assert.equal(whoami['url'], `${C}/account/whoami?access_token=<redacted>`);
      assert.equal(whoami['status'], 200);
      assert.equal(whoami['method'], 'GET');
      assert.equal(whoami['address'], '127.0.0.1');
      assert.ok(requests.some((l) => l['url'] === `${C}/keys/query` && l['status'] === 200), 'the direct key routes are logged too');
      assert.ok(requests.some((l) => l['url'] === `${C}/account/whoami?from=1&access%5Ftoken=<redacted>`), JSON.stringify(requests));
      assert.ok(!JSON.stringify(lines).includes(alice.accessToken), 'the token appears nowhere in the log');
    } finally {
      await mx.close();
    }
  });

  test('without log_requests there is no per-request line', async () => {
    const { logger, lines } = capturingLogger();
    const mx = await createTestMxkeys({ backend, logger });
    const url = await mx.listen();
    try {
      await http(url, 'GET', '/health');
      assert.equal(lines.filter((l) => l.msg === 'request').length, 0);
    } finally {
      await mx.close();
    }
  });
});

describeEachBackend('shutting down with open /sync long-polls', (backend) => {
  // The long-poll asks for 25 s (the server caps waits at 30 s); the test's 15 s limit is far
  // above a prompt answer and far below a waited-out one.
  test('they are answered at once with no news, then the server drains and closes', { timeout: 15_000 }, async () => {
    const { logger, lines } = capturingLogger();
    const mx = await createTestMxkeys({ backend, logger, config: { registration_shared_secret: SHARED_SECRET } });
    const url = await mx.listen();
    const alice = await registerUser({ url } as TestServer, 'alice');
    const since = (await http(url, 'GET', `${C}/sync`, { token: alice.accessToken })).body['next_batch'] as string;
    const poll = http(url, 'GET', `${C}/sync?since=${since}&timeout=25000`, { token: alice.accessToken });
    await new Promise((r) => setTimeout(r, 300)); // the poll is waiting on the server
    const closed = mx.close();
    const r = await poll;
    await closed;
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.body['device_lists'], { changed: [], left: [] });
    assert.equal(r.body['next_batch'], since, 'nothing was skipped: the client resumes where it was');
    assert.ok(lines.some((l) => /ending open \/sync long-polls/.test(l.msg) && l['count'] === 1), 'the shutdown says what it cut short');
  });
});

describeEachBackend('the server name a database belongs to', (backend) => {
  test('is recorded on first start; another name is refused with a message that says how to fix it', async () => {
    const database = { ...(await backend.freshDatabase()) };
    const first = await startServer({ backend, database, config: { server_name: 'one.example', registration_shared_secret: SHARED_SECRET } });
    await registerUser(first, 'dave');
    await first.close();

    await assert.rejects(createTestMxkeys({ backend, database, config: { server_name: 'two.example' } }), (e: Error) => {
      assert.ok(e instanceof ServerNameMismatchError, String(e));
      assert.match(e.message, /config key "server_name" is "two\.example", but this database belongs to "one\.example"/);
      assert.match(e.message, /Set server_name back to "one\.example", or give "two\.example" a new, empty database/);
      return true;
    });
    // The same name starts fine.
    const again = await startServer({ backend, database, config: { server_name: 'one.example' } });
    await again.close();
  });

  test('a database from before the name was recorded is judged by its users', async () => {
    const database: DatabaseConfig = await backend.freshDatabase();
    const first = await startServer({ backend, database: { ...database }, config: { server_name: 'one.example', registration_shared_secret: SHARED_SECRET } });
    await registerUser(first, 'dave');
    await first.close();
    // As an older mxkeys left it: users, but no recorded name.
    const store = await openStore(database);
    const db = (store as unknown as { db: { run(sql: string): Promise<number> } }).db;
    await db.run('DELETE FROM mxkeys_server');
    await store.close();

    await assert.rejects(createTestMxkeys({ backend, database: { ...database }, config: { server_name: 'two.example' } }), /belongs to "one\.example" \(its users are named like @dave:one\.example\)/);
  });
});
