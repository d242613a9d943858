import { test } from 'node:test';
import assert from 'node:assert/strict';
import { backends } from '../support/backends.js';
import { http, startServer } from '../support/server.js';
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
  const res = await fetch(url);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /text\/plain/);
  const text = await res.text();
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
