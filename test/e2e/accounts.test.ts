import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { http, startServer } from '../support/server.js';
import { login, passwordAuth, registerUser, registrationMac, SHARED_SECRET, expectMatrixError } from '../support/client.js';
import { runCli } from '../support/process.js';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../support/backends.js';
import { PasswordHasher } from '../../src/accounts/secrets.js';
import { NONCE_RATE_LIMIT } from '../../src/accounts/service.js';

const C = '/_matrix/client/v3';


describeEachBackend('accounts and devices', (backend) => {
  const start = (config: Record<string, unknown> = {}) => startServer({ backend, config: { registration_shared_secret: SHARED_SECRET, ...config } });

  test('the whole life of an account: register, log in, whoami, list and rename devices, delete one with UIA, log out', async () => {
    const s = await start();
    const alice = await registerUser(s, 'alice', 'correct horse');
    assert.equal(alice.userId, '@alice:test.local');
    assert.match(alice.deviceId, /^[A-Z]{10}$/);

    const phone = await login(s, 'alice', 'correct horse', { initial_device_display_name: 'Alice phone' });
    assert.notEqual(phone.deviceId, alice.deviceId);
    const who = await http(s.url, 'GET', `${C}/account/whoami`, { token: phone.accessToken });
    assert.deepEqual(who.body, { user_id: '@alice:test.local', device_id: phone.deviceId, is_guest: false });

    const list = await http<{ devices: Record<string, unknown>[] }>(s.url, 'GET', `${C}/devices`, { token: alice.accessToken });
    assert.deepEqual(list.body.devices.map((d) => d['device_id']).sort(), [alice.deviceId, phone.deviceId].sort());
    const phoneEntry = list.body.devices.find((d) => d['device_id'] === phone.deviceId)!;
    assert.equal(phoneEntry['display_name'], 'Alice phone');
    assert.equal(typeof phoneEntry['last_seen_ts'], 'number');

    const renamed = await http(s.url, 'PUT', `${C}/devices/${phone.deviceId}`, { token: alice.accessToken, body: { display_name: 'Work phone' } });
    assert.equal(renamed.status, 200);
    const one = await http(s.url, 'GET', `${C}/devices/${phone.deviceId}`, { token: alice.accessToken });
    assert.equal(one.body['display_name'], 'Work phone');

    // Deleting a device needs the password: first a 401 with the flows and a session, no errcode.
    const challenge = await http(s.url, 'DELETE', `${C}/devices/${phone.deviceId}`, { token: alice.accessToken });
    assert.equal(challenge.status, 401);
    assert.deepEqual(challenge.body['flows'], [{ stages: ['m.login.password'] }]);
    assert.equal(typeof challenge.body['session'], 'string');
    assert.equal(challenge.body['errcode'], undefined);
    const session = challenge.body['session'] as string;

    const wrong = await http(s.url, 'DELETE', `${C}/devices/${phone.deviceId}`, { token: alice.accessToken, body: { auth: { ...passwordAuth(alice, session), password: 'nope' } } });
    expectMatrixError(wrong, 401, 'M_FORBIDDEN');
    assert.equal(wrong.body['session'], session);
    assert.deepEqual(wrong.body['flows'], [{ stages: ['m.login.password'] }]);
    assert.equal((await http(s.url, 'GET', `${C}/devices/${phone.deviceId}`, { token: alice.accessToken })).status, 200, 'still there');

    const ok = await http(s.url, 'DELETE', `${C}/devices/${phone.deviceId}`, { token: alice.accessToken, body: { auth: passwordAuth(alice, session) } });
    assert.equal(ok.status, 200, ok.text);
    expectMatrixError(await http(s.url, 'GET', `${C}/devices/${phone.deviceId}`, { token: alice.accessToken }), 404, 'M_NOT_FOUND');
    expectMatrixError(await http(s.url, 'GET', `${C}/account/whoami`, { token: phone.accessToken }), 401, 'M_UNKNOWN_TOKEN');
    // Retrying the completed request gets its result, as the spec requires.
    const again = await http(s.url, 'DELETE', `${C}/devices/${phone.deviceId}`, { token: alice.accessToken, body: { auth: { session } } });
    assert.equal(again.status, 200, again.text);

    const out = await http(s.url, 'POST', `${C}/logout`, { token: alice.accessToken });
    assert.equal(out.status, 200);
    expectMatrixError(await http(s.url, 'GET', `${C}/account/whoami`, { token: alice.accessToken }), 401, 'M_UNKNOWN_TOKEN');
    const fresh = await login(s, '@alice:test.local', 'correct horse');
    const devices = await http<{ devices: unknown[] }>(s.url, 'GET', `${C}/devices`, { token: fresh.accessToken });
    assert.equal(devices.body.devices.length, 1, 'logout removed the device');
  });

  test('shared-secret registration refuses a bad MAC, a reused nonce, an expired nonce, and says when no secret is set', async () => {
    const s = await start();
    const nonce = async () => (await http<{ nonce: string }>(s.url, 'GET', '/_synapse/admin/v1/register')).body.nonce;
    const attempt = (n: string, mac: string) => http(s.url, 'POST', '/_synapse/admin/v1/register', { body: { nonce: n, username: 'bob', password: 'pw', admin: false, mac } });

    const n1 = await nonce();
    expectMatrixError(await attempt(n1, registrationMac('wrong secret', n1, 'bob', 'pw', false)), 403, 'M_FORBIDDEN');
    expectMatrixError(await attempt(n1, registrationMac(SHARED_SECRET, n1, 'bob', 'pw', false)), 400, 'M_UNKNOWN'); // used up by the failed attempt
    const n2 = await nonce();
    assert.equal((await attempt(n2, registrationMac(SHARED_SECRET, n2, 'bob', 'pw', false))).status, 200);
    expectMatrixError(await attempt(n2, registrationMac(SHARED_SECRET, n2, 'bob', 'pw', false)), 400, 'M_UNKNOWN');
    // A nonce older than a minute is refused even with the right MAC.
    await s.mx.store.accounts.addRegistrationNonce('stale-nonce', Date.now() - 61_000);
    expectMatrixError(
      await http(s.url, 'POST', '/_synapse/admin/v1/register', { body: { nonce: 'stale-nonce', username: 'carol', password: 'pw', admin: false, mac: registrationMac(SHARED_SECRET, 'stale-nonce', 'carol', 'pw', false) } }),
      400,
      'M_UNKNOWN',
    );
    const n3 = await nonce();
    expectMatrixError(await attempt(n3, 'zz'), 403, 'M_FORBIDDEN');
    const n4 = await nonce();
    expectMatrixError(
      await http(s.url, 'POST', '/_synapse/admin/v1/register', { body: { nonce: n4, username: 'bob', password: 'pw', admin: false, mac: registrationMac(SHARED_SECRET, n4, 'bob', 'pw', false) } }),
      400,
      'M_USER_IN_USE',
    );
    const n5 = await nonce();
    expectMatrixError(
      await http(s.url, 'POST', '/_synapse/admin/v1/register', { body: { nonce: n5, username: 'Bad Name', password: 'pw', admin: false, mac: registrationMac(SHARED_SECRET, n5, 'Bad Name', 'pw', false) } }),
      400,
      'M_INVALID_USERNAME',
    );

    const noSecret = await startServer({ backend });
    const get = await http(noSecret.url, 'GET', '/_synapse/admin/v1/register');
    expectMatrixError(get, 400, 'M_UNKNOWN');
    assert.match(String(get.body['error']), /registration_shared_secret/);
    expectMatrixError(await http(noSecret.url, 'POST', '/_synapse/admin/v1/register', { body: { nonce: 'x', username: 'a', password: 'b', mac: '00' } }), 400, 'M_UNKNOWN');
  });

  test('registration nonces are rate limited per address: a flood of GET /_synapse/admin/v1/register is mostly refused and writes nothing for those', async () => {
    const s = await start();
    const gets = await Promise.all(Array.from({ length: 100 }, () => http(s.url, 'GET', '/_synapse/admin/v1/register')));
    const issued = gets.filter((r) => r.status === 200).length;
    // burst_count at once, plus the few that refill while the flood is answered.
    assert.ok(issued >= NONCE_RATE_LIMIT.burst_count && issued < 50, `${issued} nonces issued`);
    assert.equal(gets.filter((r) => r.status === 429).length, 100 - issued);
    const refused = gets.find((r) => r.status === 429)!;
    expectMatrixError(refused, 429, 'M_LIMIT_EXCEEDED');
    assert.ok(Number(refused.headers.get('retry-after')) >= 1);
    const rows = await (s.mx.store as unknown as { db: { get<T>(sql: string): Promise<T> } }).db.get<{ n: number }>('SELECT COUNT(*) AS n FROM registration_nonces');
    assert.equal(Number(rows.n), issued);
  });

  test('login: wrong password and unknown user get the same 403; legacy "user" and full user IDs work', async () => {
    const s = await start();
    await registerUser(s, 'dave', 'pw-dave');
    const wrong = await http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', identifier: { type: 'm.id.user', user: 'dave' }, password: 'x' } });
    const unknown = await http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', identifier: { type: 'm.id.user', user: 'nobody' }, password: 'x' } });
    expectMatrixError(wrong, 403, 'M_FORBIDDEN');
    assert.deepEqual(unknown.body, wrong.body);
    const legacy = await http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'dave', password: 'pw-dave' } });
    assert.equal(legacy.status, 200);
    assert.equal(legacy.body['home_server'], 'test.local');
    const full = await http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', identifier: { type: 'm.id.user', user: '@dave:test.local' }, password: 'pw-dave' } });
    assert.equal(full.status, 200);
    expectMatrixError(await http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.token', token: 'x' } }), 400, 'M_UNKNOWN');
    const flows = await http(s.url, 'GET', `${C}/login`);
    assert.deepEqual(flows.body, { flows: [{ type: 'm.login.password' }] });
  });

  test('logging in with an existing device ID keeps the device and revokes its old token', async () => {
    const s = await start();
    const erin = await registerUser(s, 'erin', 'pw-erin');
    const first = await login(s, 'erin', 'pw-erin', { device_id: 'ERINLAPTOP', initial_device_display_name: 'Laptop' });
    assert.equal(first.deviceId, 'ERINLAPTOP');
    const second = await login(s, 'erin', 'pw-erin', { device_id: 'ERINLAPTOP', initial_device_display_name: 'Ignored' });
    assert.equal(second.deviceId, 'ERINLAPTOP');
    expectMatrixError(await http(s.url, 'GET', `${C}/account/whoami`, { token: first.accessToken }), 401, 'M_UNKNOWN_TOKEN');
    assert.equal((await http(s.url, 'GET', `${C}/account/whoami`, { token: second.accessToken })).status, 200);
    const device = await http(s.url, 'GET', `${C}/devices/ERINLAPTOP`, { token: erin.accessToken });
    assert.equal(device.body['display_name'], 'Laptop');
    expectMatrixError(
      await http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'erin', password: 'pw-erin', device_id: 'has space' } }),
      400,
      'M_INVALID_PARAM',
    );
  });

  test('access tokens: missing is M_MISSING_TOKEN, unknown is M_UNKNOWN_TOKEN, the query parameter is refused unless allow_access_token_in_query is on', async () => {
    const s = await start();
    const frank = await registerUser(s, 'frank');
    expectMatrixError(await http(s.url, 'GET', `${C}/account/whoami`), 401, 'M_MISSING_TOKEN');
    expectMatrixError(await http(s.url, 'GET', `${C}/account/whoami`, { token: 'mxk_made_up' }), 401, 'M_UNKNOWN_TOKEN');
    expectMatrixError(await http(s.url, 'GET', `${C}/account/whoami`, { headers: { authorization: 'Basic abc' } }), 401, 'M_MISSING_TOKEN');
    expectMatrixError(await http(s.url, 'GET', `${C}/account/whoami?access_token=${encodeURIComponent(frank.accessToken)}`), 401, 'M_MISSING_TOKEN');

    const lenient = await start({ allow_access_token_in_query: true });
    const g = await registerUser(lenient, 'grace');
    const viaQuery = await http(lenient.url, 'GET', `${C}/account/whoami?access_token=${encodeURIComponent(g.accessToken)}`);
    assert.equal(viaQuery.status, 200);
    assert.equal(viaQuery.body['user_id'], '@grace:test.local');
  });

  test('repeated failed logins are rate limited with 429 M_LIMIT_EXCEEDED and retry_after_ms', async () => {
    const s = await start({ rc_login: { failed_attempts: { per_second: 0.1, burst_count: 2 } } });
    await registerUser(s, 'heidi', 'pw-heidi');
    const attempt = (password: string) => http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'heidi', password } });
    expectMatrixError(await attempt('a'), 403, 'M_FORBIDDEN');
    expectMatrixError(await attempt('b'), 403, 'M_FORBIDDEN');
    const limited = await attempt('pw-heidi');
    expectMatrixError(limited, 429, 'M_LIMIT_EXCEEDED');
    assert.ok((limited.body['retry_after_ms'] as number) > 0);
    assert.ok(Number(limited.headers.get('retry-after')) >= 1);
  });

  test('parallel password guesses at one account are limited like sequential ones, while many users behind one address log in at once', async () => {
    const s = await start({ rc_login: { failed_attempts: { per_second: 0.1, burst_count: 2 } } });
    const names = Array.from({ length: 6 }, (_, i) => `crowd${i}`);
    for (const name of names) await registerUser(s, name, `pw-${name}`);
    const logins = await Promise.all(names.map((name) => http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: name, password: `pw-${name}` } })));
    assert.deepEqual(logins.map((r) => r.status), names.map(() => 200));

    await registerUser(s, 'ines', 'pw-ines');
    const guesses = await Promise.all(Array.from({ length: 8 }, (_, i) => http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'ines', password: `guess${i}` } })));
    assert.equal(guesses.filter((r) => r.status === 403).length, 2, 'only burst_count guesses were checked');
    assert.equal(guesses.filter((r) => r.status === 429).length, 6);
  });

  test('a burst of parallel wrong logins from one address, each naming another user, reaches the password check only burst_count times', async () => {
    const s = await start({ rc_login: { failed_attempts: { per_second: 0.1, burst_count: 2 } } });
    const attempts = await Promise.all(
      Array.from({ length: 8 }, (_, i) => http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: `stranger${i}`, password: 'guess' } })),
    );
    assert.deepEqual(attempts.map((r) => r.status).sort(), [403, 403, 429, 429, 429, 429, 429, 429], attempts.map((r) => r.text).join('\n'));
    for (const r of attempts.filter((a) => a.status === 429)) expectMatrixError(r, 429, 'M_LIMIT_EXCEEDED');
  });

  test('new passwords are hashed with scrypt N = 2^17; a cheaper old hash still logs in and is then replaced', async () => {
    const s = await start({ password_hashing: {} }); // the default cost (the test servers' own is cheaper)
    const quinn = await registerUser(s, 'quinn', 'pw-quinn');
    const hashOf = async () => (await s.mx.store.accounts.getUser(quinn.userId))!.passwordHash!;
    const current = await hashOf();
    assert.match(current, /^scrypt\$131072\$8\$1\$/);

    const old = await new PasswordHasher(15).hash('older password');
    assert.ok(await s.mx.store.accounts.replacePasswordHash(quinn.userId, current, old));
    expectMatrixError(await http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'quinn', password: 'wrong' } }), 403, 'M_FORBIDDEN');
    assert.equal(await hashOf(), old, 'a failed login changes nothing');
    await login(s, 'quinn', 'older password');
    const rehashed = await hashOf();
    assert.match(rehashed, /^scrypt\$131072\$8\$1\$/);
    await login(s, 'quinn', 'older password');
    assert.equal(await hashOf(), rehashed, 'a hash at the current cost is kept');
  });

  test('a login that would give a user more than max_devices_per_user devices is refused, also when several race', async () => {
    const s = await start({ max_devices_per_user: 3 });
    const rita = await registerUser(s, 'rita', 'pw-rita');
    await login(s, 'rita', 'pw-rita', { device_id: 'RITAPHONE' });
    const racing = await Promise.all(Array.from({ length: 4 }, () => http(s.url, 'POST', `${C}/login`, { body: { type: 'm.login.password', user: 'rita', password: 'pw-rita' } })));
    assert.deepEqual(racing.map((r) => r.status).sort(), [200, 403, 403, 403]);
    const refused = racing.find((r) => r.status === 403)!;
    expectMatrixError(refused, 403, 'ORG_MATRIX_MSC4342_M_TOO_MANY_DEVICES', /3 devices.*max_devices_per_user/);
    const devices = await http<{ devices: unknown[] }>(s.url, 'GET', `${C}/devices`, { token: rita.accessToken });
    assert.equal(devices.body.devices.length, 3);

    // An existing device may log in again; after a logout there is room for a new one.
    const again = await login(s, 'rita', 'pw-rita', { device_id: 'RITAPHONE' });
    assert.equal((await http(s.url, 'POST', `${C}/logout`, { token: again.accessToken })).status, 200);
    await login(s, 'rita', 'pw-rita');
  });

  test('POST /delete_devices deletes several devices behind user-interactive auth, and /logout/all removes every device', async () => {
    const s = await start();
    const ivan = await registerUser(s, 'ivan');
    const d1 = await login(s, 'ivan', ivan.password);
    const d2 = await login(s, 'ivan', ivan.password);
    const body = { devices: [d1.deviceId, d2.deviceId, 'NOSUCHDEVICE'] };
    const challenge = await http(s.url, 'POST', `${C}/delete_devices`, { token: ivan.accessToken, body });
    assert.equal(challenge.status, 401);
    // The session is bound to this request: it cannot authorise deleting a different set.
    const other = await http(s.url, 'POST', `${C}/delete_devices`, { token: ivan.accessToken, body: { devices: [ivan.deviceId], auth: passwordAuth(ivan, challenge.body['session'] as string) } });
    expectMatrixError(other, 403, 'M_FORBIDDEN');
    const ok = await http(s.url, 'POST', `${C}/delete_devices`, { token: ivan.accessToken, body: { ...body, auth: passwordAuth(ivan, challenge.body['session'] as string) } });
    assert.equal(ok.status, 200, ok.text);
    const left = await http<{ devices: { device_id: string }[] }>(s.url, 'GET', `${C}/devices`, { token: ivan.accessToken });
    assert.deepEqual(left.body.devices.map((d) => d.device_id), [ivan.deviceId]);
    // Someone else's password does not count.
    expectMatrixError(
      await http(s.url, 'POST', `${C}/delete_devices`, { token: ivan.accessToken, body: { devices: Array.from({ length: 1001 }, (_, i) => `D${i}`) } }),
      400,
      'M_INVALID_PARAM',
      /At most 1000/,
    );
    const judy = await registerUser(s, 'judy');
    const d3 = await login(s, 'ivan', ivan.password);
    const wrongUser = await http(s.url, 'DELETE', `${C}/devices/${d3.deviceId}`, { token: ivan.accessToken, body: { auth: passwordAuth(judy) } });
    expectMatrixError(wrongUser, 403, 'M_FORBIDDEN', /logged-in user/);
    assert.equal(wrongUser.body['flows'], undefined, "another user's password is refused outright, not as a failed stage");
    assert.equal((await http(s.url, 'GET', `${C}/account/whoami`, { token: d3.accessToken })).status, 200, 'the device is still there');

    assert.equal((await http(s.url, 'POST', `${C}/logout/all`, { token: d3.accessToken })).status, 200);
    for (const t of [ivan.accessToken, d3.accessToken]) expectMatrixError(await http(s.url, 'GET', `${C}/account/whoami`, { token: t }), 401, 'M_UNKNOWN_TOKEN');
  });

  test('deleting a device leaves no row of it in any table (keys, tokens, to-device messages), except the device-list change that records the deletion', async () => {
    const s = await start();
    const kim = await registerUser(s, 'kim');
    const gone = await login(s, 'kim', kim.password, { initial_device_display_name: 'To delete' });
    // A to-device message waiting for the device, and one it sent (its txnId is remembered).
    for (const [from, txn, to] of [[kim, 'to-gone', gone.deviceId], [gone, 'from-gone', kim.deviceId]] as const) {
      const sent = await http(s.url, 'PUT', `${C}/sendToDevice/org.example.note/${txn}`, { token: from.accessToken, body: { messages: { [kim.userId]: { [to]: { note: 1 } } } } });
      assert.equal(sent.status, 200, sent.text);
    }
    const challenge = await http(s.url, 'DELETE', `${C}/devices/${gone.deviceId}`, { token: kim.accessToken });
    const ok = await http(s.url, 'DELETE', `${C}/devices/${gone.deviceId}`, { token: kim.accessToken, body: { auth: passwordAuth(kim, challenge.body['session'] as string) } });
    assert.equal(ok.status, 200);
    const db = (s.mx.store as unknown as { db: import('../../src/storage/sql.js').SqlDatabase }).db;
    const mentions: string[] = [];
    for (const table of await s.mx.store.tableNames()) {
      for (const row of await db.all<Record<string, unknown>>(`SELECT * FROM ${table}`)) {
        if (JSON.stringify(row).includes(gone.deviceId)) mentions.push(`${table}: ${JSON.stringify(row)}`);
      }
    }
    assert.equal(mentions.length, 2, mentions.join('\n'));
    assert.ok(mentions.every((m) => m.startsWith('device_lists_stream:')), mentions.join('\n'));
  });

  test('open registration: off by default, then the m.login.dummy flow; taken and invalid names and guests are refused', async () => {
    const closed = await startServer({ backend });
    expectMatrixError(await http(closed.url, 'POST', `${C}/register`, { body: { username: 'x', password: 'y' } }), 403, 'M_FORBIDDEN');

    const s = await start({ enable_registration: true });
    const first = await http(s.url, 'POST', `${C}/register`, { body: { username: 'lena', password: 'pw', initial_device_display_name: 'Web' } });
    assert.equal(first.status, 401);
    assert.deepEqual(first.body['flows'], [{ stages: ['m.login.dummy'] }]);
    const done = await http(s.url, 'POST', `${C}/register`, {
      body: { username: 'lena', password: 'pw', initial_device_display_name: 'Web', auth: { type: 'm.login.dummy', session: first.body['session'] } },
    });
    assert.equal(done.status, 200, done.text);
    assert.equal(done.body['user_id'], '@lena:test.local');
    assert.equal(typeof done.body['access_token'], 'string');
    const me = await login(s, 'lena', 'pw');
    assert.equal(me.userId, '@lena:test.local');

    // inhibit_login: an account, but no device and no access token that nobody would receive.
    const quiet = await http(s.url, 'POST', `${C}/register`, { body: { username: 'otto', password: 'pw', inhibit_login: true, auth: { type: 'm.login.dummy' } } });
    assert.deepEqual(quiet.body, { user_id: '@otto:test.local' }, quiet.text);
    const otto = await login(s, 'otto', 'pw');
    const ottoDevices = await http<{ devices: { device_id: string }[] }>(s.url, 'GET', `${C}/devices`, { token: otto.accessToken });
    assert.deepEqual(ottoDevices.body.devices.map((d) => d.device_id), [otto.deviceId], 'only the device of the later login');

    expectMatrixError(await http(s.url, 'POST', `${C}/register`, { body: { username: 'lena', password: 'pw' } }), 400, 'M_USER_IN_USE');
    expectMatrixError(await http(s.url, 'POST', `${C}/register`, { body: { username: 'Lena!', password: 'pw' } }), 400, 'M_INVALID_USERNAME');
    expectMatrixError(await http(s.url, 'POST', `${C}/register`, { body: { username: 'x'.repeat(300), password: 'pw' } }), 400, 'M_INVALID_USERNAME');
    expectMatrixError(await http(s.url, 'POST', `${C}/register?kind=guest`, { body: {} }), 403, 'M_FORBIDDEN');
    expectMatrixError(await http(s.url, 'GET', `${C}/register/available?username=lena`), 400, 'M_USER_IN_USE');
    assert.deepEqual((await http(s.url, 'GET', `${C}/register/available?username=mona`)).body, { available: true });
  });

  test('bad input gets 4xx Matrix errors, never a 500', async () => {
    const s = await start();
    const nia = await registerUser(s, 'nia');
    const cases: [string, string, unknown, string?][] = [
      ['POST', `${C}/login`, { type: 'm.login.password', identifier: { type: 'm.id.user', user: 42 }, password: 'x' }],
      ['POST', `${C}/login`, { type: 'm.login.password', identifier: 'nia', password: 'x' }],
      ['POST', `${C}/login`, { type: 'm.login.password', user: 'nia', password: ['x'] }],
      ['POST', `${C}/login`, { type: 'm.login.password', user: 'nia', password: 'x', initial_device_display_name: 7 }],
      ['POST', `${C}/login`, [1, 2]],
      ['POST', `${C}/login`, 'just a string'],
      ['POST', `${C}/login`, { type: 'm.login.password', identifier: { type: 'm.id.thirdparty', medium: 'email', address: 'a@b' }, password: 'x' }],
      ['POST', `${C}/login`, { type: 'm.login.password', user: `@${'a'.repeat(300)}:test.local`, password: 'x' }],
      ['PUT', `${C}/devices/${nia.deviceId}`, { display_name: 5 }, nia.accessToken],
      ['PUT', `${C}/devices/${nia.deviceId}`, { display_name: 'x'.repeat(101) }, nia.accessToken],
      ['PUT', `${C}/devices/NOSUCH`, { display_name: 'x' }, nia.accessToken],
      ['POST', `${C}/delete_devices`, { devices: 'all' }, nia.accessToken],
      ['POST', `${C}/delete_devices`, { devices: [1] }, nia.accessToken],
      ['POST', `${C}/delete_devices`, {}, nia.accessToken],
      ['DELETE', `${C}/devices/${nia.deviceId}`, { auth: 'password' }, nia.accessToken],
      ['DELETE', `${C}/devices/${nia.deviceId}`, { auth: { type: 'm.login.password', session: 5 } }, nia.accessToken],
      ['DELETE', `${C}/devices/${nia.deviceId}`, { auth: { type: 'm.login.recaptcha' } }, nia.accessToken],
      ['DELETE', `${C}/devices/${nia.deviceId}`, { auth: { type: 'm.login.password', session: 'unknown' } }, nia.accessToken],
      ['POST', '/_synapse/admin/v1/register', { nonce: 1, username: 'x', password: 'y', mac: 'z' }],
      ['POST', '/_synapse/admin/v1/register', { nonce: 'n', username: 'x', password: 'y', mac: 'z', admin: 'yes' }],
      ['POST', `${C}/register`, { username: 5 }],
    ];
    for (const [method, path, body, token] of cases) {
      const r = await http(s.url, method, path, { body, ...(token ? { token } : {}) });
      assert.ok(r.status >= 400 && r.status < 500, `${method} ${path} ${JSON.stringify(body)} → ${r.status} ${r.text}`);
      assert.equal(typeof r.body['errcode'], 'string', `${method} ${path} ${JSON.stringify(body)} → ${r.text}`);
    }
    const nonJson = await http(s.url, 'POST', `${C}/login`, { rawBody: '{"type":', headers: { 'content-type': 'application/json' } });
    expectMatrixError(nonJson, 400, 'M_NOT_JSON');
    // Nothing changed: the device is still there under its name, and nia can still log in.
    assert.equal((await http(s.url, 'GET', `${C}/devices/${nia.deviceId}`, { token: nia.accessToken })).status, 200);
    await login(s, 'nia', nia.password);
  });

  test('discovery: /versions, and the .well-known documents from public_baseurl', async () => {
    const bare = await startServer({ backend });
    const versions = await http(bare.url, 'GET', '/_matrix/client/versions');
    assert.ok((versions.body['versions'] as string[]).includes('v1.1'));
    expectMatrixError(await http(bare.url, 'GET', '/.well-known/matrix/client'), 404, 'M_NOT_FOUND');
    expectMatrixError(await http(bare.url, 'GET', '/.well-known/matrix/server'), 404, 'M_NOT_FOUND');
    const s = await startServer({ backend, config: { public_baseurl: 'https://matrix.example.org/', serve_server_wellknown: true } });
    assert.deepEqual((await http(s.url, 'GET', '/.well-known/matrix/client')).body, { 'm.homeserver': { base_url: 'https://matrix.example.org' } });
    assert.deepEqual((await http(s.url, 'GET', '/.well-known/matrix/server')).body, { 'm.server': 'matrix.example.org:443' });
  });
});

describeEachBackend('mxkeys register-user', (backend) => {
  test('creates a user in the database of a running server, which can then log in', async () => {
    const database = await backend.freshDatabase();
    const s = await startServer({ backend, database: { ...database } });
    const dir = tempDir();
    const config = join(dir, 'mxkeys.yaml');
    const dbYaml = database.postgres ? `{ postgres: "${database.postgres}" }` : `{ sqlite: "${database.sqlite}" }`;
    writeFileSync(config, `server_name: test.local\ndatabase: ${dbYaml}\nsigning_key_path: ${join(dir, 'k')}\n`);
    const pwFile = join(dir, 'pw');
    writeFileSync(pwFile, 'from a file\n');
    const r = runCli(['register-user', '--config', config, '--user', 'olga', '--password-file', pwFile, '--admin']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), '@olga:test.local');
    const session = await login(s, 'olga', 'from a file');
    assert.equal(session.userId, '@olga:test.local');

    const taken = runCli(['register-user', '--config', config, '--user', 'olga', '--password', 'x']);
    assert.equal(taken.code, 1, 'a taken name is a failure, not a usage mistake');
    assert.match(taken.stderr, /already taken/);
    assert.doesNotMatch(taken.stderr, /Usage:/, 'no usage text for a taken name');
    // No password given and no terminal to ask on (standard input is not a TTY here).
    const noPassword = runCli(['register-user', '--config', config, '--user', 'pia']);
    assert.equal(noPassword.code, 2);
    assert.match(noPassword.stderr, /not a terminal.*--password-file/);
    const foreign = runCli(['register-user', '--config', config, '--user', '@pia:elsewhere.example', '--password', 'x']);
    assert.equal(foreign.code, 2);
    assert.match(foreign.stderr, /not a user of this server/);
  });
});

