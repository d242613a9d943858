import { test } from 'node:test';
import assert from 'node:assert/strict';
import { responseValidator } from '../support/spec-schema.js';

// The response checks in the federation tests are only as good as this validator: prove it bites.
test('the spec-derived validators reject responses that break user_keys.yaml and user_devices.yaml', () => {
  const query = responseValidator('server-server/user_keys.yaml', '/user/keys/query', 'post');
  const claim = responseValidator('server-server/user_keys.yaml', '/user/keys/claim', 'post');
  const devices = responseValidator('server-server/user_devices.yaml', '/user/devices/{userId}', 'get');
  assert.deepEqual(query({ device_keys: {} }), []);
  assert.notDeepEqual(query({ device_keys: { '@a:b': { D: { user_id: '@a:b', device_id: 'D', algorithms: [], keys: {} } } } }), [], 'signatures are required on device keys');
  assert.notDeepEqual(query({ device_keys: 5 }), []);
  assert.notDeepEqual(claim({ one_time_keys: { '@a:b': { D: { 'signed_curve25519:x': { key: 'k' } } } } }), [], 'a key object needs signatures');
  assert.deepEqual(claim({ one_time_keys: { '@a:b': { D: { 'curve25519:x': 'k' } } } }), []);
  assert.notDeepEqual(devices({ user_id: '@a:b', devices: [] }), [], 'stream_id is required');
  assert.notDeepEqual(devices({ user_id: '@a:b', stream_id: 1, devices: [{ device_id: 'D' }] }), [], 'every device has keys');
});
