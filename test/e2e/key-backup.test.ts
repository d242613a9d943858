import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend, type Backend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { expectMatrixError, registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import type { SqlDatabase } from '../../src/storage/sql.js';
import { responseValidator } from '../support/spec-schema.js';
import { PURGE_BATCH } from '../../src/backup/purge.js';
import { MAX_SESSION_DATA_BYTES } from '../../src/backup/validate.js';
import { openStore } from '../../src/storage/index.js';

const C = '/_matrix/client/v3';
const ALGORITHM = 'm.megolm_backup.v1.curve25519-aes-sha2';
type Json = Record<string, unknown>;

interface KeyData {
  first_message_index: number;
  forwarded_count: number;
  is_verified: boolean;
  session_data: Json;
}

function keyData(firstMessageIndex: number, forwardedCount: number, isVerified: boolean, tag = 'x'): KeyData {
  return {
    first_message_index: firstMessageIndex,
    forwarded_count: forwardedCount,
    is_verified: isVerified,
    session_data: { ephemeral: `eph-${tag}`, ciphertext: `ct-${tag}-${firstMessageIndex}-${forwardedCount}-${isVerified}`, mac: 'mac', 'org.example.extra': [1, { two: null }] },
  };
}

async function setup(backend: Backend, config: Json = {}) {
  const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET, ...config } });
  return { server, alice: await registerUser(server, 'alice'), bob: await registerUser(server, 'bob') };
}

const call = (s: TestServer, who: Session, method: string, path: string, body?: unknown) =>
  http(s.url, method, `${C}${path}`, { token: who.accessToken, ...(body !== undefined ? { body } : {}) });

async function createVersion(s: TestServer, who: Session, authData: Json = { public_key: 'pubkey', signatures: {} }): Promise<string> {
  const r = await call(s, who, 'POST', '/room_keys/version', { algorithm: ALGORITHM, auth_data: authData });
  assert.equal(r.status, 200, r.text);
  assert.equal(typeof r.body['version'], 'string');
  return r.body['version'] as string;
}

async function putKeys(s: TestServer, who: Session, version: string, rooms: Record<string, Record<string, KeyData>>) {
  const body = { rooms: Object.fromEntries(Object.entries(rooms).map(([room, sessions]) => [room, { sessions }])) };
  return call(s, who, 'PUT', `/room_keys/keys?version=${version}`, body);
}

async function versionInfo(s: TestServer, who: Session, version?: string): Promise<Json> {
  const r = await call(s, who, 'GET', version === undefined ? '/room_keys/version' : `/room_keys/version/${version}`);
  assert.equal(r.status, 200, r.text);
  return r.body;
}

const enc = encodeURIComponent;

/** The 200 answers of key_backup.yaml, checked against the spec's own schemas. */
const spec = {
  version: responseValidator('client-server/key_backup.yaml', '/room_keys/version/{version}', 'get'),
  current: responseValidator('client-server/key_backup.yaml', '/room_keys/version', 'get'),
  created: responseValidator('client-server/key_backup.yaml', '/room_keys/version', 'post'),
  allKeys: responseValidator('client-server/key_backup.yaml', '/room_keys/keys', 'get'),
  roomKeys: responseValidator('client-server/key_backup.yaml', '/room_keys/keys/{roomId}', 'get'),
  sessionKey: responseValidator('client-server/key_backup.yaml', '/room_keys/keys/{roomId}/{sessionId}', 'get'),
  update: responseValidator('client-server/key_backup.yaml', '/room_keys/keys', 'put'),
};

describeEachBackend('server-side key backup: versions', (backend) => {
  test('a new backup version is current, keeps auth_data exactly as sent, and versions are numbered per user', async () => {
    const { server, alice, bob } = await setup(backend);
    expectMatrixError(await call(server, alice, 'GET', '/room_keys/version'), 404, 'M_NOT_FOUND', /No current backup version/);

    const authData = { public_key: 'hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo', signatures: { [alice.userId]: { 'ed25519:DEV': 'sig' } }, 'org.example': { n: [1, 2] } };
    assert.equal(await createVersion(server, alice, authData), '1');
    const info = await versionInfo(server, alice);
    assert.deepEqual(info, { algorithm: ALGORITHM, auth_data: authData, count: 0, etag: info['etag'], version: '1' });
    assert.equal(typeof info['etag'], 'string');

    assert.equal(await createVersion(server, alice, { public_key: 'second' }), '2');
    assert.equal((await versionInfo(server, alice))['version'], '2', 'the newest version is the current one');
    assert.deepEqual((await versionInfo(server, alice, '1'))['auth_data'], authData, 'an older version can still be read');
    expectMatrixError(await call(server, alice, 'GET', '/room_keys/version/3'), 404, 'M_NOT_FOUND');
    expectMatrixError(await call(server, alice, 'GET', '/room_keys/version/abc'), 404, 'M_NOT_FOUND');

    assert.equal(await createVersion(server, bob), '1', "bob's versions are numbered apart from alice's");
    assert.equal((await versionInfo(server, alice))['version'], '2');
  });

  test('PUT of a version replaces auth_data only; another algorithm, a mismatched version or a missing field is refused', async () => {
    const { server, alice } = await setup(backend);
    const v = await createVersion(server, alice, { public_key: 'old' });
    const put = (body: Json, version = v) => call(server, alice, 'PUT', `/room_keys/version/${version}`, body);

    const r = await put({ algorithm: ALGORITHM, auth_data: { public_key: 'new', signatures: { x: { y: 'z' } } }, version: v });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.body, {});
    assert.deepEqual((await versionInfo(server, alice, v))['auth_data'], { public_key: 'new', signatures: { x: { y: 'z' } } });

    expectMatrixError(await put({ algorithm: 'm.megolm_backup.v2', auth_data: { public_key: 'other' } }), 400, 'M_INVALID_PARAM', /algorithm/);
    expectMatrixError(await put({ algorithm: ALGORITHM, auth_data: { public_key: 'other' }, version: '7' }), 400, 'M_INVALID_PARAM', /does not match/);
    expectMatrixError(await put({ algorithm: ALGORITHM }), 400, 'M_BAD_JSON', /auth_data/);
    expectMatrixError(await put({ algorithm: ALGORITHM, auth_data: 'a string' }), 400, 'M_BAD_JSON', /auth_data/);
    expectMatrixError(await put({ algorithm: ALGORITHM, auth_data: { public_key: 'other' } }, '9'), 404, 'M_NOT_FOUND');
    const info = await versionInfo(server, alice, v);
    assert.equal(info['algorithm'], ALGORITHM);
    assert.deepEqual(info['auth_data'], { public_key: 'new', signatures: { x: { y: 'z' } } }, 'refused updates changed nothing');

    expectMatrixError(await call(server, alice, 'POST', '/room_keys/version', { auth_data: {} }), 400, 'M_BAD_JSON', /algorithm/);
    expectMatrixError(await call(server, alice, 'POST', '/room_keys/version', [1]), 400, 'M_BAD_JSON');
  });

  test('deleting a version deletes its keys; deleting it again succeeds, an unknown version is 404, and its number is not reused', async () => {
    const { server, alice } = await setup(backend);
    const v1 = await createVersion(server, alice);
    assert.equal((await putKeys(server, alice, v1, { '!r:test.local': { s1: keyData(0, 0, true), s2: keyData(1, 0, false) } })).status, 200);

    const r = await call(server, alice, 'DELETE', `/room_keys/version/${v1}`);
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.body, {});
    expectMatrixError(await call(server, alice, 'GET', '/room_keys/version'), 404, 'M_NOT_FOUND');
    expectMatrixError(await call(server, alice, 'GET', `/room_keys/version/${v1}`), 404, 'M_NOT_FOUND');
    expectMatrixError(await call(server, alice, 'GET', `/room_keys/keys?version=${v1}`), 404, 'M_NOT_FOUND');
    await server.mx.backupPurger.drain();
    const db = (server.mx.store as unknown as { db: SqlDatabase }).db;
    assert.deepEqual(await db.all('SELECT session_id FROM e2e_room_keys WHERE user_id = ?', [alice.userId]), [], 'the keys are gone from the database');

    assert.equal((await call(server, alice, 'DELETE', `/room_keys/version/${v1}`)).status, 200, 'deleting a deleted version succeeds');
    expectMatrixError(await call(server, alice, 'DELETE', '/room_keys/version/7'), 404, 'M_NOT_FOUND');
    expectMatrixError(await call(server, alice, 'PUT', `/room_keys/version/${v1}`, { algorithm: ALGORITHM, auth_data: {} }), 404, 'M_NOT_FOUND');
    assert.equal(await createVersion(server, alice), '2');
  });

  test('a deleted version of more keys than one purge batch is gone for the client at once, and its keys leave the database in batches afterwards', async () => {
    const { server, alice, bob } = await setup(backend);
    const v1 = await createVersion(server, alice);
    const many = Object.fromEntries(Array.from({ length: PURGE_BATCH + 500 }, (_, i) => [`s${i}`, keyData(i, 0, false)]));
    assert.equal((await putKeys(server, alice, v1, { '!big:test.local': many })).body['count'], PURGE_BATCH + 500);
    const bobs = await createVersion(server, bob);
    assert.equal((await putKeys(server, bob, bobs, { '!big:test.local': { s0: keyData(0, 0, false) } })).status, 200);

    assert.equal((await call(server, alice, 'DELETE', `/room_keys/version/${v1}`)).status, 200);
    expectMatrixError(await call(server, alice, 'GET', `/room_keys/keys?version=${v1}`), 404, 'M_NOT_FOUND');
    expectMatrixError(await call(server, alice, 'GET', `/room_keys/keys/${enc('!big:test.local')}/s1?version=${v1}`), 404, 'M_NOT_FOUND');
    const v2 = await createVersion(server, alice);
    assert.deepEqual((await versionInfo(server, alice))['count'], 0, 'the new version starts empty');
    await server.mx.backupPurger.drain();
    const db = (server.mx.store as unknown as { db: SqlDatabase }).db;
    assert.deepEqual(await db.all('SELECT version FROM e2e_room_keys WHERE user_id = ?', [alice.userId]), [], "the deleted version's keys are gone from the database");
    assert.deepEqual(await db.all('SELECT version FROM e2e_room_keys_versions WHERE user_id = ?', [alice.userId]), [{ version: Number(v2) }], 'and so is its row');
    assert.equal((await versionInfo(server, bob))['count'], 1, "bob's backup is untouched");
    assert.equal((await call(server, alice, 'DELETE', `/room_keys/version/${v1}`)).status, 200, 'deleting it again still succeeds');
    assert.equal(await createVersion(server, alice), '3', 'and its number is not reused');
  });

  test('when the current version is deleted, the newest remaining one becomes current again', async () => {
    const { server, alice } = await setup(backend);
    const v1 = await createVersion(server, alice);
    const v2 = await createVersion(server, alice);
    assert.equal((await call(server, alice, 'DELETE', `/room_keys/version/${v2}`)).status, 200);
    assert.equal((await versionInfo(server, alice))['version'], v1);
    assert.equal((await putKeys(server, alice, v1, { '!r:test.local': { s: keyData(0, 0, false) } })).status, 200);
    expectMatrixError(await putKeys(server, alice, v2, { '!r:test.local': { s: keyData(0, 0, false) } }), 404, 'M_NOT_FOUND');
  });
});

describeEachBackend('server-side key backup: keys', (backend) => {
  test('keys stored at the three levels come back at the three levels as uploaded, with count and etag', async () => {
    const { server, alice } = await setup(backend);
    const v = await createVersion(server, alice);
    const [r1, r2, r3] = ['!one:test.local', '!two:other.example', '!three/with?odd#chars:test.local'];

    const a = await putKeys(server, alice, v, { [r1]: { s1: keyData(0, 0, true, 'a'), s2: keyData(3, 1, false, 'b') }, [r2]: { s3: keyData(0, 0, false, 'c') } });
    assert.equal(a.status, 200, a.text);
    assert.equal(a.body['count'], 3);
    assert.equal(typeof a.body['etag'], 'string');

    const b = await call(server, alice, 'PUT', `/room_keys/keys/${enc(r3)}?version=${v}`, { sessions: { 's4/+=': keyData(2, 0, true, 'd') } });
    assert.equal(b.status, 200, b.text);
    assert.equal(b.body['count'], 4);
    assert.notEqual(b.body['etag'], a.body['etag'], 'the etag moves on when keys are added');

    const c = await call(server, alice, 'PUT', `/room_keys/keys/${enc(r3)}/s5?version=${v}`, keyData(9, 2, false, 'e'));
    assert.equal(c.status, 200, c.text);
    assert.equal(c.body['count'], 5);

    const all = await call(server, alice, 'GET', `/room_keys/keys?version=${v}`);
    assert.equal(all.status, 200, all.text);
    assert.deepEqual(all.body, {
      rooms: {
        [r1]: { sessions: { s1: keyData(0, 0, true, 'a'), s2: keyData(3, 1, false, 'b') } },
        [r2]: { sessions: { s3: keyData(0, 0, false, 'c') } },
        [r3]: { sessions: { 's4/+=': keyData(2, 0, true, 'd'), s5: keyData(9, 2, false, 'e') } },
      },
    });
    const room = await call(server, alice, 'GET', `/room_keys/keys/${enc(r3)}?version=${v}`);
    assert.deepEqual(room.body, { sessions: { 's4/+=': keyData(2, 0, true, 'd'), s5: keyData(9, 2, false, 'e') } });
    const one = await call(server, alice, 'GET', `/room_keys/keys/${enc(r3)}/${enc('s4/+=')}?version=${v}`);
    assert.deepEqual(one.body, keyData(2, 0, true, 'd'));

    // As Synapse: a room without keys is an empty map, a session without a key is 404.
    assert.deepEqual((await call(server, alice, 'GET', `/room_keys/keys/${enc('!empty:test.local')}?version=${v}`)).body, { sessions: {} });
    expectMatrixError(await call(server, alice, 'GET', `/room_keys/keys/${enc(r1)}/nope?version=${v}`), 404, 'M_NOT_FOUND');

    const info = await versionInfo(server, alice, v);
    assert.equal(info['count'], 5);
    assert.equal(info['etag'], c.body['etag']);

    // Every answer has the shape key_backup.yaml gives it.
    assert.deepEqual(spec.update(a.body), []);
    assert.deepEqual(spec.allKeys(all.body), []);
    assert.deepEqual(spec.roomKeys(room.body), []);
    assert.deepEqual(spec.sessionKey(one.body), []);
    assert.deepEqual(spec.version(info), []);
    assert.deepEqual(spec.current(await versionInfo(server, alice)), []);
    assert.deepEqual(spec.created((await call(server, alice, 'POST', '/room_keys/version', { algorithm: ALGORITHM, auth_data: {} })).body), []);
    assert.notDeepEqual(spec.allKeys({ rooms: { '!r:x': { sessions: { s: { ...keyData(0, 0, false), is_verified: 1 } } } } }), [], 'the schema check bites');
  });

  test('a stored key is replaced only by a better one: verified first, then a lower first_message_index, then a lower forwarded_count', async () => {
    const { server, alice } = await setup(backend);
    const v = await createVersion(server, alice);
    const room = '!r:test.local';
    let etag = '';
    const offer = async (k: KeyData, replaces: boolean, why: string) => {
      const before = (await call(server, alice, 'GET', `/room_keys/keys/${enc(room)}/s?version=${v}`)).body;
      const r = await putKeys(server, alice, v, { [room]: { s: k } });
      assert.equal(r.status, 200, r.text);
      assert.equal(r.body['count'], 1);
      const after = (await call(server, alice, 'GET', `/room_keys/keys/${enc(room)}/s?version=${v}`)).body;
      assert.deepEqual(after, replaces ? k : before, why);
      assert.equal(r.body['etag'] !== etag, replaces, `${why}: the etag moves on exactly when the key changes`);
      etag = r.body['etag'] as string;
    };
    await offer(keyData(5, 2, false), true, 'the first key is stored');
    await offer(keyData(10, 10, true), true, 'a verified key replaces an unverified one, whatever its index and count');
    await offer(keyData(0, 0, false), false, 'an unverified key never replaces a verified one');
    await offer(keyData(11, 0, true), false, 'a higher first_message_index loses');
    await offer(keyData(3, 20, true), true, 'a lower first_message_index wins over a higher forwarded_count');
    await offer(keyData(3, 25, true), false, 'a higher forwarded_count loses');
    await offer(keyData(3, 1, true), true, 'a lower forwarded_count wins');
    await offer({ ...keyData(3, 1, true), session_data: { other: 'data' } }, false, 'an equal key keeps the stored one');
  });

  test('keys go only to the current version: 403 M_WRONG_ROOM_KEYS_VERSION names it; unknown versions are 404; older versions stay readable', async () => {
    const { server, alice } = await setup(backend);
    const room = { '!r:test.local': { s: keyData(0, 0, false) } };
    expectMatrixError(await putKeys(server, alice, '1', room), 404, 'M_NOT_FOUND', /version/);

    const v1 = await createVersion(server, alice);
    assert.equal((await putKeys(server, alice, v1, room)).status, 200);
    const v2 = await createVersion(server, alice);
    const stale = await putKeys(server, alice, v1, { '!r:test.local': { s: keyData(0, 0, true), t: keyData(0, 0, false) } });
    expectMatrixError(stale, 403, 'M_WRONG_ROOM_KEYS_VERSION');
    assert.equal(stale.body['current_version'], v2);
    for (const path of [`/room_keys/keys/${enc('!r:test.local')}?version=${v1}`, `/room_keys/keys/${enc('!r:test.local')}/s?version=${v1}`]) {
      const body = path.includes('/s?') ? keyData(0, 0, true) : { sessions: { s: keyData(0, 0, true) } };
      expectMatrixError(await call(server, alice, 'PUT', path, body), 403, 'M_WRONG_ROOM_KEYS_VERSION');
    }
    assert.deepEqual((await call(server, alice, 'GET', `/room_keys/keys?version=${v1}`)).body, { rooms: { '!r:test.local': { sessions: { s: keyData(0, 0, false) } } } }, 'the old version is readable and unchanged');
    assert.equal((await versionInfo(server, alice, v1))['count'], 1);

    expectMatrixError(await putKeys(server, alice, '99', room), 404, 'M_NOT_FOUND');
    expectMatrixError(await putKeys(server, alice, 'abc', room), 404, 'M_NOT_FOUND');
    expectMatrixError(await call(server, alice, 'PUT', '/room_keys/keys', { rooms: {} }), 400, 'M_MISSING_PARAM', /version/);
    expectMatrixError(await call(server, alice, 'GET', '/room_keys/keys'), 400, 'M_MISSING_PARAM', /version/);
    expectMatrixError(await call(server, alice, 'DELETE', '/room_keys/keys'), 400, 'M_MISSING_PARAM', /version/);
    assert.equal((await putKeys(server, alice, v2, room)).status, 200);
  });

  test('deleting keys at the three levels moves the etag on and lowers the count; from an older version too', async () => {
    const { server, alice } = await setup(backend);
    const v = await createVersion(server, alice);
    const [r1, r2] = ['!one:test.local', '!two:test.local'];
    const put = await putKeys(server, alice, v, { [r1]: { a: keyData(0, 0, false), b: keyData(0, 0, false) }, [r2]: { c: keyData(0, 0, false), d: keyData(0, 0, false) } });
    let etag = put.body['etag'];

    const del = async (path: string, count: number) => {
      const r = await call(server, alice, 'DELETE', `${path}?version=${v}`);
      assert.equal(r.status, 200, r.text);
      assert.equal(r.body['count'], count);
      assert.notEqual(r.body['etag'], etag);
      etag = r.body['etag'];
      assert.equal((await versionInfo(server, alice, v))['count'], count);
    };
    await del(`/room_keys/keys/${enc(r1)}/a`, 3);
    await del(`/room_keys/keys/${enc(r1)}`, 2);
    const nothing = await call(server, alice, 'DELETE', `/room_keys/keys/${enc(r1)}?version=${v}`);
    assert.deepEqual(nothing.body, { etag, count: 2 }, 'deleting nothing changes nothing');
    await createVersion(server, alice);
    await del('/room_keys/keys', 0);
    assert.deepEqual((await call(server, alice, 'GET', `/room_keys/keys?version=${v}`)).body, { rooms: {} });
    expectMatrixError(await call(server, alice, 'DELETE', '/room_keys/keys?version=42'), 404, 'M_NOT_FOUND');
  });

  test('key data of the wrong shape is refused with 400 naming the field, and nothing of the request is stored', async () => {
    const { server, alice } = await setup(backend);
    const v = await createVersion(server, alice);
    const good = keyData(0, 0, false);
    const cases: [unknown, string, RegExp][] = [
      [{ rooms: { '!r:x': { sessions: { s: { ...good, is_verified: undefined } } } } }, 'M_BAD_JSON', /is_verified/],
      [{ rooms: { '!r:x': { sessions: { s: { ...good, is_verified: 'yes' } } } } }, 'M_BAD_JSON', /is_verified/],
      [{ rooms: { '!r:x': { sessions: { s: { ...good, first_message_index: -1 } } } } }, 'M_BAD_JSON', /first_message_index/],
      [{ rooms: { '!r:x': { sessions: { s: { ...good, forwarded_count: 1.5 } } } } }, 'M_BAD_JSON', /forwarded_count/],
      [{ rooms: { '!r:x': { sessions: { s: { ...good, session_data: 'opaque string' } } } } }, 'M_BAD_JSON', /session_data/],
      [{ rooms: { '!r:x': { sessions: [] } } }, 'M_BAD_JSON', /sessions/],
      [{ rooms: { '!r:x': {} } }, 'M_BAD_JSON', /sessions/],
      [{ rooms: { 'no-bang:x': { sessions: { s: good } } } }, 'M_INVALID_PARAM', /room ID/],
      [{ rooms: { '!r:x': { sessions: { ['x'.repeat(300)]: good } } } }, 'M_INVALID_PARAM', /session ID/],
      [{ rooms: { '!r:x': { sessions: { s: { ...good, session_data: { big: 'x'.repeat(MAX_SESSION_DATA_BYTES) } } } } } }, 'M_INVALID_PARAM', /session_data is larger than 4096 bytes/],
      [{}, 'M_BAD_JSON', /rooms/],
    ];
    for (const [body, errcode, message] of cases) {
      // Each bad session travels with a good one, which must not be stored either.
      const withGood = typeof body === 'object' && body !== null && 'rooms' in body ? { rooms: { ...(body as { rooms: Json }).rooms, '!ok:x': { sessions: { fine: good } } } } : body;
      expectMatrixError(await call(server, alice, 'PUT', `/room_keys/keys?version=${v}`, withGood), 400, errcode, message);
    }
    expectMatrixError(await call(server, alice, 'PUT', `/room_keys/keys/${enc('!r:x')}/s?version=${v}`, { ...good, is_verified: 1 }), 400, 'M_BAD_JSON', /is_verified/);
    expectMatrixError(await call(server, alice, 'PUT', `/room_keys/keys/nobang/s?version=${v}`, good), 400, 'M_INVALID_PARAM', /room ID/);
    const info = await versionInfo(server, alice, v);
    assert.equal(info['count'], 0);
    assert.deepEqual((await call(server, alice, 'GET', `/room_keys/keys?version=${v}`)).body, { rooms: {} });
  });

  test('one user never sees, writes or deletes another user\'s backup', async () => {
    const { server, alice, bob } = await setup(backend);
    const v = await createVersion(server, alice, { public_key: 'alice' });
    assert.equal((await putKeys(server, alice, v, { '!r:test.local': { s: keyData(0, 0, true) } })).status, 200);

    expectMatrixError(await call(server, bob, 'GET', '/room_keys/version'), 404, 'M_NOT_FOUND');
    expectMatrixError(await call(server, bob, 'GET', `/room_keys/version/${v}`), 404, 'M_NOT_FOUND');
    expectMatrixError(await call(server, bob, 'GET', `/room_keys/keys?version=${v}`), 404, 'M_NOT_FOUND');
    expectMatrixError(await putKeys(server, bob, v, { '!r:test.local': { s: keyData(0, 0, true, 'bob') } }), 404, 'M_NOT_FOUND');
    expectMatrixError(await call(server, bob, 'DELETE', `/room_keys/keys?version=${v}`), 404, 'M_NOT_FOUND');
    expectMatrixError(await call(server, bob, 'PUT', `/room_keys/version/${v}`, { algorithm: ALGORITHM, auth_data: { public_key: 'bob' } }), 404, 'M_NOT_FOUND');
    expectMatrixError(await call(server, bob, 'DELETE', `/room_keys/version/${v}`), 404, 'M_NOT_FOUND');

    const bobVersion = await createVersion(server, bob, { public_key: 'bob' });
    assert.equal(bobVersion, v, 'both have a version of the same number');
    assert.deepEqual((await call(server, bob, 'GET', `/room_keys/keys?version=${v}`)).body, { rooms: {} }, "bob's version of that number is his own, and empty");
    assert.equal((await call(server, bob, 'DELETE', `/room_keys/version/${v}`)).status, 200);

    assert.deepEqual((await versionInfo(server, alice))['auth_data'], { public_key: 'alice' });
    assert.deepEqual((await call(server, alice, 'GET', `/room_keys/keys?version=${v}`)).body, { rooms: { '!r:test.local': { sessions: { s: keyData(0, 0, true) } } } });
    expectMatrixError(await http(server.url, 'GET', `${C}/room_keys/version`), 401, 'M_MISSING_TOKEN');
  });

  test('limits: too many sessions in one request, or more than a user may keep, is 413 M_TOO_LARGE and stores nothing', async () => {
    const { server, alice } = await setup(backend, { key_backup: { max_sessions_per_request: 3, max_sessions_per_user: 5 } });
    const v1 = await createVersion(server, alice);
    const sessions = (prefix: string, n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`${prefix}${i}`, keyData(5, 0, false)]));

    expectMatrixError(await putKeys(server, alice, v1, { '!a:x': sessions('a', 2), '!b:x': sessions('b', 2) }), 413, 'M_TOO_LARGE', /at most 3/);
    assert.equal((await versionInfo(server, alice))['count'], 0);
    assert.equal((await putKeys(server, alice, v1, { '!a:x': sessions('a', 3) })).body['count'], 3);
    expectMatrixError(await putKeys(server, alice, v1, { '!b:x': sessions('b', 3) }), 413, 'M_TOO_LARGE', /5/);
    assert.equal((await versionInfo(server, alice))['count'], 3);
    assert.equal((await putKeys(server, alice, v1, { '!b:x': sessions('b', 2) })).body['count'], 5);
    const better = await putKeys(server, alice, v1, { '!a:x': { a0: keyData(0, 0, true) } });
    assert.equal(better.status, 200, 'a full backup still takes better keys of sessions it holds');

    // The limit is per user, across versions.
    const v2 = await createVersion(server, alice);
    expectMatrixError(await putKeys(server, alice, v2, { '!c:x': sessions('c', 1) }), 413, 'M_TOO_LARGE');
    assert.equal((await call(server, alice, 'DELETE', `/room_keys/version/${v1}`)).status, 200);
    assert.equal((await putKeys(server, alice, v2, { '!c:x': sessions('c', 3) })).body['count'], 3);
  });

  test('limits: a user keeps at most max_versions_per_user versions and max_bytes_per_user bytes of session data', async () => {
    const { server, alice, bob } = await setup(backend, { key_backup: { max_versions_per_user: 2, max_bytes_per_user: 4096 } });
    const v1 = await createVersion(server, alice);
    await createVersion(server, alice);
    expectMatrixError(await call(server, alice, 'POST', '/room_keys/version', { algorithm: ALGORITHM, auth_data: {} }), 403, 'M_FORBIDDEN', /2 backup versions.*DELETE \/room_keys\/version/);
    assert.equal((await versionInfo(server, alice))['version'], '2', 'no version was created');
    assert.equal(await createVersion(server, bob), '1', 'the limit is per user');
    assert.equal((await call(server, alice, 'DELETE', `/room_keys/version/${v1}`)).status, 200);
    const v3 = await createVersion(server, alice);
    assert.equal(v3, '3', 'a deleted version no longer counts');

    // Sessions of known size: 20 fit in 4096 bytes, the 21st does not.
    const size = (k: KeyData) => Buffer.byteLength(JSON.stringify(k.session_data));
    const tag = (i: number) => `t${String(i).padStart(2, '0')}${'p'.repeat(48)}`;
    const sessions = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`s${i}`, keyData(7, 0, false, tag(i))]));
    const each = size(keyData(7, 0, false, tag(0)));
    assert.ok(each * 20 <= 4096 && each * 21 > 4096, `${each} bytes per session`);
    assert.equal((await putKeys(server, alice, v3, { '!r:x': sessions(20) })).body['count'], 20);
    expectMatrixError(await putKeys(server, alice, v3, { '!r:x': { extra: keyData(7, 0, false, 'xx') } }), 413, 'M_TOO_LARGE', /bytes of session data/);
    const bigger = keyData(0, 0, true, `t00-${'x'.repeat(200)}`);
    // A better but larger key counts its growth.
    expectMatrixError(await putKeys(server, alice, v3, { '!r:x': { s0: bigger } }), 413, 'M_TOO_LARGE', /bytes/);
    const smaller = { ...keyData(0, 0, true), session_data: { c: 'x' } };
    assert.equal((await putKeys(server, alice, v3, { '!r:x': { s0: smaller } })).status, 200, 'a better, smaller key frees room');
    assert.equal((await putKeys(server, alice, v3, { '!r:x': { extra: keyData(7, 0, false, 'xx') } })).body['count'], 21);
    assert.equal((await call(server, alice, 'DELETE', `/room_keys/keys/${enc('!r:x')}?version=${v3}`)).body['count'], 0);
    assert.equal((await putKeys(server, alice, v3, { '!r:x': sessions(20) })).body['count'], 20, 'deleted keys free their bytes');
  });

  test('a backup larger than one read page comes back whole, per room and overall', async () => {
    const { server, alice } = await setup(backend);
    const v = await createVersion(server, alice);
    const rooms: Record<string, Record<string, KeyData>> = {};
    // One room bigger than a page, then small rooms: pages end inside a room and between rooms.
    rooms['!big:test.local'] = Object.fromEntries(Array.from({ length: 1500 }, (_, i) => [`s${String(i).padStart(5, '0')}`, keyData(i, 0, false)]));
    for (let r = 0; r < 700; r++) rooms[`!small${r}:test.local`] = { a: keyData(r, 1, true), b: keyData(r, 2, false) };
    const put = await putKeys(server, alice, v, rooms);
    assert.equal(put.status, 200, put.text.slice(0, 300));
    assert.equal(put.body['count'], 2900);

    const all = await call(server, alice, 'GET', `/room_keys/keys?version=${v}`);
    assert.equal(all.status, 200);
    assert.equal(all.headers.get('content-type'), 'application/json');
    assert.deepEqual(all.body, { rooms: Object.fromEntries(Object.entries(rooms).map(([room, sessions]) => [room, { sessions }])) });
    const big = await call(server, alice, 'GET', `/room_keys/keys/${enc('!big:test.local')}?version=${v}`);
    assert.deepEqual(big.body, { sessions: rooms['!big:test.local'] });
  });

  test('concurrent uploads of the same session keep the best key, and concurrent new versions get distinct numbers', async () => {
    const { server, alice } = await setup(backend);
    const v = await createVersion(server, alice);
    const results = await Promise.all(
      Array.from({ length: 12 }, (_, i) => putKeys(server, alice, v, { '!r:test.local': { s: keyData(20 - i, 0, false, `n${i}`), [`own${i}`]: keyData(0, 0, false) } })),
    );
    for (const r of results) assert.equal(r.status, 200, r.text);
    assert.deepEqual((await call(server, alice, 'GET', `/room_keys/keys/${enc('!r:test.local')}/s?version=${v}`)).body, keyData(9, 0, false, 'n11'));
    assert.equal((await versionInfo(server, alice))['count'], 13);

    const created = await Promise.all(Array.from({ length: 8 }, () => call(server, alice, 'POST', '/room_keys/version', { algorithm: ALGORITHM, auth_data: {} })));
    for (const r of created) assert.equal(r.status, 200, r.text);
    assert.deepEqual(created.map((r) => Number(r.body['version'])).sort((a, b) => a - b), [2, 3, 4, 5, 6, 7, 8, 9]);
  });
});

describeEachBackend('server-side key backup: storage', (backend) => {
  test('a deleted version is invisible at once, and its keys are purged at most a batch per transaction, then its row', async () => {
    const store = await openStore(await backend.freshDatabase());
    try {
      const user = '@alice:test.local';
      const keys = Array.from({ length: 25 }, (_, i) => ({ roomId: '!r:x', sessionId: `s${i}`, firstMessageIndex: 0, forwardedCount: 0, isVerified: false, sessionData: '{"c":"x"}' }));
      const v1 = await store.backup.transaction(user, async (tx) => {
        const v = await tx.createVersion(ALGORITHM, '{}');
        await tx.putRoomKeys(v, keys, keys.length, keys.length * 9);
        return v;
      });
      const v2 = await store.backup.transaction(user, (tx) => tx.createVersion(ALGORITHM, '{}'));
      assert.deepEqual(await store.backup.transaction(user, (tx) => tx.usage()), { versions: 2, sessions: 25, bytes: 225 });

      await store.backup.transaction(user, (tx) => tx.deleteVersion(v1));
      assert.equal(await store.backup.getVersion(user, v1), undefined);
      assert.deepEqual(await store.backup.getRoomKeys(user, v1, {}, 100), [], 'its keys are gone for readers');
      assert.deepEqual(await store.backup.transaction(user, (tx) => tx.usage()), { versions: 1, sessions: 0, bytes: 0 });
      assert.deepEqual(await store.backup.deletedVersionsWithKeys(10), [{ userId: user, version: v1 }]);
      assert.equal(await store.backup.purgeDeletedKeys(user, v2, 10), 0, 'a version that is not deleted is never purged');

      const batches: number[] = [];
      for (let n; (n = await store.backup.purgeDeletedKeys(user, v1, 10)) > 0; ) batches.push(n);
      assert.deepEqual(batches, [10, 10, 5]);
      assert.deepEqual(await store.backup.deletedVersionsWithKeys(10), []);
      assert.equal(await store.backup.transaction(user, (tx) => tx.versionExists(v1)), true, 'its number stays taken');
      assert.equal(await store.backup.transaction(user, (tx) => tx.createVersion(ALGORITHM, '{}')), v2 + 1);
    } finally {
      await store.close();
    }
  });
});
