/**
 * "A one-time key is handed out at most once, ever": across concurrent requests to several mxkeys
 * processes sharing one database, and across kill -9 and a restart. Runs the built server
 * (dist/main.js) as real child processes.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describeEachBackend, tempDir } from '../support/backends.js';
import { http, type TestServer } from '../support/server.js';
import { registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { TestDevice } from '../support/keys.js';
import { startServerProcess, type ServerProcess } from '../support/process.js';
import type { DatabaseConfig } from '../../src/storage/index.js';

const C = '/_matrix/client/v3';
const FALLBACK_ID = 'signed_curve25519:fallback';
type Json = Record<string, unknown>;

/** A config file for `mxkeys serve --config`; JSON strings are valid YAML and quote URLs' ':'. */
function writeConfig(database: DatabaseConfig): string {
  const dir = tempDir();
  const path = join(dir, 'mxkeys.yaml');
  const db = database.postgres
    ? `{ postgres: ${JSON.stringify(database.postgres)}, pool_size: ${database.pool_size ?? 10} }`
    : `{ sqlite: ${JSON.stringify(database.sqlite)} }`;
  writeFileSync(
    path,
    [
      'server_name: test.local',
      `database: ${db}`,
      `signing_key_path: ${JSON.stringify(join(dir, 'signing.key'))}`,
      `registration_shared_secret: ${JSON.stringify(SHARED_SECRET)}`,
      '',
    ].join('\n'),
  );
  return path;
}

// registerUser only needs the base URL of a server.
const at = (url: string) => ({ url }) as TestServer;

const upload = (url: string, who: Session, body: Json) => http(url, 'POST', `${C}/keys/upload`, { token: who.accessToken, body });

const counts = async (url: string, who: Session) => {
  const r = await http<{ device_one_time_keys_count: Record<string, number>; device_unused_fallback_key_types: string[] }>(url, 'GET', `${C}/sync`, {
    token: who.accessToken,
  });
  assert.equal(r.status, 200, r.text);
  return r.body;
};

/** One claim of `who`'s device: the key ID and object handed out, or undefined when none was. Throws if the request fails. */
async function claimOne(url: string, by: Session, who: Session): Promise<[string, Json] | undefined> {
  const r = await http(url, 'POST', `${C}/keys/claim`, { token: by.accessToken, body: { one_time_keys: { [who.userId]: { [who.deviceId]: 'signed_curve25519' } } } });
  assert.equal(r.status, 200, r.text);
  const keys = ((r.body['one_time_keys'] as Json)[who.userId] as Record<string, Json> | undefined)?.[who.deviceId];
  if (!keys) return undefined;
  const entries = Object.entries(keys);
  assert.equal(entries.length, 1, r.text);
  return entries[0] as [string, Json];
}

/** SIGTERM, then the process must drain and exit cleanly. */
async function stop(p: ServerProcess): Promise<void> {
  p.child.kill('SIGTERM');
  assert.equal(await p.exited, 0, p.output());
}

function duplicates(ids: readonly string[]): string[] {
  const seen = new Set<string>();
  return ids.filter((id) => (seen.has(id) ? true : (seen.add(id), false)));
}

describeEachBackend('one-time keys across processes', (backend) => {
  test('two mxkeys processes sharing one database never hand out a key twice', async (t: TestContext) => {
    const config = writeConfig(await backend.freshDatabase());
    // Started together: both migrate the same empty database at once, as replicas do.
    const [a, b] = await Promise.all([startServerProcess(['--config', config]), startServerProcess(['--config', config])]);
    assert.notEqual(a.url, b.url);

    const alice = await registerUser(at(a.url), 'alice');
    const bob = await registerUser(at(b.url), 'bob');
    const device = new TestDevice(alice.userId, alice.deviceId);
    const n = 40;
    const uploaded = device.oneTimeKeys(n);
    const fallback = device.fallbackKey();
    const up = await upload(a.url, alice, { device_keys: device.deviceKeys(), one_time_keys: uploaded, fallback_keys: { [FALLBACK_ID]: fallback } });
    assert.equal(up.status, 200, up.text);
    assert.equal((await counts(b.url, alice)).device_one_time_keys_count['signed_curve25519'], n, 'the other process sees the upload');

    const urls = [a.url, b.url];
    const results = await Promise.all(Array.from({ length: 64 }, (_, i) => claimOne(urls[i % 2]!, bob, alice).then((got) => ({ url: urls[i % 2]!, got }))));
    for (const { got } of results) assert.ok(got, 'every claim got a key while the fallback key exists');
    const oneTime = results.filter((r) => r.got![0] !== FALLBACK_ID);
    const oneTimeIds = oneTime.map((r) => r.got![0]);
    assert.deepEqual(duplicates(oneTimeIds), [], 'no one-time key was handed out twice');
    assert.deepEqual(new Set(oneTimeIds), new Set(Object.keys(uploaded)), 'exactly the uploaded keys were handed out');
    for (const r of oneTime) assert.deepEqual(r.got![1], uploaded[r.got![0]], 'each key comes back exactly as uploaded');
    const fallbacks = results.filter((r) => r.got![0] === FALLBACK_ID);
    assert.equal(fallbacks.length, 64 - n);
    for (const r of fallbacks) assert.deepEqual(r.got![1], fallback);
    // 32 claims went to each process and only 40 keys existed, so each process handed out at least 8.
    for (const url of urls) assert.ok(oneTime.filter((r) => r.url === url).length >= 64 / 2 - (64 - n), `process ${url} handed out one-time keys`);
    t.diagnostic(`one-time keys handed out by process A: ${oneTime.filter((r) => r.url === a.url).length}, by B: ${oneTime.filter((r) => r.url === b.url).length}`);

    for (const url of urls) {
      const c = await counts(url, alice);
      assert.equal(c.device_one_time_keys_count['signed_curve25519'], 0);
      assert.deepEqual(c.device_unused_fallback_key_types, []);
    }
    await Promise.all([stop(a), stop(b)]);
  });

  test('after kill -9, every acknowledged upload is still there and no claimed key is ever handed out again', async (t: TestContext) => {
    const config = writeConfig(await backend.freshDatabase());
    const first = await startServerProcess(['--config', config]);
    const alice = await registerUser(at(first.url), 'alice');
    const bob = await registerUser(at(first.url), 'bob');
    const device = new TestDevice(alice.userId, alice.deviceId);
    const deviceKeys = device.deviceKeys();
    const fallback = device.fallbackKey();

    // Three acknowledged uploads; the first carries the device keys, the last the fallback key.
    const uploaded: Record<string, Json> = {};
    const batches = 3;
    const perBatch = 20;
    for (let i = 0; i < batches; i++) {
      const batch = device.oneTimeKeys(perBatch, `u${i}_`);
      const body: Json = { one_time_keys: batch };
      if (i === 0) body['device_keys'] = deviceKeys;
      if (i === batches - 1) body['fallback_keys'] = { [FALLBACK_ID]: fallback };
      const r = await upload(first.url, alice, body);
      assert.equal(r.status, 200, r.text);
      assert.deepEqual(r.body, { one_time_key_counts: { signed_curve25519: perBatch * (i + 1) } });
      Object.assign(uploaded, batch);
    }

    const acknowledged: string[] = [];
    const check = (got: [string, Json] | undefined): string => {
      assert.ok(got, 'a key is handed out while unclaimed keys remain');
      assert.notEqual(got[0], FALLBACK_ID, 'one-time keys remain, so no fallback key yet');
      assert.deepEqual(got[1], uploaded[got[0]], 'the key comes back exactly as uploaded');
      return got[0];
    };
    for (let i = 0; i < 10; i++) acknowledged.push(check(await claimOne(first.url, bob, alice)));

    // A stream of claims from 8 concurrent claimers; kill -9 once 10 of them are answered, so
    // up to 8 are in flight. Each claimer stops at its first failed request.
    const killAfter = 10;
    const claimers = 8;
    let inBurst = 0;
    let unacknowledged = 0;
    let killedAt = 0;
    await Promise.all(
      Array.from({ length: claimers }, async () => {
        for (;;) {
          let got: [string, Json] | undefined;
          try {
            got = await claimOne(first.url, bob, alice);
          } catch (e) {
            // An assertion failure is a real answer from the server; only a lost connection may end the loop.
            if (e instanceof assert.AssertionError) throw e;
            unacknowledged++;
            return;
          }
          acknowledged.push(check(got));
          if (++inBurst === killAfter) {
            killedAt = Date.now();
            first.child.kill('SIGKILL');
          }
        }
      }),
    );
    await first.exited;
    assert.equal(first.child.signalCode, 'SIGKILL');
    assert.equal(unacknowledged, claimers);
    t.diagnostic(`answered claims: ${acknowledged.length} (${inBurst} in the burst, ${inBurst - killAfter} of them after the kill was sent); unanswered: ${unacknowledged}`);
    assert.ok(killedAt > 0);

    const second = await startServerProcess(['--config', config]);

    const q = await http(second.url, 'POST', `${C}/keys/query`, { token: bob.accessToken, body: { device_keys: { [alice.userId]: [] } } });
    assert.equal(q.status, 200, q.text);
    const stored = ((q.body['device_keys'] as Record<string, Json>)[alice.userId] as Record<string, Json>)[alice.deviceId];
    assert.ok(stored, 'the device keys survived the kill');
    const { unsigned: _unsigned, ...storedKeys } = stored;
    assert.deepEqual(storedKeys, deviceKeys);

    const before = await counts(second.url, alice);
    assert.deepEqual(before.device_unused_fallback_key_types, ['signed_curve25519'], 'the fallback key survived the kill, unused');
    const remaining = before.device_one_time_keys_count['signed_curve25519'] ?? 0;

    // Claim until the fallback key comes back: everything left is handed out once more, and only once.
    const afterRestart: string[] = [];
    for (let i = 0; i <= Object.keys(uploaded).length; i++) {
      const got = await claimOne(second.url, bob, alice);
      assert.ok(got);
      if (got[0] === FALLBACK_ID) {
        assert.deepEqual(got[1], fallback);
        break;
      }
      afterRestart.push(check(got));
    }
    assert.equal(afterRestart.length, remaining, 'the count reported after the restart is what could be claimed');

    const acknowledgedSet = new Set(acknowledged);
    assert.deepEqual(duplicates(acknowledged), [], 'no key was handed out twice before the kill');
    assert.deepEqual(duplicates(afterRestart), [], 'no key was handed out twice after the restart');
    assert.deepEqual(
      afterRestart.filter((id) => acknowledgedSet.has(id)),
      [],
      'no key handed out before the kill is handed out again after the restart',
    );
    // Keys neither acknowledged nor claimable now were taken by claims whose answer the kill lost:
    // still handed out at most once, and never more of them than there were unanswered claims.
    const seen = new Set([...acknowledged, ...afterRestart]);
    for (const id of seen) assert.ok(id in uploaded, `${id} was uploaded`);
    const lost = Object.keys(uploaded).filter((id) => !seen.has(id));
    assert.ok(lost.length <= unacknowledged, `${lost.length} keys vanished but only ${unacknowledged} claims went unanswered: ${lost.join(', ')}`);
    t.diagnostic(`uploaded ${Object.keys(uploaded).length}: ${acknowledged.length} acknowledged before the kill, ${afterRestart.length} claimed after the restart, ${lost.length} taken by unanswered claims`);

    const after = await counts(second.url, alice);
    assert.equal(after.device_one_time_keys_count['signed_curve25519'], 0);
    assert.deepEqual(after.device_unused_fallback_key_types, []);
    await stop(second);
  });
});

// Each process keeps recent reads (tokens, users' keys) in memory on SQLite (storage/read-cache.ts);
// a change through another process must still be seen by the very next request.
describeEachBackend('changes across processes', (backend) => {
  test('a change made through one process is seen by the next request to the other (on PostgreSQL, once the staleness bound has passed)', async () => {
    const config = writeConfig(await backend.freshDatabase());
    const [a, b] = await Promise.all([startServerProcess(['--config', config]), startServerProcess(['--config', config])]);
    const alice = await registerUser(at(a.url), 'alice');
    const bob = await registerUser(at(b.url), 'bob');
    const query = async () => {
      const r = await http(b.url, 'POST', `${C}/keys/query`, { token: bob.accessToken, body: { device_keys: { [alice.userId]: [] } } });
      assert.equal(r.status, 200, r.text);
      return ((r.body['device_keys'] as Json)[alice.userId] as Record<string, Json>)[alice.deviceId];
    };
    // Twice through B before each change, so what B read is there to be reused.
    assert.equal(await query(), undefined);
    assert.equal(await query(), undefined);
    const device = new TestDevice(alice.userId, alice.deviceId);
    assert.equal((await upload(a.url, alice, { device_keys: device.deviceKeys() })).status, 200);
    await backend.settle();
    assert.deepEqual(((await query()) as Json | undefined)?.['keys'], device.deviceKeys()['keys'], 'keys uploaded through A are served by B');

    await query();
    const renamed = await http(a.url, 'PUT', `${C}/devices/${alice.deviceId}`, { token: alice.accessToken, body: { display_name: 'new name' } });
    assert.equal(renamed.status, 200, renamed.text);
    await backend.settle();
    assert.deepEqual(((await query()) as Json)['unsigned'], { device_display_name: 'new name' }, 'a rename through A shows in B');

    const whoami = () => http(b.url, 'GET', `${C}/account/whoami`, { token: alice.accessToken });
    assert.equal((await whoami()).status, 200);
    assert.equal((await http(b.url, 'POST', `${C}/keys/query`, { token: alice.accessToken, body: { device_keys: {} } })).status, 200);
    assert.equal((await http(a.url, 'POST', `${C}/logout`, { token: alice.accessToken, body: {} })).status, 200);
    await backend.settle();
    const after = await http(b.url, 'POST', `${C}/keys/query`, { token: alice.accessToken, body: { device_keys: {} } });
    assert.equal(after.status, 401, 'a token logged out through A is refused by B');
    assert.equal(after.body['errcode'], 'M_UNKNOWN_TOKEN');
    assert.equal((await whoami()).status, 401);
    assert.equal(await query(), undefined, "the logged-out device's keys are gone from B's answers");
    await Promise.all([stop(a), stop(b)]);
  });
});
