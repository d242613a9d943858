import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { AddressPolicy, DEFAULT_IP_RANGE_BLACKLIST, embeddedIpv4, requestJson } from '../../src/federation/client.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';

describe('the outbound address blacklist', () => {
  const defaults = new AddressPolicy(DEFAULT_IP_RANGE_BLACKLIST);

  test('IPv6 forms that carry a loopback or private IPv4 address are refused by default', () => {
    for (const address of [
      '::ffff:127.0.0.1', // IPv4-mapped
      '::ffff:7f00:1',
      '::ffff:10.1.2.3',
      '::127.0.0.1', // IPv4-compatible
      '64:ff9b::127.0.0.1', // NAT64
      '64:ff9b::a9fe:a9fe', // NAT64 of the cloud metadata address 169.254.169.254
      '2002:7f00:1::1', // 6to4 of 127.0.0.1
      '2002:c0a8:101::', // 6to4 of 192.168.1.1
    ]) {
      assert.equal(defaults.permits(address), false, address);
    }
  });

  test('NAT64 and 6to4 are refused whole by default, public addresses in any form are reachable', () => {
    assert.equal(defaults.permits('64:ff9b::8.8.8.8'), false);
    assert.equal(defaults.permits('2002:808:808::1'), false);
    for (const address of ['8.8.8.8', '::ffff:8.8.8.8', '2001:4860:4860::8888']) assert.equal(defaults.permits(address), true, address);
  });

  test('an IPv4 blacklist alone also refuses that range in IPv4-mapped, NAT64 and 6to4 form, even with NAT64 whitelisted', () => {
    const policy = new AddressPolicy(['127.0.0.0/8', '64:ff9b::/96'], ['64:ff9b::/96']);
    for (const address of ['::ffff:127.0.0.1', '64:ff9b::7f00:1', '2002:7f00:1::']) assert.equal(policy.permits(address), false, address);
    assert.equal(policy.permits('64:ff9b::8.8.8.8'), true, 'a whitelisted NAT64 gateway still reaches public IPv4 hosts');
  });

  test('the embedded IPv4 address is read from each form', () => {
    assert.equal(embeddedIpv4('::ffff:1.2.3.4'), '1.2.3.4');
    assert.equal(embeddedIpv4('::ffff:102:304'), '1.2.3.4');
    assert.equal(embeddedIpv4('::1.2.3.4'), '1.2.3.4');
    assert.equal(embeddedIpv4('64:ff9b::102:304'), '1.2.3.4');
    assert.equal(embeddedIpv4('2002:102:304:5::9'), '1.2.3.4');
    assert.equal(embeddedIpv4('2001:db8::1'), undefined);
    assert.equal(embeddedIpv4('fe80::1:2:3'), undefined);
  });

  test('a server named by an IPv4-mapped loopback address is never contacted', async () => {
    const remote = await FakeHomeserver.start();
    const port = new URL(remote.url).port;
    await assert.rejects(
      requestJson(`http://[::ffff:127.0.0.1]:${port}/_matrix/key/v2/server`, { timeoutMs: 5000, maxBytes: 65536, ca: undefined, addresses: defaults }),
      /may not reach \(federation\.ip_range_blacklist\)/,
    );
    assert.equal(remote.requests.length, 0);
  });
});
