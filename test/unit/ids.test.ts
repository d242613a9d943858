import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { isLocalUser, isValidDeviceId, isValidNewLocalpart, isValidServerName, parseServerName, parseUserId, userIdFor } from '../../src/matrix/ids.js';

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

  test('refuses names that only contain an IP literal or a port somewhere inside them', () => {
    // Each would pass if a pattern lost its ^ or $ anchor.
    for (const name of ['x_1.2.3.4', '1.2.3.4_', '[::1zz]', '[::1]x80', '[1.2.3.4]', 'example.org:80a', 'example.org:a80', 'example.org:8_0']) {
      assert.equal(parseServerName(name), undefined, name);
    }
  });

  test('reports the kind of host, so discovery never asks an IP address for .well-known', () => {
    // Multi-digit octets in every position: a pattern that allowed one digit would call these DNS names.
    assert.deepEqual(parseServerName('192.168.10.200'), { host: '192.168.10.200', port: undefined, kind: 'ipv4' });
    assert.deepEqual(parseServerName('10.200.30.4:8448'), { host: '10.200.30.4', port: 8448, kind: 'ipv4' });
    assert.deepEqual(parseServerName('1.22.3.4'), { host: '1.22.3.4', port: undefined, kind: 'ipv4' });
    assert.deepEqual(parseServerName('1.2.133.4'), { host: '1.2.133.4', port: undefined, kind: 'ipv4' });
    assert.deepEqual(parseServerName('[::1]'), { host: '[::1]', port: undefined, kind: 'ipv6' });
    // Names that merely start or end like an address are DNS names, resolved as such.
    assert.deepEqual(parseServerName('1.2.3.4.example'), { host: '1.2.3.4.example', port: undefined, kind: 'dns' });
    assert.deepEqual(parseServerName('1.2.3.4x'), { host: '1.2.3.4x', port: undefined, kind: 'dns' });
    assert.deepEqual(parseServerName('x1.2.3.4'), { host: 'x1.2.3.4', port: undefined, kind: 'dns' });
  });

  test('accepts the edge values: octet 255, port 65535, and a fully qualified name ending in a dot', () => {
    assert.deepEqual(parseServerName('255.255.255.255'), { host: '255.255.255.255', port: undefined, kind: 'ipv4' });
    assert.deepEqual(parseServerName('example.org:65535'), { host: 'example.org', port: 65535, kind: 'dns' });
    assert.equal(parseServerName('example.org:65536'), undefined);
    // The grammar's dns-name allows dots anywhere; we refuse empty labels except the root one.
    assert.deepEqual(parseServerName('example.org.'), { host: 'example.org.', port: undefined, kind: 'dns' });
    assert.deepEqual(parseServerName('example.org.:8448'), { host: 'example.org.', port: 8448, kind: 'dns' });
    for (const name of ['.', '.example.org', 'example..org', 'example.org..']) assert.equal(parseServerName(name), undefined, name);
  });

  test('refuses user IDs whose server name is invalid or empty', () => {
    for (const id of ['@alice:bad_host', '@a:', '@a:example.org:', '@a:1.2.3.4_', '@a:[::1']) assert.equal(parseUserId(id), undefined, id);
    assert.ok(!isLocalUser('@alice:bad_host', 'bad_host'));
    assert.ok(!isLocalUser('not a user ID', 'example.org'));
  });

  test('builds a user ID that parses back into the same parts', () => {
    assert.equal(userIdFor('alice', 'example.org:8448'), '@alice:example.org:8448');
    assert.deepEqual(parseUserId(userIdFor('alice', 'example.org:8448')), { localpart: 'alice', serverName: 'example.org:8448' });
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
