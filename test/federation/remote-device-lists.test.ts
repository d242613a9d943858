/**
 * mxkeys against a scripted remote server: what it does with the remote's answers and with the
 * device-list EDUs the remote sends — gaps, forgeries, replays, malformed answers, backoff.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend, type Backend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';
import { TestCrossSigning, TestDevice } from '../support/keys.js';
import { eventually, QUICK_FEDERATION } from '../support/federation.js';

const C = '/_matrix/client/v3';
const F = '/_matrix/federation/v1';
type Json = Record<string, unknown>;

interface Setup {
  readonly fake: FakeHomeserver;
  readonly mx: TestServer;
  readonly alice: Session;
  readonly bob: string;
  /** The device list the fake serves for bob at /user/devices (mutable). */
  list: Json;
  send(edus: Json[], txnId?: string, extra?: Json): Promise<{ status: number; body: Json; text: string }>;
  query(users: Record<string, string[]>, timeout?: number): Promise<Json>;
}

let txnCounter = 0;

async function setup(backend: Backend, federation: Json = {}): Promise<Setup> {
  const fake = await FakeHomeserver.start();
  const mx = await startServer({
    backend,
    config: { registration_shared_secret: SHARED_SECRET, federation: { ...QUICK_FEDERATION, resolve: { [fake.serverName]: fake.url }, ...federation } },
  });
  const alice = await registerUser(mx, 'alice');
  const bob = `@bob:${fake.serverName}`;
  const s: Setup = {
    fake,
    mx,
    alice,
    bob,
    list: { user_id: bob, stream_id: 5, devices: [{ device_id: 'D1', keys: new TestDevice(bob, 'D1').deviceKeys() }] },
    async send(edus, txnId = `t${++txnCounter}`, extra = {}) {
      return fake.request(mx.url, 'test.local', 'PUT', `${F}/send/${txnId}`, { body: { origin: fake.serverName, origin_server_ts: Date.now(), pdus: [], edus, ...extra } });
    },
    async query(users, timeout) {
      const r = await http(mx.url, 'POST', `${C}/keys/query`, { token: alice.accessToken, body: { device_keys: users, ...(timeout !== undefined ? { timeout } : {}) } });
      assert.equal(r.status, 200, r.text);
      return r.body;
    },
  };
  fake.onRequest = (method, url) => {
    if (method === 'GET' && url === `${F}/user/devices/${encodeURIComponent(bob)}`) return { status: 200, body: s.list };
    return undefined;
  };
  return s;
}

const devicesOf = (answer: Json, userId: string) => Object.keys(((answer['device_keys'] as Record<string, Json>)[userId] ?? {}) as Json).sort();
const update = (bob: string, deviceId: string, streamId: number, prev: number[], extra: Json = {}) => ({
  edu_type: 'm.device_list_update',
  content: { user_id: bob, device_id: deviceId, stream_id: streamId, prev_id: prev, ...extra },
});

describeEachBackend('device lists of users on another server', (backend) => {
  test('the first query fetches the whole list once; later queries and in-order updates need no request', async () => {
    const s = await setup(backend);
    assert.deepEqual(devicesOf(await s.query({ [s.bob]: [] }), s.bob), ['D1']);
    assert.equal(s.fake.count(`${F}/user/devices/`), 1);
    assert.deepEqual(devicesOf(await s.query({ [s.bob]: [] }), s.bob), ['D1']);
    assert.equal(s.fake.count(`${F}/user/devices/`), 1, 'the second query was answered from the cache');

    const sent = await s.send([update(s.bob, 'D2', 6, [5], { keys: new TestDevice(s.bob, 'D2').deviceKeys() })]);
    assert.equal(sent.status, 200, sent.text);
    assert.deepEqual(sent.body, { pdus: {} });
    assert.deepEqual(devicesOf(await s.query({ [s.bob]: [] }), s.bob), ['D1', 'D2']);
    const deleted = await s.send([update(s.bob, 'D1', 7, [6], { deleted: true })]);
    assert.equal(deleted.status, 200, deleted.text);
    assert.deepEqual(devicesOf(await s.query({ [s.bob]: [] }), s.bob), ['D2']);
    assert.equal(s.fake.count(`${F}/user/devices/`), 1, 'both updates continued the chain: no resync');
  });

  test('a gap in prev_id triggers exactly one resync, and the resynced list is served', async () => {
    const s = await setup(backend);
    await s.query({ [s.bob]: [] });
    s.list = { ...s.list, stream_id: 9, devices: [{ device_id: 'D3', keys: new TestDevice(s.bob, 'D3').deviceKeys() }] };
    // prev_id 7 was never seen (the cache is at 5): two updates of the same gap arrive together.
    const sent = await s.send([update(s.bob, 'D3', 8, [7]), update(s.bob, 'D3', 9, [8])]);
    assert.equal(sent.status, 200, sent.text);
    await eventually('the resync', async () => (s.fake.count(`${F}/user/devices/`) === 2 ? true : undefined));
    const answer = await eventually('the resynced list', async () => {
      const a = await s.query({ [s.bob]: [] });
      return devicesOf(a, s.bob).join() === 'D3' ? a : undefined;
    });
    assert.deepEqual(answer['failures'], {});
    // Past the first retry's wait (1 s): still one resync.
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(s.fake.count(`${F}/user/devices/`), 2, 'one resync for the whole gap, and none after');
  });

  test('an update that arrives while its list is being fetched is not lost', async () => {
    const s = await setup(backend);
    await s.query({ [s.bob]: [] });
    const d7 = new TestDevice(s.bob, 'D7');
    const d8 = new TestDevice(s.bob, 'D8');
    const asOf7 = { user_id: s.bob, stream_id: 7, devices: [{ device_id: 'D7', keys: d7.deviceKeys() }] };
    const asOf8 = { user_id: s.bob, stream_id: 8, devices: [{ device_id: 'D7', keys: d7.deviceKeys() }, { device_id: 'D8', keys: d8.deviceKeys() }] };
    let update8Sent!: () => void;
    const afterUpdate8 = new Promise<void>((resolve) => (update8Sent = resolve));
    let fetches = 0;
    s.fake.onRequest = async (method, url) => {
      if (!url.startsWith(`${F}/user/devices/`)) return undefined;
      // The resync for the gap is answered only after update 8 has arrived, with the list as of 7.
      if (++fetches === 1) {
        await afterUpdate8;
        return { status: 200, body: asOf7 };
      }
      return { status: 200, body: asOf8 };
    };
    await s.send([update(s.bob, 'D7', 7, [6], { keys: d7.deviceKeys() })]);
    await eventually('the resync for the gap', async () => (fetches === 1 ? true : undefined));
    await s.send([update(s.bob, 'D8', 8, [7], { keys: d8.deviceKeys() })]);
    update8Sent();
    const answer = await eventually('D8 in the answer', async () => {
      const a = await s.query({ [s.bob]: [] }, 3000);
      return devicesOf(a, s.bob).includes('D8') ? a : undefined;
    });
    assert.deepEqual(devicesOf(answer, s.bob), ['D7', 'D8']);
  });

  test("a client's short timeout does not count against the remote server", async () => {
    const s = await setup(backend, { destination_min_retry_interval: 60_000, destination_max_retry_interval: 60_000 });
    const carol = `@carol:${s.fake.serverName}`;
    let slow = true;
    s.fake.onRequest = (method, url) => {
      if (!url.startsWith(`${F}/user/devices/`)) return undefined;
      return slow ? 'hang' : { status: 200, body: { user_id: carol, stream_id: 1, devices: [] } };
    };
    const hurried = await s.query({ [carol]: [] }, 100);
    assert.ok((hurried['failures'] as Json)[s.fake.serverName], 'the hurried query itself is a failure');
    slow = false;
    const patient = await s.query({ [carol]: [] });
    assert.deepEqual(patient['failures'], {}, 'the server is asked again at once');
  });

  test('an update the cache already has, or one that starts a new chain, is handled without losing devices', async () => {
    const s = await setup(backend);
    await s.query({ [s.bob]: [] });
    const old = await s.send([update(s.bob, 'D1', 4, [3], { deleted: true })]);
    assert.equal(old.status, 200);
    assert.deepEqual(devicesOf(await s.query({ [s.bob]: [] }), s.bob), ['D1'], 'an update older than the cached list is ignored (a deletion too)');
    assert.equal(s.fake.count(`${F}/user/devices/`), 1);
    await s.send([update(s.bob, 'D9', 6, [])]);
    await eventually('a resync for a new chain', async () => (s.fake.count(`${F}/user/devices/`) === 2 ? true : undefined));
  });

  test('a forged update (a user of another server) and an update for an untracked user change nothing', async () => {
    const s = await setup(backend);
    await s.query({ [s.bob]: [] });
    const forged = await s.send([update('@victim:test.local', 'EVIL', 6, [5]), update('@mallory:elsewhere.example', 'EVIL', 6, [5])]);
    assert.equal(forged.status, 200, forged.text);
    const carol = `@carol:${s.fake.serverName}`;
    await s.send([update(carol, 'C1', 1, [], { keys: new TestDevice(carol, 'C1').deviceKeys() })]);
    // Nothing about carol was kept: asking for her fetches her list.
    await s.query({ [carol]: [] });
    assert.equal(s.fake.count(`${F}/user/devices/${encodeURIComponent(carol)}`), 1);
    const sync = await http(s.mx.url, 'GET', `${C}/keys/changes?from=s0`, { token: s.alice.accessToken });
    assert.deepEqual(sync.body['changed'], [s.alice.userId], 'only alice herself (her device was created); no tracked user changed');
  });

  test('a replayed transaction gets the same answer and applies nothing twice', async () => {
    const s = await setup(backend);
    await s.query({ [s.bob]: [] });
    const first = new TestCrossSigning(s.bob);
    const second = new TestCrossSigning(s.bob);
    const signingUpdate = (cs: TestCrossSigning) => ({ edu_type: 'm.signing_key_update', content: { user_id: s.bob, master_key: cs.masterKey(), self_signing_key: cs.selfSigningKey() } });
    const a = await s.send([signingUpdate(first)], 'txn-a', { pdus: [{ event_id: '$ev1', type: 'm.room.message', room_id: '!r:x', content: {} }] });
    assert.equal(a.status, 200, a.text);
    assert.match(JSON.stringify(a.body), /\$ev1/, 'a PDU is answered with an error entry');
    assert.equal(typeof ((a.body['pdus'] as Record<string, Json>)['$ev1']!['error']), 'string');
    await s.send([signingUpdate(second)], 'txn-b');
    const replay = await s.send([signingUpdate(first)], 'txn-a', { pdus: [{ event_id: '$ev1', type: 'm.room.message', room_id: '!r:x', content: {} }] });
    assert.equal(replay.text, a.text, 'the same answer');
    const answer = await s.query({ [s.bob]: [] });
    assert.deepEqual((answer['master_keys'] as Json)[s.bob], second.masterKey(), 'the replay did not bring the first master key back');
  });

  test('a self-signing key not signed by the master key is dropped', async () => {
    const s = await setup(backend);
    await s.query({ [s.bob]: [] });
    const cs = new TestCrossSigning(s.bob);
    const other = new TestCrossSigning(s.bob);
    await s.send([{ edu_type: 'm.signing_key_update', content: { user_id: s.bob, master_key: cs.masterKey(), self_signing_key: other.selfSigningKey() } }]);
    const answer = await s.query({ [s.bob]: [] });
    assert.equal((answer['master_keys'] as Json)[s.bob], undefined);
    assert.equal((answer['self_signing_keys'] as Json)[s.bob], undefined);
  });

  test('transactions: the origin in the body must be the signer, and at most 50 PDUs and 100 EDUs', async () => {
    const s = await setup(backend);
    const wrongOrigin = await s.send([], undefined, { origin: 'someone.else' });
    assert.equal(wrongOrigin.status, 403, wrongOrigin.text);
    assert.equal(wrongOrigin.body['errcode'], 'M_FORBIDDEN');
    const tooMany = await s.send(
      Array.from({ length: 101 }, () => ({ edu_type: 'm.typing', content: {} })),
    );
    assert.equal(tooMany.status, 400, tooMany.text);
    const tooManyPdus = await s.send([], undefined, { pdus: Array.from({ length: 51 }, (_, i) => ({ event_id: `$e${i}` })) });
    assert.equal(tooManyPdus.status, 400, tooManyPdus.text);
    const notAList = await s.send([], undefined, { pdus: 'nope' });
    assert.equal(notAList.status, 400, notAList.text);
    const unknownEdus = await s.send([
      { edu_type: 'm.typing', content: { room_id: '!r:x' } },
      { edu_type: 'm.presence' },
      { edu_type: 'hasOwnProperty', content: {} },
      { edu_type: '__proto__', content: {} },
      'garbage' as unknown as Json,
    ]);
    assert.equal(unknownEdus.status, 200, unknownEdus.text);
    const unsigned = await http(s.mx.url, 'PUT', `${F}/send/t-unsigned`, { body: { origin: s.fake.serverName, origin_server_ts: 1, pdus: [] } });
    assert.equal(unsigned.status, 401, unsigned.text);
  });

  test('answers that break the spec are dropped, never passed on, never a 500', async () => {
    // No retry wait after a failure, so each case reaches the server.
    const s = await setup(backend, { destination_min_retry_interval: 1, destination_max_retry_interval: 1 });
    const carol = `@carol:${s.fake.serverName}`;
    const dave = `@dave:${s.fake.serverName}`;
    const eve = `@eve:${s.fake.serverName}`;
    const huge = 'x'.repeat(10 * 1024 * 1024);
    s.fake.onRequest = (method, url, body) => {
      if (url === `${F}/user/devices/${encodeURIComponent(s.bob)}`) {
        // Keys filed under the wrong device, and keys of another user.
        return {
          status: 200,
          body: {
            user_id: s.bob,
            stream_id: 3,
            devices: [
              { device_id: 'D1', keys: new TestDevice(s.bob, 'OTHER').deviceKeys() },
              { device_id: 'D2', keys: new TestDevice('@alice:test.local', 'D2').deviceKeys() },
              { device_id: 'D3', keys: new TestDevice(s.bob, 'D3').deviceKeys() },
              'junk',
            ],
          },
        };
      }
      if (url === `${F}/user/devices/${encodeURIComponent(carol)}`) return { status: 200, body: { user_id: carol, stream_id: 'x', devices: 'none' } };
      if (url === `${F}/user/devices/${encodeURIComponent(dave)}`) return { status: 200, raw: `{"user_id":"${dave}","stream_id":1,"devices":[],"pad":"${huge}"}` };
      if (url === `${F}/user/devices/${encodeURIComponent(eve)}`) return 'hang';
      if (url === `${F}/user/keys/query`) {
        // Asked for bob's D1 only: answers with more devices and another user.
        const asked = (body as { device_keys: Json }).device_keys;
        assert.deepEqual(Object.keys(asked), ['@frank:' + s.fake.serverName]);
        const frank = '@frank:' + s.fake.serverName;
        return {
          status: 200,
          body: {
            device_keys: {
              [frank]: { F1: new TestDevice(frank, 'F1').deviceKeys(), F2: new TestDevice(frank, 'F2').deviceKeys() },
              '@alice:test.local': { X: new TestDevice('@alice:test.local', 'X').deviceKeys() },
            },
            master_keys: { [frank]: { user_id: frank, usage: ['master'], keys: { 'ed25519:bad': 'bad' } } },
          },
        };
      }
      return undefined;
    };
    const answer = await s.query({ [s.bob]: [] });
    assert.deepEqual(devicesOf(answer, s.bob), ['D3'], 'only the well-formed device keys filed under the right user and device');
    const broken = await s.query({ [carol]: [] });
    assert.ok((broken['failures'] as Json)[s.fake.serverName], JSON.stringify(broken));
    const tooBig = await s.query({ [dave]: [] });
    assert.ok((tooBig['failures'] as Json)[s.fake.serverName], 'a 10 MB answer is refused');
    await new Promise((r) => setTimeout(r, 5));
    const silent = await s.query({ [eve]: [] }, 500);
    assert.ok((silent['failures'] as Json)[s.fake.serverName], 'a server that never answers is a failure');
    await new Promise((r) => setTimeout(r, 5));
    const frank = '@frank:' + s.fake.serverName;
    const specific = await s.query({ [frank]: ['F1'] });
    assert.deepEqual(devicesOf(specific, frank), ['F1'], 'only the device asked for');
    assert.equal((specific['device_keys'] as Json)['@alice:test.local'], undefined, 'never keys of a user that was not asked for');
    assert.equal((specific['master_keys'] as Json)[frank], undefined, 'an invalid master key is dropped');
  });

  test('claims: one request per server, only the devices and algorithms asked for come back', async () => {
    const s = await setup(backend);
    const carol = `@carol:${s.fake.serverName}`;
    const keys = new Map<string, Json>();
    const keyOf = (d: TestDevice) => {
      if (!keys.has(d.deviceId)) keys.set(d.deviceId, { [`signed_curve25519:AAAA${d.deviceId}`]: d.oneTimeKey() });
      return keys.get(d.deviceId)!;
    };
    const b1 = new TestDevice(s.bob, 'B1');
    s.fake.onRequest = (method, url) => {
      if (url !== `${F}/user/keys/claim`) return undefined;
      return {
        status: 200,
        body: {
          one_time_keys: {
            [s.bob]: { B1: keyOf(b1), B2: keyOf(new TestDevice(s.bob, 'B2')) },
            [carol]: { C1: { 'other_alg:K': 'abc' } },
            '@alice:test.local': { A: keyOf(new TestDevice('@alice:test.local', 'A')) },
          },
        },
      };
    };
    const r = await http(s.mx.url, 'POST', `${C}/keys/claim`, {
      token: s.alice.accessToken,
      body: { one_time_keys: { [s.bob]: { B1: 'signed_curve25519' }, [carol]: { C1: 'signed_curve25519' } } },
    });
    assert.equal(r.status, 200, r.text);
    assert.equal(s.fake.count(`${F}/user/keys/claim`), 1, 'one request for both users of the server');
    assert.deepEqual(r.body['one_time_keys'], { [s.bob]: { B1: keyOf(b1) } });
    assert.deepEqual(r.body['failures'], {});
  });

  test('after a failure the server is a failure at once, until it talks to us again', async () => {
    const s = await setup(backend, { destination_min_retry_interval: 60_000, destination_max_retry_interval: 60_000 });
    const carol = `@carol:${s.fake.serverName}`;
    let down = true;
    s.fake.onRequest = (method, url) => {
      if (!url.startsWith(`${F}/user/devices/`)) return undefined;
      if (down) return { status: 502, body: { errcode: 'M_UNKNOWN', error: 'bad gateway' } };
      return { status: 200, body: { user_id: decodeURIComponent(url.split('/').pop()!), stream_id: 1, devices: [] } };
    };
    const first = await s.query({ [carol]: [] });
    assert.ok((first['failures'] as Json)[s.fake.serverName]);
    assert.equal(s.fake.count(`${F}/user/devices/`), 1);
    down = false;
    const during = await s.query({ [carol]: [] });
    assert.match(String(((during['failures'] as Record<string, Json>)[s.fake.serverName] ?? {})['message']), /not asking it again/);
    assert.equal(s.fake.count(`${F}/user/devices/`), 1, 'no request while waiting');
    // The remote sends us a signed request: it is up again.
    const ping = await s.send([]);
    assert.equal(ping.status, 200, ping.text);
    const after = await s.query({ [carol]: [] });
    assert.deepEqual(after['failures'], {});
    assert.equal(s.fake.count(`${F}/user/devices/`), 2);
  });
});
