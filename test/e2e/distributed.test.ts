/**
 * The distributed deployment (docs/operations.md, "Several nodes on one database"): three mxkeys
 * processes on different ports share one database, as nodes behind a load balancer would. Runs
 * the built server (dist/main.js) as real child processes, on each backend (PostgreSQL is the one
 * that spans machines; SQLite shows the same on one machine).
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { http, type TestServer } from '../support/server.js';
import { registerUser, login, type Session } from '../support/client.js';
import { TestDevice } from '../support/keys.js';
import { startServerProcess, type ServerProcess } from '../support/process.js';
import { writeClusterConfig } from '../support/cluster.js';

const C = '/_matrix/client/v3';
const FALLBACK_ID = 'signed_curve25519:fallback';
type Json = Record<string, unknown>;

const at = (url: string) => ({ url }) as TestServer;

async function claimOne(url: string, by: Session, who: Session): Promise<[string, Json] | undefined> {
  const r = await http(url, 'POST', `${C}/keys/claim`, { token: by.accessToken, body: { one_time_keys: { [who.userId]: { [who.deviceId]: 'signed_curve25519' } } } });
  assert.equal(r.status, 200, r.text);
  const keys = ((r.body['one_time_keys'] as Json)[who.userId] as Record<string, Json> | undefined)?.[who.deviceId];
  return keys ? (Object.entries(keys)[0] as [string, Json]) : undefined;
}

async function startNodes(config: string): Promise<ServerProcess[]> {
  // Started together: all three migrate the same empty database at once, as a rolling deploy would.
  const nodes = await Promise.all([0, 1, 2].map(() => startServerProcess(['--config', config])));
  assert.equal(new Set(nodes.map((n) => n.url)).size, 3, 'three nodes on three ports');
  return nodes;
}

async function stopNodes(nodes: readonly ServerProcess[]): Promise<void> {
  for (const n of nodes) n.child.kill('SIGTERM');
  for (const n of nodes) assert.equal(await n.exited, 0, n.output());
}

describeEachBackend('three mxkeys nodes on one database', (backend) => {
  test('64 claimers spread over three nodes get distinct keys, each exactly as uploaded, then the fallback key', async (t: TestContext) => {
    const nodes = await startNodes(writeClusterConfig(await backend.freshDatabase()));
    const urls = nodes.map((n) => n.url);
    const alice = await registerUser(at(urls[0]!), 'alice');
    const bob = await registerUser(at(urls[1]!), 'bob');
    const device = new TestDevice(alice.userId, alice.deviceId);
    const uploaded = device.oneTimeKeys(50);
    const fallback = device.fallbackKey();
    const up = await http(urls[2]!, 'POST', `${C}/keys/upload`, { token: alice.accessToken, body: { device_keys: device.deviceKeys(), one_time_keys: uploaded, fallback_keys: { [FALLBACK_ID]: fallback } } });
    assert.equal(up.status, 200, up.text);

    const results = await Promise.all(Array.from({ length: 64 }, (_, i) => claimOne(urls[i % 3]!, bob, alice).then((got) => ({ node: i % 3, got }))));
    const oneTime = results.filter((r) => r.got && r.got[0] !== FALLBACK_ID);
    const ids = oneTime.map((r) => r.got![0]);
    assert.equal(new Set(ids).size, ids.length, 'no key was handed out twice');
    assert.deepEqual(new Set(ids), new Set(Object.keys(uploaded)), 'every uploaded key was handed out');
    for (const r of oneTime) assert.deepEqual(r.got![1], uploaded[r.got![0]]);
    const fallbacks = results.filter((r) => r.got?.[0] === FALLBACK_ID);
    assert.equal(fallbacks.length, 64 - 50, 'the rest got the fallback key');
    for (const r of fallbacks) assert.deepEqual(r.got![1], fallback);
    t.diagnostic(`one-time keys handed out per node: ${[0, 1, 2].map((n) => oneTime.filter((r) => r.node === n).length).join(', ')}`);
    await stopNodes(nodes);
  });

  test('a change made through one node is seen by the next request to each of the others (on PostgreSQL, once the staleness bound has passed)', async () => {
    const nodes = await startNodes(writeClusterConfig(await backend.freshDatabase()));
    const [a, b, c] = nodes.map((n) => n.url) as [string, string, string];
    const alice = await registerUser(at(a), 'alice');
    const bob = await registerUser(at(b), 'bob');
    const phone = await login(at(c), alice.userId, alice.password, { device_id: 'PHONE' });
    const devicesOn = async (url: string) => {
      const r = await http(url, 'POST', `${C}/keys/query`, { token: bob.accessToken, body: { device_keys: { [alice.userId]: [] } } });
      assert.equal(r.status, 200, r.text);
      return ((r.body['device_keys'] as Json)[alice.userId] ?? {}) as Record<string, Json>;
    };
    // Each node answers first (what it read could be reused, if it were wrongly kept).
    for (const url of [a, b, c]) assert.deepEqual(await devicesOn(url), {});

    const keys = new TestDevice(alice.userId, 'PHONE').deviceKeys();
    assert.equal((await http(b, 'POST', `${C}/keys/upload`, { token: phone.accessToken, body: { device_keys: keys } })).status, 200);
    await backend.settle();
    for (const url of [a, c]) assert.deepEqual((await devicesOn(url))['PHONE']?.['keys'], keys['keys'], `keys uploaded through B are served by ${url}`);

    for (const url of [a, b, c]) assert.equal((await http(url, 'GET', `${C}/account/whoami`, { token: phone.accessToken })).status, 200);
    assert.equal((await http(a, 'POST', `${C}/logout`, { token: phone.accessToken, body: {} })).status, 200);
    await backend.settle();
    for (const url of [b, c]) {
      const r = await http(url, 'GET', `${C}/account/whoami`, { token: phone.accessToken });
      assert.equal(r.status, 401, `a token logged out through A is refused by ${url}: ${r.text}`);
      assert.equal(r.body['errcode'], 'M_UNKNOWN_TOKEN');
      assert.deepEqual(await devicesOn(url), {}, "the logged-out device's keys are gone");
    }
    await stopNodes(nodes);
  });
});
