import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { login, passwordAuth, registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { TestCrossSigning, TestDevice } from '../support/keys.js';

const C = '/_matrix/client/v3';
type Json = Record<string, unknown>;

interface Device {
  readonly session: Session;
  readonly keys: TestDevice;
  /** The device keys as uploaded. */
  uploaded: Json;
  displayName: string | null;
}

interface User {
  readonly userId: string;
  readonly devices: Device[];
  readonly cs: TestCrossSigning;
  /** Signatures on the master key: by signer user ID, the signed master key as that signer uploaded it. */
  readonly masterSignedBy: Map<string, Json>;
}

const post = async (s: TestServer, who: Session, path: string, body: unknown) => {
  const r = await http(s.url, 'POST', `${C}${path}`, { token: who.accessToken, body });
  assert.equal(r.status, 200, `${path}: ${r.text}`);
  return r;
};
const sskId = (u: User) => `ed25519:${u.cs.selfSigning.publicKey}`;

/**
 * `n` users with three devices each (some named), all three cross-signing keys, the self-signing
 * key's signature on every device, and device keys whose fields come in an order of their own.
 */
async function makeUsers(s: TestServer, n: number): Promise<User[]> {
  const users: User[] = [];
  for (let i = 0; i < n; i++) {
    const name = `user${String(i).padStart(2, '0')}`;
    const first = await registerUser(s, name);
    const sessions = [first, await login(s, name, first.password, { initial_device_display_name: `phone ${i}` }), await login(s, name, first.password)];
    const devices: Device[] = [];
    for (const [j, session] of sessions.entries()) {
      const keys = new TestDevice(session.userId, session.deviceId);
      // A field of the client's own, first: the order must survive too.
      const uploaded = j === 2 ? keys.ed25519.sign({ 'org.example.first': [i, 'x', null], ...keys.unsignedDeviceKeys() }, session.userId, `ed25519:${session.deviceId}`) : keys.deviceKeys();
      await post(s, session, '/keys/upload', { device_keys: uploaded });
      devices.push({ session, keys, uploaded, displayName: j === 1 ? `phone ${i}` : null });
    }
    const cs = new TestCrossSigning(first.userId);
    await post(s, first, '/keys/device_signing/upload', cs.upload());
    const user: User = { userId: first.userId, devices, cs, masterSignedBy: new Map() };
    const signed = Object.fromEntries(devices.map((d) => [d.session.deviceId, cs.selfSigning.sign(d.uploaded, user.userId, sskId(user))]));
    await post(s, first, '/keys/signatures/upload', { [user.userId]: signed });
    users.push(user);
  }
  return users;
}

/** `signer` (the first user) signs the master keys of `targets` with their user-signing key. */
async function signMasters(s: TestServer, signer: User, targets: readonly User[]): Promise<void> {
  const body: Record<string, Json> = {};
  for (const t of targets) {
    const signed = signer.cs.userSigning.sign(t.cs.masterKey(), signer.userId, `ed25519:${signer.cs.userSigning.publicKey}`);
    t.masterSignedBy.set(signer.userId, signed);
    body[t.userId] = { [t.cs.master.publicKey]: signed };
  }
  const r = await post(s, signer.devices[0]!.session, '/keys/signatures/upload', body);
  assert.deepEqual(r.body, { failures: {} });
}

/** What `viewer` (a user ID, or null for another server) must get for a device: as uploaded, the self-signing signature merged in, then `unsigned`. */
function expectedDevice(u: User, d: Device, displayNames: boolean): Json {
  const signed = u.cs.selfSigning.sign(d.uploaded, u.userId, sskId(u));
  return { ...signed, unsigned: displayNames && d.displayName !== null ? { device_display_name: d.displayName } : {} };
}

function expectedMaster(u: User, viewer: string | null): Json {
  const bySigner = viewer === null ? undefined : u.masterSignedBy.get(viewer);
  return bySigner ?? u.cs.masterKey();
}

/** Checks a whole answer: every device byte for byte (its text is in the answer), cross-signing keys by value. */
function checkAnswer(text: string, users: readonly User[], viewer: string | null, extra: readonly string[], opts: { displayNames: boolean; clientApi: boolean }): void {
  const body = JSON.parse(text) as Record<string, Record<string, Json>>;
  assert.deepEqual(Object.keys(body['device_keys']!), [...users.map((u) => u.userId), ...extra], 'every user named, in the order asked');
  for (const x of extra) assert.deepEqual(body['device_keys']![x], {});
  for (const u of users) {
    const got = body['device_keys']![u.userId]!;
    assert.deepEqual(Object.keys(got).sort(), u.devices.map((d) => d.session.deviceId).sort(), `${u.userId}'s devices`);
    for (const d of u.devices) {
      const want = expectedDevice(u, d, opts.displayNames);
      assert.ok(text.includes(`${JSON.stringify(d.session.deviceId)}:${JSON.stringify(want)}`), `${u.userId} ${d.session.deviceId} comes back exactly as uploaded plus signature and unsigned:\n${JSON.stringify(got[d.session.deviceId])}\n${JSON.stringify(want)}`);
    }
    assert.deepEqual(body['master_keys']![u.userId], expectedMaster(u, viewer), `${u.userId}'s master key as ${viewer} sees it`);
    assert.deepEqual(body['self_signing_keys']![u.userId], u.cs.selfSigningKey());
  }
  if (opts.clientApi) {
    const own = users.find((u) => u.userId === viewer);
    assert.deepEqual(body['user_signing_keys'], own ? { [own.userId]: own.cs.userSigningKey() } : {}, 'only the viewer\'s own user-signing key');
    assert.deepEqual(body['failures'], {});
  } else assert.equal(body['user_signing_keys'], undefined);
}

describeEachBackend('key queries naming many users at once', (backend) => {
  const start = () => startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });
  const clientQuery = (s: TestServer, who: Session, users: readonly string[]) =>
    http(s.url, 'POST', `${C}/keys/query`, { token: who.accessToken, body: { device_keys: Object.fromEntries(users.map((u) => [u, []])) } });

  test('24 users × 3 devices come back exactly as uploaded, with the signatures each viewer may see, asked again and again by different viewers', async () => {
    const s = await start();
    const users = await makeUsers(s, 24);
    const [alice, bob] = users as [User, User];
    await signMasters(s, alice, users.slice(1, 8));
    const ids = users.map((u) => u.userId);
    // Each viewer in turn, several times (answers and their parts are kept between requests),
    // each time with a user no request named before.
    for (let round = 0; round < 3; round++) {
      for (const viewer of [alice, bob]) {
        const r = await clientQuery(s, viewer.devices[0]!.session, [...ids, `@nobody${round}:test.local`]);
        assert.equal(r.status, 200, r.text);
        checkAnswer(r.text, users, viewer.userId, [`@nobody${round}:test.local`], { displayNames: true, clientApi: true });
      }
      const fromServer = String(await s.mx.keys.query(null, { device_keys: Object.fromEntries(ids.map((u) => [u, []])) }, { displayNames: false, clientApi: false }));
      checkAnswer(fromServer, users, null, [], { displayNames: false, clientApi: false });
    }
    // Named devices only, for some users.
    const some = users.slice(0, 5);
    const r = await http(s.url, 'POST', `${C}/keys/query`, {
      token: alice.devices[0]!.session.accessToken,
      body: { device_keys: Object.fromEntries(some.map((u) => [u.userId, [u.devices[1]!.session.deviceId, 'NOSUCHDEVICE']])) },
    });
    for (const u of some) {
      const got = ((r.body['device_keys'] as Json)[u.userId] as Json);
      assert.deepEqual(got, { [u.devices[1]!.session.deviceId]: expectedDevice(u, u.devices[1]!, true) });
      assert.deepEqual((r.body['master_keys'] as Json)[u.userId], expectedMaster(u, alice.userId));
    }
  });

  test('answers follow every change at once: signatures, display names, new and deleted devices', async () => {
    const s = await start();
    const users = await makeUsers(s, 8);
    const [alice, bob, carol, dave, erin] = users as [User, User, User, User, User];
    const ids = users.map((u) => u.userId);
    const check = async (viewer: User) => {
      const r = await clientQuery(s, viewer.devices[0]!.session, ids);
      assert.equal(r.status, 200, r.text);
      checkAnswer(r.text, users, viewer.userId, [], { displayNames: true, clientApi: true });
    };
    await check(alice);
    await check(bob);

    await signMasters(s, alice, [bob]);
    await check(alice);
    await check(bob);

    const renamed = carol.devices[2]!;
    const put = await http(s.url, 'PUT', `${C}/devices/${renamed.session.deviceId}`, { token: renamed.session.accessToken, body: { display_name: 'tablet' } });
    assert.equal(put.status, 200, put.text);
    renamed.displayName = 'tablet';
    await check(alice);

    const extra = await login(s, 'user03', dave.devices[0]!.session.password);
    const extraKeys = new TestDevice(extra.userId, extra.deviceId);
    await post(s, extra, '/keys/upload', { device_keys: extraKeys.deviceKeys() });
    // Not yet signed by the self-signing key: it comes back with its own signature only.
    const fresh: Device = { session: extra, keys: extraKeys, uploaded: extraKeys.deviceKeys(), displayName: null };
    const r1 = await clientQuery(s, alice.devices[0]!.session, [dave.userId]);
    assert.deepEqual(((r1.body['device_keys'] as Json)[dave.userId] as Json)[extra.deviceId], { ...fresh.uploaded, unsigned: {} });
    await post(s, extra, '/keys/signatures/upload', { [dave.userId]: { [extra.deviceId]: dave.cs.selfSigning.sign(fresh.uploaded, dave.userId, sskId(dave)) } });
    dave.devices.push(fresh);
    await check(alice);

    const gone = erin.devices.pop()!;
    const challenge = await http(s.url, 'DELETE', `${C}/devices/${gone.session.deviceId}`, { token: erin.devices[0]!.session.accessToken });
    const del = await http(s.url, 'DELETE', `${C}/devices/${gone.session.deviceId}`, {
      token: erin.devices[0]!.session.accessToken,
      body: { auth: passwordAuth(erin.devices[0]!.session, challenge.body['session'] as string) },
    });
    assert.equal(del.status, 200, del.text);
    await check(alice);
    await check(bob);
  });

  test('a query naming many users reads the database in one statement; a claim for many devices is one statement on PostgreSQL, two on SQLite', async () => {
    const s = await start();
    const users = await makeUsers(s, 6);
    const [alice] = users as [User];
    // Background work (the federation sender's polling, housekeeping) would run statements of its own.
    await Promise.all([s.mx.federation.sender.stop(), s.mx.federation.maintenance.stop(), s.mx.backupPurger.stop()]);
    const viewer = { userId: alice.userId };
    const everyone = Object.fromEntries(users.map((u) => [u.userId, []]));
    const statementsOf = async (f: () => Promise<unknown>) => {
      const before = s.mx.store.statementCount();
      await f();
      return s.mx.store.statementCount() - before;
    };
    const options = { displayNames: true, clientApi: true };
    await s.mx.keys.query(viewer, { device_keys: everyone }, options); // the viewer now tracks them all
    for (let i = 0; i < 3; i++) {
      // A user no request named before: at least that user is read, in the same one statement.
      const n = await statementsOf(() => s.mx.keys.query(viewer, { device_keys: { ...everyone, [`@nobody${i}:test.local`]: [] } }, options));
      assert.equal(n, 1, `query ${i}: ${n} statements`);
    }

    // One-time keys on the first device of each user, only a fallback key on the second.
    const wanted: Record<string, Json> = {};
    for (const u of users) {
      const [withKeys, withFallback] = u.devices as [Device, Device];
      await post(s, withKeys.session, '/keys/upload', { one_time_keys: withKeys.keys.oneTimeKeys(2) });
      await post(s, withFallback.session, '/keys/upload', { fallback_keys: { 'signed_curve25519:fb': withFallback.keys.fallbackKey() } });
      wanted[u.userId] = { [withKeys.session.deviceId]: 'signed_curve25519', [withFallback.session.deviceId]: 'signed_curve25519' };
    }
    let answer = '';
    const n = await statementsOf(async () => (answer = await s.mx.keys.claim({ one_time_keys: wanted }, false)));
    assert.equal(n, backend.name === 'postgres' ? 1 : 2, `${n} statements`);
    const got = JSON.parse(answer) as { one_time_keys: Record<string, Record<string, Json>> };
    for (const u of users) {
      const [withKeys, withFallback] = u.devices as [Device, Device];
      assert.match(Object.keys(got.one_time_keys[u.userId]![withKeys.session.deviceId]!)[0]!, /^signed_curve25519:k[01]$/);
      assert.deepEqual(Object.keys(got.one_time_keys[u.userId]![withFallback.session.deviceId]!), ['signed_curve25519:fb']);
    }
  });
});
