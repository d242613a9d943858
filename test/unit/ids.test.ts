import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { isLocalUser, isValidDeviceId, isValidNewLocalpart, isValidServerName, parseServerName, parseUserId } from '../../src/matrix/ids.js';

describe('identifier grammar', () => {
  test('accepts the spec example server names', () => {
    for (const name of ['matrix.org', 'matrix.org:8888', '1.2.3.4', '1.2.3.4:1234', '[1234:5678::abcd]', '[1234:5678::abcd]:5678', 'localhost', 'test.local:8448']) {
      assert.ok(isValidServerName(name), name);
    }
    assert.deepEqual(parseServerName('[1234:5678::abcd]:5678'), { host: '[1234:5678::abcd]', port: 5678, kind: 'ipv6' });
    assert.deepEqual(parseServerName('matrix.org'), { host: 'matrix.org', port: undefined, kind: 'dns' });
  });

  test('refuses malformed server names', () => {
    for (const name of ['', 'bad name', 'example.org:', 'example.org:123456', 'example.org:99999', '1.2.3.256', '[::1', '[zz::1]', 'exa_mple.org', 'a..b', 'host:port', '[1234:5678::abcd]x']) {
      assert.ok(!isValidServerName(name), name);
    }
  });

  test('splits user IDs at the first colon, so the server name may carry a port', () => {
    assert.deepEqual(parseUserId('@alice:example.org:8448'), { localpart: 'alice', serverName: 'example.org:8448' });
    assert.deepEqual(parseUserId('@a:[::1]:80'), { localpart: 'a', serverName: '[::1]:80' });
  });

  test('counts the 255-byte user ID limit in UTF-8 bytes', () => {
    const server = 'example.org';
    const fits = `@${'a'.repeat(255 - 2 - server.length)}:${server}`;
    assert.equal(Buffer.byteLength(fits), 255);
    assert.ok(parseUserId(fits));
    assert.equal(parseUserId(`@${'a'.repeat(255 - 1 - server.length)}:${server}`), undefined);
    // 'é' is one UTF-16 unit but two UTF-8 bytes.
    const accented = `@${'é'.repeat(122)}:${server}`;
    assert.ok(accented.length < 255 && Buffer.byteLength(accented) > 255);
    assert.equal(parseUserId(accented), undefined);
  });

  test('accepts historical localparts but allocates only the current grammar', () => {
    assert.ok(parseUserId('@Alice!:example.org'), 'historical user IDs must be accepted');
    assert.equal(parseUserId('alice:example.org'), undefined);
    assert.equal(parseUserId('@alice'), undefined);
    assert.equal(parseUserId('@a\u0000b:example.org'), undefined);
    assert.ok(isValidNewLocalpart('alice.b_c=d-e/f+g'));
    assert.ok(!isValidNewLocalpart('Alice'));
    assert.ok(!isValidNewLocalpart(''));
    assert.ok(!isValidNewLocalpart('a:b'));
  });

  test('treats server names case-sensitively when deciding whether a user is local', () => {
    assert.ok(isLocalUser('@a:example.org', 'example.org'));
    assert.ok(!isLocalUser('@a:EXAMPLE.ORG', 'example.org'));
    assert.ok(!isLocalUser('@a:example.org:8448', 'example.org'));
  });

  test('device IDs are 1 to 255 printable ASCII characters without spaces', () => {
    for (const ok of ['JLAFKJWSCS', 'a', 'abc+/=', 'x'.repeat(255)]) assert.ok(isValidDeviceId(ok), ok);
    for (const bad of ['', 'a b', 'x'.repeat(256), 'tab\t', 'é']) assert.ok(!isValidDeviceId(bad), bad);
  });
});
