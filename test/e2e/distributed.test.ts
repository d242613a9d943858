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
import { registerUser, login } from '../support/client.js';
import { TestDevice } from '../support/keys.js';
import { startServerProcess, type ServerProcess } from '../support/process.js';
import { writeClusterConfig } from '../support/cluster.js';

const C = '/_matrix/client/v3';
const FALLBACK_ID = 'signed_curve25519:fallback';
type Json = Record<string, unknown>;

const at = (url: string) => ({ url }) as TestServer;

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
  test('64 claimers spread over three nodes, each claiming from four devices at once, get distinct keys, each exactly as uploaded, then the fallback key', async (t: TestContext) => {
    const nodes = await startNodes(writeClusterConfig(await backend.freshDatabase()));
    const urls = nodes.map((n) => n.url);
    const alice = await registerUser(at(urls[0]!), 'alice');
    const carol = await registerUser(at(urls[1]!), 'carol');
    const bob = await registerUser(at(urls[2]!), 'bob');
    const owners = [alice, await login(at(urls[1]!), alice.userId, alice.password, { device_id: 'ALICE2' }), carol, await login(at(urls[2]!), carol.userId, carol.password, { device_id: 'CAROL2' })];
    // Each device uploads through another node: 48 one-time keys and a fallback key.
    const devices = await Promise.all(
      owners.map(async (owner, i) => {
        const keys = new TestDevice(owner.userId, owner.deviceId);
        const uploaded = keys.oneTimeKeys(48);
        const fallback = keys.fallbackKey();
        const up = await http(urls[i % 3]!, 'POST', `${C}/keys/upload`, { token: owner.accessToken, body: { device_keys: keys.deviceKeys(), one_time_keys: uploaded, fallback_keys: { [FALLBACK_ID]: fallback } } });
        assert.equal(up.status, 200, up.text);
        return { owner, uploaded, fallback };
      }),
    );

    // Claimer i asks node i % 3 for a key of every device, naming them in an order of its own.
    const results = await Promise.all(
      Array.from({ length: 64 }, async (_, i) => {
        const order = [...devices.slice(i % 4), ...devices.slice(0, i % 4)];
        const wanted: Record<string, Record<string, string>> = {};
        for (const { owner } of order) (wanted[owner.userId] ??= {})[owner.deviceId] = 'signed_curve25519';
        const r = await http(urls[i % 3]!, 'POST', `${C}/keys/claim`, { token: bob.accessToken, body: { one_time_keys: wanted } });
        assert.equal(r.status, 200, r.text);
        return { node: i % 3, got: r.body['one_time_keys'] as Record<string, Record<string, Json>> };
      }),
    );
    for (const { owner, uploaded, fallback } of devices) {
      const got = results.map((r) => {
        const keys = r.got[owner.userId]?.[owner.deviceId];
        assert.ok(keys, `a claimer got no key of ${owner.userId} ${owner.deviceId}`);
        return { node: r.node, entry: Object.entries(keys)[0] as [string, Json] };
      });
      const oneTime = got.filter((g) => g.entry[0] !== FALLBACK_ID);
      const ids = oneTime.map((g) => g.entry[0]);
      assert.equal(new Set(ids).size, ids.length, `no key of ${owner.deviceId} was handed out twice`);
      assert.deepEqual(new Set(ids), new Set(Object.keys(uploaded)), `every key of ${owner.deviceId} was handed out`);
      for (const g of oneTime) assert.deepEqual(g.entry[1], uploaded[g.entry[0]], 'a key comes back exactly as uploaded');
      const fallbacks = got.filter((g) => g.entry[0] === FALLBACK_ID);
      assert.equal(fallbacks.length, 64 - 48, 'the other claimers got the fallback key');
      for (const g of fallbacks) assert.deepEqual(g.entry[1], fallback);
      t.diagnostic(`${owner.deviceId}: one-time keys handed out per node: ${[0, 1, 2].map((n) => oneTime.filter((g) => g.node === n).length).join(', ')}`);
    }
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
