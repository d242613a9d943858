/**
 * The EDU sender across processes: its queue (device-list updates, to-device messages) survives
 * kill -9, and several processes sharing one database (separate processes, and the workers of
 * `mxkeys serve --workers`) send each update to a destination once, not once per process.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describeEachBackend, tempDir, type Backend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { login, registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { TestDevice } from '../support/keys.js';
import { startServerProcess, type ServerProcess } from '../support/process.js';
import { freshRequest, writeClusterConfig } from '../support/cluster.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';
import { CountingProxy, eventually, freePort, QUICK_FEDERATION } from '../support/federation.js';
import type { DatabaseConfig } from '../../src/storage/index.js';

const C = '/_matrix/client/v3';
const F = '/_matrix/federation/v1';
type Json = Record<string, unknown>;

function writeConfig(database: DatabaseConfig, serverName: string, resolve: Record<string, string>): string {
  const dir = tempDir();
  const path = join(dir, 'mxkeys.yaml');
  const db = database.postgres ? `{ postgres: ${JSON.stringify(database.postgres)} }` : `{ sqlite: ${JSON.stringify(database.sqlite)} }`;
  writeFileSync(
    path,
    [
      `server_name: ${serverName}`,
      `database: ${db}`,
      `signing_key_path: ${JSON.stringify(join(dir, 'signing.key'))}`,
      `registration_shared_secret: ${JSON.stringify(SHARED_SECRET)}`,
      `federation: ${JSON.stringify({ ...QUICK_FEDERATION, resolve })}`,
      '',
    ].join('\n'),
  );
  return path;
}

const at = (url: string) => ({ url }) as TestServer;

async function newDeviceWithKeys(url: string, user: Session, deviceId: string): Promise<Session> {
  const s = await login(at(url), user.userId, user.password, { device_id: deviceId });
  const r = await http(url, 'POST', `${C}/keys/upload`, { token: s.accessToken, body: { device_keys: new TestDevice(s.userId, deviceId).deviceKeys() } });
  assert.equal(r.status, 200, r.text);
  return s;
}

/**
 * hs2 in this process and hs1 as a child process (`restartHs1` starts it, again after a kill),
 * each reaching the other through a counting proxy that can play an outage.
 */
async function twoServers(backend: Backend): Promise<{ toHs1: CountingProxy; toHs2: CountingProxy; hs2: TestServer; restartHs1: () => Promise<ServerProcess> }> {
  const [port1, port2] = [await freePort(), await freePort()];
  const toHs1 = await CountingProxy.start(`http://127.0.0.1:${port1}`);
  const toHs2 = await CountingProxy.start(`http://127.0.0.1:${port2}`);
  const hs2 = await startServer({
    backend,
    config: { server_name: 'hs2.test', registration_shared_secret: SHARED_SECRET, listen: { host: '127.0.0.1', port: port2 }, federation: { ...QUICK_FEDERATION, resolve: { 'hs1.test': toHs1.url } } },
  });
  const config = writeConfig(await backend.freshDatabase(), 'hs1.test', { 'hs2.test': toHs2.url });
  return { toHs1, toHs2, hs2, restartHs1: () => startServerProcess(['--config', config], { env: { MXKEYS_LISTEN_PORT: String(port1) } }) };
}

describeEachBackend('the federation sender across processes', (backend) => {
  test('updates queued while the receiver is unreachable survive kill -9 of the sender and arrive after a restart', async () => {
    const { toHs1, toHs2, hs2, restartHs1 } = await twoServers(backend);
    let hs1 = await restartHs1();

    const bob = await registerUser(at(hs1.url), 'bob');
    await newDeviceWithKeys(hs1.url, bob, 'PHONE');
    const alice = await registerUser(hs2, 'alice');
    const query = async () => {
      const r = await http(hs2.url, 'POST', `${C}/keys/query`, { token: alice.accessToken, body: { device_keys: { [bob.userId]: [] } } });
      assert.equal(r.status, 200, r.text);
      return Object.keys(((r.body['device_keys'] as Record<string, Json>)[bob.userId] ?? {}) as Json).sort();
    };
    assert.deepEqual(await query(), ['PHONE'], 'devices with keys');
    const fetches = toHs1.count(`${F}/user/devices/`);

    // hs2 becomes unreachable; bob adds a device; hs1 queues the update and cannot send it.
    toHs2.up = false;
    await newDeviceWithKeys(hs1.url, bob, 'LAPTOP');
    await eventually('a failed attempt to send', async () => (hs1.output().includes('a destination did not answer') ? true : undefined));
    hs1.child.kill('SIGKILL');
    await hs1.exited;

    toHs2.up = true;
    hs1 = await restartHs1();
    await eventually("bob's new device on hs2", async () => ((await query()).includes('LAPTOP') ? true : undefined), 20_000);
    assert.equal(toHs1.count(`${F}/user/devices/`), fetches, 'it came as an update, not by hs2 asking again');
    hs1.child.kill('SIGTERM');
    assert.equal(await hs1.exited, 0, hs1.output());
  });

  test('to-device messages queued for an unreachable server survive kill -9 of the sender and are delivered once, in order, after a restart', async () => {
    const { toHs2, hs2, restartHs1 } = await twoServers(backend);
    let hs1 = await restartHs1();

    const alice = await registerUser(at(hs1.url), 'alice');
    const bob = await registerUser(hs2, 'bob');
    let since = (await http(hs2.url, 'GET', `${C}/sync`, { token: bob.accessToken })).body['next_batch'] as string;
    const sendToBob = async (url: string, n: number) => {
      const r = await http(url, 'PUT', `${C}/sendToDevice/org.example.note/n${n}`, { token: alice.accessToken, body: { messages: { [bob.userId]: { [bob.deviceId]: { n } } } } });
      assert.equal(r.status, 200, r.text);
    };

    // hs2 is unreachable; the message waits in hs1's queue; hs1 is killed.
    toHs2.up = false;
    await sendToBob(hs1.url, 1);
    await eventually('a failed attempt to send', async () => (hs1.output().includes('a destination did not answer') ? true : undefined));
    hs1.child.kill('SIGKILL');
    await hs1.exited;

    toHs2.up = true;
    hs1 = await restartHs1();
    await sendToBob(hs1.url, 2);
    const received: number[] = [];
    await eventually(
      'the second message at bob',
      async () => {
        const r = await http(hs2.url, 'GET', `${C}/sync?since=${since}&timeout=1000`, { token: bob.accessToken });
        assert.equal(r.status, 200, r.text);
        since = r.body['next_batch'] as string;
        for (const e of ((r.body['to_device'] as Json)['events'] as Json[])) received.push((e['content'] as { n: number }).n);
        return received.includes(2) ? true : undefined;
      },
      20_000,
    );
    assert.deepEqual(received, [1, 2], 'the message queued before the crash arrived once, before the later one');
    hs1.child.kill('SIGTERM');
    assert.equal(await hs1.exited, 0, hs1.output());
  });

  /** Checks the device-list updates the fake received: each once, in one unbroken chain from `previous`. */
  function assertSentOnce(received: readonly Json[], previous: number): void {
    const streamIds = received.map((c) => c['stream_id'] as number);
    assert.equal(new Set(streamIds).size, streamIds.length, `no update was sent twice: ${JSON.stringify(streamIds)}`);
    // The chain is continuous: each prev_id is the stream_id sent before it.
    for (const c of received) {
      assert.deepEqual(c['prev_id'], [previous], JSON.stringify(received));
      previous = c['stream_id'] as number;
    }
  }

  /** A fake destination that records the device-list updates it is sent. */
  async function recordingFake(): Promise<{ fake: FakeHomeserver; received: Json[] }> {
    const fake = await FakeHomeserver.start();
    const received: Json[] = [];
    fake.onRequest = (method, url, body) => {
      if (method !== 'PUT' || !url.startsWith(`${F}/send/`)) return undefined;
      for (const edu of ((body as Json)['edus'] as Json[] | undefined) ?? []) if (edu['edu_type'] === 'm.device_list_update') received.push(edu['content'] as Json);
      return { status: 200, body: { pdus: {} } };
    };
    return { fake, received };
  }

  test('three processes sharing one database send each update to a destination once, not once per process', async () => {
    const { fake, received } = await recordingFake();
    const database = await backend.freshDatabase();
    const signingKeyPath = join(tempDir(), 'signing.key');
    const config = { registration_shared_secret: SHARED_SECRET, federation: { ...QUICK_FEDERATION, resolve: { [fake.serverName]: fake.url } } };
    const servers = [];
    for (let i = 0; i < 3; i++) servers.push(await startServer({ backend, database: database as Record<string, unknown>, signingKeyPath, config }));

    const bob = await registerUser(servers[0]!, 'bob');
    // The fake reads bob's list: it subscribes, and its chain starts at the stream_id it got.
    const read = await fake.request(servers[0]!.url, 'test.local', 'GET', `${F}/user/devices/${encodeURIComponent(bob.userId)}`);
    assert.equal(read.status, 200, read.text);

    const names = Array.from({ length: 12 }, (_, i) => `DEV${i}`);
    for (const [i, name] of names.entries()) await newDeviceWithKeys(servers[i % 3]!.url, bob, name);
    await eventually('every new device at the fake', async () => (names.every((n) => received.some((c) => c['device_id'] === n && c['keys'])) ? true : undefined));
    assertSentOnce(received, read.body['stream_id'] as number);
  });

  test('a cluster of two workers and another process on the same database send each update to a destination once', async () => {
    const { fake, received } = await recordingFake();
    const database = await backend.freshDatabase();
    const dir = tempDir();
    const federation = { ...QUICK_FEDERATION, resolve: { [fake.serverName]: fake.url } };
    const cluster = await startServerProcess(['--config', writeClusterConfig(database, { federation }, dir), '--workers', '2']);
    const other = await startServer({ backend, database: database as Record<string, unknown>, signingKeyPath: join(dir, 'signing.key'), config: { registration_shared_secret: SHARED_SECRET, federation } });

    const bob = await registerUser(other, 'bob');
    const read = await fake.request(cluster.url, 'test.local', 'GET', `${F}/user/devices/${encodeURIComponent(bob.userId)}`);
    assert.equal(read.status, 200, read.text);
    // Devices added through both workers (new connections go to each in turn) and the other process.
    const names = Array.from({ length: 12 }, (_, i) => `DEV${i}`);
    for (const [i, name] of names.entries()) {
      const url = i % 3 === 2 ? other.url : cluster.url;
      const s = await login(at(url), bob.userId, bob.password, { device_id: name });
      const r = await freshRequest(url, 'POST', `${C}/keys/upload`, { token: s.accessToken, body: { device_keys: new TestDevice(s.userId, name).deviceKeys() } });
      assert.equal(r.status, 200, r.text);
    }
    await eventually('every new device at the fake', async () => (names.every((n) => received.some((c) => c['device_id'] === n && c['keys'])) ? true : undefined));
    assertSentOnce(received, read.body['stream_id'] as number);
    cluster.child.kill('SIGTERM');
    assert.equal(await cluster.exited, 0, cluster.output());
  });
});
