import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { definitionValidator, responseValidator, SHARED_SPEC_DATA, SPEC_DATA } from '../support/spec-schema.js';

function filesUnder(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? filesUnder(join(dir, e.name)) : [join(dir, e.name)]));
}

test('the spec files the validators read are byte-identical to the spec extract in ../shared/spec', { skip: !existsSync(SHARED_SPEC_DATA) && 'no ../shared/spec next to this clone' }, () => {
  const copies = filesUnder(SPEC_DATA);
  assert.ok(copies.length >= 4);
  for (const copy of copies) {
    const name = relative(SPEC_DATA, copy);
    assert.ok(readFileSync(copy).equals(readFileSync(join(SHARED_SPEC_DATA, name))), `${name} differs from ../shared/spec/data/${name}`);
  }
});

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

test('the spec-derived m.direct_to_device validator rejects EDUs that break its schema', () => {
  const edu = definitionValidator('server-server/definitions/event-schemas/m.direct_to_device.yaml');
  const content = { sender: '@a:b', type: 'm.room_key', message_id: 'x', messages: { '@c:d': { D: {} } } };
  assert.deepEqual(edu({ edu_type: 'm.direct_to_device', content }), []);
  assert.notDeepEqual(edu({ edu_type: 'm.direct_to_device', content: { ...content, message_id: undefined } }), [], 'message_id is required');
  assert.notDeepEqual(edu({ edu_type: 'm.typing', content }), [], 'the EDU type is m.direct_to_device');
  assert.notDeepEqual(edu({ edu_type: 'm.direct_to_device', content: { ...content, messages: { '@c:d': { D: 'text' } } } }), [], 'messages are objects');
});
