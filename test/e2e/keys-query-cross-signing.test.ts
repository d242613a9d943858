import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { exactly, login, passwordAuth, registerUser, SHARED_SECRET, type Session, expectMatrixError } from '../support/client.js';
import { TestCrossSigning, TestDevice } from '../support/keys.js';

const C = '/_matrix/client/v3';
type Json = Record<string, unknown>;


interface User {
  readonly session: Session;
  readonly device: TestDevice;
  readonly cs: TestCrossSigning;
}

async function user(server: TestServer, name: string): Promise<User> {
  const session = await registerUser(server, name);
  const device = new TestDevice(session.userId, session.deviceId);
  const r = await http(server.url, 'POST', `${C}/keys/upload`, { token: session.accessToken, body: { device_keys: device.deviceKeys() } });
  assert.equal(r.status, 200, r.text);
  return { session, device, cs: new TestCrossSigning(session.userId) };
}

const post = (s: TestServer, who: Session, path: string, body: unknown) => http(s.url, 'POST', `${C}${path}`, { token: who.accessToken, body });
const query = (s: TestServer, who: Session, deviceKeys: Json) => post(s, who, '/keys/query', { device_keys: deviceKeys });
const uploadCrossSigning = async (s: TestServer, u: User, body: Json = u.cs.upload()) => {
  const r = await post(s, u.session, '/keys/device_signing/upload', body);
  assert.equal(r.status, 200, r.text);
};
/** Asserts that a /keys/signatures/upload answer lists exactly this failure for the item. */
function expectFailure(r: { status: number; body: Json; text: string }, userId: string, keyId: string, errcode: string, message: RegExp, what = ''): void {
  assert.equal(r.status, 200, r.text);
  const f = (r.body['failures'] as Record<string, Record<string, Json>>)[userId]?.[keyId];
  assert.equal(f?.['errcode'], errcode, `${what} ${r.text}`);
  assert.match(String(f['error']), message, what);
}
/** New users, each with devices keys and all three cross-signing keys uploaded. */
const usersWithCrossSigning = async (s: TestServer, ...names: string[]): Promise<[User, User]> => {
  const users: User[] = [];
  for (const name of names) {
    const u = await user(s, name);
    await uploadCrossSigning(s, u);
    users.push(u);
  }
  return users as [User, User];
};

/** Uploads cross-signing keys through user-interactive auth (a replacement needs it). */
const uploadWithAuth = async (s: TestServer, u: User, body: Json) => {
  const challenge = await post(s, u.session, '/keys/device_signing/upload', body);
  assert.equal(challenge.status, 401, challenge.text);
  const done = await post(s, u.session, '/keys/device_signing/upload', { ...body, auth: passwordAuth(u.session, challenge.body['session'] as string) });
  assert.equal(done.status, 200, done.text);
};
const nextBatch = async (s: TestServer, who: Session) => (await http(s.url, 'GET', `${C}/sync`, { token: who.accessToken })).body['next_batch'] as string;

describeEachBackend('POST /keys/query', (backend) => {
  const start = () => startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });

  test('returns all devices for an empty list, only the named ones otherwise, and {} for users with nothing', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const second = await login(server, 'alice', alice.session.password, { initial_device_display_name: 'Second' });
    const secondDevice = new TestDevice(alice.session.userId, second.deviceId);
    await post(server, second, '/keys/upload', { device_keys: secondDevice.deviceKeys() });
    await login(server, 'alice', alice.session.password); // a device without keys is not listed
    const bob = await user(server, 'bob');

    const all = await query(server, bob.session, { [alice.session.userId]: [], '@nobody:test.local': [] });
    assert.deepEqual(Object.keys((all.body['device_keys'] as Record<string, Json>)[alice.session.userId]!).sort(), [alice.session.deviceId, second.deviceId].sort());
    assert.deepEqual((all.body['device_keys'] as Json)['@nobody:test.local'], {});
    const named = await query(server, bob.session, { [alice.session.userId]: [second.deviceId, 'NOSUCH'] });
    const only = (named.body['device_keys'] as Record<string, Json>)[alice.session.userId]!;
    assert.deepEqual(Object.keys(only), [second.deviceId]);
    assert.deepEqual((only[second.deviceId] as Json)['unsigned'], { device_display_name: 'Second' });
  });

  test('master and self-signing keys come back for every queried user, the user-signing key only to its owner', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const bob = await user(server, 'bob');
    await uploadCrossSigning(server, alice);
    const byBob = await query(server, bob.session, { [alice.session.userId]: [] });
    assert.deepEqual((byBob.body['master_keys'] as Json)[alice.session.userId], alice.cs.masterKey());
    assert.deepEqual((byBob.body['self_signing_keys'] as Json)[alice.session.userId], alice.cs.selfSigningKey());
    assert.deepEqual(byBob.body['user_signing_keys'], {});
    const byAlice = await query(server, alice.session, { [alice.session.userId]: [] });
    assert.deepEqual((byAlice.body['user_signing_keys'] as Json)[alice.session.userId], alice.cs.userSigningKey());
    // The same question again, in turn, with nothing changed in between: each still gets their own answer.
    for (let i = 0; i < 2; i++) {
      const again = await query(server, alice.session, { [alice.session.userId]: [] });
      assert.deepEqual((again.body['user_signing_keys'] as Json)[alice.session.userId], alice.cs.userSigningKey());
      assert.deepEqual((await query(server, bob.session, { [alice.session.userId]: [] })).body['user_signing_keys'], {}, 'not the answer alice got');
    }
  });

  test('users on other servers are reported in failures', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const r = await query(server, alice.session, { '@carol:elsewhere.example': [], [alice.session.userId]: [] });
    assert.equal(r.status, 200);
    assert.deepEqual(Object.keys(r.body['failures'] as Json), ['elsewhere.example']);
    assert.equal((r.body['device_keys'] as Json)['@carol:elsewhere.example'], undefined);
  });
});

describeEachBackend('POST /keys/device_signing/upload', (backend) => {
  const start = () => startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });

  test('checks user, usage, the single key, and that the self- and user-signing keys are signed by the master key', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const bob = await user(server, 'bob');
    const cs = alice.cs;
    const bad: [Json, number, string][] = [
      [{ master_key: { ...cs.masterKey(), user_id: bob.session.userId } }, 400, 'M_INVALID_PARAM'],
      [{ master_key: { ...cs.masterKey(), usage: ['self_signing'] } }, 400, 'M_INVALID_PARAM'],
      [{ master_key: { ...cs.masterKey(), keys: { ...(cs.masterKey()['keys'] as Json), 'ed25519:other': 'other' } } }, 400, 'M_INVALID_PARAM'],
      [{ master_key: { ...cs.masterKey(), keys: { 'ed25519:abc': 'def' } } }, 400, 'M_INVALID_PARAM'],
      [{ master_key: cs.masterKey(), self_signing_key: { ...cs.selfSigningKey(), signatures: {} } }, 400, 'M_INVALID_SIGNATURE'],
      [{ master_key: cs.masterKey(), user_signing_key: new TestCrossSigning(alice.session.userId).userSigningKey() }, 400, 'M_INVALID_SIGNATURE'],
      [{ self_signing_key: cs.selfSigningKey() }, 400, 'M_MISSING_PARAM'],
      [{ master_key: { ...cs.masterKey(), 'org.example.weight': 0.5 } }, 400, 'M_BAD_JSON'],
    ];
    for (const [body, status, errcode] of bad) expectMatrixError(await post(server, alice.session, '/keys/device_signing/upload', body), status, errcode);
    const q = await query(server, bob.session, { [alice.session.userId]: [] });
    assert.deepEqual(q.body['master_keys'], {}, 'nothing was stored');
    await uploadCrossSigning(server, alice);
  });

  test('each field of a cross-signing key is checked and named in the error: types, the key ID naming its own public key, signatures, size', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const bob = await user(server, 'bob');
    const a = alice.session.userId;
    const master = alice.cs.masterKey();
    const pub = alice.cs.master.publicKey;
    const otherPub = alice.cs.selfSigning.publicKey;
    const keyShape = exactly('master_key.keys must be {"ed25519:<public key>": "<public key>"} with an unpadded base64 Ed25519 public key');
    const cases: [string, Json, string, RegExp][] = [
      ['not an object', { master_key: [master] }, 'M_BAD_JSON', exactly('master_key must be an object')],
      ['user_id missing', { master_key: { ...master, user_id: undefined } }, 'M_MISSING_PARAM', exactly('master_key.user_id is required')],
      ['usage missing', { master_key: { ...master, usage: undefined } }, 'M_MISSING_PARAM', exactly('master_key.usage is required')],
      ['keys missing', { master_key: { ...master, keys: undefined } }, 'M_MISSING_PARAM', exactly('master_key.keys is required')],
      ['user_id a number', { master_key: { ...master, user_id: 5 } }, 'M_BAD_JSON', exactly('master_key.user_id must be a string')],
      ["bob's user_id", { master_key: { ...master, user_id: bob.session.userId } }, 'M_INVALID_PARAM', exactly(`master_key.user_id is ${bob.session.userId}, but you are logged in as ${a}`)],
      ['usage a string', { master_key: { ...master, usage: 'master' } }, 'M_BAD_JSON', exactly('master_key.usage must be a list of strings')],
      ['usage with a number', { master_key: { ...master, usage: ['master', 1] } }, 'M_BAD_JSON', exactly('master_key.usage must be a list of strings')],
      ['usage without its type', { master_key: { ...master, usage: ['user_signing'] } }, 'M_INVALID_PARAM', exactly('master_key.usage must contain "master"')],
      ['keys not a map of strings', { master_key: { ...master, keys: { [`ed25519:${pub}`]: 5 } } }, 'M_BAD_JSON', exactly(`master_key.keys["ed25519:${pub}"] must be a string`)],
      ['no key', { master_key: { ...master, keys: {} } }, 'M_INVALID_PARAM', exactly('master_key.keys must have exactly one entry, found 0')],
      ['two keys', { master_key: { ...master, keys: { [`ed25519:${pub}`]: pub, [`ed25519:${otherPub}`]: otherPub } } }, 'M_INVALID_PARAM', exactly('master_key.keys must have exactly one entry, found 2')],
      ['key ID naming a different public key', { master_key: { ...master, keys: { [`ed25519:${otherPub}`]: pub } } }, 'M_INVALID_PARAM', keyShape],
      ['not ed25519', { master_key: { ...master, keys: { [`curve25519:${pub}`]: pub } } }, 'M_INVALID_PARAM', keyShape],
      ['public key not 32 bytes', { master_key: { ...master, keys: { 'ed25519:AAAA': 'AAAA' } } }, 'M_INVALID_PARAM', keyShape],
      ['signatures not a map', { master_key: { ...master, signatures: 'signed' } }, 'M_BAD_JSON', exactly('master_key.signatures must be an object')],
      ["a user's signatures not a map", { master_key: { ...master, signatures: { [a]: 'signed' } } }, 'M_BAD_JSON', exactly(`master_key.signatures["${a}"] must be an object`)],
      ['a signature not a string', { master_key: { ...master, signatures: { [a]: { [`ed25519:${pub}`]: 1 } } } }, 'M_BAD_JSON', exactly(`master_key.signatures["${a}"]["ed25519:${pub}"] must be a string`)],
      ['over 64 KiB', { master_key: { ...master, 'org.example.padding': 'p'.repeat(70_000) } }, 'M_INVALID_PARAM', exactly('master_key is larger than 65536 bytes')],
      ['the self-signing key invalid', { master_key: master, self_signing_key: { ...alice.cs.selfSigningKey(), usage: 'self_signing' } }, 'M_BAD_JSON', exactly('self_signing_key.usage must be a list of strings')],
      ['the user-signing key invalid', { master_key: master, user_signing_key: { ...alice.cs.userSigningKey(), keys: {} } }, 'M_INVALID_PARAM', exactly('user_signing_key.keys must have exactly one entry, found 0')],
    ];
    for (const [what, body, errcode, message] of cases) {
      const r = await post(server, alice.session, '/keys/device_signing/upload', body);
      assert.equal(r.status, 400, `${what}: ${r.text}`);
      expectMatrixError(r, 400, errcode, message);
    }
    assert.deepEqual((await query(server, bob.session, { [a]: [] })).body['master_keys'], {}, 'nothing was stored');

    // Exactly 64 KiB of JSON is accepted; an `unsigned` object the client sends is not stored.
    const base = JSON.stringify({ ...master, 'org.example.padding': '' }).length;
    const atLimit = { ...master, 'org.example.padding': 'p'.repeat(65_536 - base) };
    assert.equal(JSON.stringify(atLimit).length, 65_536);
    await uploadCrossSigning(server, alice, { master_key: { ...atLimit, unsigned: { 'org.example.client': 'x' } } });
    assert.deepEqual(((await query(server, bob.session, { [a]: [] })).body['master_keys'] as Json)[a], atLimit);
  });

  test('a key whose public key is one of the user\'s device IDs is refused with 403, and such a device ID cannot be taken later', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const cs = alice.cs;
    await login(server, 'alice', alice.session.password, { device_id: cs.master.publicKey });
    expectMatrixError(await post(server, alice.session, '/keys/device_signing/upload', cs.upload()), 403, 'M_FORBIDDEN', exactly('The public key of the master key is the ID of one of your devices; generate a new key'));

    const carol = await user(server, 'carol');
    await uploadCrossSigning(server, carol);
    const r = await http(server.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'carol', password: carol.session.password, device_id: carol.cs.selfSigning.publicKey } });
    expectMatrixError(r, 400, 'M_INVALID_PARAM', /cross-signing/);
  });

  test('user-interactive auth is needed to replace keys, but not for the first upload or an exact repeat', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const first = alice.cs.upload();
    await uploadCrossSigning(server, alice, first);
    await uploadCrossSigning(server, alice, first); // a repeat, e.g. after a lost response
    await uploadCrossSigning(server, alice, { master_key: first['master_key'] as Json });

    const replacement = new TestCrossSigning(alice.session.userId);
    const challenge = await post(server, alice.session, '/keys/device_signing/upload', replacement.upload());
    assert.equal(challenge.status, 401, challenge.text);
    assert.deepEqual(challenge.body['flows'], [{ stages: ['m.login.password'] }]);
    const stillOld = await query(server, alice.session, { [alice.session.userId]: [] });
    assert.deepEqual((stillOld.body['master_keys'] as Json)[alice.session.userId], first['master_key']);

    const done = await post(server, alice.session, '/keys/device_signing/upload', { ...replacement.upload(), auth: passwordAuth(alice.session, challenge.body['session'] as string) });
    assert.equal(done.status, 200, done.text);
    const now = await query(server, alice.session, { [alice.session.userId]: [] });
    assert.deepEqual((now.body['master_keys'] as Json)[alice.session.userId], replacement.masterKey());
    assert.deepEqual((now.body['user_signing_keys'] as Json)[alice.session.userId], replacement.userSigningKey());
  });

  test('null keys count as absent, and the errors name the key that lacks a master key or its signature', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const bob = await user(server, 'bob');
    const a = alice.session.userId;
    const cs = alice.cs;
    const upload = (body: Json) => post(server, alice.session, '/keys/device_signing/upload', body);
    const none = await upload({ master_key: null, self_signing_key: null, user_signing_key: null });
    assert.equal(none.status, 200, none.text);
    assert.deepEqual((await query(server, bob.session, { [a]: [] })).body['master_keys'], {}, 'nothing was stored');

    expectMatrixError(await upload({ self_signing_key: cs.selfSigningKey() }), 400, 'M_MISSING_PARAM', exactly('self_signing_key needs a master key to be signed by, and none is available: upload master_key too'));
    expectMatrixError(await upload({ user_signing_key: cs.userSigningKey() }), 400, 'M_MISSING_PARAM', exactly('user_signing_key needs a master key to be signed by, and none is available: upload master_key too'));
    const byOther = new TestCrossSigning(a);
    expectMatrixError(await upload({ master_key: cs.masterKey(), self_signing_key: byOther.selfSigningKey() }), 400, 'M_INVALID_SIGNATURE', exactly(`self_signing_key must be signed by the master key ed25519:${cs.master.publicKey}`));
    expectMatrixError(await upload({ master_key: cs.masterKey(), user_signing_key: byOther.userSigningKey() }), 400, 'M_INVALID_SIGNATURE', exactly(`user_signing_key must be signed by the master key ed25519:${cs.master.publicKey}`));

    // With the master key stored, the self-signing key may come later, signed by the stored master key.
    await uploadCrossSigning(server, alice, { master_key: cs.masterKey(), self_signing_key: null });
    const later = { self_signing_key: byOther.selfSigningKey() };
    expectMatrixError(await upload(later), 400, 'M_INVALID_SIGNATURE', exactly(`self_signing_key must be signed by the master key ed25519:${cs.master.publicKey}`));
    await uploadWithAuth(server, alice, { self_signing_key: cs.selfSigningKey(), user_signing_key: null });
    const q = await query(server, bob.session, { [a]: [] });
    assert.deepEqual((q.body['self_signing_keys'] as Json)[a], cs.selfSigningKey());
  });

  test('replacing the self-signing key takes its signatures on devices away with it', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const bob = await user(server, 'bob');
    await uploadCrossSigning(server, alice);
    const a = alice.session.userId;
    const sskId = `ed25519:${alice.cs.selfSigning.publicKey}`;
    const signed = alice.cs.selfSigning.sign(alice.device.deviceKeys(), a, sskId);
    assert.deepEqual((await post(server, alice.session, '/keys/signatures/upload', { [a]: { [alice.session.deviceId]: signed } })).body, { failures: {} });
    const deviceSignatures = async () => {
      const q = await query(server, bob.session, { [a]: [] });
      return Object.keys(((((q.body['device_keys'] as Json)[a] as Json)[alice.session.deviceId] as Json)['signatures'] as Json)[a] as Json).sort();
    };
    assert.deepEqual(await deviceSignatures(), [`ed25519:${alice.session.deviceId}`, sskId].sort());

    // The same master key with a new self-signing key: the old key's signature no longer counts.
    const replacement = new TestCrossSigning(a);
    const newSsk = alice.cs.master.sign({ user_id: a, usage: ['self_signing'], keys: { [`ed25519:${replacement.selfSigning.publicKey}`]: replacement.selfSigning.publicKey } }, a, `ed25519:${alice.cs.master.publicKey}`);
    // Sent with the unchanged master key: replacing one key of several still needs auth.
    await uploadWithAuth(server, alice, { master_key: alice.cs.masterKey(), self_signing_key: newSsk });
    assert.deepEqual(await deviceSignatures(), [`ed25519:${alice.session.deviceId}`]);
  });

  test('two different first uploads at the same moment: one is stored, the other must authenticate', async () => {
    const server = await start();
    const users = await Promise.all(['alice', 'bob', 'carol', 'dave', 'erin'].map((name) => user(server, name)));
    await Promise.all(
      users.map(async (u) => {
        const rival = new TestCrossSigning(u.session.userId);
        const [first, second] = await Promise.all([u.cs, rival].map((cs) => post(server, u.session, '/keys/device_signing/upload', cs.upload())));
        assert.deepEqual([first!.status, second!.status].sort(), [200, 401], `${first!.text} ${second!.text}`);
        const winner = first!.status === 200 ? u.cs : rival;
        const q = await query(server, u.session, { [u.session.userId]: [] });
        assert.deepEqual((q.body['master_keys'] as Json)[u.session.userId], winner.masterKey(), 'the stored keys are the ones that were accepted');
      }),
    );
  });

  test('works under the unstable prefix too', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const r = await http(server.url, 'POST', '/_matrix/client/unstable/keys/device_signing/upload', { token: alice.session.accessToken, body: alice.cs.upload() });
    assert.equal(r.status, 200, r.text);
  });
});

describeEachBackend('POST /keys/signatures/upload', (backend) => {
  const start = () => startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });

  test('accepts the self-signing key on own devices, own devices on the master key, and the user-signing key on others; shows them in queries', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const bob = await user(server, 'bob');
    const carol = await user(server, 'carol');
    await uploadCrossSigning(server, alice);
    await uploadCrossSigning(server, bob);

    const a = alice.session.userId;
    const deviceKeys = alice.device.deviceKeys();
    const signedDevice = alice.cs.selfSigning.sign(deviceKeys, a, `ed25519:${alice.cs.selfSigning.publicKey}`);
    const signedMaster = alice.device.ed25519.sign(alice.cs.masterKey(), a, `ed25519:${alice.session.deviceId}`);
    const signedBob = alice.cs.userSigning.sign(bob.cs.masterKey(), a, `ed25519:${alice.cs.userSigning.publicKey}`);
    const r = await post(server, alice.session, '/keys/signatures/upload', {
      [a]: { [alice.session.deviceId]: signedDevice, [alice.cs.master.publicKey]: signedMaster },
      [bob.session.userId]: { [bob.cs.master.publicKey]: signedBob },
    });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.body, { failures: {} });

    const seenByCarol = await query(server, carol.session, { [a]: [], [bob.session.userId]: [] });
    const device = ((seenByCarol.body['device_keys'] as Json)[a] as Json)[alice.session.deviceId] as Json;
    assert.deepEqual(device['signatures'], signedDevice['signatures'], 'the self-signing signature on the device is public');
    assert.deepEqual(((seenByCarol.body['master_keys'] as Json)[a] as Json)['signatures'], signedMaster['signatures'], "the device's signature on the master key is public");
    assert.deepEqual((seenByCarol.body['master_keys'] as Json)[bob.session.userId], bob.cs.masterKey(), "alice's user-signing signature is hidden from carol");

    const seenByBob = await query(server, bob.session, { [bob.session.userId]: [] });
    assert.deepEqual((seenByBob.body['master_keys'] as Json)[bob.session.userId], bob.cs.masterKey(), "…and from bob himself");
    const seenByAlice = await query(server, alice.session, { [bob.session.userId]: [] });
    assert.deepEqual((seenByAlice.body['master_keys'] as Json)[bob.session.userId], signedBob, '…but alice sees her own signature');
    // Asked in turn with nothing changed in between, the answers stay each viewer's own.
    for (let i = 0; i < 2; i++) {
      assert.deepEqual(((await query(server, alice.session, { [bob.session.userId]: [] })).body['master_keys'] as Json)[bob.session.userId], signedBob);
      assert.deepEqual(((await query(server, bob.session, { [bob.session.userId]: [] })).body['master_keys'] as Json)[bob.session.userId], bob.cs.masterKey());
    }
  });

  test('invalid signatures are reported per item and not stored, while valid ones in the same request are', async () => {
    const server = await start();
    const [alice, bob] = await usersWithCrossSigning(server, 'alice', 'bob');
    const a = alice.session.userId;
    const ssk = `ed25519:${alice.cs.selfSigning.publicKey}`;
    const forged = { ...alice.cs.selfSigning.sign(alice.device.deviceKeys(), a, ssk) };
    (forged['signatures'] as Record<string, Json>)[a]![ssk] = 'A'.repeat(86);
    const good = alice.cs.userSigning.sign(bob.cs.masterKey(), a, `ed25519:${alice.cs.userSigning.publicKey}`);
    const otherDevice = await login(server, 'alice', alice.session.password);
    const r = await post(server, alice.session, '/keys/signatures/upload', {
      [a]: {
        [alice.session.deviceId]: forged,
        NOSUCHDEVICE: alice.cs.selfSigning.sign({ device_id: 'NOSUCHDEVICE' }, a, ssk),
        [otherDevice.deviceId]: alice.cs.selfSigning.sign({ device_id: otherDevice.deviceId }, a, ssk),
      },
      [bob.session.userId]: {
        [bob.cs.master.publicKey]: good,
        notbobsmasterkey: good,
      },
      '@dave:elsewhere.example': { somekey: { user_id: '@dave:elsewhere.example' } },
    });
    assert.equal(r.status, 200, r.text);
    const failures = r.body['failures'] as Record<string, Record<string, Json>>;
    assert.equal(failures[a]![alice.session.deviceId]!['errcode'], 'M_INVALID_SIGNATURE');
    assert.equal(failures[a]!['NOSUCHDEVICE']!['errcode'], 'M_NOT_FOUND');
    assert.equal(failures[a]![otherDevice.deviceId]!['errcode'], 'M_NOT_FOUND', 'a device without keys cannot be signed');
    assert.equal(failures[bob.session.userId]!['notbobsmasterkey']!['errcode'], 'M_NOT_FOUND');
    assert.equal(failures[bob.session.userId]![bob.cs.master.publicKey], undefined);
    assert.equal(failures['@dave:elsewhere.example']!['somekey']!['errcode'], 'M_NOT_FOUND', 'a remote user whose master key this server has not fetched');

    const q = await query(server, alice.session, { [a]: [], [bob.session.userId]: [] });
    const device = ((q.body['device_keys'] as Json)[a] as Json)[alice.session.deviceId] as Json;
    assert.deepEqual(Object.keys((device['signatures'] as Json)[a] as Json), [`ed25519:${alice.session.deviceId}`], 'the forged signature was not stored');
    assert.deepEqual((q.body['master_keys'] as Json)[bob.session.userId], good, 'the valid one was');
  });

  test('a signed object that differs from the stored key is refused', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    await uploadCrossSigning(server, alice);
    const a = alice.session.userId;
    const ssk = `ed25519:${alice.cs.selfSigning.publicKey}`;
    const altered = alice.cs.selfSigning.sign(alice.device.deviceKeys({ algorithms: ['something.else'] }), a, ssk);
    const r = await post(server, alice.session, '/keys/signatures/upload', { [a]: { [alice.session.deviceId]: altered } });
    assert.equal((r.body['failures'] as Record<string, Record<string, Json>>)[a]![alice.session.deviceId]!['errcode'], 'M_INVALID_SIGNATURE');
  });

  test("a device's signature on its user's master key must verify, be by one of the user's devices, and cover the stored master key", async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const carol = await user(server, 'carol');
    await uploadCrossSigning(server, alice);
    const a = alice.session.userId;
    const masterId = alice.cs.master.publicKey;
    const deviceKeyId = `ed25519:${alice.session.deviceId}`;
    const signMaster = (master: Json, key = alice.device.ed25519, keyId = deviceKeyId) => key.sign(master, a, keyId);
    const forged = signMaster(alice.cs.masterKey());
    (forged['signatures'] as Record<string, Json>)[a]![deviceKeyId] = 'A'.repeat(86);
    // A second device that signs correctly does not make up for a bad signature by the first.
    const laptop = await login(server, 'alice', alice.session.password);
    const laptopDevice = new TestDevice(a, laptop.deviceId);
    assert.equal((await post(server, laptop, '/keys/upload', { device_keys: laptopDevice.deviceKeys() })).status, 200);
    const oneBad = signMaster(forged, laptopDevice.ed25519, `ed25519:${laptop.deviceId}`);
    const cases: [string, Json, RegExp][] = [
      ['forged', forged, exactly(`The signature by device ${alice.session.deviceId} does not verify`)],
      ['one of two forged', oneBad, exactly(`The signature by device ${alice.session.deviceId} does not verify`)],
      ['signed by a key that is not the device key', signMaster(alice.cs.masterKey(), alice.cs.selfSigning), /does not verify/],
      ['signed only by the master key itself', alice.cs.master.sign(alice.cs.masterKey(), a, `ed25519:${masterId}`), /^No signature by one of your devices was found on your master key$/],
      ['signed by an unknown device', signMaster(alice.cs.masterKey(), new TestDevice(a, 'NOSUCHDEVICE').ed25519, 'ed25519:NOSUCHDEVICE'), /^No signature by one of your devices/],
      ['signed under a key ID that is not ed25519', signMaster(alice.cs.masterKey(), alice.device.ed25519, `curve25519:${alice.session.deviceId}`), /^No signature by one of your devices/],
      ['not signed', alice.cs.masterKey(), /^No signature by one of your devices/],
      ['altered (an added field)', signMaster({ ...alice.cs.masterKey(), 'org.example.note': 'x' }), /^The signed object is not your current master key$/],
      ['altered (another usage)', signMaster({ ...alice.cs.masterKey(), usage: ['master', 'self_signing'] }), /^The signed object is not your current master key$/],
      ['altered (another user)', signMaster({ ...alice.cs.masterKey(), user_id: carol.session.userId }), /^The signed object is not your current master key$/],
    ];
    for (const [what, signed, message] of cases) {
      expectFailure(await post(server, alice.session, '/keys/signatures/upload', { [a]: { [masterId]: signed } }), a, masterId, 'M_INVALID_SIGNATURE', message, what);
    }
    const seen = await query(server, carol.session, { [a]: [] });
    assert.deepEqual((seen.body['master_keys'] as Json)[a], alice.cs.masterKey(), 'no signature was stored on the master key');

    // The refusals are per item: a valid device signature in the same request is stored.
    const good = signMaster(alice.cs.masterKey());
    const mixed = await post(server, alice.session, '/keys/signatures/upload', { [a]: { [masterId]: good, NOSUCHDEVICE: good } });
    assert.deepEqual(Object.keys((mixed.body['failures'] as Record<string, Json>)[a] as Json), ['NOSUCHDEVICE']);
    const after = await query(server, carol.session, { [a]: [] });
    assert.deepEqual((after.body['master_keys'] as Json)[a], good);
  });

  test("a user-signing signature on another user's master key must be by the signer's user-signing key, verify, and cover that user's stored master key", async () => {
    const server = await start();
    const [alice, bob] = await usersWithCrossSigning(server, 'alice', 'bob');
    const a = alice.session.userId;
    const b = bob.session.userId;
    const bobMaster = bob.cs.master.publicKey;
    const uskId = `ed25519:${alice.cs.userSigning.publicKey}`;
    const signBob = (master: Json, key = alice.cs.userSigning) => key.sign(master, a, uskId);
    const forged = signBob(bob.cs.masterKey());
    (forged['signatures'] as Record<string, Json>)[a]![uskId] = 'A'.repeat(86);
    const cases: [string, Json, RegExp][] = [
      ['forged', forged, /^The user-signing signature does not verify$/],
      ["made with alice's self-signing key", signBob(bob.cs.masterKey(), alice.cs.selfSigning), /^The user-signing signature does not verify$/],
      ["made with alice's master key", alice.cs.master.sign(bob.cs.masterKey(), a, `ed25519:${alice.cs.master.publicKey}`), exactly(`The master key is not signed by your user-signing key ${uskId}`)],
      ['signed by bob instead of alice', alice.cs.userSigning.sign(bob.cs.masterKey(), b, uskId), /is not signed by your user-signing key/],
      ['not signed', bob.cs.masterKey(), /is not signed by your user-signing key/],
      ['altered (an added field)', signBob({ ...bob.cs.masterKey(), 'org.example.note': 'x' }), exactly(`The signed object is not the stored master key of ${b}`)],
      ['altered (another usage)', signBob({ ...bob.cs.masterKey(), usage: ['master', 'user_signing'] }), /is not the stored master key/],
    ];
    for (const [what, signed, message] of cases) {
      expectFailure(await post(server, alice.session, '/keys/signatures/upload', { [b]: { [bobMaster]: signed } }), b, bobMaster, 'M_INVALID_SIGNATURE', message, what);
    }
    const seen = await query(server, alice.session, { [b]: [] });
    assert.deepEqual((seen.body['master_keys'] as Json)[b], bob.cs.masterKey(), 'no signature was stored, not even one only alice would see');

    // Bob's self-signing key is not his master key, and carol has no user-signing key to sign with.
    const notMaster = await post(server, alice.session, '/keys/signatures/upload', { [b]: { [bob.cs.selfSigning.publicKey]: signBob(bob.cs.selfSigningKey()) } });
    expectFailure(notMaster, b, bob.cs.selfSigning.publicKey, 'M_NOT_FOUND', exactly(`${bob.cs.selfSigning.publicKey} is not the current master key of ${b}`));
    const carol = await user(server, 'carol');
    await uploadCrossSigning(server, carol, { master_key: carol.cs.masterKey() });
    const noUsk = await post(server, carol.session, '/keys/signatures/upload', { [b]: { [bobMaster]: carol.cs.userSigning.sign(bob.cs.masterKey(), carol.session.userId, `ed25519:${carol.cs.userSigning.publicKey}`) } });
    expectFailure(noUsk, b, bobMaster, 'M_NOT_FOUND', /no user-signing key/);
  });

  test('each malformed item is refused with its own reason, and a bad user ID refuses the whole request', async () => {
    const server = await start();
    const [alice] = await usersWithCrossSigning(server, 'alice');
    const carol = await user(server, 'carol'); // no cross-signing keys
    const a = alice.session.userId;
    const c = carol.session.userId;
    const masterId = alice.cs.master.publicKey;
    const uskId = `ed25519:${alice.cs.userSigning.publicKey}`;
    const devSig = (signatures: unknown) => ({ ...alice.cs.masterKey(), signatures });
    const r = await post(server, alice.session, '/keys/signatures/upload', {
      [a]: {
        [alice.session.deviceId]: 'not an object',
        'A KEY ID WITH SPACES': alice.cs.masterKey(),
        NOSUCHDEVICE: alice.cs.masterKey(),
      },
      [c]: { somekey: alice.cs.userSigning.sign({ user_id: c }, a, uskId) },
      '@dave:elsewhere.example': { somekey: { user_id: '@dave:elsewhere.example' } },
    });
    expectFailure(r, a, alice.session.deviceId, 'M_BAD_JSON', exactly('The signed key must be an object'));
    expectFailure(r, a, 'A KEY ID WITH SPACES', 'M_NOT_FOUND', exactly('No device or cross-signing key has this ID'));
    expectFailure(r, a, 'NOSUCHDEVICE', 'M_NOT_FOUND', exactly('NOSUCHDEVICE is neither one of your devices with keys nor your master key'));
    expectFailure(r, c, 'somekey', 'M_NOT_FOUND', exactly(`somekey is not the current master key of ${c}`));
    expectFailure(r, '@dave:elsewhere.example', 'somekey', 'M_NOT_FOUND', exactly('somekey is not the current master key of @dave:elsewhere.example'));

    // Signatures that are not a map of strings count as no signature; a float cannot be checked at all.
    const deviceSignature = (alice.device.ed25519.sign(alice.cs.masterKey(), a, `ed25519:${alice.session.deviceId}`)['signatures'] as Record<string, Json>)[a]![`ed25519:${alice.session.deviceId}`];
    const misnamed = { [a]: { [`ed25519_${alice.session.deviceId}`]: deviceSignature } };
    for (const signatures of ['signed', { [a]: 'signed' }, { [a]: { [`ed25519:${alice.session.deviceId}`]: 5 } }, misnamed]) {
      const bad = await post(server, alice.session, '/keys/signatures/upload', { [a]: { [masterId]: devSig(signatures) } });
      expectFailure(bad, a, masterId, 'M_INVALID_SIGNATURE', exactly('No signature by one of your devices was found on your master key'), JSON.stringify(signatures));
    }
    const float = await post(server, alice.session, '/keys/signatures/upload', { [a]: { [masterId]: { ...alice.cs.masterKey(), weight: 0.5 } } });
    expectFailure(float, a, masterId, 'M_BAD_JSON', exactly('The signed object is not canonical JSON: weight: 0.5 is not an integer (canonical JSON allows no floats)'));

    const badUser = await post(server, alice.session, '/keys/signatures/upload', { [a]: {}, 'not-a-user': {} });
    expectMatrixError(badUser, 400, 'M_INVALID_PARAM', exactly('"not-a-user" is not a valid user ID'));
    expectMatrixError(await post(server, alice.session, '/keys/signatures/upload', { [a]: 'keys' }), 400, 'M_BAD_JSON', exactly(`["${a}"] must be an object`));
    const seen = await query(server, carol.session, { [a]: [] });
    assert.deepEqual((seen.body['master_keys'] as Json)[a], alice.cs.masterKey(), 'nothing was stored');
  });

  test('a new signature on a device or on the master key is a device-list change everyone tracking the user hears of', async () => {
    const server = await start();
    const [alice] = await usersWithCrossSigning(server, 'alice');
    const bob = await user(server, 'bob');
    const a = alice.session.userId;
    await query(server, bob.session, { [a]: [] }); // bob tracks alice
    const changed = async (from: string) => (await http(server.url, 'GET', `${C}/keys/changes?from=${from}`, { token: bob.session.accessToken })).body['changed'];
    const signatures: Json[] = [
      { [alice.session.deviceId]: alice.cs.selfSigning.sign(alice.device.deviceKeys(), a, `ed25519:${alice.cs.selfSigning.publicKey}`) },
      { [alice.cs.master.publicKey]: alice.device.ed25519.sign(alice.cs.masterKey(), a, `ed25519:${alice.session.deviceId}`) },
    ];
    for (const item of signatures) {
      const from = await nextBatch(server, bob.session);
      assert.deepEqual((await post(server, alice.session, '/keys/signatures/upload', { [a]: item })).body, { failures: {} });
      assert.deepEqual(await changed(from), [a], Object.keys(item)[0]);
    }
  });

  test('a self-signing signature on a device must be by the self-signing key and cover the stored device keys', async () => {
    const server = await start();
    const alice = await user(server, 'alice');
    const a = alice.session.userId;
    const dev = alice.session.deviceId;
    const sskId = `ed25519:${alice.cs.selfSigning.publicKey}`;
    const signed = alice.cs.selfSigning.sign(alice.device.deviceKeys(), a, sskId);
    const before = await post(server, alice.session, '/keys/signatures/upload', { [a]: { [dev]: signed } });
    expectFailure(before, a, dev, 'M_NOT_FOUND', /no self-signing key/);
    await uploadCrossSigning(server, alice);
    const cases: [string, Json, RegExp][] = [
      ['signed by the master key', alice.cs.master.sign(alice.device.deviceKeys(), a, `ed25519:${alice.cs.master.publicKey}`), exactly(`The device keys are not signed by your self-signing key ${sskId}`)],
      ['signed by another key under the self-signing key ID', alice.cs.master.sign(alice.device.deviceKeys(), a, sskId), /^The self-signing signature does not verify$/],
      ['altered', alice.cs.selfSigning.sign(alice.device.deviceKeys({ 'org.example.note': 'x' }), a, sskId), exactly(`The signed object is not the stored device keys of ${dev}`)],
    ];
    for (const [what, body, message] of cases) {
      expectFailure(await post(server, alice.session, '/keys/signatures/upload', { [a]: { [dev]: body } }), a, dev, 'M_INVALID_SIGNATURE', message, what);
    }
    const seen = await query(server, alice.session, { [a]: [] });
    assert.deepEqual(((seen.body['device_keys'] as Json)[a] as Json)[dev], { ...alice.device.deviceKeys(), unsigned: {} }, 'nothing was stored');
  });
});

describeEachBackend('GET /keys/changes', (backend) => {
  test('lists the caller and the users whose keys the caller queried, when their keys changed between the tokens', async () => {
    const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });
    const alice = await user(server, 'alice');
    const bob = await user(server, 'bob');
    const carol = await user(server, 'carol');
    await query(server, alice.session, { [bob.session.userId]: [] }); // alice now tracks bob
    const from = await nextBatch(server, alice.session);

    const bobPhone = await login(server, 'bob', bob.session.password);
    await post(server, bobPhone, '/keys/upload', { device_keys: new TestDevice(bob.session.userId, bobPhone.deviceId).deviceKeys() });
    await uploadCrossSigning(server, carol);
    await uploadCrossSigning(server, alice);
    const to = await nextBatch(server, alice.session);

    const forAlice = await http(server.url, 'GET', `${C}/keys/changes?from=${from}&to=${to}`, { token: alice.session.accessToken });
    assert.equal(forAlice.status, 200, forAlice.text);
    assert.deepEqual(forAlice.body, { changed: [alice.session.userId, bob.session.userId].sort(), left: [] });
    const forCarol = await http(server.url, 'GET', `${C}/keys/changes?from=${from}&to=${to}`, { token: carol.session.accessToken });
    assert.deepEqual(forCarol.body, { changed: [carol.session.userId], left: [] });
    const empty = await http(server.url, 'GET', `${C}/keys/changes?from=${to}&to=${to}`, { token: alice.session.accessToken });
    assert.deepEqual(empty.body, { changed: [], left: [] });
  });

  test('a user-signing signature is a change only the signer hears of', async () => {
    const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });
    const alice = await user(server, 'alice');
    const bob = await user(server, 'bob');
    const carol = await user(server, 'carol');
    await uploadCrossSigning(server, alice);
    await uploadCrossSigning(server, bob);
    await query(server, alice.session, { [bob.session.userId]: [] });
    await query(server, carol.session, { [bob.session.userId]: [] });
    const from = await nextBatch(server, alice.session);
    const signed = alice.cs.userSigning.sign(bob.cs.masterKey(), alice.session.userId, `ed25519:${alice.cs.userSigning.publicKey}`);
    const r = await post(server, alice.session, '/keys/signatures/upload', { [bob.session.userId]: { [bob.cs.master.publicKey]: signed } });
    assert.deepEqual(r.body, { failures: {} });
    const changes = async (who: Session) => (await http(server.url, 'GET', `${C}/keys/changes?from=${from}`, { token: who.accessToken })).body['changed'];
    assert.deepEqual(await changes(alice.session), [bob.session.userId]);
    assert.deepEqual(await changes(carol.session), []);
  });

  test('repeating a cross-signing upload is no change; a new user-signing key is a change only its owner hears of', async () => {
    const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });
    const alice = await user(server, 'alice');
    const bob = await user(server, 'bob');
    const a = alice.session.userId;
    await uploadCrossSigning(server, alice);
    await query(server, bob.session, { [a]: [] }); // bob tracks alice
    const changes = async (who: Session, from: string) => (await http(server.url, 'GET', `${C}/keys/changes?from=${from}`, { token: who.accessToken })).body['changed'];
    const from = await nextBatch(server, alice.session);
    await uploadCrossSigning(server, alice);
    assert.deepEqual(await changes(bob.session, from), [], 'an identical upload is not news to bob');
    assert.deepEqual(await changes(alice.session, from), [], '…nor to alice');

    const replacement = new TestCrossSigning(a);
    const newUsk = alice.cs.master.sign({ user_id: a, usage: ['user_signing'], keys: { [`ed25519:${replacement.userSigning.publicKey}`]: replacement.userSigning.publicKey } }, a, `ed25519:${alice.cs.master.publicKey}`);
    await uploadWithAuth(server, alice, { user_signing_key: newUsk });
    assert.deepEqual(await changes(bob.session, from), [], 'bob never sees user-signing keys');
    assert.deepEqual(await changes(alice.session, from), [a]);

    const newSsk = alice.cs.master.sign({ user_id: a, usage: ['self_signing'], keys: { [`ed25519:${replacement.selfSigning.publicKey}`]: replacement.selfSigning.publicKey } }, a, `ed25519:${alice.cs.master.publicKey}`);
    await uploadWithAuth(server, alice, { self_signing_key: newSsk });
    assert.deepEqual(await changes(bob.session, from), [a], 'a new self-signing key is news to everyone tracking alice');
  });

  test('an incremental /sync waits for a change the caller can see, then reports it', async () => {
    const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });
    const alice = await user(server, 'alice');
    const bob = await user(server, 'bob');
    await query(server, alice.session, { [bob.session.userId]: [] });
    const since = await nextBatch(server, alice.session);
    const started = Date.now();
    const waiting = http(server.url, 'GET', `${C}/sync?since=${since}&timeout=10000`, { token: alice.session.accessToken });
    await new Promise((r) => setTimeout(r, 300));
    await login(server, 'bob', bob.session.password);
    const r = await waiting;
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.body['device_lists'], { changed: [bob.session.userId], left: [] });
    assert.ok(Date.now() - started < 9000, 'answered on the change, not at the timeout');
    assert.notEqual(r.body['next_batch'], since);
  });
});
