/**
 * `mxkeys serve --workers N`: the built server (dist/main.js) as a real supervisor with real
 * worker processes sharing one port. Each request below goes on a connection of its own, which the
 * cluster hands to its workers in turn; the request log says which worker served it.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { connect } from 'node:tls';
import { X509Certificate } from 'node:crypto';
import { backends, describeEachBackend } from '../support/backends.js';
import { http, type TestServer } from '../support/server.js';
import { registerUser } from '../support/client.js';
import { TestDevice } from '../support/keys.js';
import { startServerProcess, type ServerProcess } from '../support/process.js';
import { freshRequest, inLog, isAlive, logLines, newProbe, servedBy, withProbe, workerPids, writeClusterConfig, type FreshResult } from '../support/cluster.js';
import { testCa } from '../support/tls.js';

const C = '/_matrix/client/v3';
const FALLBACK_ID = 'signed_curve25519:fallback';
type Json = Record<string, unknown>;

const at = (url: string) => ({ url }) as TestServer;

/** A request on a new connection, and the worker that served it. */
async function served(p: ServerProcess, method: string, path: string, options: { token?: string; body?: unknown } = {}): Promise<FreshResult & { worker: number }> {
  const probe = newProbe();
  const r = await freshRequest(p.url, method, withProbe(path, probe), options);
  return { ...r, worker: (await servedBy(p, probe)).worker };
}

/**
 * Runs `read` (each time on a new connection) until a worker other than `not` has served it,
 * checking every answer with `check`: what one worker changed, every worker serves at once.
 */
async function readOnOtherWorker(p: ServerProcess, not: number, read: () => Promise<FreshResult & { worker: number }>, check: (r: FreshResult) => void): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const r = await read();
    check(r);
    if (r.worker !== not) return r.worker;
  }
  throw new Error(`50 requests in a row were all served by worker ${not}`);
}

async function stopCluster(p: ServerProcess): Promise<void> {
  p.child.kill('SIGTERM');
  assert.equal(await p.exited, 0, p.output());
}

/** The supervisor's metrics URL, from its log. */
function metricsUrlOf(p: ServerProcess): Promise<string> {
  return inLog(p, 'the metrics URL', (lines) => lines.find((l) => l['msg'] === 'serving metrics')?.['url'] as string | undefined);
}

/** One scrape, which must succeed; `value` reads one series, `total` adds up every series of a metric. */
async function scrape(url: string): Promise<{ text: string; value(series: string): number; total(name: string): number }> {
  const res = await fetch(url);
  const text = await res.text();
  assert.equal(res.status, 200, text);
  return {
    text,
    value: (series) => Number(new RegExp(`^${series.replace(/[{}"[\]/.]/g, '\\$&')} (\\S+)$`, 'm').exec(text)?.[1]),
    total: (name) => [...text.matchAll(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, 'gm'))].reduce((sum, m) => sum + Number(m[1]), 0),
  };
}

/** Requests on new connections until every one of `workers` has served at least one; how many were made. */
async function requestsOnEveryWorker(p: ServerProcess, workers: number): Promise<number> {
  const seen = new Set<number>();
  let n = 0;
  while (seen.size < workers) {
    const r = await served(p, 'GET', '/_matrix/client/versions');
    assert.equal(r.status, 200, r.text);
    seen.add(r.worker);
    assert.ok(++n < 100, `100 requests were all served by workers ${[...seen].join(', ')}`);
  }
  return n;
}

describeEachBackend('mxkeys serve --workers', (backend) => {
  test('a change made through one worker is seen by the next request to another (on PostgreSQL, once the staleness bound has passed)', async () => {
    const cluster = await startServerProcess(['--config', writeClusterConfig(await backend.freshDatabase()), '--workers', '2']);
    assert.equal(workerPids(cluster).size, 2);
    const alice = await registerUser(at(cluster.url), 'alice');
    const bob = await registerUser(at(cluster.url), 'bob');
    const query = () => served(cluster, 'POST', `${C}/keys/query`, { token: bob.accessToken, body: { device_keys: { [alice.userId]: [] } } });
    const aliceDevice = (r: FreshResult) => {
      assert.equal(r.status, 200, r.text);
      return ((r.body['device_keys'] as Json)[alice.userId] as Record<string, Json> | undefined)?.[alice.deviceId];
    };
    // Read first, so that what a worker read could be reused if it were wrongly kept.
    await query();
    await query();

    const device = new TestDevice(alice.userId, alice.deviceId);
    const upload = await served(cluster, 'POST', `${C}/keys/upload`, { token: alice.accessToken, body: { device_keys: device.deviceKeys(), one_time_keys: device.oneTimeKeys(3) } });
    assert.equal(upload.status, 200, upload.text);
    await backend.settle();
    await readOnOtherWorker(cluster, upload.worker, query, (r) => assert.deepEqual(aliceDevice(r)?.['keys'], device.deviceKeys()['keys'], 'the uploaded keys are served'));

    const renamed = await served(cluster, 'PUT', `${C}/devices/${alice.deviceId}`, { token: alice.accessToken, body: { display_name: 'new name' } });
    assert.equal(renamed.status, 200, renamed.text);
    await backend.settle();
    await readOnOtherWorker(cluster, renamed.worker, query, (r) => assert.deepEqual(aliceDevice(r)?.['unsigned'], { device_display_name: 'new name' }));

    const claim = await served(cluster, 'POST', `${C}/keys/claim`, { token: bob.accessToken, body: { one_time_keys: { [alice.userId]: { [alice.deviceId]: 'signed_curve25519' } } } });
    assert.equal(claim.status, 200, claim.text);
    const counts = () => served(cluster, 'GET', `${C}/sync?timeout=0`, { token: alice.accessToken });
    await readOnOtherWorker(cluster, claim.worker, counts, (r) => assert.deepEqual(r.body['device_one_time_keys_count'], { signed_curve25519: 2 }, r.text));

    // Alice's token is used on every worker before the logout, then refused by every worker after it.
    const whoami = () => served(cluster, 'GET', `${C}/account/whoami`, { token: alice.accessToken });
    const before = new Set<number>();
    while (before.size < 2) before.add((await whoami()).worker);
    const logout = await served(cluster, 'POST', `${C}/logout`, { token: alice.accessToken, body: {} });
    assert.equal(logout.status, 200, logout.text);
    await backend.settle();
    const refusedBy = new Set<number>();
    while (refusedBy.size < 2) {
      const r = await whoami();
      assert.equal(r.status, 401, `worker ${r.worker} still accepts a token logged out through worker ${logout.worker}: ${r.text}`);
      assert.equal(r.body['errcode'], 'M_UNKNOWN_TOKEN');
      refusedBy.add(r.worker);
    }
    await readOnOtherWorker(cluster, logout.worker, query, (r) => assert.equal(aliceDevice(r), undefined, "the logged-out device's keys are gone"));
    await stopCluster(cluster);
  });

  test('kill -9 of a worker loses no acknowledged upload, hands out no key twice, and the supervisor starts a replacement', async (t) => {
    const cluster = await startServerProcess(['--config', writeClusterConfig(await backend.freshDatabase()), '--workers', '2']);
    const alice = await registerUser(at(cluster.url), 'alice');
    const bob = await registerUser(at(cluster.url), 'bob');
    const device = new TestDevice(alice.userId, alice.deviceId);
    const fallback = device.fallbackKey();
    assert.equal((await http(cluster.url, 'POST', `${C}/keys/upload`, { token: alice.accessToken, body: { device_keys: device.deviceKeys(), fallback_keys: { [FALLBACK_ID]: fallback } } })).status, 200);
    const victim = workerPids(cluster).get(1)!;

    // 6 uploaders, each sending batches of 3 new keys on new connections; worker 1 is killed
    // after the 10th acknowledged batch. A batch whose connection fails may or may not have landed.
    const uploaded: Record<string, Json> = {};
    const acknowledged: string[] = [];
    let failed = 0;
    let batches = 0;
    const killAfter = 10;
    const total = 40;
    await Promise.all(
      Array.from({ length: 6 }, async () => {
        while (acknowledged.length < total * 3) {
          const batch = device.oneTimeKeys(3, `b${batches++}_`);
          Object.assign(uploaded, batch);
          let r: FreshResult;
          try {
            r = await freshRequest(cluster.url, 'POST', `${C}/keys/upload`, { token: alice.accessToken, body: { one_time_keys: batch } });
          } catch (e) {
            failed++;
            t.diagnostic(`an upload failed: ${(e as Error).message}`);
            continue;
          }
          assert.equal(r.status, 200, r.text);
          acknowledged.push(...Object.keys(batch));
          if (acknowledged.length === killAfter * 3) process.kill(victim, 'SIGKILL');
        }
      }),
    );
    t.diagnostic(`acknowledged uploads: ${acknowledged.length / 3}; failed with the worker: ${failed}`);

    const replacement = await inLog(cluster, 'a replacement for worker 1', () => {
      const pid = workerPids(cluster).get(1);
      return pid !== victim ? pid : undefined;
    });
    const died = logLines(cluster).find((l) => l['msg'] === 'a worker ended unexpectedly; starting a replacement');
    assert.ok(died, 'the death is logged');
    assert.equal(died['worker_pid'], victim);
    assert.equal(died['exit'], 'killed by SIGKILL');
    assert.equal(isAlive(victim), false);
    // The replacement serves requests.
    for (let i = 0; ; i++) {
      const probe = newProbe();
      const r = await freshRequest(cluster.url, 'GET', withProbe('/_matrix/client/versions', probe)).catch(() => undefined);
      if (r && (await servedBy(cluster, probe)).pid === replacement) break;
      assert.ok(i < 200, 'the replacement worker never served a request');
    }

    // Every acknowledged key is there and is handed out once; nothing is handed out twice.
    const claimed: string[] = [];
    for (;;) {
      const r = await freshRequest(cluster.url, 'POST', `${C}/keys/claim`, { token: bob.accessToken, body: { one_time_keys: { [alice.userId]: { [alice.deviceId]: 'signed_curve25519' } } } });
      assert.equal(r.status, 200, r.text);
      const [id, key] = Object.entries(((r.body['one_time_keys'] as Json)[alice.userId] as Record<string, Json>)[alice.deviceId]!)[0]!;
      if (id === FALLBACK_ID) {
        assert.deepEqual(key, fallback);
        break;
      }
      assert.deepEqual(key, uploaded[id], 'a key comes back exactly as uploaded');
      claimed.push(id);
    }
    assert.equal(new Set(claimed).size, claimed.length, 'no key was handed out twice');
    const missing = acknowledged.filter((id) => !claimed.includes(id));
    assert.deepEqual(missing, [], 'every acknowledged key was there to claim');
    await stopCluster(cluster);
  });

  test('SIGTERM to the supervisor lets a request in flight finish with 200, then stops every worker, and the supervisor exits 0', async () => {
    const cluster = await startServerProcess(['--config', writeClusterConfig(await backend.freshDatabase()), '--workers', '2']);
    const pids = [...workerPids(cluster).values()];
    assert.equal(pids.length, 2);
    const alice = await registerUser(at(cluster.url), 'alice');
    const device = new TestDevice(alice.userId, alice.deviceId);
    const body = Buffer.from(JSON.stringify({ device_keys: device.deviceKeys(), one_time_keys: device.oneTimeKeys(5) }));

    // An upload whose headers a worker has read (it answered "100 Continue") but whose body is
    // not sent yet: in flight when SIGTERM comes.
    const upload = httpRequest(`${cluster.url}${C}/keys/upload`, {
      method: 'POST',
      agent: false,
      headers: { authorization: `Bearer ${alice.accessToken}`, 'content-type': 'application/json', 'content-length': String(body.length), expect: '100-continue' },
    });
    const answer = new Promise<FreshResult>((resolve, reject) => {
      upload.on('response', (res) => {
        let text = '';
        res.on('data', (c: Buffer) => (text += c.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text, body: JSON.parse(text) as Json }));
      });
      upload.on('error', reject);
    });
    await new Promise<void>((resolve) => upload.once('continue', resolve));
    cluster.child.kill('SIGTERM');
    await inLog(cluster, 'every worker draining', (lines) => (lines.filter((l) => l['msg'] === 'shutting down: finishing in-flight requests').length === 2 ? true : undefined));
    upload.end(body);
    const r = await answer;
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.body['one_time_key_counts'], { signed_curve25519: 5 });

    assert.equal(await cluster.exited, 0, cluster.output());
    for (const pid of pids) assert.equal(isAlive(pid), false, `worker ${pid} is gone`);
    const lines = logLines(cluster);
    const draining = lines.filter((l) => l['msg'] === 'shutting down: finishing in-flight requests').map((l) => l['worker']);
    const stopped = lines.filter((l) => l['msg'] === 'stopped').map((l) => l['worker'] ?? 'supervisor');
    assert.deepEqual(draining.sort(), [1, 2]);
    assert.deepEqual(stopped.map(String).sort(), ['1', '2', 'supervisor']);
    assert.equal(stopped.at(-1), 'supervisor', 'the supervisor ends last');
  });
});

test('one scrape of the supervisor shows the requests and claims of every worker, and the devices low on one-time keys', async () => {
  const config = writeClusterConfig(await backends[0]!.freshDatabase(), { metrics: { enabled: true, port: 0 } });
  const cluster = await startServerProcess(['--config', config, '--workers', '2']);
  const metricsUrl = await metricsUrlOf(cluster);
  const alice = await registerUser(at(cluster.url), 'alice');
  const device = new TestDevice(alice.userId, alice.deviceId);
  const up = await http(cluster.url, 'POST', `${C}/keys/upload`, { token: alice.accessToken, body: { device_keys: device.deviceKeys(), one_time_keys: device.oneTimeKeys(40) } });
  assert.equal(up.status, 200, up.text);
  // Claims until both workers have answered some.
  const byWorker = new Map<number, number>();
  let claims = 0;
  while (byWorker.size < 2) {
    const r = await served(cluster, 'POST', `${C}/keys/claim`, { token: alice.accessToken, body: { one_time_keys: { [alice.userId]: { [alice.deviceId]: 'signed_curve25519' } } } });
    assert.equal(r.status, 200, r.text);
    claims++;
    byWorker.set(r.worker, (byWorker.get(r.worker) ?? 0) + 1);
    assert.ok(claims < 40, 'one worker answered every claim');
  }
  let { text, value } = await scrape(metricsUrl);
  // Figures read from the database are waited for a second at most: on a very busy machine the
  // first scrape may come before them (the reads finish in the background).
  for (let i = 0; !text.includes('mxkeys_devices_with_few_one_time_keys{'); i++) {
    assert.ok(i < 50, `the figures read from the database never came:\n${text}`);
    ({ text, value } = await scrape(metricsUrl));
  }
  assert.equal(value(`mxkeys_http_requests_total{route="/_matrix/client/v3/keys/claim",method="POST",status="200"}`), claims, text);
  assert.equal(value(`mxkeys_keys_claimed_total{result="one_time_key"}`), claims);
  assert.equal(value(`mxkeys_http_request_duration_seconds_count{route="/_matrix/client/v3/keys/claim"}`), claims);
  assert.equal(value('mxkeys_workers'), 2);
  assert.equal(value('mxkeys_cluster_worker_up{worker="1"}') + value('mxkeys_cluster_worker_up{worker="2"}'), 2);
  // Read from the database by each worker, shown once: 40 - claims keys left.
  assert.equal(value('mxkeys_devices_with_few_one_time_keys{fewer_than="1"}'), 0);
  assert.equal(value('mxkeys_devices_with_few_one_time_keys{fewer_than="50"}'), 1);
  assert.equal(value('mxkeys_devices_with_few_one_time_keys{fewer_than="10"}'), 40 - claims < 10 ? 1 : 0);
  assert.ok(value('process_resident_memory_bytes') > 0);
  await stopCluster(cluster);
});

test('SIGHUP to the supervisor makes every worker read the renewed TLS certificate', async () => {
  const ca = testCa();
  const [first, second, live] = [ca.leaf('first', 'IP:127.0.0.1'), ca.leaf('second', 'IP:127.0.0.1'), ca.leaf('live', 'IP:127.0.0.1')];
  copyFileSync(first.certPath, live.certPath);
  copyFileSync(first.keyPath, live.keyPath);
  const config = writeClusterConfig(await backends[0]!.freshDatabase(), { tls_certificate_path: live.certPath, tls_private_key_path: live.keyPath });
  const cluster = await startServerProcess(['--config', config, '--workers', '2']);
  assert.match(cluster.url, /^https:/);
  const caPem = readFileSync(ca.caPath, 'utf8');
  const fingerprint = (pem: string) => new X509Certificate(pem).fingerprint256;
  const served = () =>
    new Promise<string>((resolve, reject) => {
      const socket = connect({ host: '127.0.0.1', port: Number(new URL(cluster.url).port), ca: caPem }, () => {
        resolve(socket.getPeerCertificate().fingerprint256);
        socket.end();
      });
      socket.on('error', reject);
    });
  for (let i = 0; i < 4; i++) assert.equal(await served(), fingerprint(first.cert));

  copyFileSync(second.certPath, live.certPath);
  copyFileSync(second.keyPath, live.keyPath);
  cluster.child.kill('SIGHUP');
  await inLog(cluster, 'both workers reloading', (lines) => (new Set(lines.filter((l) => l['msg'] === 'reloaded the TLS certificate and key').map((l) => l['worker'])).size === 2 ? true : undefined));
  for (let i = 0; i < 4; i++) assert.equal(await served(), fingerprint(second.cert), 'every new connection gets the renewed certificate');
  await stopCluster(cluster);
});

test('a SIGHUP while the workers are starting does not end the supervisor, and the worker that was starting reloads once serving', async () => {
  const ca = testCa();
  const leaf = ca.leaf('early', 'IP:127.0.0.1');
  const config = writeClusterConfig(await backends[0]!.freshDatabase(), { tls_certificate_path: leaf.certPath, tls_private_key_path: leaf.keyPath });
  let hangup: Promise<void> | undefined;
  const cluster = await startServerProcess(['--config', config, '--workers', '2'], {
    onSpawn: (child) => {
      hangup = new Promise((resolve) => {
        let out = '';
        const onData = (d: Buffer) => {
          out += d.toString();
          // The supervisor has started worker 1, which is now applying migrations.
          if (!out.includes('"msg":"started a worker"')) return;
          child.stdout!.off('data', onData);
          child.kill('SIGHUP');
          resolve();
        };
        child.stdout!.on('data', onData);
      });
    },
  });
  await hangup;
  const reloaded = await inLog(cluster, 'worker 1 reloading', (lines) => lines.find((l) => l['msg'] === 'reloaded the TLS certificate and key'));
  assert.equal(reloaded['worker'], 1, 'the worker that was starting reads the files again once serving');
  for (const pid of workerPids(cluster).values()) assert.ok(isAlive(pid));
  await stopCluster(cluster);
});

test('a SIGHUP while a single server process starts is ignored, and the server comes up', async () => {
  let hangup: Promise<void> | undefined;
  const server = await startServerProcess(['--config', writeClusterConfig(await backends[0]!.freshDatabase())], {
    onSpawn: (child) => {
      // At its first log line the process is starting: opening the database, making its key.
      hangup = new Promise((resolve) => child.stdout!.once('data', () => resolve(void child.kill('SIGHUP'))));
    },
  });
  await hangup;
  assert.equal((await fetch(`${server.url}/health`)).status, 200);
  server.child.kill('SIGTERM');
  assert.equal(await server.exited, 0, server.output());
});

test('--workers takes a number or "auto", and says what it wants otherwise', async () => {
  const { runCli } = await import('../support/process.js');
  for (const bad of ['0', 'two', '1.5', '99999']) {
    const r = runCli(['serve', '--workers', bad]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /--workers .*: give a number of worker processes \(1 or more\) or "auto"/);
  }
});

describe('mxkeys serve --workers: metrics of the cluster', () => {
  /** Two workers with metrics, each having served requests, and a first scrape that counted them all. */
  async function clusterThatCounted() {
    const cluster = await startServerProcess(['--config', writeClusterConfig(await backends[0]!.freshDatabase(), { metrics: { enabled: true, port: 0 } }), '--workers', '2']);
    const metricsUrl = await metricsUrlOf(cluster);
    const requests = await requestsOnEveryWorker(cluster, 2);
    const before = await scrape(metricsUrl);
    assert.equal(before.total('mxkeys_http_requests_total'), requests, before.text);
    return { cluster, metricsUrl, requests, before };
  }

  test('a scrape does not wait for a worker that does not answer: it shows that worker down and its counts as last seen', async () => {
    const { cluster, metricsUrl, requests, before } = await clusterThatCounted();
    assert.equal(before.value('mxkeys_cluster_worker_up{worker="2"}'), 1);

    const stuck = workerPids(cluster).get(2)!;
    process.kill(stuck, 'SIGSTOP');
    try {
      const during = await scrape(metricsUrl);
      assert.equal(during.value('mxkeys_cluster_worker_up{worker="2"}'), 0, `the stuck worker is shown down:\n${during.text}`);
      assert.equal(during.total('mxkeys_http_requests_total'), requests, "the stuck worker's requests are still counted");
      const left = await inLog(cluster, 'the stuck worker left out', (lines) => lines.find((l) => l['msg'] === 'a worker is left out of this metrics scrape; its counts are shown as of its last answer'));
      assert.equal(left['worker'], 2);
      assert.match(String(left['reason']), /did not answer within/);
    } finally {
      process.kill(stuck, 'SIGCONT');
    }
    for (let i = 0; ; i++) {
      const after = await scrape(metricsUrl);
      assert.equal(after.total('mxkeys_http_requests_total'), requests);
      if (after.value('mxkeys_cluster_worker_up{worker="1"}') + after.value('mxkeys_cluster_worker_up{worker="2"}') === 2) break;
      assert.ok(i < 20, `the worker never answered again:\n${after.text}`);
    }
    await stopCluster(cluster);
  });

  test('counts of a worker killed with -9 stay in the totals after its replacement: they never go down', async () => {
    const { cluster, metricsUrl, requests, before } = await clusterThatCounted();
    const latency = before.total('mxkeys_http_request_duration_seconds_count');
    assert.equal(latency, requests);

    const victim = workerPids(cluster).get(1)!;
    process.kill(victim, 'SIGKILL');
    const replacement = await inLog(cluster, 'a replacement for worker 1', () => {
      const pid = workerPids(cluster).get(1);
      return pid !== victim ? pid : undefined;
    });
    // Counted throughout: while the slot is empty, and once the replacement answers too.
    for (let i = 0; ; i++) {
      const now = await scrape(metricsUrl);
      assert.equal(now.total('mxkeys_http_requests_total'), requests, now.text);
      assert.equal(now.total('mxkeys_http_request_duration_seconds_count'), latency);
      if (now.value('mxkeys_cluster_worker_up{worker="1"}') === 1) {
        assert.equal(now.value('mxkeys_worker_restarts_total'), 1);
        break;
      }
      assert.ok(i < 100, `the replacement (pid ${replacement}) never answered a scrape:\n${now.text}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    await stopCluster(cluster);
  });
});
