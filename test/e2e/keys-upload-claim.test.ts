import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { exactly, login, passwordAuth, registerUser, SHARED_SECRET, type Session, expectMatrixError } from '../support/client.js';
import { TestDevice } from '../support/keys.js';

const C = '/_matrix/client/v3';
type Json = Record<string, unknown>;


async function setup(backend: Parameters<typeof startServer>[0]['backend'], config: Json = {}) {
  const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET, ...config } });
  const alice = await registerUser(server, 'alice');
  const bob = await registerUser(server, 'bob');
  return { server, alice, bob, aliceDevice: new TestDevice(alice.userId, alice.deviceId) };
}

const upload = (s: TestServer, who: Session, body: Json) => http(s.url, 'POST', `${C}/keys/upload`, { token: who.accessToken, body });
const query = (s: TestServer, who: Session, deviceKeys: Json) => http(s.url, 'POST', `${C}/keys/query`, { token: who.accessToken, body: { device_keys: deviceKeys } });
const claim = (s: TestServer, who: Session, oneTimeKeys: Json) => http(s.url, 'POST', `${C}/keys/claim`, { token: who.accessToken, body: { one_time_keys: oneTimeKeys } });
const counts = async (s: TestServer, who: Session) =>
  (await http<{ device_one_time_keys_count: Record<string, number>; device_unused_fallback_key_types: string[] }>(s.url, 'GET', `${C}/sync`, { token: who.accessToken })).body;

/** The key (name and value) one claim of `who`'s device returned, if any. */
async function claimOne(s: TestServer, by: Session, who: Session): Promise<[string, Json] | undefined> {
  const r = await claim(s, by, { [who.userId]: { [who.deviceId]: 'signed_curve25519' } });
  assert.equal(r.status, 200, r.text);
  const keys = ((r.body['one_time_keys'] as Json)[who.userId] as Record<string, Json> | undefined)?.[who.deviceId];
  return keys ? (Object.entries(keys)[0] as [string, Json]) : undefined;
}

describeEachBackend('POST /keys/upload', (backend) => {
  test('device keys are stored verbatim and come back byte-equal, plus unsigned.device_display_name', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    await http(server.url, 'PUT', `${C}/devices/${alice.deviceId}`, { token: alice.accessToken, body: { display_name: 'Alice laptop' } });
    // An unknown field and a field order of our own: both must survive.
    const keys = aliceDevice.deviceKeys({ 'org.example.extra': { nested: [1, 'two', null] } });
    const r = await upload(server, alice, { device_keys: { ...keys, unsigned: { ignored: true } } });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.body, { one_time_key_counts: { signed_curve25519: 0 } });

    const q = await query(server, bob, { [alice.userId]: [] });
    const got = ((q.body['device_keys'] as Json)[alice.userId] as Json)[alice.deviceId] as Json;
    const { unsigned, ...rest } = got;
    assert.deepEqual(rest, keys, 'the stored object is exactly the uploaded one');
    assert.deepEqual(unsigned, { device_display_name: 'Alice laptop' });
    assert.deepEqual(q.body['failures'], {});
  });

  test('device keys must be the caller\'s, complete, well-typed and self-signed; a refused upload stores nothing', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    const good = aliceDevice.deviceKeys();
    const cases: [Json, number, string][] = [
      [aliceDevice.ed25519.sign({ ...aliceDevice.unsignedDeviceKeys(), user_id: bob.userId }, bob.userId, `ed25519:${alice.deviceId}`), 400, 'M_INVALID_PARAM'],
      [aliceDevice.ed25519.sign({ ...aliceDevice.unsignedDeviceKeys(), device_id: 'OTHERDEV' }, alice.userId, `ed25519:${alice.deviceId}`), 400, 'M_INVALID_PARAM'],
      // A DeviceKeys object missing a required field is malformed JSON, as Synapse answers.
      [{ ...good, algorithms: undefined }, 400, 'M_BAD_JSON'],
      [{ ...good, keys: undefined }, 400, 'M_BAD_JSON'],
      [{ ...good, signatures: undefined }, 400, 'M_BAD_JSON'],
      [{ ...good, user_id: undefined }, 400, 'M_BAD_JSON'],
      [{ ...good, algorithms: 'm.olm.v1.curve25519-aes-sha2' }, 400, 'M_BAD_JSON'],
      [{ ...good, keys: { [`ed25519:${alice.deviceId}`]: 5 } }, 400, 'M_BAD_JSON'],
      [{ ...good, keys: { ...(good['keys'] as Json), 'curve25519:OTHER': 'x' } }, 400, 'M_INVALID_PARAM'],
      [{ ...good, 'org.example': 'changed after signing' }, 400, 'M_INVALID_SIGNATURE'],
      [{ ...good, signatures: {} }, 400, 'M_INVALID_SIGNATURE'],
      [new TestDevice(alice.userId, alice.deviceId).ed25519.sign(aliceDevice.unsignedDeviceKeys(), alice.userId, `ed25519:${alice.deviceId}`), 400, 'M_INVALID_SIGNATURE'],
      [aliceDevice.deviceKeys({ ratio: 1.5 }), 400, 'M_BAD_JSON'],
    ];
    for (const [deviceKeys, status, errcode] of cases) {
      const r = await upload(server, alice, { device_keys: deviceKeys, one_time_keys: aliceDevice.oneTimeKeys(2) });
      expectMatrixError(r, status, errcode);
    }
    const q = await query(server, bob, { [alice.userId]: [] });
    assert.deepEqual((q.body['device_keys'] as Json)[alice.userId], {}, 'no device keys stored');
    assert.equal((await counts(server, alice)).device_one_time_keys_count['signed_curve25519'], 0, 'no one-time keys stored');
    assert.equal((await upload(server, alice, { device_keys: good })).status, 200);
  });

  test('with accept_invalid_device_self_signatures, device keys whose self-signature is missing or wrong are stored as uploaded; the other checks stay', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend, { accept_invalid_device_self_signatures: true });
    const placeholder = { ...aliceDevice.unsignedDeviceKeys(), signatures: { [alice.userId]: { [`ed25519:${alice.deviceId}`]: 'not-a-signature' } } };
    const r = await upload(server, alice, { device_keys: placeholder });
    assert.equal(r.status, 200, r.text);
    const q = await query(server, bob, { [alice.userId]: [] });
    const { unsigned: _unsigned, ...stored } = ((q.body['device_keys'] as Json)[alice.userId] as Json)[alice.deviceId] as Json;
    assert.deepEqual(stored, placeholder);

    const carol = await registerUser(server, 'carol');
    const unsignedKeys = { ...new TestDevice(carol.userId, carol.deviceId).unsignedDeviceKeys(), signatures: {} };
    assert.equal((await upload(server, carol, { device_keys: unsignedKeys })).status, 200, 'a missing self-signature is accepted too');
    expectMatrixError(await upload(server, carol, { device_keys: { ...unsignedKeys, keys: undefined } }), 400, 'M_BAD_JSON');
    expectMatrixError(await upload(server, carol, { device_keys: { ...unsignedKeys, user_id: bob.userId } }), 400, 'M_INVALID_PARAM');
    expectMatrixError(await upload(server, carol, { device_keys: { ...unsignedKeys, ratio: 0.5 } }), 400, 'M_BAD_JSON', /canonical/);

    // Off by default: the same placeholder is refused.
    const strict = await setup(backend);
    const refused = await upload(strict.server, strict.alice, { device_keys: { ...strict.aliceDevice.unsignedDeviceKeys(), signatures: { [strict.alice.userId]: { [`ed25519:${strict.alice.deviceId}`]: 'not-a-signature' } } } });
    expectMatrixError(refused, 400, 'M_INVALID_SIGNATURE');
  });

  test('each field of the device keys is checked and named in the error; nothing is stored', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    const a = alice.userId;
    const d = alice.deviceId;
    const good = aliceDevice.deviceKeys();
    const keys = good['keys'] as Json;
    const resign = (obj: Json) => aliceDevice.ed25519.sign({ ...obj, signatures: undefined }, a, `ed25519:${d}`);
    const cases: [string, unknown, string, RegExp][] = [
      // A missing required field is M_BAD_JSON, as Synapse answers (issue 10's compatibility list).
      ['user_id missing', { ...good, user_id: undefined }, 'M_BAD_JSON', exactly('device_keys.user_id is required')],
      ['device_id missing', { ...good, device_id: undefined }, 'M_BAD_JSON', exactly('device_keys.device_id is required')],
      ['user_id a number', { ...good, user_id: 5 }, 'M_BAD_JSON', exactly('device_keys.user_id must be a string')],
      ["bob's user_id", resign({ ...good, user_id: bob.userId }), 'M_INVALID_PARAM', exactly(`device_keys.user_id is ${bob.userId}, but you are logged in as ${a}`)],
      ['another device_id', resign({ ...good, device_id: 'OTHERDEV' }), 'M_INVALID_PARAM', exactly(`device_keys.device_id is OTHERDEV, but your access token belongs to device ${d}`)],
      ['device_id a number', { ...good, device_id: 5 }, 'M_BAD_JSON', exactly('device_keys.device_id must be a string')],
      ['algorithms: [1]', aliceDevice.deviceKeys({ algorithms: [1] }), 'M_BAD_JSON', exactly('device_keys.algorithms must be a list of strings')],
      ['algorithms with a number', aliceDevice.deviceKeys({ algorithms: ['m.megolm.v1.aes-sha2', 1] }), 'M_BAD_JSON', exactly('device_keys.algorithms must be a list of strings')],
      ['keys not a map', { ...good, keys: 'k' }, 'M_BAD_JSON', exactly('device_keys.keys must be an object')],
      ['a key name without an algorithm', resign({ ...good, keys: { ...keys, [`:${d}`]: 'x' } }), 'M_INVALID_PARAM', exactly(`device_keys.keys[":${d}"]: key names must be "<algorithm>:${d}"`)],
      ['no ed25519 key', resign({ ...good, keys: { [`curve25519:${d}`]: keys[`curve25519:${d}`] } }), 'M_MISSING_PARAM', exactly(`device_keys.keys must include the device's "ed25519:${d}" key`)],
      ['signatures not a map', { ...good, signatures: 'signed' }, 'M_BAD_JSON', exactly('device_keys.signatures must be an object')],
      ["the user's signatures not a map", { ...good, signatures: { [a]: 'signed' } }, 'M_BAD_JSON', exactly(`device_keys.signatures["${a}"] must be an object`)],
      ['a signature not a string', { ...good, signatures: { [a]: { [`ed25519:${d}`]: 1 } } }, 'M_BAD_JSON', exactly(`device_keys.signatures["${a}"]["ed25519:${d}"] must be a string`)],
      ['signed by another user', aliceDevice.ed25519.sign(aliceDevice.unsignedDeviceKeys(), bob.userId, `ed25519:${d}`), 'M_INVALID_SIGNATURE', exactly(`device_keys must be signed by the device's own key: device_keys.signatures["${a}"]["ed25519:${d}"] is missing`)],
      ['a bad signature', { ...good, signatures: { [a]: { [`ed25519:${d}`]: 'A'.repeat(86) } } }, 'M_INVALID_SIGNATURE', /^device_keys: the signature by ed25519:\S+ does not verify; sign the object without "signatures" and "unsigned" as canonical JSON$/],
      ['a float', aliceDevice.deviceKeys({ ratio: 1.5 }), 'M_BAD_JSON', exactly('device_keys cannot be signed as canonical JSON: ratio: 1.5 is not an integer (canonical JSON allows no floats)')],
    ];
    for (const [what, deviceKeys, errcode, message] of cases) {
      const r = await upload(server, alice, { device_keys: deviceKeys });
      assert.equal(r.status, 400, `${what}: ${r.text}`);
      expectMatrixError(r, 400, errcode, message);
    }
    assert.deepEqual((await query(server, bob, { [a]: [] })).body['device_keys'], { [a]: {} }, 'no device keys stored');
  });

  test('device keys of exactly 65536 bytes are accepted, and an unsigned object the client sends is not stored', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    const base = JSON.stringify(aliceDevice.deviceKeys({ 'org.example.padding': '' })).length;
    const atLimit = aliceDevice.deviceKeys({ 'org.example.padding': 'p'.repeat(65_536 - base) });
    assert.equal(JSON.stringify(atLimit).length, 65_536);
    const r = await upload(server, alice, { device_keys: { ...atLimit, unsigned: { 'org.example.client': 'x' } } });
    assert.equal(r.status, 200, r.text);
    const stored = (((await query(server, bob, { [alice.userId]: [] })).body['device_keys'] as Json)[alice.userId] as Json)[alice.deviceId] as Json;
    assert.deepEqual(stored, { ...atLimit, unsigned: {} });
    const over = aliceDevice.deviceKeys({ 'org.example.padding': 'p'.repeat(65_537 - base) });
    expectMatrixError(await upload(server, alice, { device_keys: over }), 400, 'M_INVALID_PARAM', exactly('device_keys is larger than 65536 bytes'));
  });

  test('re-uploads: identical changes nothing, added signatures are kept, new identity keys are refused', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    const keys = aliceDevice.deviceKeys();
    assert.equal((await upload(server, alice, { device_keys: keys })).status, 200);
    const token = (await http(server.url, 'GET', `${C}/sync`, { token: alice.accessToken })).body['next_batch'] as string;

    assert.equal((await upload(server, alice, { device_keys: keys })).status, 200);
    const unchanged = await http(server.url, 'GET', `${C}/keys/changes?from=${token}&to=${(await http(server.url, 'GET', `${C}/sync`, { token: alice.accessToken })).body['next_batch']}`, { token: alice.accessToken });
    assert.deepEqual(unchanged.body['changed'], [], 'an identical re-upload records no change');

    const extra = new TestDevice(alice.userId, 'X').ed25519;
    const withMore = extra.sign(keys, alice.userId, 'ed25519:extra');
    assert.equal((await upload(server, alice, { device_keys: withMore })).status, 200);
    const q = await query(server, bob, { [alice.userId]: [alice.deviceId] });
    const stored = ((q.body['device_keys'] as Json)[alice.userId] as Json)[alice.deviceId] as Json;
    assert.deepEqual(stored['signatures'], withMore['signatures']);

    const impostor = new TestDevice(alice.userId, alice.deviceId);
    const refused = await upload(server, alice, { device_keys: impostor.deviceKeys() });
    expectMatrixError(refused, 400, 'M_INVALID_PARAM', /log in as a new device/);
    const after = await query(server, bob, { [alice.userId]: [alice.deviceId] });
    assert.deepEqual(((after.body['device_keys'] as Json)[alice.userId] as Json)[alice.deviceId], stored, 'the old identity keys stay');
  });

  test('one-time keys: the same ID and key is skipped, the same ID with another key refuses the whole upload', async () => {
    const { server, alice, aliceDevice } = await setup(backend);
    const first = aliceDevice.oneTimeKeys(5);
    const r1 = await upload(server, alice, { one_time_keys: first });
    assert.deepEqual(r1.body, { one_time_key_counts: { signed_curve25519: 5 } });

    // Same keys, signatures changed: a retry, silently skipped.
    const resigned = Object.fromEntries(Object.entries(first).map(([id, k]) => [id, new TestDevice(alice.userId, 'Z').ed25519.sign({ key: k['key'] }, alice.userId, 'ed25519:Z')]));
    const r2 = await upload(server, alice, { one_time_keys: { ...resigned, 'signed_curve25519:new': aliceDevice.oneTimeKey() } });
    assert.deepEqual(r2.body, { one_time_key_counts: { signed_curve25519: 6 } });

    const conflicting = { 'signed_curve25519:k0': aliceDevice.oneTimeKey(), 'signed_curve25519:fresh1': aliceDevice.oneTimeKey() };
    const r3 = await upload(server, alice, { device_keys: aliceDevice.deviceKeys(), one_time_keys: conflicting, fallback_keys: { 'signed_curve25519:fb': aliceDevice.fallbackKey() } });
    expectMatrixError(r3, 400, 'M_INVALID_PARAM', /signed_curve25519:k0/);
    const c = await counts(server, alice);
    assert.equal(c.device_one_time_keys_count['signed_curve25519'], 6, 'nothing from the refused upload was stored');
    assert.deepEqual(c.device_unused_fallback_key_types, []);
    const q = await query(server, alice, { [alice.userId]: [] });
    assert.deepEqual((q.body['device_keys'] as Json)[alice.userId], {});
  });

  test('one-time keys may be plain strings or key objects, and other algorithms are counted apart', async () => {
    const { server, alice, bob } = await setup(backend);
    const r = await upload(server, alice, { one_time_keys: { 'curve25519:AAAA': 'c2ltcGxlIGtleQ', 'signed_curve25519:BBBB': { key: 'b2JqZWN0IGtleQ' } } });
    assert.deepEqual(r.body, { one_time_key_counts: { signed_curve25519: 1, curve25519: 1 } });
    const c = await claim(server, bob, { [alice.userId]: { [alice.deviceId]: 'curve25519' } });
    assert.deepEqual(c.body['one_time_keys'], { [alice.userId]: { [alice.deviceId]: { 'curve25519:AAAA': 'c2ltcGxlIGtleQ' } } });
  });

  test('a device holds at most max_one_time_keys_per_device keys; an upload beyond it is refused whole', async () => {
    const { server, alice, aliceDevice } = await setup(backend, { max_one_time_keys_per_device: 10 });
    assert.equal((await upload(server, alice, { one_time_keys: aliceDevice.oneTimeKeys(8, 'a') })).status, 200);
    const r = await upload(server, alice, { one_time_keys: aliceDevice.oneTimeKeys(3, 'b') });
    expectMatrixError(r, 400, 'M_INVALID_PARAM', /at most 10/);
    assert.equal((await counts(server, alice)).device_one_time_keys_count['signed_curve25519'], 8);
    assert.equal((await upload(server, alice, { one_time_keys: aliceDevice.oneTimeKeys(2, 'c') })).status, 200);
  });

  test('fallback keys: one per algorithm, handed out when one-time keys run out, re-upload keeps "used", a new key is unused', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    const fallback = aliceDevice.fallbackKey();
    expectMatrixError(
      await upload(server, alice, { fallback_keys: { 'signed_curve25519:f1': fallback, 'signed_curve25519:f2': aliceDevice.fallbackKey() } }),
      400,
      'M_INVALID_PARAM',
      /one key per algorithm/,
    );
    assert.equal((await upload(server, alice, { fallback_keys: { 'signed_curve25519:f1': fallback }, one_time_keys: aliceDevice.oneTimeKeys(1) })).status, 200);
    assert.deepEqual((await counts(server, alice)).device_unused_fallback_key_types, ['signed_curve25519']);

    assert.equal((await claimOne(server, bob, alice))?.[0], 'signed_curve25519:k0');
    // Out of one-time keys: the fallback key, every time, marked used.
    for (let i = 0; i < 2; i++) assert.deepEqual(await claimOne(server, bob, alice), ['signed_curve25519:f1', fallback]);
    assert.deepEqual((await counts(server, alice)).device_unused_fallback_key_types, []);

    assert.equal((await upload(server, alice, { fallback_keys: { 'signed_curve25519:f1': fallback } })).status, 200);
    assert.deepEqual((await counts(server, alice)).device_unused_fallback_key_types, [], 're-uploading the same key keeps it used');

    const replacement = aliceDevice.fallbackKey();
    assert.equal((await upload(server, alice, { fallback_keys: { 'signed_curve25519:f2': replacement } })).status, 200);
    assert.deepEqual((await counts(server, alice)).device_unused_fallback_key_types, ['signed_curve25519']);
    assert.deepEqual(await claimOne(server, bob, alice), ['signed_curve25519:f2', replacement]);
  });
});

describeEachBackend('POST /keys/claim', (backend) => {
  test('hands out keys oldest upload first, each once, then the fallback key', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    const early = aliceDevice.oneTimeKeys(3, 'early');
    const late = aliceDevice.oneTimeKeys(3, 'late');
    await upload(server, alice, { one_time_keys: early });
    await upload(server, alice, { one_time_keys: late, fallback_keys: { 'signed_curve25519:fb': aliceDevice.fallbackKey() } });
    const got: string[] = [];
    for (let i = 0; i < 6; i++) {
      const [id, value] = (await claimOne(server, bob, alice))!;
      assert.deepEqual(value, { ...early, ...late }[id], 'returned exactly as uploaded');
      got.push(id);
    }
    assert.deepEqual(got.slice(0, 3).sort(), Object.keys(early).sort(), 'all keys of the earlier upload come first');
    assert.deepEqual(got.slice(3).sort(), Object.keys(late).sort());
    assert.equal((await claimOne(server, bob, alice))?.[0], 'signed_curve25519:fb');
  });

  test('unknown users and devices are simply absent; other servers are listed in failures', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    await upload(server, alice, { one_time_keys: aliceDevice.oneTimeKeys(1) });
    const r = await claim(server, bob, {
      [alice.userId]: { [alice.deviceId]: 'signed_curve25519', NOSUCHDEVICE: 'signed_curve25519' },
      '@nobody:test.local': { X: 'signed_curve25519' },
      '@carol:elsewhere.example': { Y: 'signed_curve25519' },
    });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(Object.keys(r.body['one_time_keys'] as Json), [alice.userId]);
    assert.deepEqual(Object.keys((r.body['one_time_keys'] as Record<string, Json>)[alice.userId]!), [alice.deviceId]);
    assert.deepEqual(Object.keys(r.body['failures'] as Json), ['elsewhere.example']);
  });

  test('a claim for 20 devices costs no more database statements than a claim for one', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    await upload(server, alice, { one_time_keys: aliceDevice.oneTimeKeys(1) });
    const sessions: Session[] = [];
    for (let i = 0; i < 20; i++) {
      const s = await login(server, 'bob', bob.password);
      await upload(server, s, { one_time_keys: new TestDevice(s.userId, s.deviceId).oneTimeKeys(1) });
      sessions.push(s);
    }
    // Background work (the federation sender's polling, housekeeping) would run statements of its own.
    await Promise.all([server.mx.federation.sender.stop(), server.mx.federation.maintenance.stop(), server.mx.backupPurger.stop()]);
    const statementsFor = async (body: Json) => {
      const before = server.mx.store.statementCount();
      const r = await claim(server, alice, body);
      assert.equal(r.status, 200);
      return server.mx.store.statementCount() - before;
    };
    // A claim of a device without keys first: the access token's lookup, which the uploads left
    // out of the cache, is done before the two measured claims (on PostgreSQL claims leave the
    // cache in place).
    await statementsFor({ [alice.userId]: { NO_SUCH_DEVICE: 'signed_curve25519' } });
    const one = await statementsFor({ [alice.userId]: { [alice.deviceId]: 'signed_curve25519' } });
    const many = await statementsFor({ [bob.userId]: Object.fromEntries(sessions.map((s) => [s.deviceId, 'signed_curve25519'])) });
    // (On SQLite one device's claim reads its key, then deletes it: two cheaper statements.)
    assert.ok(many <= one, `one device: ${one} statements; 20 devices: ${many}`);
    assert.ok(one <= 3, `${one} statements (token lookup, claim, fallback)`);
  });

  test('many clients claiming the same devices in different orders at once all get their keys at once, each key once', async () => {
    const { server, alice, bob } = await setup(backend);
    const devices = [alice, ...(await Promise.all([1, 2, 3, 4, 5].map(() => login(server, 'alice', alice.password))))];
    const handedOut = new Set<string>();
    for (const d of devices) {
      const keys = new TestDevice(alice.userId, d.deviceId).oneTimeKeys(350);
      assert.equal((await upload(server, d, { one_time_keys: keys })).status, 200);
    }
    const ids = devices.map((d) => d.deviceId);
    const retries = server.mx.store.retryCount();
    const statuses: number[] = [];
    await Promise.all(
      Array.from({ length: 16 }, async (_, worker) => {
        for (let i = 0; i < 20; i++) {
          const order = (worker + i) % 2 === 0 ? ids : [...ids].reverse();
          const r = await claim(server, bob, { [alice.userId]: Object.fromEntries(order.map((d) => [d, 'signed_curve25519'])) });
          statuses.push(r.status);
          for (const [device, keys] of Object.entries(((r.body['one_time_keys'] as Json | undefined)?.[alice.userId] ?? {}) as Record<string, Json>)) {
            for (const id of Object.keys(keys)) handedOut.add(`${device} ${id}`);
          }
        }
      }),
    );
    assert.deepEqual([...new Set(statuses)], [200], 'every claim succeeded');
    assert.equal(handedOut.size, 320 * 6, 'each claim got one distinct key of every device');
    assert.equal(server.mx.store.retryCount() - retries, 0, 'no claim waited for a deadlock to be detected and ran again');
  });

  test('claims running past the last one-time keys of devices named in different orders get the fallback keys, at once, without deadlocks', async () => {
    const { server, alice, bob } = await setup(backend);
    const devices = [alice, ...(await Promise.all([1, 2, 3, 4, 5].map(() => login(server, 'alice', alice.password))))];
    for (const d of devices) {
      const keys = new TestDevice(alice.userId, d.deviceId);
      assert.equal((await upload(server, d, { one_time_keys: keys.oneTimeKeys(5), fallback_keys: { 'signed_curve25519:fb': keys.fallbackKey() } })).status, 200);
    }
    const ids = devices.map((d) => d.deviceId);
    const retries = server.mx.store.retryCount();
    const oneTime = new Set<string>();
    let fallbacks = 0;
    await Promise.all(
      Array.from({ length: 16 }, async (_, worker) => {
        for (let i = 0; i < 5; i++) {
          const order = (worker + i) % 2 === 0 ? ids : [...ids].reverse();
          const r = await claim(server, bob, { [alice.userId]: Object.fromEntries(order.map((d) => [d, 'signed_curve25519'])) });
          assert.equal(r.status, 200, r.text);
          const got = ((r.body['one_time_keys'] as Json)[alice.userId] ?? {}) as Record<string, Json>;
          assert.deepEqual(Object.keys(got).sort(), [...ids].sort(), 'a key for every device');
          for (const [device, keys] of Object.entries(got)) {
            const id = Object.keys(keys)[0]!;
            if (id === 'signed_curve25519:fb') fallbacks++;
            else oneTime.add(`${device} ${id}`);
          }
        }
      }),
    );
    assert.equal(oneTime.size, 5 * 6, 'every one-time key handed out, each once');
    assert.equal(fallbacks, 16 * 5 * 6 - 5 * 6, 'the fallback key for the rest');
    assert.equal(server.mx.store.retryCount() - retries, 0, 'no claim waited for a deadlock to be detected and ran again');
    assert.deepEqual((await counts(server, alice)).device_unused_fallback_key_types, []);
  });

  test('claims racing uploads to the same device hand out each key at most once, and the count of keys left stays exact', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    await upload(server, alice, { fallback_keys: { 'signed_curve25519:fb': aliceDevice.fallbackKey() } });
    const handedOut: string[] = [];
    const uploads = Promise.all(
      Array.from({ length: 5 }, async (_, i) => {
        const r = await upload(server, alice, { one_time_keys: aliceDevice.oneTimeKeys(40, `u${i}x`) });
        assert.equal(r.status, 200, r.text);
      }),
    );
    const claims = Promise.all(
      Array.from({ length: 8 }, async () => {
        for (let i = 0; i < 15; i++) {
          const [id] = (await claimOne(server, bob, alice))!;
          if (id !== 'signed_curve25519:fb') handedOut.push(id);
        }
      }),
    );
    await Promise.all([uploads, claims]);
    assert.equal(new Set(handedOut).size, handedOut.length, 'no key was handed out twice');
    const left = (await counts(server, alice)).device_one_time_keys_count['signed_curve25519']!;
    assert.equal(left + handedOut.length, 200, `${left} left + ${handedOut.length} handed out`);
    // What is left comes out, once each, and nothing more.
    for (let i = 0; i < left; i++) handedOut.push((await claimOne(server, bob, alice))![0]);
    assert.equal(new Set(handedOut).size, 200);
    assert.equal((await claimOne(server, bob, alice))?.[0], 'signed_curve25519:fb');
  });

  test('claims racing the deletion of the device hand out each key at most once, and none after it is gone', async () => {
    const { server, alice, bob } = await setup(backend);
    const phone = await login(server, 'alice', alice.password);
    const phoneKeys = new TestDevice(alice.userId, phone.deviceId);
    await upload(server, phone, { one_time_keys: phoneKeys.oneTimeKeys(100), fallback_keys: { 'signed_curve25519:fb': phoneKeys.fallbackKey() } });
    const challenge = await http(server.url, 'DELETE', `${C}/devices/${phone.deviceId}`, { token: alice.accessToken });
    const handedOut: string[] = [];
    let deleted = false;
    const claims = Promise.all(
      Array.from({ length: 8 }, async () => {
        for (let i = 0; i < 20; i++) {
          const afterDeletion = deleted;
          const got = await claimOne(server, bob, phone);
          if (got && got[0] !== 'signed_curve25519:fb') handedOut.push(got[0]);
          if (afterDeletion) assert.equal(got, undefined, 'nothing is handed out once the deletion is answered');
        }
      }),
    );
    const del = await http(server.url, 'DELETE', `${C}/devices/${phone.deviceId}`, { token: alice.accessToken, body: { auth: passwordAuth(alice, challenge.body['session'] as string) } });
    assert.equal(del.status, 200, del.text);
    deleted = true;
    await claims;
    assert.equal(new Set(handedOut).size, handedOut.length, 'no key was handed out twice');
    assert.equal(await claimOne(server, bob, phone), undefined);
  });

  test('64 concurrent claimers against one device with N keys get exactly N distinct keys, then the fallback key', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    const n = 40;
    const uploaded = aliceDevice.oneTimeKeys(n);
    await upload(server, alice, { one_time_keys: uploaded, fallback_keys: { 'signed_curve25519:fallback': aliceDevice.fallbackKey() } });
    const results = await Promise.all(Array.from({ length: 64 }, () => claimOne(server, bob, alice)));
    const ids = results.map((r) => r?.[0]);
    const oneTime = ids.filter((id) => id !== 'signed_curve25519:fallback');
    assert.equal(oneTime.length, n, `expected ${n} one-time keys, got ${oneTime.length}`);
    assert.equal(new Set(oneTime).size, n, 'no key was handed out twice');
    assert.deepEqual(new Set(oneTime), new Set(Object.keys(uploaded)));
    assert.equal(ids.filter((id) => id === 'signed_curve25519:fallback').length, 64 - n);
    assert.equal((await counts(server, alice)).device_one_time_keys_count['signed_curve25519'], 0);
  });
});

describeEachBackend('bad input to the key endpoints', (backend) => {
  test('wrong types, missing fields, invalid IDs, non-lists and numbers for algorithms are 4xx Matrix errors that store nothing', async () => {
    const { server, alice, aliceDevice } = await setup(backend);
    const cases: [string, string, unknown][] = [
      ['POST', '/keys/upload', { device_keys: 'keys' }],
      ['POST', '/keys/upload', { one_time_keys: ['a'] }],
      ['POST', '/keys/upload', { one_time_keys: { 'signed_curve25519:a': 42 } }],
      ['POST', '/keys/upload', { one_time_keys: { 'signed_curve25519:a': { key: 42 } } }],
      ['POST', '/keys/upload', { one_time_keys: { nocolon: 'abc' } }],
      ['POST', '/keys/upload', { one_time_keys: { 'signed_curve25519:': 'abc' } }],
      ['POST', '/keys/upload', { fallback_keys: { 'signed_curve25519:f': { key: 'x', signatures: 'sig' } } }],
      ['POST', '/keys/upload', [1]],
      ['POST', '/keys/query', {}],
      ['POST', '/keys/query', { device_keys: { [alice.userId]: 'all' } }],
      ['POST', '/keys/query', { device_keys: { [alice.userId]: [1] } }],
      ['POST', '/keys/query', { device_keys: { 'not-a-user-id': [] } }],
      ['POST', '/keys/query', { device_keys: {}, timeout: 'soon' }],
      ['POST', '/keys/claim', {}],
      ['POST', '/keys/claim', { one_time_keys: { [alice.userId]: { [alice.deviceId]: 1 } } }],
      ['POST', '/keys/claim', { one_time_keys: { [alice.userId]: [alice.deviceId] } }],
      ['POST', '/keys/claim', { one_time_keys: { 'alice-without-sigil': { X: 'signed_curve25519' } } }],
      ['POST', '/keys/claim', { one_time_keys: { '@nocolon': { X: 'signed_curve25519' } } }],
      ['GET', '/keys/changes', undefined],
      ['GET', '/keys/changes?from=garbage&to=s1', undefined],
      ['POST', '/keys/device_signing/upload', { master_key: 'key' }],
      ['POST', '/keys/signatures/upload', { 'not-a-user': {} }],
      ['POST', '/keys/signatures/upload', { [alice.userId]: 'x' }],
    ];
    for (const [method, path, body] of cases) {
      const r = await http(server.url, method, `${C}${path}`, { token: alice.accessToken, ...(body !== undefined ? { body } : {}) });
      assert.ok(r.status >= 400 && r.status < 500, `${method} ${path} ${JSON.stringify(body)} → ${r.status} ${r.text}`);
      assert.equal(typeof r.body['errcode'], 'string', `${method} ${path} ${JSON.stringify(body)} → ${r.text}`);
    }
    const c = await counts(server, alice);
    assert.deepEqual(c.device_one_time_keys_count, { signed_curve25519: 0 });
    assert.deepEqual(c.device_unused_fallback_key_types, []);
    // The device still works normally afterwards.
    assert.equal((await upload(server, alice, { device_keys: aliceDevice.deviceKeys() })).status, 200);
  });

  test('one-time keys must be small canonical JSON with printable key IDs; device keys have a size cap; claims need valid IDs', async () => {
    const { server, alice, bob, aliceDevice } = await setup(backend);
    const cases: [string, unknown, string, RegExp][] = [
      ['/keys/upload', { one_time_keys: { 'signed_curve25519:a b': aliceDevice.oneTimeKey() } }, 'M_INVALID_PARAM', /printable ASCII/],
      ['/keys/upload', { one_time_keys: { [`signed_curve25519:${'k'.repeat(256)}`]: aliceDevice.oneTimeKey() } }, 'M_INVALID_PARAM', /1–255/],
      ['/keys/upload', { one_time_keys: { 'signed_curve25519:big': { key: 'x'.repeat(5000) } } }, 'M_INVALID_PARAM', /larger than 4096/],
      ['/keys/upload', { fallback_keys: { 'signed_curve25519:float': { key: 'abc', weight: 0.5 } } }, 'M_BAD_JSON', /canonical/i],
      ['/keys/upload', { device_keys: aliceDevice.deviceKeys({ padding: 'p'.repeat(70_000) }) }, 'M_INVALID_PARAM', /larger than 65536/],
      ['/keys/claim', { one_time_keys: { [alice.userId]: { 'DEVICE WITH SPACES': 'signed_curve25519' } } }, 'M_INVALID_PARAM', /not a valid device ID/],
      ['/keys/claim', { one_time_keys: { [alice.userId]: { [alice.deviceId]: 'a'.repeat(300) } } }, 'M_INVALID_PARAM', /not a valid algorithm/],
    ];
    for (const [path, body, errcode, message] of cases) {
      expectMatrixError(await http(server.url, 'POST', `${C}${path}`, { token: alice.accessToken, body }), 400, errcode, message);
    }
    const c = await counts(server, alice);
    assert.deepEqual(c.device_one_time_keys_count, { signed_curve25519: 0 }, 'no one-time key stored');
    assert.deepEqual(c.device_unused_fallback_key_types, [], 'no fallback key stored');
    assert.deepEqual((await query(server, bob, { [alice.userId]: [] })).body['device_keys'], { [alice.userId]: {} }, 'no device keys stored');
  });

  test('one-time and fallback keys: null means none, names need an algorithm and an ID, a key object needs a string key and at most 4096 bytes', async () => {
    const { server, alice, aliceDevice } = await setup(backend);
    assert.equal((await upload(server, alice, { device_keys: aliceDevice.deviceKeys(), one_time_keys: null, fallback_keys: null })).status, 200);
    const signed = aliceDevice.oneTimeKey();
    const a = alice.userId;
    const cases: [string, Json, string, RegExp][] = [
      ['no algorithm', { one_time_keys: { ':AAAA': signed } }, 'M_INVALID_PARAM', exactly('one_time_keys[":AAAA"]: key names must be "<algorithm>:<key_id>", each part 1–255 printable ASCII characters')],
      ['an algorithm with a space', { fallback_keys: { 'signed curve25519:AAAA': signed } }, 'M_INVALID_PARAM', /^fallback_keys\["signed curve25519:AAAA"\]: key names must be/],
      ['a number', { one_time_keys: { 'signed_curve25519:AAAA': 42 } }, 'M_BAD_JSON', exactly('one_time_keys["signed_curve25519:AAAA"] must be a key string or a key object')],
      ['a key object without a string key', { one_time_keys: { 'signed_curve25519:AAAA': { key: 42 } } }, 'M_BAD_JSON', exactly('one_time_keys["signed_curve25519:AAAA"].key must be a string')],
      ['signatures not a map', { fallback_keys: { 'signed_curve25519:AAAA': { key: 'k', signatures: 'sig' } } }, 'M_BAD_JSON', exactly('fallback_keys["signed_curve25519:AAAA"].signatures must be an object')],
      ['a float', { one_time_keys: { 'signed_curve25519:AAAA': { key: 'k', n: 0.5 } } }, 'M_BAD_JSON', /^one_time_keys\["signed_curve25519:AAAA"\] cannot be encoded as canonical JSON: n: 0\.5 is not an integer/],
      ['4097 bytes', { one_time_keys: { 'signed_curve25519:AAAA': { key: 'x'.repeat(4087) } } }, 'M_INVALID_PARAM', exactly('one_time_keys["signed_curve25519:AAAA"] is larger than 4096 bytes')],
    ];
    for (const [what, body, errcode, message] of cases) {
      const r = await upload(server, alice, body);
      assert.equal(r.status, 400, `${what}: ${r.text}`);
      expectMatrixError(r, 400, errcode, message);
    }
    assert.deepEqual((await counts(server, alice)).device_one_time_keys_count, { signed_curve25519: 0 }, 'nothing was stored');

    // 4096 bytes exactly (10 for {"key":""}), a plain string key, and a signed key object are accepted and come back as sent.
    const atLimit = { key: 'x'.repeat(4086) };
    assert.equal(JSON.stringify(atLimit).length, 4096);
    const r = await upload(server, alice, { one_time_keys: { 'signed_curve25519:big': atLimit, 'curve25519:plain': 'cGxhaW4', 'signed_curve25519:sig': signed } });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.body['one_time_key_counts'], { signed_curve25519: 2, curve25519: 1 });
    const claimed = await claim(server, alice, { [a]: { [alice.deviceId]: 'curve25519' } });
    assert.deepEqual(((claimed.body['one_time_keys'] as Json)[a] as Json)[alice.deviceId], { 'curve25519:plain': 'cGxhaW4' });
  });

  test('a query or claim timeout must be a non-negative integer of milliseconds', async () => {
    const { server, alice } = await setup(backend);
    const bodies = { '/keys/query': { device_keys: { [alice.userId]: [] } }, '/keys/claim': { one_time_keys: {} } };
    for (const [path, body] of Object.entries(bodies)) {
      for (const timeout of [0, 10_000]) {
        const r = await http(server.url, 'POST', `${C}${path}`, { token: alice.accessToken, body: { ...body, timeout } });
        assert.equal(r.status, 200, `${path} timeout ${timeout}: ${r.text}`);
      }
      for (const timeout of [-1, 1.5, '10', 2 ** 53]) {
        const r = await http(server.url, 'POST', `${C}${path}`, { token: alice.accessToken, body: { ...body, timeout } });
        expectMatrixError(r, 400, 'M_BAD_JSON', exactly('timeout must be a non-negative integer (milliseconds)'));
      }
      const missing = await http(server.url, 'POST', `${C}${path}`, { token: alice.accessToken, body: { timeout: 0 } });
      expectMatrixError(missing, 400, 'M_MISSING_PARAM', exactly(`the request body is missing the required field "${Object.keys(body)[0]}"`));
    }
  });

  test('key endpoints need an access token', async () => {
    const { server } = await setup(backend);
    for (const path of ['/keys/upload', '/keys/query', '/keys/claim', '/keys/device_signing/upload', '/keys/signatures/upload']) {
      expectMatrixError(await http(server.url, 'POST', `${C}${path}`, { body: {} }), 401, 'M_MISSING_TOKEN');
    }
  });
});
