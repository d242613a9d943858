/**
 * Synapse's user admin API on mxkeys (docs/api.md, "Administration"), and the same operations on
 * the command line (`mxkeys users …`).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describeEachBackend, tempDir } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { expectMatrixError, login, registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { TestCrossSigning, TestDevice, TestSigningKey } from '../support/keys.js';
import { runCli } from '../support/process.js';
import type { SqlDatabase } from '../../src/storage/sql.js';

const C = '/_matrix/client/v3';
const A1 = '/_synapse/admin/v1';
const A2 = '/_synapse/admin/v2';
type Json = Record<string, unknown>;

const enc = encodeURIComponent;
const as = (s: TestServer, who: Session, method: string, path: string, body?: unknown) =>
  http(s.url, method, path, { token: who.accessToken, ...(body !== undefined ? { body } : {}) });

/** Gives the user a new backup version holding two room keys. */
async function withBackup(s: TestServer, who: Session): Promise<void> {
  const created = await as(s, who, 'POST', `${C}/room_keys/version`, { algorithm: 'm.megolm_backup.v1.curve25519-aes-sha2', auth_data: { public_key: 'pk' } });
  assert.equal(created.status, 200, created.text);
  const key = { first_message_index: 0, forwarded_count: 0, is_verified: false, session_data: { ciphertext: 'ct', ephemeral: 'e', mac: 'm' } };
  const put = await as(s, who, 'PUT', `${C}/room_keys/keys?version=${created.body['version'] as string}`, { rooms: { '!r:test.local': { sessions: { a: key, b: key } } } });
  assert.equal(put.status, 200, put.text);
}

/** How many backup versions and keys of the user are in the database, deleted or not. */
async function backupRows(s: TestServer, userId: string): Promise<{ versions: number; keys: number }> {
  const db = (s.mx.store as unknown as { db: SqlDatabase }).db;
  const count = async (table: string) => Number((await db.get<{ n: number }>(`SELECT COUNT(*) AS n FROM ${table} WHERE user_id = ?`, [userId]))!.n);
  return { versions: await count('e2e_room_keys_versions'), keys: await count('e2e_room_keys') };
}

/** Carol with cross-signing keys, which an admin has just let her replace without user-interactive auth. */
async function crossSigningReplaceableWithoutUia(s: TestServer): Promise<{ carol: Session; cs: TestCrossSigning }> {
  const admin = await registerUser(s, 'admin', 'pw', true);
  const carol = await registerUser(s, 'carol');
  const cs = new TestCrossSigning(carol.userId);
  assert.equal((await as(s, carol, 'POST', `${C}/keys/device_signing/upload`, cs.upload())).status, 200);
  assert.equal((await as(s, admin, 'POST', `${A1}/users/${enc(carol.userId)}/_allow_cross_signing_replacement_without_uia`, {})).status, 200);
  return { carol, cs };
}

async function withKeys(s: TestServer, who: Session): Promise<TestDevice> {
  const device = new TestDevice(who.userId, who.deviceId);
  const r = await as(s, who, 'POST', `${C}/keys/upload`, { device_keys: device.deviceKeys(), one_time_keys: device.oneTimeKeys(3) });
  assert.equal(r.status, 200, r.text);
  return device;
}

/**
 * Holds the next password check (`verify`) or new password hash (`hash`) once it is computed and
 * before the caller goes on: the window in which an admin may deactivate the account or reset
 * its password.
 */
function holdNextPasswordHashing(s: TestServer, step: 'verify' | 'hash'): { reached: Promise<void>; release: () => void } {
  const passwords = s.mx.accounts.passwords as unknown as Record<typeof step, (...args: unknown[]) => Promise<unknown>>;
  const real = passwords[step];
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  let reached!: () => void;
  const reachedP = new Promise<void>((resolve) => (reached = resolve));
  passwords[step] = async (...args: unknown[]) => {
    const result = await real.apply(s.mx.accounts.passwords, args);
    delete passwords[step];
    reached();
    await gate;
    return result;
  };
  return { reached: reachedP, release };
}

describeEachBackend("Synapse's user admin API", (backend) => {
  const start = () => startServer({ backend, config: { registration_shared_secret: SHARED_SECRET, enable_registration: true } });

  test('only an admin user may use it: others get 403 "You are not a server admin", no token 401', async () => {
    const server = await start();
    const bob = await registerUser(server, 'bob');
    expectMatrixError(await as(server, bob, 'GET', `${A2}/users`), 403, 'M_FORBIDDEN', /You are not a server admin/);
    expectMatrixError(await as(server, bob, 'POST', `${A1}/deactivate/${enc(bob.userId)}`, {}), 403, 'M_FORBIDDEN');
    expectMatrixError(await http(server.url, 'GET', `${A2}/users`), 401, 'M_MISSING_TOKEN');
    // Nothing happened to bob.
    await login(server, 'bob', bob.password);
  });

  test('lists users with Synapse\'s fields, pages with next_token, filters by user_id and admins', async () => {
    const server = await start();
    const admin = await registerUser(server, 'admin', 'pw', true);
    for (const name of ['carol', 'dave', 'erin']) await registerUser(server, name);

    const all = await as(server, admin, 'GET', `${A2}/users`);
    assert.equal(all.status, 200, all.text);
    assert.equal(all.body['total'], 4);
    assert.equal(all.body['next_token'], undefined, 'no next_token when everything fit');
    const users = all.body['users'] as Json[];
    assert.deepEqual(users.map((u) => u['name']), ['@admin:test.local', '@carol:test.local', '@dave:test.local', '@erin:test.local']);
    const carol = users[1]!;
    for (const field of ['is_guest', 'admin', 'deactivated', 'erased', 'shadow_banned', 'locked']) assert.equal(typeof carol[field], 'boolean', field);
    assert.equal(carol['admin'], false);
    assert.equal(users[0]!['admin'], true);
    assert.ok(Math.abs((carol['creation_ts'] as number) - Date.now()) < 3_600_000, 'creation_ts is in milliseconds in the list');

    const page1 = await as(server, admin, 'GET', `${A2}/users?limit=3`);
    assert.equal((page1.body['users'] as Json[]).length, 3);
    assert.equal(page1.body['next_token'], '3');
    const page2 = await as(server, admin, 'GET', `${A2}/users?limit=3&from=${page1.body['next_token']}`);
    assert.deepEqual((page2.body['users'] as Json[]).map((u) => u['name']), ['@erin:test.local']);
    assert.equal(page2.body['next_token'], undefined);

    const backwards = await as(server, admin, 'GET', `${A2}/users?dir=b&limit=1`);
    assert.deepEqual((backwards.body['users'] as Json[]).map((u) => u['name']), ['@erin:test.local']);
    const filtered = await as(server, admin, 'GET', `${A2}/users?user_id=ar`);
    assert.deepEqual((filtered.body['users'] as Json[]).map((u) => u['name']), ['@carol:test.local']);
    const admins = await as(server, admin, 'GET', `${A2}/users?admins=true`);
    assert.deepEqual((admins.body['users'] as Json[]).map((u) => u['name']), ['@admin:test.local']);

    expectMatrixError(await as(server, admin, 'GET', `${A2}/users?from=-1`), 400, 'M_INVALID_PARAM', /from/);
    expectMatrixError(await as(server, admin, 'GET', `${A2}/users?deactivated=yes`), 400, 'M_INVALID_PARAM', /deactivated/);
    expectMatrixError(await as(server, admin, 'GET', `${A2}/users?order_by=shoe_size`), 400, 'M_INVALID_PARAM', /order_by/);
  });

  test('queries one user; an unknown one is 404, another server\'s user 400', async () => {
    const server = await start();
    const admin = await registerUser(server, 'admin', 'pw', true);
    const carol = await registerUser(server, 'carol');
    const r = await as(server, admin, 'GET', `${A2}/users/${enc(carol.userId)}`);
    assert.equal(r.status, 200, r.text);
    assert.equal(r.body['name'], carol.userId);
    assert.equal(r.body['admin'], false);
    assert.equal(r.body['deactivated'], false);
    assert.deepEqual(r.body['threepids'], []);
    assert.deepEqual(r.body['external_ids'], []);
    // Synapse answers creation_ts in seconds here (and in milliseconds in the list).
    assert.ok(Math.abs((r.body['creation_ts'] as number) - Date.now() / 1000) < 3600, r.text);
    assert.equal(typeof r.body['last_seen_ts'], 'number', 'the device registration made is a sighting');
    expectMatrixError(await as(server, admin, 'GET', `${A2}/users/${enc('@nobody:test.local')}`), 404, 'M_NOT_FOUND', /User not found/);
    expectMatrixError(await as(server, admin, 'GET', `${A2}/users/${enc('@carol:elsewhere.example')}`), 400, 'M_INVALID_PARAM', /local users/);
  });

  test('resetting a password deletes every device of the user (as Synapse) unless logout_devices is false, and those tracking the user hear of it', async () => {
    const server = await start();
    const admin = await registerUser(server, 'admin', 'pw', true);
    const carol = await registerUser(server, 'carol');
    const carolPhone = await login(server, 'carol', carol.password);
    await withKeys(server, carol);
    await withKeys(server, carolPhone);
    const dave = await registerUser(server, 'dave');
    await as(server, dave, 'POST', `${C}/keys/query`, { device_keys: { [carol.userId]: [] } });
    const since = (await as(server, dave, 'GET', `${C}/sync`)).body['next_batch'] as string;

    const r = await as(server, admin, 'POST', `${A1}/reset_password/${enc(carol.userId)}`, { new_password: 'new one' });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.body, {});
    for (const s of [carol, carolPhone]) expectMatrixError(await as(server, s, 'GET', `${C}/account/whoami`), 401, 'M_UNKNOWN_TOKEN');
    expectMatrixError(await http(server.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'carol', password: carol.password } }), 403, 'M_FORBIDDEN');
    assert.equal((await as(server, admin, 'GET', `${A2}/users/${enc(carol.userId)}/devices`)).body['total'], 0, 'every device is gone');
    const seen = await as(server, dave, 'POST', `${C}/keys/query`, { device_keys: { [carol.userId]: [] } });
    assert.deepEqual((seen.body['device_keys'] as Json)[carol.userId], {}, 'with their keys');
    const changes = await as(server, dave, 'GET', `${C}/keys/changes?from=${since}`);
    assert.deepEqual(changes.body['changed'], [carol.userId], 'a tracker hears of the deleted devices');

    const again = await login(server, 'carol', 'new one', { device_id: carol.deviceId });
    await withKeys(server, again);
    const keep = await as(server, admin, 'POST', `${A1}/reset_password/${enc(carol.userId)}`, { new_password: 'third', logout_devices: false });
    assert.equal(keep.status, 200, keep.text);
    assert.equal((await as(server, again, 'GET', `${C}/account/whoami`)).status, 200, 'still logged in');
    const kept = await as(server, dave, 'POST', `${C}/keys/query`, { device_keys: { [carol.userId]: [] } });
    assert.ok((kept.body['device_keys'] as Record<string, Json>)[carol.userId]![carol.deviceId], 'the device kept its keys');

    expectMatrixError(await as(server, admin, 'POST', `${A1}/reset_password/${enc(carol.userId)}`, {}), 400, 'M_MISSING_PARAM', /new_password/);
    expectMatrixError(await as(server, admin, 'POST', `${A1}/reset_password/${enc(carol.userId)}`, { new_password: 'x', logout_devices: 'yes' }), 400, 'M_BAD_JSON');
    expectMatrixError(await as(server, admin, 'POST', `${A1}/reset_password/${enc('@nobody:test.local')}`, { new_password: 'x' }), 404, 'M_NOT_FOUND');
  });

  /** Carol logs in; while her password is being checked, the admin does `meanwhile`. Her login must be refused. */
  async function loginRacing(server: TestServer, admin: Session, carol: Session, meanwhile: () => Promise<{ status: number }>): Promise<void> {
    const hold = holdNextPasswordHashing(server, 'verify');
    const loggingIn = http(server.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'carol', password: carol.password, device_id: 'RACER' } });
    await hold.reached;
    assert.equal((await meanwhile()).status, 200);
    hold.release();
    expectMatrixError(await loggingIn, 403, 'M_FORBIDDEN', /Invalid username or password/);
    const devices = (await as(server, admin, 'GET', `${A2}/users/${enc(carol.userId)}/devices`)).body['devices'] as Json[];
    assert.ok(!devices.some((d) => d['device_id'] === 'RACER'), 'no device was created');
  }

  test('a login whose password was checked just before the account was deactivated gets no token and no device', async () => {
    const server = await start();
    const admin = await registerUser(server, 'admin', 'pw', true);
    const carol = await registerUser(server, 'carol');
    await loginRacing(server, admin, carol, () => as(server, admin, 'POST', `${A1}/deactivate/${enc(carol.userId)}`, {}));
    assert.equal((await as(server, admin, 'GET', `${A2}/users/${enc(carol.userId)}/devices`)).body['total'], 0);
  });

  test('a login with the old password that was checked just before an admin reset it is refused', async () => {
    const server = await start();
    const admin = await registerUser(server, 'admin', 'pw', true);
    const carol = await registerUser(server, 'carol');
    await loginRacing(server, admin, carol, () => as(server, admin, 'POST', `${A1}/reset_password/${enc(carol.userId)}`, { new_password: 'new one' }));
    await login(server, 'carol', 'new one');
  });

  test('a password reset whose hash was made just before the account was deactivated leaves it without a password', async () => {
    const server = await start();
    const admin = await registerUser(server, 'admin', 'pw', true);
    const carol = await registerUser(server, 'carol');
    const hold = holdNextPasswordHashing(server, 'hash');
    const resetting = as(server, admin, 'POST', `${A1}/reset_password/${enc(carol.userId)}`, { new_password: 'back again' });
    await hold.reached;
    assert.equal((await as(server, admin, 'POST', `${A1}/deactivate/${enc(carol.userId)}`, {})).status, 200);
    hold.release();
    expectMatrixError(await resetting, 400, 'M_INVALID_PARAM', /deactivated/);
    expectMatrixError(await http(server.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'carol', password: 'back again' } }), 403, 'M_FORBIDDEN');
    assert.equal((await server.mx.store.accounts.getUser(carol.userId))?.passwordHash, null);
  });

  test("a user's devices: list, show, rename, delete one, delete several", async () => {
    const server = await start();
    const admin = await registerUser(server, 'admin', 'pw', true);
    const carol = await registerUser(server, 'carol');
    const second = await login(server, 'carol', carol.password, { initial_device_display_name: 'phone' });
    const third = await login(server, 'carol', carol.password);
    const base = `${A2}/users/${enc(carol.userId)}/devices`;

    const list = await as(server, admin, 'GET', base);
    assert.equal(list.status, 200, list.text);
    assert.equal(list.body['total'], 3);
    for (const d of list.body['devices'] as Json[]) assert.equal(d['user_id'], carol.userId);

    const one = await as(server, admin, 'GET', `${base}/${second.deviceId}`);
    assert.equal(one.body['display_name'], 'phone');
    assert.equal(one.body['user_id'], carol.userId);
    assert.equal((await as(server, admin, 'PUT', `${base}/${second.deviceId}`, { display_name: 'old phone' })).status, 200);
    assert.equal((await as(server, admin, 'GET', `${base}/${second.deviceId}`)).body['display_name'], 'old phone');
    expectMatrixError(await as(server, admin, 'PUT', `${base}/${second.deviceId}`, { display_name: 'x'.repeat(101) }), 400, 'M_TOO_LARGE', /at most 100 characters/);
    assert.equal((await as(server, admin, 'GET', `${base}/${second.deviceId}`)).body['display_name'], 'old phone', 'a name too long changes nothing');

    assert.equal((await as(server, admin, 'DELETE', `${base}/${second.deviceId}`)).status, 200);
    expectMatrixError(await as(server, second, 'GET', `${C}/account/whoami`), 401, 'M_UNKNOWN_TOKEN');
    expectMatrixError(await as(server, admin, 'GET', `${base}/${second.deviceId}`), 404, 'M_NOT_FOUND', /No device found/);

    const bulk = await as(server, admin, 'POST', `${A2}/users/${enc(carol.userId)}/delete_devices`, { devices: [carol.deviceId, third.deviceId, 'NOSUCHDEVICE'] });
    assert.equal(bulk.status, 200, bulk.text);
    assert.equal((await as(server, admin, 'GET', base)).body['total'], 0);
    expectMatrixError(await as(server, admin, 'POST', `${A2}/users/${enc(carol.userId)}/delete_devices`, {}), 400, 'M_MISSING_PARAM');
    expectMatrixError(await as(server, admin, 'GET', `${A2}/users/${enc('@nobody:test.local')}/devices`), 404, 'M_NOT_FOUND');
  });

  test('deactivation logs out, deletes every device and key, keeps the user ID taken, and puts the user in "left" for those tracking them', async () => {
    const server = await start();
    const admin = await registerUser(server, 'admin', 'pw', true);
    const carol = await registerUser(server, 'carol');
    const carolPhone = await login(server, 'carol', carol.password);
    await withKeys(server, carol);
    await withKeys(server, carolPhone);
    const cs = new TestCrossSigning(carol.userId);
    assert.equal((await as(server, carol, 'POST', `${C}/keys/device_signing/upload`, cs.upload())).status, 200);
    await withBackup(server, carol);
    await withBackup(server, carol);
    // Dave tracks carol (by querying her keys) and remembers where he is in the stream.
    const dave = await registerUser(server, 'dave');
    await as(server, dave, 'POST', `${C}/keys/query`, { device_keys: { [carol.userId]: [] } });
    const since = (await as(server, dave, 'GET', `${C}/sync`)).body['next_batch'] as string;
    const longPoll = as(server, dave, 'GET', `${C}/sync?since=${since}&timeout=20000`);

    const r = await as(server, admin, 'POST', `${A1}/deactivate/${enc(carol.userId)}`, { erase: false });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.body, { id_server_unbind_result: 'success' });

    const woken = await longPoll;
    assert.deepEqual(woken.body['device_lists'], { changed: [], left: [carol.userId] }, 'the waiting /sync of a tracker hears of it');
    const changes = await as(server, dave, 'GET', `${C}/keys/changes?from=${since}`);
    assert.deepEqual(changes.body, { changed: [], left: [carol.userId] });

    for (const s of [carol, carolPhone]) expectMatrixError(await as(server, s, 'GET', `${C}/account/whoami`), 401, 'M_UNKNOWN_TOKEN');
    expectMatrixError(await http(server.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'carol', password: carol.password } }), 403, 'M_FORBIDDEN');
    const keys = await as(server, dave, 'POST', `${C}/keys/query`, { device_keys: { [carol.userId]: [] } });
    assert.deepEqual((keys.body['device_keys'] as Json)[carol.userId], {}, 'no device keys left');
    assert.equal((keys.body['master_keys'] as Json)[carol.userId], undefined, 'no cross-signing keys left');
    const claim = await as(server, dave, 'POST', `${C}/keys/claim`, { one_time_keys: { [carol.userId]: { [carol.deviceId]: 'signed_curve25519' } } });
    assert.deepEqual(claim.body['one_time_keys'], {}, 'no one-time key left to claim');
    await server.mx.backupPurger.drain();
    assert.deepEqual(await backupRows(server, carol.userId), { versions: 0, keys: 0 }, 'the key backups are deleted, versions and keys');

    const shown = await as(server, admin, 'GET', `${A2}/users/${enc(carol.userId)}`);
    assert.equal(shown.body['deactivated'], true);
    assert.deepEqual((await as(server, admin, 'GET', `${A2}/users`)).body['total'], 2, 'deactivated users are left out of the list by default');
    assert.equal((await as(server, admin, 'GET', `${A2}/users?deactivated=true`)).body['total'], 3);

    // The ID stays taken.
    expectMatrixError(await http(server.url, 'GET', `${C}/register/available?username=carol`), 400, 'M_USER_IN_USE');
    expectMatrixError(
      await http(server.url, 'POST', `${C}/register`, { body: { username: 'carol', password: 'again', auth: { type: 'm.login.dummy' } } }),
      400,
      'M_USER_IN_USE',
    );
    expectMatrixError(await as(server, admin, 'POST', `${A1}/reset_password/${enc(carol.userId)}`, { new_password: 'back' }), 400, 'M_INVALID_PARAM', /deactivated/);
    expectMatrixError(await as(server, admin, 'POST', `${A1}/deactivate/${enc('@carol:elsewhere.example')}`, {}), 400, 'M_INVALID_PARAM', /local users/);
    expectMatrixError(await as(server, admin, 'POST', `${A1}/deactivate/${enc('@nobody:test.local')}`), 404, 'M_NOT_FOUND');
    expectMatrixError(await as(server, admin, 'POST', `${A1}/deactivate/${enc(carol.userId)}`, { erase: 'yes' }), 400, 'M_BAD_JSON');
  });

  test('an admin can let a user replace their master key without user-interactive auth, for ten minutes, once', async () => {
    const server = await start();
    const admin = await registerUser(server, 'admin', 'pw', true);
    const carol = await registerUser(server, 'carol');
    const allow = `${A1}/users/${enc(carol.userId)}/_allow_cross_signing_replacement_without_uia`;
    expectMatrixError(await as(server, admin, 'POST', allow, {}), 404, 'M_NOT_FOUND', /no master cross-signing key/);

    assert.equal((await as(server, carol, 'POST', `${C}/keys/device_signing/upload`, new TestCrossSigning(carol.userId).upload())).status, 200);
    const before = Date.now();
    const r = await as(server, admin, 'POST', allow, {});
    assert.equal(r.status, 200, r.text);
    const until = r.body['updatable_without_uia_before_ms'] as number;
    assert.ok(until >= before + 9 * 60_000 && until <= Date.now() + 10 * 60_000, r.text);

    const replaced = await as(server, carol, 'POST', `${C}/keys/device_signing/upload`, new TestCrossSigning(carol.userId).upload());
    assert.equal(replaced.status, 200, `replaced without a password: ${replaced.text}`);
    const again = await as(server, carol, 'POST', `${C}/keys/device_signing/upload`, new TestCrossSigning(carol.userId).upload());
    assert.equal(again.status, 401, 'the permission ended with the replacement');
  });

  test('replacing only the self-signing key uses up the permission too', async () => {
    const server = await start();
    const { carol, cs } = await crossSigningReplaceableWithoutUia(server);

    const newSelfSigning = new TestSigningKey();
    const selfSigningKey = cs.master.sign(
      { user_id: carol.userId, usage: ['self_signing'], keys: { [`ed25519:${newSelfSigning.publicKey}`]: newSelfSigning.publicKey } },
      carol.userId,
      `ed25519:${cs.master.publicKey}`,
    );
    const replaced = await as(server, carol, 'POST', `${C}/keys/device_signing/upload`, { self_signing_key: selfSigningKey });
    assert.equal(replaced.status, 200, replaced.text);
    const master = await as(server, carol, 'POST', `${C}/keys/device_signing/upload`, new TestCrossSigning(carol.userId).upload());
    assert.equal(master.status, 401, 'the master key cannot be replaced without a password afterwards');
  });

  test('of two uploads racing in the window, only one replaces the keys without user-interactive auth', async () => {
    const server = await start();
    const { carol } = await crossSigningReplaceableWithoutUia(server);
    // Both uploads see the window open before either stores its keys.
    const keys = server.mx.store.keys;
    const read = keys.masterKeyReplaceableWithoutUiaUntil.bind(keys);
    let arrived = 0;
    let allArrived!: () => void;
    const barrier = new Promise<void>((resolve) => (allArrived = resolve));
    keys.masterKeyReplaceableWithoutUiaUntil = async (userId) => {
      const until = await read(userId);
      if (++arrived === 2) allArrived();
      await barrier;
      return until;
    };
    const uploads = await Promise.all(
      Array.from({ length: 2 }, () => as(server, carol, 'POST', `${C}/keys/device_signing/upload`, new TestCrossSigning(carol.userId).upload())),
    );
    assert.deepEqual(uploads.map((r) => r.status).sort(), [200, 401]);
  });
});

describeEachBackend('mxkeys users (command line)', (backend) => {
  test('list, reset-password and deactivate work on the database of a running server, through the same rules', async () => {
    const database = await backend.freshDatabase();
    const server = await startServer({ backend, database: { ...database }, config: { registration_shared_secret: SHARED_SECRET } });
    const carol = await registerUser(server, 'carol');
    const dave = await registerUser(server, 'dave');
    const dir = tempDir();
    const config = join(dir, 'mxkeys.yaml');
    const db = database.postgres ? `{ postgres: ${JSON.stringify(database.postgres)} }` : `{ sqlite: ${JSON.stringify(database.sqlite)} }`;
    writeFileSync(config, `server_name: test.local\ndatabase: ${db}\nsigning_key_path: ${JSON.stringify(join(dir, 'k'))}\n`);

    const list = runCli(['users', 'list', '--config', config]);
    assert.equal(list.code, 0, list.stderr);
    assert.match(list.stdout, /^USER +ADMIN +DEACTIVATED +CREATED +LAST SEEN\n@carol:test\.local +- +- +\d{4}-\d\d-\d\d \d\d:\d\d/);
    assert.match(list.stdout, /@dave:test\.local/);

    const pw = join(dir, 'pw');
    writeFileSync(pw, 'from the cli\n');
    const reset = runCli(['users', 'reset-password', '--config', config, '--user', 'carol', '--password-file', pw]);
    assert.equal(reset.code, 0, reset.stderr);
    const logged = reset.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Json);
    assert.deepEqual(
      logged.map((l) => [l['msg'], l['by'], l['user']]),
      [['password reset by an administrator', 'command line', carol.userId]],
      'the action is logged on standard error, as JSON lines',
    );
    assert.doesNotMatch(reset.stdout, /"msg"/, 'standard output holds only the answer');
    expectMatrixError(await http(server.url, 'GET', `${C}/account/whoami`, { token: carol.accessToken }), 401, 'M_UNKNOWN_TOKEN');
    await login(server, 'carol', 'from the cli');

    await withBackup(server, dave);
    const deactivate = runCli(['users', 'deactivate', '--config', config, '--user', '@dave:test.local']);
    assert.equal(deactivate.code, 0, deactivate.stderr);
    assert.match(deactivate.stdout, /deactivated @dave:test\.local/);
    assert.match(deactivate.stderr, /"by":"command line".*"msg":"user deactivated by an administrator"|"msg":"user deactivated by an administrator".*"by":"command line"/);
    assert.deepEqual(await backupRows(server, dave.userId), { versions: 0, keys: 0 }, 'the command purged the key backups before exiting');
    expectMatrixError(await http(server.url, 'GET', `${C}/account/whoami`, { token: dave.accessToken }), 401, 'M_UNKNOWN_TOKEN');
    const after = runCli(['users', 'list', '--config', config]);
    assert.doesNotMatch(after.stdout, /@dave/);
    assert.match(runCli(['users', 'list', '--config', config, '--deactivated']).stdout, /@dave:test\.local +- +deactivated/);

    const missing = runCli(['users', 'deactivate', '--config', config, '--user', 'nobody']);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /@nobody:test\.local: there is no such user on this server/);
    assert.doesNotMatch(missing.stderr, /Usage:/);
    const noAction = runCli(['users', '--config', config]);
    assert.equal(noAction.code, 2);
    assert.match(noAction.stderr, /list, reset-password or deactivate/);
  });
});
