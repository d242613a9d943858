/**
 * The Prometheus endpoint (`metrics` in the configuration) of one process, and the figures it
 * reads from the database at scrape time.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { backends, describeEachBackend, POSTGRES_URL, type Backend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { openStore } from '../../src/storage/index.js';
import type { Store } from '../../src/storage/store.js';
import { DATABASE_READ_EVERY_MS, MxkeysMetrics, serveMetrics } from '../../src/metrics/mxkeys.js';
import { registerUser, SHARED_SECRET } from '../support/client.js';
import { TestDevice } from '../support/keys.js';

test('with metrics enabled, a Prometheus endpoint on its own port counts requests, claims and database statements', async () => {
  const server = await startServer({ backend: backends[0]!, config: { registration_shared_secret: SHARED_SECRET, metrics: { enabled: true, port: 0 } } });
  const url = server.mx.metricsUrl();
  assert.ok(url, 'the metrics URL is known once listening');
  assert.notEqual(new URL(url).port, new URL(server.url).port, 'metrics are not on the main listener');
  const alice = await registerUser(server, 'alice');
  const device = new TestDevice(alice.userId, alice.deviceId);
  await http(server.url, 'POST', '/_matrix/client/v3/keys/upload', { token: alice.accessToken, body: { one_time_keys: device.oneTimeKeys(1), fallback_keys: { 'signed_curve25519:fb': device.fallbackKey() } } });
  for (let i = 0; i < 2; i++) {
    await http(server.url, 'POST', '/_matrix/client/v3/keys/claim', { token: alice.accessToken, body: { one_time_keys: { [alice.userId]: { [alice.deviceId]: 'signed_curve25519' } } } });
  }
  let text = '';
  // A scrape waits for a figure read from the database for a second at most: on a very busy
  // machine the first one may come before it (the read finishes in the background).
  for (let i = 0; !text.includes('mxkeys_devices_with_few_one_time_keys{'); i++) {
    assert.ok(i < 50, `the figures read from the database never came:\n${text}`);
    const res = await fetch(url);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /text\/plain/);
    text = await res.text();
  }
  assert.match(text, /mxkeys_http_requests_total\{route="\/_matrix\/client\/v3\/keys\/claim",method="POST",status="200"\} 2/);
  assert.match(text, /mxkeys_http_request_duration_seconds_count\{route="\/_matrix\/client\/v3\/keys\/claim"\} 2/);
  assert.match(text, /mxkeys_keys_claimed_total\{result="one_time_key"\} 1/);
  assert.match(text, /mxkeys_keys_claimed_total\{result="fallback_key"\} 1/);
  assert.match(text, /mxkeys_db_statements_total [1-9]\d*/);
  // Alice's device has used up its one key: it is among the devices with none left.
  assert.match(text, /mxkeys_devices_with_few_one_time_keys\{fewer_than="1"\} 1\n/);
  assert.match(text, /mxkeys_devices_with_few_one_time_keys\{fewer_than="50"\} 1\n/);
  assert.match(text, /process_resident_memory_bytes \d+/);
  assert.equal((await http(server.url, 'GET', '/metrics')).status, 404, 'not served on the main listener');
});

const zeroSources = {
  keyStats: { oneTimeKeysClaimed: 0, fallbackKeysClaimed: 0, claimsUnanswered: 0 },
  federationAuth: { accepted: 0, refused: 0 },
  serverKeyFetches: { fromServer: 0, fromNotary: 0, failed: 0 },
};

/** A server whose only user's device holds 3 one-time keys: 1 device under 10 and under 50, none at 0. */
async function serverWithALowDevice(backend: Backend): Promise<TestServer> {
  const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });
  const alice = await registerUser(server, 'alice');
  const device = new TestDevice(alice.userId, alice.deviceId);
  const up = await http(server.url, 'POST', '/_matrix/client/v3/keys/upload', { token: alice.accessToken, body: { device_keys: device.deviceKeys(), one_time_keys: device.oneTimeKeys(3) } });
  assert.equal(up.status, 200, up.text);
  return server;
}

const LOW_DEVICE = /mxkeys_devices_with_few_one_time_keys\{fewer_than="1"\} 0\nmxkeys_devices_with_few_one_time_keys\{fewer_than="10"\} 1\nmxkeys_devices_with_few_one_time_keys\{fewer_than="50"\} 1\n/;

describeEachBackend('metrics read from the database', (backend) => {
  // The metrics of a store of their own (on the server's database), so its statements are theirs
  // alone and it can be closed under them; and a clock the test moves.
  async function metricsOn(server: TestServer): Promise<{ metrics: MxkeysMetrics; store: Store; clock: { now: number } }> {
    const store = await openStore(server.config.database);
    const clock = { now: 1_000_000 };
    // No bound on the wait here (a busy machine may be slow): the bound has a test of its own below.
    const metrics = new MxkeysMetrics({ store, ...zeroSources }, { now: () => clock.now, waitMs: 600_000 });
    after(async () => {
      metrics.stop();
      await store.close().catch(() => undefined);
    });
    return { metrics, store, clock };
  }

  test('scrapes that come close together cost one database read, not one each', async () => {
    const { metrics, store, clock } = await metricsOn(await serverWithALowDevice(backend));
    const readsBy = async (scrape: () => Promise<string>) => {
      const before = store.statementCount();
      assert.match(await scrape(), LOW_DEVICE);
      return store.statementCount() - before;
    };
    assert.equal(await readsBy(() => metrics.render()), 1, 'the first scrape reads the figure');
    assert.equal(await readsBy(() => metrics.render()), 0, 'the next one, right after, is served the same figure');
    const together = await Promise.all([0, 1, 2].map(() => readsBy(() => metrics.render())));
    assert.deepEqual(together, [0, 0, 0]);
    clock.now += DATABASE_READ_EVERY_MS;
    const concurrent = store.statementCount();
    await Promise.all([0, 1, 2].map(() => metrics.render()));
    assert.equal(store.statementCount() - concurrent, 1, 'scrapes at once, once the figure is due, share one read');
  });

  test('while the database cannot be read, a scrape still answers 200 with the last figures, their age and the failed reads', async () => {
    const server = await serverWithALowDevice(backend);
    const { metrics, store, clock } = await metricsOn(server);
    const { url, server: listener } = await serveMetrics('127.0.0.1', 0, () => metrics.render());
    after(() => listener.close());
    const scrape = async () => {
      const res = await fetch(url);
      const text = await res.text();
      assert.equal(res.status, 200, text);
      return text;
    };
    assert.match(await scrape(), LOW_DEVICE);
    await store.close();
    clock.now += 60_000;
    const text = await scrape();
    assert.match(text, LOW_DEVICE, 'the last figures read are shown');
    assert.match(text, /mxkeys_metrics_database_reading_age_seconds\{metric="mxkeys_devices_with_few_one_time_keys"\} 60\n/);
    assert.match(text, /mxkeys_metrics_database_read_failures_total\{metric="mxkeys_devices_with_few_one_time_keys"\} 1\n/);
    clock.now += 1;
    assert.match(await scrape(), /mxkeys_metrics_database_read_failures_total\{metric="mxkeys_devices_with_few_one_time_keys"\} 1\n/, 'a database that failed is not asked again at once');
  });
});

test('a scrape is answered while the table it reads is locked, and shows the figure once the lock is gone', { skip: POSTGRES_URL ? false : 'needs MXKEYS_TEST_POSTGRES' }, async () => {
  const postgres = backends.find((b) => b.name === 'postgres')!;
  const server = await startServer({ backend: postgres, config: { registration_shared_secret: SHARED_SECRET, metrics: { enabled: true, port: 0 } } });
  const alice = await registerUser(server, 'alice');
  const device = new TestDevice(alice.userId, alice.deviceId);
  assert.equal((await http(server.url, 'POST', '/_matrix/client/v3/keys/upload', { token: alice.accessToken, body: { one_time_keys: device.oneTimeKeys(3) } })).status, 200);
  // Another session holds a lock that makes every read of the table wait, as a long migration or a
  // stuck transaction would.
  const locker = new pg.Client({ connectionString: server.config.database.postgres! });
  await locker.connect();
  await locker.query('BEGIN');
  await locker.query('LOCK TABLE e2e_one_time_key_counts IN ACCESS EXCLUSIVE MODE');
  let released = false;
  const release = async () => {
    if (released) return;
    released = true;
    await locker.query('COMMIT');
    await locker.end();
  };
  // Only so that a scrape that waits for the lock ends the test instead of hanging it.
  const unblock = setTimeout(() => void release(), 30_000);
  try {
    const res = await fetch(server.mx.metricsUrl()!);
    const text = await res.text();
    assert.equal(released, false, 'the scrape waited for the lock to go');
    assert.equal(res.status, 200, text);
    assert.match(text, /mxkeys_http_requests_total\{route="\/_matrix\/client\/v3\/keys\/upload",method="POST",status="200"\} 1/, 'the other figures are there');
    assert.doesNotMatch(text, /mxkeys_devices_with_few_one_time_keys\{/, 'no figure is made up before one could be read');
  } finally {
    clearTimeout(unblock);
    await release();
  }
  // The read that waited for the lock finishes now; a later scrape shows its figure.
  for (let i = 0; ; i++) {
    const text = await (await fetch(server.mx.metricsUrl()!)).text();
    if (/mxkeys_devices_with_few_one_time_keys\{fewer_than="10"\} 1\n/.test(text)) break;
    assert.ok(i < 100, `the figure never came:\n${text}`);
    await new Promise((r) => setTimeout(r, 100));
  }
});
