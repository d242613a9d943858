/**
 * The sending side of device-list updates against a scripted remote server: subscriptions (by
 * request and through the library API), refused transactions, a destination that stays away, and
 * what a request may leave behind.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend, type Backend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { login, registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';
import { TestCrossSigning, TestDevice } from '../support/keys.js';
import { eventually } from '../support/federation.js';
import type { SqlDatabase } from '../../src/storage/sql.js';

const C = '/_matrix/client/v3';
const F = '/_matrix/federation/v1';
type Json = Record<string, unknown>;

const dbOf = (s: TestServer) => (s.mx.store as unknown as { db: SqlDatabase }).db;
const count = async (s: TestServer, sql: string, params: (string | number)[] = []) => (await dbOf(s).get<{ n: number }>(sql, params))!.n;

interface Setup {
  readonly fake: FakeHomeserver;
  readonly mx: TestServer;
  readonly bob: Session;
  /** EDUs the fake accepted, in order. */
  readonly received: { edu_type: string; content: Json }[];
  /** What the fake answers to PUT /send (200 by default). */
  sendStatus: number;
}

async function setup(backend: Backend, federation: Json = {}): Promise<Setup> {
  const fake = await FakeHomeserver.start();
  const mx = await startServer({
    backend,
    config: {
      registration_shared_secret: SHARED_SECRET,
      federation: { destination_min_retry_interval: 50, destination_max_retry_interval: 400, resolve: { [fake.serverName]: fake.url }, ...federation },
    },
  });
  const bob = await registerUser(mx, 'bob');
  const s: Setup = { fake, mx, bob, received: [], sendStatus: 200 };
  fake.onRequest = (method, url, body) => {
    if (method !== 'PUT' || !url.startsWith(`${F}/send/`)) return undefined;
    if (s.sendStatus !== 200) return { status: s.sendStatus, body: { errcode: 'M_UNAUTHORIZED', error: 'no' } };
    s.received.push(...(((body as Json)['edus'] as { edu_type: string; content: Json }[] | undefined) ?? []));
    return { status: 200, body: { pdus: {} } };
  };
  return s;
}

/** The fake reads bob's list: it is subscribed from then on. */
async function subscribe(s: Setup): Promise<number> {
  const r = await s.fake.request(s.mx.url, 'test.local', 'GET', `${F}/user/devices/${encodeURIComponent(s.bob.userId)}`);
  assert.equal(r.status, 200, r.text);
  return r.body['stream_id'] as number;
}

async function newDevice(s: Setup, deviceId: string): Promise<Session> {
  const d = await login(s.mx, s.bob.userId, s.bob.password, { device_id: deviceId });
  const r = await http(s.mx.url, 'POST', `${C}/keys/upload`, { token: d.accessToken, body: { device_keys: new TestDevice(d.userId, deviceId).deviceKeys() } });
  assert.equal(r.status, 200, r.text);
  return d;
}

const deviceUpdates = (s: Setup, deviceId: string) => s.received.filter((e) => e.edu_type === 'm.device_list_update' && e.content['device_id'] === deviceId);

describeEachBackend('sending device-list updates', (backend) => {
  test('a server added through the library API receives updates until it is removed', async () => {
    const s = await setup(backend);
    await s.mx.mx.deviceListSubscriptions.add(s.bob.userId, [s.fake.serverName]);
    assert.deepEqual((await s.mx.mx.deviceListSubscriptions.list(s.bob.userId)).map((x) => [x.serverName, x.expiresTs]), [[s.fake.serverName, null]]);
    await newDevice(s, 'ADDED');
    await eventually('the update', async () => (deviceUpdates(s, 'ADDED').some((e) => e.content['keys']) ? true : undefined));

    await s.mx.mx.deviceListSubscriptions.remove(s.bob.userId, [s.fake.serverName]);
    assert.deepEqual(await s.mx.mx.deviceListSubscriptions.list(s.bob.userId), []);
    await newDevice(s, 'AFTER');
    assert.equal(await count(s.mx, 'SELECT COUNT(*) AS n FROM device_list_outbound_pokes'), 0, 'nothing was queued for the removed server');
  });

  test('a refused transaction is retried with a growing wait, and delivered once accepted', async () => {
    const s = await setup(backend);
    await subscribe(s);
    s.sendStatus = 401;
    await newDevice(s, 'REFUSED');
    const failures = () => count(s.mx, 'SELECT COALESCE(MAX(failure_count), 0) AS n FROM federation_destinations');
    await eventually('three refusals in a row', async () => ((await failures()) >= 3 ? true : undefined));
    const txnIds = new Set(s.fake.requests.filter((r) => r.url.startsWith(`${F}/send/`)).map((r) => r.url));
    assert.equal(txnIds.size, 1, 'every attempt sent the same transaction');
    s.sendStatus = 200;
    await eventually('the delivery', async () => (deviceUpdates(s, 'REFUSED').length > 0 ? true : undefined));
    await eventually('the wait ended', async () => ((await failures()) === 0 ? true : undefined));
  });

  test('a destination away longer than max_undelivered_age gets the newest state of every device and key when it returns', async () => {
    const s = await setup(backend, { max_undelivered_age: 1 });
    const streamId = await subscribe(s);
    s.sendStatus = 503;
    await newDevice(s, 'AWAY1');
    await eventually('a failed attempt', async () => ((await count(s.mx, 'SELECT COUNT(*) AS n FROM federation_destinations')) > 0 ? true : undefined));
    await newDevice(s, 'AWAY2');
    const cs = new TestCrossSigning(s.bob.userId);
    const up = await http(s.mx.url, 'POST', `${C}/keys/device_signing/upload`, { token: s.bob.accessToken, body: cs.upload() });
    assert.equal(up.status, 200, up.text);
    await s.mx.mx.federation.maintenance.runOnce();
    assert.equal(await count(s.mx, 'SELECT COUNT(*) AS n FROM device_list_outbound_last_sent'), 0, 'the chain was broken on purpose');

    s.sendStatus = 200;
    // The destination talks to us: it is up again.
    await s.fake.request(s.mx.url, 'test.local', 'PUT', `${F}/send/back-again`, { body: { origin: s.fake.serverName, origin_server_ts: Date.now(), pdus: [] } });
    await eventually('both devices and the cross-signing keys', async () =>
      deviceUpdates(s, 'AWAY2').some((e) => e.content['keys']) && s.received.some((e) => e.edu_type === 'm.signing_key_update' && e.content['master_key']) ? true : undefined,
    );
    // A device update after the break either continues what was delivered, or starts a new chain
    // (empty prev_id, so the receiver fetches the whole list); never a chain over the dropped changes.
    const later = s.received.filter((e) => e.edu_type === 'm.device_list_update');
    const first = later.find((e) => (e.content['stream_id'] as number) > streamId && e.content['device_id'] === 'AWAY2')!;
    assert.ok(first, JSON.stringify(later));
    const prev = first.content['prev_id'] as number[];
    const delivered = later.filter((e) => e !== first).map((e) => e.content['stream_id'] as number);
    assert.ok(prev.length === 0 || delivered.includes(prev[0]!), `prev_id ${JSON.stringify(prev)} refers to an update the receiver got (${JSON.stringify(delivered)})`);
  });

  test('reading a list without being subscribed, or about a user who does not exist, leaves nothing behind', async () => {
    const s = await setup(backend);
    for (const user of ['@ghost:test.local', s.bob.userId]) {
      const r = await s.fake.request(s.mx.url, 'test.local', 'GET', `${F}/user/devices/${encodeURIComponent(user)}`);
      assert.equal(r.status, 200, r.text);
    }
    assert.equal(await count(s.mx, 'SELECT COUNT(*) AS n FROM device_list_subscriptions'), 1, 'only bob, who exists, has a subscriber');
    assert.equal(await count(s.mx, 'SELECT COUNT(*) AS n FROM device_list_outbound_last_sent'), 1);
  });
});
