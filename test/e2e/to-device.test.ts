/**
 * To-device messaging over HTTP (send_to_device.md): PUT /sendToDevice, delivery in /sync with
 * acknowledgement by the next `since`, txnId idempotency, `*` fan-out, limits, and the
 * m.direct_to_device EDU both ways with a fake remote server.
 */
import { afterEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend, type Backend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { expectMatrixError, login, registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';
import { eventually, QUICK_FEDERATION } from '../support/federation.js';
import { definitionValidator } from '../support/spec-schema.js';
import pg from 'pg';
import pino from 'pino';

const C = '/_matrix/client/v3';
const F = '/_matrix/federation/v1';
type Json = Record<string, unknown>;

let txnCounter = 0;

async function send(server: TestServer, from: Session, type: string, messages: Json, txnId = `t${++txnCounter}`): Promise<{ status: number; body: Json; text: string }> {
  return http(server.url, 'PUT', `${C}/sendToDevice/${encodeURIComponent(type)}/${encodeURIComponent(txnId)}`, { token: from.accessToken, body: { messages } });
}

async function sendOk(server: TestServer, from: Session, type: string, messages: Json, txnId?: string): Promise<void> {
  const r = await send(server, from, type, messages, txnId);
  assert.equal(r.status, 200, r.text);
  assert.deepEqual(r.body, {});
}

interface SyncAnswer {
  readonly token: string;
  readonly events: Json[];
  readonly body: Json;
}

async function sync(server: TestServer, who: Session, since?: string, timeout = 0): Promise<SyncAnswer> {
  const query = since === undefined ? '' : `?since=${encodeURIComponent(since)}&timeout=${timeout}`;
  const r = await http(server.url, 'GET', `${C}/sync${query}`, { token: who.accessToken });
  assert.equal(r.status, 200, r.text);
  return { token: r.body['next_batch'] as string, events: ((r.body['to_device'] as Json | undefined)?.['events'] as Json[] | undefined) ?? [], body: r.body };
}

const contents = (events: Json[]) => events.map((e) => e['content']);
const directToDeviceSchema = definitionValidator('server-server/definitions/event-schemas/m.direct_to_device.yaml');

const started: TestServer[] = [];
// Each server holds its database connections until closed: closed after each test, not at the end.
afterEach(async () => {
  for (const s of started.splice(0)) await s.close();
});

async function start(backend: Backend, config: Json = {}, logger?: pino.Logger): Promise<TestServer> {
  const s = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET, ...config }, ...(logger ? { logger } : {}) });
  started.push(s);
  return s;
}

/** A logger that keeps what it is given (info and above), one parsed line each. */
function keptLog(): { logger: pino.Logger; lines: Json[] } {
  const lines: Json[] = [];
  return { logger: pino({ level: 'info' }, { write: (line: string) => void lines.push(JSON.parse(line) as Json) }), lines };
}

const metricsOf = async (s: TestServer) => (await fetch(s.mx.metricsUrl()!)).text();
/** A content of about `bytes` bytes of JSON. */
const padded = (n: number, bytes: number) => ({ n, pad: 'x'.repeat(bytes) });

describeEachBackend('to-device messages between users of one server', (backend) => {
  test("a message reaches the recipient's /sync with sender and type, in order, and stays until the next /sync acknowledges it", async () => {
    const s = await start(backend);
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    const first = await sync(s, bob);
    assert.deepEqual(first.events, [], 'nothing waiting yet');

    for (let i = 1; i <= 3; i++) await sendOk(s, alice, 'org.example.ping', { [bob.userId]: { [bob.deviceId]: { n: i } } });
    const got = await sync(s, bob, first.token);
    assert.deepEqual(got.events, [1, 2, 3].map((n) => ({ sender: alice.userId, type: 'org.example.ping', content: { n } })));

    // The answer was lost: the same `since` gets the same messages again.
    const again = await sync(s, bob, first.token);
    assert.deepEqual(again.events, got.events, 'nothing is lost when an answer never arrives');
    assert.equal(again.token, got.token);

    // The next /sync with the newer token acknowledges them: they are gone, for good.
    const next = await sync(s, bob, got.token);
    assert.deepEqual(next.events, []);
    assert.deepEqual((await sync(s, bob, first.token)).events, [], 'acknowledged messages are deleted, not just skipped');
    assert.deepEqual((await sync(s, alice)).events, [], 'the sender received nothing');
  });

  test('a /sync with messages waiting answers at once, and a waiting /sync answers as soon as a message arrives', { timeout: 15_000 }, async () => {
    // Each /sync asks to wait 25 s; the test's 15 s limit is far above a prompt answer and below a waited-out one.
    const s = await start(backend);
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    const since = (await sync(s, bob)).token;
    await sendOk(s, alice, 'org.example.ping', { [bob.userId]: { [bob.deviceId]: { waiting: true } } });
    const pending = await sync(s, bob, since, 25_000);
    assert.deepEqual(contents(pending.events), [{ waiting: true }]);

    const poll = sync(s, bob, pending.token, 25_000);
    await new Promise((r) => setTimeout(r, 200)); // the poll is waiting on the server
    await sendOk(s, alice, 'org.example.ping', { [bob.userId]: { [bob.deviceId]: { woke: true } } });
    assert.deepEqual(contents((await poll).events), [{ woke: true }]);
  });

  test('messages waiting before a device first syncs come in its first /sync, without a since token', async () => {
    const s = await start(backend);
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    await sendOk(s, alice, 'org.example.early', { [bob.userId]: { [bob.deviceId]: { early: true } } });
    const first = await sync(s, bob);
    assert.deepEqual(contents(first.events), [{ early: true }]);
    assert.deepEqual((await sync(s, bob, first.token)).events, [], 'and its next /sync acknowledges them');
  });

  test('messages sent by several senders at once, while the device syncs, each arrive once', async () => {
    const s = await start(backend);
    const senders = await Promise.all(['s1', 's2', 's3', 's4'].map((n) => registerUser(s, n)));
    const bob = await registerUser(s, 'bob');
    let token = (await sync(s, bob)).token;
    const seen: string[] = [];
    let sending = true;
    const receiving = (async () => {
      while (sending || seen.length < 200) {
        const got = await sync(s, bob, token, sending ? 1000 : 0);
        token = got.token;
        seen.push(...got.events.map((e) => `${e['sender'] as string}/${(e['content'] as { n: number }).n}`));
        if (!sending && got.events.length === 0) break;
      }
    })();
    await Promise.all(senders.map(async (from) => {
      for (let n = 0; n < 50; n++) await sendOk(s, from, 'org.example.n', { [bob.userId]: { [bob.deviceId]: { n } } });
    }));
    sending = false;
    await receiving;
    assert.equal(seen.length, 200, 'nothing lost, nothing twice');
    assert.equal(new Set(seen).size, 200);
    for (const from of senders) {
      const mine = seen.filter((x) => x.startsWith(`${from.userId}/`)).map((x) => Number(x.split('/')[1]));
      assert.deepEqual(mine, Array.from({ length: 50 }, (_, n) => n), "each sender's messages in the order sent");
    }
  });

  test('a repeated txnId delivers nothing twice; other devices, and other event types, have their own txnIds', async () => {
    const s = await start(backend);
    const alice = await registerUser(s, 'alice');
    const alice2 = await login(s, 'alice', alice.password);
    const bob = await registerUser(s, 'bob');
    const since = (await sync(s, bob)).token;
    const to = (n: number) => ({ [bob.userId]: { [bob.deviceId]: { n } } });

    await sendOk(s, alice, 'org.example.a', to(1), 'same');
    await sendOk(s, alice, 'org.example.a', to(2), 'same'); // a retry (with other content, even): ignored
    await Promise.all([sendOk(s, alice, 'org.example.a', to(3), 'concurrent'), sendOk(s, alice, 'org.example.a', to(3), 'concurrent')]);
    await sendOk(s, alice2, 'org.example.a', to(4), 'same'); // another device of alice
    await sendOk(s, alice, 'org.example.b', to(5), 'same'); // another event type (another request path)
    const got = await sync(s, bob, since);
    assert.deepEqual(
      got.events.map((e) => [e['type'], (e['content'] as Json)['n']]),
      [
        ['org.example.a', 1],
        ['org.example.a', 3],
        ['org.example.a', 4],
        ['org.example.b', 5],
      ],
    );
  });

  test('"*" reaches every device of the user; a device named in the same request gets its own message', async () => {
    const s = await start(backend);
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    const bob2 = await login(s, 'bob', bob.password);
    const bob3 = await login(s, 'bob', bob.password);
    const carol = await registerUser(s, 'carol');
    const tokens = await Promise.all([bob, bob2, bob3, carol].map(async (d) => (await sync(s, d)).token));

    await sendOk(s, alice, 'org.example.all', { [bob.userId]: { '*': { to: 'all' }, [bob3.deviceId]: { to: 'bob3' } }, [carol.userId]: { '*': { to: 'carol' } } });
    const got = await Promise.all([bob, bob2, bob3, carol].map(async (d, i) => contents((await sync(s, d, tokens[i])).events)));
    assert.deepEqual(got, [[{ to: 'all' }], [{ to: 'all' }], [{ to: 'bob3' }], [{ to: 'carol' }]]);
  });

  test('unknown users and devices are skipped; the rest is delivered', async () => {
    const s = await start(backend);
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    const since = (await sync(s, bob)).token;
    await sendOk(s, alice, 'org.example.x', { '@nobody:test.local': { '*': { a: 1 } }, [bob.userId]: { NOSUCHDEVICE: { a: 2 }, [bob.deviceId]: { a: 3 } } });
    assert.deepEqual(contents((await sync(s, bob, since)).events), [{ a: 3 }]);
  });

  test('bad requests get a Matrix error and store nothing', async () => {
    const s = await start(backend, { to_device: { max_messages_per_request: 3 } });
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    const since = (await sync(s, bob)).token;
    const ok = { [bob.deviceId]: { fine: true } };
    const path = `${C}/sendToDevice/org.example.x/bad1`;
    expectMatrixError(await http(s.url, 'PUT', path, { token: alice.accessToken, body: {} }), 400, 'M_MISSING_PARAM', /messages/);
    expectMatrixError(await http(s.url, 'PUT', path, { token: alice.accessToken, body: { messages: [] } }), 400, 'M_BAD_JSON', /messages/);
    expectMatrixError(await send(s, alice, 'org.example.x', { [bob.userId]: ok, 'not-a-user': { D: {} } }), 400, 'M_INVALID_PARAM', /not-a-user/);
    expectMatrixError(await send(s, alice, 'org.example.x', { [bob.userId]: { ...ok, OTHER: 'text' } }), 400, 'M_BAD_JSON', /OTHER.*object/);
    expectMatrixError(await send(s, alice, 'org.example.x', { [bob.userId]: { ...ok, OTHER: { f: 1.5 } } }), 400, 'M_BAD_JSON', /canonical JSON/);
    expectMatrixError(await send(s, alice, 'org.example.x', { [bob.userId]: { ...ok, 'has space': {} } }), 400, 'M_INVALID_PARAM', /device ID/);
    expectMatrixError(await send(s, alice, 'org.example.x', { [bob.userId]: { ...ok, BIG: { pad: 'x'.repeat(70_000) } } }), 413, 'M_TOO_LARGE', /at most 61440 bytes/);
    expectMatrixError(
      await send(s, alice, 'org.example.x', { [bob.userId]: { A: {}, B: {}, C: {}, D: {} } }),
      413,
      'M_TOO_LARGE',
      /more than 3 messages.*to_device\.max_messages_per_request/,
    );
    expectMatrixError(await send(s, alice, 'x'.repeat(256), { [bob.userId]: ok }), 400, 'M_INVALID_PARAM', /eventType/);
    expectMatrixError(await http(s.url, 'PUT', `${C}/sendToDevice/org.example.x/t`, { body: { messages: {} } }), 401, 'M_MISSING_TOKEN');
    assert.deepEqual((await sync(s, bob, since)).events, [], 'no part of a refused request was stored');
    // A refused request did not use up its txnId.
    await sendOk(s, alice, 'org.example.x', { [bob.userId]: ok }, 'bad1');
    assert.deepEqual(contents((await sync(s, bob, since)).events), [{ fine: true }]);
  });

  test("a full inbox drops its oldest messages: the device gets the newest ones, and the metric counts what was dropped", async () => {
    const s = await start(backend, { to_device: { max_pending_per_device: 3 }, metrics: { enabled: true, port: 0 } });
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    const since = (await sync(s, bob)).token;
    for (let n = 1; n <= 5; n++) await sendOk(s, alice, 'org.example.n', { [bob.userId]: { [bob.deviceId]: { n } } });
    assert.deepEqual(contents((await sync(s, bob, since)).events), [{ n: 3 }, { n: 4 }, { n: 5 }]);
    // The pending count is read from the database; a scrape waits at most a second for a first read.
    let metrics = '';
    for (let i = 0; i < 20 && !/mxkeys_to_device_pending_messages \d/.test(metrics); i++) metrics = await (await fetch(s.mx.metricsUrl()!)).text();
    assert.match(metrics, /mxkeys_to_device_messages_dropped_total\{reason="inbox_full"\} 2/);
    assert.match(metrics, /mxkeys_to_device_messages_total\{source="client"\} 5/);
    assert.match(metrics, /mxkeys_to_device_pending_messages 3/);
  });

  test("an inbox over to_device.max_pending_bytes_per_device drops its oldest messages, however few they are", async () => {
    const s = await start(backend, { to_device: { max_pending_bytes_per_device: 131_072 }, metrics: { enabled: true, port: 0 } });
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    const since = (await sync(s, bob)).token;
    // Four messages of 50 KB: two fit in 128 KiB, three do not.
    for (let n = 1; n <= 4; n++) await sendOk(s, alice, 'org.example.big', { [bob.userId]: { [bob.deviceId]: padded(n, 50_000) } });
    assert.deepEqual(contents((await sync(s, bob, since)).events).map((c) => (c as { n: number }).n), [3, 4]);
    assert.match(await metricsOf(s), /mxkeys_to_device_messages_dropped_total\{reason="inbox_full"\} 2/);
  });

  test('a /sync answers at most 1 MiB of to-device messages; the rest follow in the next ones, each once and in order, and a lost answer is answered again', async () => {
    const s = await start(backend);
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    let token = (await sync(s, bob)).token;
    // 30 messages of 50 KB: 1.5 MB, under the 100-message limit.
    for (let n = 0; n < 30; n++) await sendOk(s, alice, 'org.example.big', { [bob.userId]: { [bob.deviceId]: padded(n, 50_000) } });
    const seen: number[] = [];
    const sizes: number[] = [];
    for (;;) {
      const got = await sync(s, bob, token);
      if (got.events.length === 0) break;
      const bytes = Buffer.byteLength(JSON.stringify(got.events));
      assert.ok(bytes <= 1024 * 1024, `an answer carried ${bytes} bytes of to-device events`);
      // The answer never arrived: the same since gets the same messages, and the same next_batch.
      const again = await sync(s, bob, token);
      assert.deepEqual(again.events, got.events);
      assert.equal(again.token, got.token);
      sizes.push(got.events.length);
      seen.push(...got.events.map((e) => (e['content'] as { n: number }).n));
      token = got.token;
    }
    assert.ok(sizes.length > 1 && sizes[0]! < 30, `answers of ${JSON.stringify(sizes)} messages`);
    assert.deepEqual(seen, Array.from({ length: 30 }, (_, n) => n), 'nothing lost, nothing twice, in order');
  });

  test('"*" to many users with several devices each costs as many database statements as "*" to two of them', async () => {
    const s = await start(backend);
    const alice = await registerUser(s, 'alice');
    const users: Session[][] = [];
    for (let i = 0; i < 12; i++) {
      const first = await registerUser(s, `fan${i}`);
      users.push([first, await login(s, first.userId, first.password), await login(s, first.userId, first.password)]);
    }
    const tokens = await Promise.all(users.flat().map(async (d) => (await sync(s, d)).token));
    // Background work (the federation sender's polling, housekeeping) would run statements of its own.
    await Promise.all([s.mx.federation.sender.stop(), s.mx.federation.maintenance.stop(), s.mx.backupPurger.stop()]);
    const statementsFor = async (to: Session[][], n: number) => {
      const before = s.mx.store.statementCount();
      await sendOk(s, alice, 'org.example.all', Object.fromEntries(to.map((devices) => [devices[0]!.userId, { '*': { n } }])));
      return s.mx.store.statementCount() - before;
    };
    await sendOk(s, alice, 'org.example.warm-up', {});
    const two = await statementsFor(users.slice(0, 2), 1);
    const twelve = await statementsFor(users, 2);
    assert.equal(twelve, two, `"*" to 2 users: ${two} statements; to 12 users: ${twelve}`);
    const got = await Promise.all(users.flat().map(async (d, i) => contents((await sync(s, d, tokens[i])).events)));
    assert.deepEqual(got, users.flatMap((_, u) => [0, 1, 2].map(() => (u < 2 ? [{ n: 1 }, { n: 2 }] : [{ n: 2 }]))), 'every device of every user got its messages');
  });

  test('on PostgreSQL, a send held up at one recipient does not hold up sends from others to other users', { skip: backend.name !== 'postgres' && 'SQLite has one writer at a time' }, async () => {
    const s = await start(backend);
    const [alice, bob, carol, dan] = [await registerUser(s, 'alice'), await registerUser(s, 'bob'), await registerUser(s, 'carol'), await registerUser(s, 'dan')];
    const tokens = await Promise.all([bob, carol].map(async (d) => (await sync(s, d)).token));
    // Another connection locks bob's device row: a message to bob waits for it, holding whatever it holds.
    const other = new pg.Client({ connectionString: s.config.database.postgres! });
    await other.connect();
    try {
      await other.query('BEGIN');
      await other.query('SELECT 1 FROM devices WHERE user_id = $1 FOR UPDATE', [bob.userId]);
      const otherPid = (await other.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
      const waitingFor = async (pid: number) =>
        (await other.query<{ pid: number }>('SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))', [pid])).rows[0]?.pid;
      const toBob = sendOk(s, alice, 'org.example.x', { [bob.userId]: { [bob.deviceId]: { to: 'bob' } } });
      const bobPid = await eventually('the message to bob waiting for the lock', () => waitingFor(otherPid));

      // dan to carol: it goes through, or it waits for the send to bob (the test then fails at once).
      let settled = false;
      const toCarol = sendOk(s, dan, 'org.example.x', { [carol.userId]: { [carol.deviceId]: { to: 'carol' } } }).then(() => 'sent', (e: Error) => `failed: ${e.message}`).finally(() => (settled = true));
      const heldUp = (async () => {
        while (!settled) {
          if ((await waitingFor(bobPid)) !== undefined) return 'waited for the send to bob';
          await new Promise((r) => setTimeout(r, 20));
        }
        return 'sent';
      })();
      assert.equal(await Promise.race([toCarol, heldUp]), 'sent');
      await other.query('ROLLBACK');
      await toBob;
    } finally {
      await other.end();
    }
    assert.deepEqual(contents((await sync(s, bob, tokens[0])).events), [{ to: 'bob' }]);
    assert.deepEqual(contents((await sync(s, carol, tokens[1])).events), [{ to: 'carol' }]);
  });

  test('a /sync answers at most 100 messages; the rest follow in the next ones, in order', async () => {
    const s = await start(backend);
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    let token = (await sync(s, bob)).token;
    for (let batch = 0; batch < 3; batch++) {
      await Promise.all(Array.from({ length: 50 }, (_, i) => sendOk(s, alice, 'org.example.n', { [bob.userId]: { [bob.deviceId]: { n: batch * 50 + i } } })));
    }
    const sizes: number[] = [];
    const seen: number[] = [];
    for (;;) {
      const got = await sync(s, bob, token);
      token = got.token;
      if (got.events.length === 0) break;
      sizes.push(got.events.length);
      seen.push(...got.events.map((e) => (e['content'] as { n: number }).n));
    }
    assert.deepEqual(sizes, [100, 50]);
    assert.deepEqual([...seen].sort((a, b) => a - b), Array.from({ length: 150 }, (_, i) => i), 'each message once');
  });

  test('tokens from before to-device messages still work, for /sync and /keys/changes; new tokens work for /keys/changes', async () => {
    const s = await start(backend);
    const alice = await registerUser(s, 'alice');
    const bob = await registerUser(s, 'bob');
    const current = await sync(s, bob);
    assert.match(current.token, /^s\d+_\d+$/);
    const old = current.token.replace(/_\d+$/, '');
    await sendOk(s, alice, 'org.example.x', { [bob.userId]: { [bob.deviceId]: { old: true } } });
    const got = await sync(s, bob, old);
    assert.deepEqual(contents(got.events), [{ old: true }], 'an old token acknowledged no to-device message');
    for (const from of [old, current.token]) {
      const changes = await http(s.url, 'GET', `${C}/keys/changes?from=${from}&to=${got.token}`, { token: bob.accessToken });
      assert.equal(changes.status, 200, changes.text);
    }
    expectMatrixError(await http(s.url, 'GET', `${C}/sync?since=s1_x`, { token: bob.accessToken }), 400, 'M_INVALID_PARAM', /since/);
  });
});

describeEachBackend('to-device messages and other servers (a fake remote server)', (backend) => {
  interface Setup {
    readonly s: TestServer;
    readonly fake: FakeHomeserver;
    /** The m.direct_to_device EDU contents the fake accepted. */
    readonly edus: Json[];
    /** What the fake answers to PUT /send: 200 (taken) unless set otherwise. */
    sendStatus: number;
  }

  async function setup(config: Json = {}, logger?: pino.Logger): Promise<Setup> {
    const fake = await FakeHomeserver.start();
    const edus: Json[] = [];
    const federation = { ...QUICK_FEDERATION, resolve: { [fake.serverName]: fake.url }, ...((config['federation'] as Json | undefined) ?? {}) };
    const s = await start(backend, { ...config, federation }, logger);
    const out: Setup = { s, fake, edus, sendStatus: 200 };
    fake.onRequest = (method, url, body) => {
      if (method !== 'PUT' || !url.startsWith(`${F}/send/`)) return undefined;
      if (out.sendStatus !== 200) return { status: out.sendStatus, body: { errcode: 'M_UNKNOWN', error: 'not now' } };
      for (const edu of ((body as Json)['edus'] as Json[] | undefined) ?? []) if (edu['edu_type'] === 'm.direct_to_device') edus.push(edu['content'] as Json);
      return { status: 200, body: { pdus: {} } };
    };
    return out;
  }

  let txn = 0;
  const transaction = (fake: FakeHomeserver, s: TestServer, content: Json) =>
    fake.request(s.url, 'test.local', 'PUT', `${F}/send/fake${++txn}`, {
      body: { origin: fake.serverName, origin_server_ts: Date.now(), pdus: [], edus: [{ edu_type: 'm.direct_to_device', content }] },
    });

  test('messages to users of another server leave as one m.direct_to_device EDU per server, with a message_id; "*" is passed on', async () => {
    const { s, fake, edus } = await setup();
    const alice = await registerUser(s, 'alice');
    const dan = `@dan:${fake.serverName}`;
    const erin = `@erin:${fake.serverName}`;
    await sendOk(s, alice, 'm.room_key_request', { [dan]: { DANDEV: { a: 1 } }, [erin]: { '*': { b: 2 } } });
    await eventually('the EDU at the fake server', async () => (edus.length > 0 ? true : undefined));
    assert.equal(edus.length, 1);
    const edu = edus[0]!;
    assert.deepEqual(directToDeviceSchema({ edu_type: 'm.direct_to_device', content: edu }), [], 'the EDU follows m.direct_to_device.yaml');
    assert.equal(edu['sender'], alice.userId);
    assert.equal(edu['type'], 'm.room_key_request');
    assert.match(edu['message_id'] as string, /^[A-Za-z0-9_-]{16}$/);
    assert.deepEqual(edu['messages'], { [dan]: { DANDEV: { a: 1 } }, [erin]: { '*': { b: 2 } } });
  });

  test('messages too large for one EDU are spread over several of at most 64 KiB, and each message arrives once', async () => {
    const { s, fake, edus } = await setup();
    const alice = await registerUser(s, 'alice');
    const dan = `@dan:${fake.serverName}`;
    const devices = Array.from({ length: 12 }, (_, i) => `D${i}`);
    await sendOk(s, alice, 'm.room.encrypted', { [dan]: Object.fromEntries(devices.map((d) => [d, { ciphertext: d.repeat(10_000 / d.length) }])) });
    await eventually('every message at the fake server', async () => (edus.flatMap((e) => Object.keys((e['messages'] as Record<string, Json>)[dan]!)).length >= 12 ? true : undefined));
    assert.ok(edus.length > 1, 'more than one EDU');
    for (const e of edus) {
      assert.ok(JSON.stringify({ content: e, edu_type: 'm.direct_to_device' }).length <= 65_536, 'each EDU within 64 KiB');
      assert.deepEqual(directToDeviceSchema({ edu_type: 'm.direct_to_device', content: e }), [], 'each EDU follows m.direct_to_device.yaml');
    }
    assert.deepEqual(edus.flatMap((e) => Object.keys((e['messages'] as Record<string, Json>)[dan]!)).sort(), [...devices].sort());
    assert.equal(new Set(edus.map((e) => e['message_id'])).size, edus.length, 'each EDU has its own message_id');
  });

  test("an m.direct_to_device EDU reaches the local devices once, however often it is sent; forged senders and other servers' users are dropped", async () => {
    const { s, fake } = await setup();
    const bob = await registerUser(s, 'bob');
    const bob2 = await login(s, 'bob', bob.password);
    const tokens = [(await sync(s, bob)).token, (await sync(s, bob2)).token];
    const sender = `@dan:${fake.serverName}`;
    const edu = { sender, type: 'm.room_key', message_id: 'msg-1', messages: { [bob.userId]: { '*': { hello: 'all' } }, '@zed:elsewhere.example': { Z: { no: 1 } } } };
    for (let i = 0; i < 2; i++) {
      const r = await transaction(fake, s, edu);
      assert.equal(r.status, 200, r.text);
    }
    const forged = await transaction(fake, s, { ...edu, sender: '@mallory:test.local', message_id: 'msg-2', messages: { [bob.userId]: { [bob.deviceId]: { forged: true } } } });
    assert.equal(forged.status, 200, 'a bad EDU does not fail the transaction');
    const r = await transaction(fake, s, { ...edu, message_id: 'msg-3', messages: { [bob.userId]: { [bob2.deviceId]: { only: 'bob2' } } } });
    assert.equal(r.status, 200, r.text);

    const got = await Promise.all([bob, bob2].map(async (d, i) => (await sync(s, d, tokens[i])).events));
    assert.deepEqual(got[0], [{ sender, type: 'm.room_key', content: { hello: 'all' } }]);
    assert.deepEqual(got[1], [
      { sender, type: 'm.room_key', content: { hello: 'all' } },
      { sender, type: 'm.room_key', content: { only: 'bob2' } },
    ]);
  });

  test('an m.direct_to_device EDU is held to the limits of a local request: contents over 60 KiB, and entries beyond to_device.max_messages_per_request, are dropped and logged', async () => {
    const { logger, lines } = keptLog();
    const { s, fake } = await setup({ to_device: { max_messages_per_request: 3 }, metrics: { enabled: true, port: 0 } }, logger);
    const bob = await registerUser(s, 'bob');
    const devices = [bob, ...(await Promise.all(['D2', 'D3', 'D4', 'D5'].map((d) => login(s, bob.userId, bob.password, { device_id: d }))))];
    const tokens = await Promise.all(devices.map(async (d) => (await sync(s, d)).token));
    const sender = `@dan:${fake.serverName}`;
    // In order: a fine one, one too large, two fine ones (three in all: the limit), one beyond the limit.
    const bodies = [{ n: 1 }, padded(2, 70_000), { n: 3 }, { n: 4 }, { n: 5 }];
    const edu = { sender, type: 'm.room_key', message_id: 'limits-1', messages: { [bob.userId]: Object.fromEntries(devices.map((d, i) => [d.deviceId, bodies[i]])) } };
    for (let i = 0; i < 2; i++) {
      const r = await transaction(fake, s, edu);
      assert.equal(r.status, 200, r.text);
    }
    const got = await Promise.all(devices.map(async (d, i) => contents((await sync(s, d, tokens[i])).events)));
    assert.deepEqual(got, [[{ n: 1 }], [], [{ n: 3 }], [{ n: 4 }], []]);
    const metrics = await metricsOf(s);
    assert.match(metrics, /mxkeys_to_device_messages_dropped_total\{reason="too_large"\} 1\n/, 'counted once, not again for the repeated EDU');
    assert.match(metrics, /mxkeys_to_device_messages_dropped_total\{reason="too_many"\} 1\n/);
    const logged = lines.filter((l) => /beyond the limits/.test(l['msg'] as string));
    assert.equal(logged.length, 1, JSON.stringify(lines));
    assert.deepEqual([logged[0]!['origin'], logged[0]!['message_id'], logged[0]!['too_large'], logged[0]!['too_many']], [fake.serverName, 'limits-1', 1, 1]);
  });

  test('messages a server has not taken within federation.max_undelivered_age are dropped from the queue, counted and logged; later ones still go', async () => {
    const { logger, lines } = keptLog();
    const setupResult = await setup({ federation: { max_undelivered_age: 1 }, metrics: { enabled: true, port: 0 } }, logger);
    const { s, fake, edus } = setupResult;
    const alice = await registerUser(s, 'alice');
    const dan = `@dan:${fake.serverName}`;
    setupResult.sendStatus = 503;
    // A transaction is retried as it is until the server takes it (so its EDUs may still arrive);
    // this one carries only the probe, the messages below wait in the queue behind it.
    await sendOk(s, alice, 'm.room_key_request', { [dan]: { D0: { probe: true } } });
    await eventually('a refused attempt', async () => (fake.requests.some((r) => r.url.startsWith(`${F}/send/`)) ? true : undefined));
    await sendOk(s, alice, 'm.room_key_request', { [dan]: { D1: { old: 1 }, D2: { old: 2 } } });
    await sendOk(s, alice, 'm.room_key_request', { [dan]: { '*': { old: 3 } } });
    await new Promise((r) => setTimeout(r, 5)); // older than max_undelivered_age (1 ms), for certain
    await s.mx.federation.maintenance.runOnce();

    assert.deepEqual([...(await s.mx.store.toDevice.eduCounts())], [], 'the queue is empty');
    assert.match(await metricsOf(s), /mxkeys_to_device_messages_dropped_total\{reason="undelivered"\} 4\n/);
    const logged = lines.filter((l) => /max_undelivered_age/.test(l['msg'] as string));
    assert.deepEqual(logged.map((l) => [l['level'], l['destination'], l['messages'], l['edus']]), [[40, fake.serverName, 4, 3]]);

    setupResult.sendStatus = 200;
    await sendOk(s, alice, 'm.room_key_request', { [dan]: { D1: { later: true } } });
    await eventually('the later message at the fake', async () => (edus.some((e) => JSON.stringify(e).includes('later')) ? true : undefined));
    assert.deepEqual(edus.filter((e) => JSON.stringify(e).includes('old')), [], 'the dropped messages never left');
  });
});
