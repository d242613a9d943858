import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { ServerDiscovery, wellKnownCacheMs, type DiscoveryNetwork, type SrvRecord } from '../../src/federation/discovery.js';
import { backends } from '../support/backends.js';
import { testCa } from '../support/tls.js';
import { startServer } from '../support/server.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';

/** DNS and .well-known answers for discovery, as a table, counting the lookups made. */
function network(wellKnown: Record<string, string | undefined>, srv: Record<string, SrvRecord[]>) {
  const calls: string[] = [];
  const net: DiscoveryNetwork = {
    async fetchWellKnown(hostname) {
      calls.push(`well-known ${hostname}`);
      const server = wellKnown[hostname];
      return { server, cacheMs: server === undefined ? 3_600_000 : 86_400_000 };
    },
    async resolveSrv(name) {
      calls.push(`srv ${name}`);
      const records = srv[name];
      if (!records) throw Object.assign(new Error('ENOTFOUND'), { code: 'ENOTFOUND' });
      return records;
    },
  };
  return { net, calls };
}

const rec = (name: string, port: number, priority = 10, weight = 5): SrvRecord => ({ name, port, priority, weight });

describe('server discovery', () => {
  test('1. an IP literal is used directly, port 8448 unless given, certificate checked for the IP', async () => {
    const { net, calls } = network({}, {});
    const d = new ServerDiscovery(net);
    assert.deepEqual(await d.resolve('1.2.3.4'), { baseUrl: 'https://1.2.3.4:8448', host: '1.2.3.4', tlsName: '1.2.3.4' });
    assert.deepEqual(await d.resolve('203.0.113.45'), { baseUrl: 'https://203.0.113.45:8448', host: '203.0.113.45', tlsName: '203.0.113.45' });
    assert.deepEqual(await d.resolve('[2001:db8::1]:9000'), { baseUrl: 'https://[2001:db8::1]:9000', host: '[2001:db8::1]:9000', tlsName: '2001:db8::1' });
    assert.deepEqual(calls, [], 'no .well-known or SRV lookup for an IP literal');
  });

  test('2. an explicit port skips .well-known and SRV', async () => {
    const { net, calls } = network({ 'example.org': 'delegated.example' }, {});
    assert.deepEqual(await new ServerDiscovery(net).resolve('example.org:8000'), { baseUrl: 'https://example.org:8000', host: 'example.org:8000', tlsName: 'example.org' });
    assert.deepEqual(calls, []);
  });

  test('3. .well-known delegation: to an IP, to a name with port, through SRV, or to port 8448', async () => {
    const { net } = network(
      { 'a.example': '5.6.7.8', 'b.example': 'matrix.b.example:443', 'c.example': 'matrix.c.example', 'd.example': 'matrix.d.example' },
      { '_matrix-fed._tcp.matrix.c.example': [rec('backend.c.example', 8449)] },
    );
    const d = new ServerDiscovery(net);
    assert.deepEqual(await d.resolve('a.example'), { baseUrl: 'https://5.6.7.8:8448', host: '5.6.7.8', tlsName: '5.6.7.8' });
    assert.deepEqual(await d.resolve('b.example'), { baseUrl: 'https://matrix.b.example:443', host: 'matrix.b.example:443', tlsName: 'matrix.b.example' });
    assert.deepEqual(await d.resolve('c.example'), { baseUrl: 'https://backend.c.example:8449', host: 'matrix.c.example', tlsName: 'matrix.c.example' });
    assert.deepEqual(await d.resolve('d.example'), { baseUrl: 'https://matrix.d.example:8448', host: 'matrix.d.example', tlsName: 'matrix.d.example' });
  });

  test('3.4 and 5: the deprecated _matrix._tcp SRV record is used when _matrix-fed._tcp is missing', async () => {
    const { net, calls } = network({}, { '_matrix._tcp.old.example': [rec('legacy.old.example', 8450)] });
    assert.deepEqual(await new ServerDiscovery(net).resolve('old.example'), { baseUrl: 'https://legacy.old.example:8450', host: 'old.example', tlsName: 'old.example' });
    assert.deepEqual(calls, ['well-known old.example', 'srv _matrix-fed._tcp.old.example', 'srv _matrix._tcp.old.example']);
  });

  test('4. without .well-known, SRV for the server name; the lowest priority wins; certificate for the server name', async () => {
    const { net } = network({}, { '_matrix-fed._tcp.e.example': [rec('second.e.example', 2, 20), rec('first.e.example', 1, 10)] });
    assert.deepEqual(await new ServerDiscovery(net).resolve('e.example'), { baseUrl: 'https://first.e.example:1', host: 'e.example', tlsName: 'e.example' });
  });

  test('6. otherwise the server name on port 8448', async () => {
    assert.deepEqual(await new ServerDiscovery(network({}, {}).net).resolve('f.example'), { baseUrl: 'https://f.example:8448', host: 'f.example', tlsName: 'f.example' });
  });

  test('.well-known answers are cached, and federation.resolve overrides everything', async () => {
    const { net, calls } = network({ 'g.example': 'matrix.g.example:443' }, {});
    const d = new ServerDiscovery(net, { 'h.example': 'http://127.0.0.1:9999/' });
    await d.resolve('g.example');
    await d.resolve('g.example');
    assert.equal(calls.filter((c) => c.startsWith('well-known')).length, 1);
    assert.deepEqual(await d.resolve('h.example'), { baseUrl: 'http://127.0.0.1:9999', host: '127.0.0.1:9999', tlsName: '127.0.0.1' });
  });

  test('.well-known cache times follow Cache-Control, capped at 48 hours', () => {
    assert.equal(wellKnownCacheMs(undefined), 24 * 3_600_000);
    assert.equal(wellKnownCacheMs('max-age=600'), 600_000);
    assert.equal(wellKnownCacheMs('public, max-age=9999999'), 48 * 3_600_000);
  });
});

describe('HTTPS to other servers', () => {
  /** A CA and a certificate for 127.0.0.1 signed by it (and one for another name). */
  function certificates(): { ca: string; key: string; cert: string; otherCert: string; otherKey: string } {
    const ca = testCa();
    const local = ca.leaf('local', 'IP:127.0.0.1');
    const other = ca.leaf('other', 'DNS:somewhere.else.example');
    return { ca: ca.caPath, key: local.key, cert: local.cert, otherKey: other.key, otherCert: other.cert };
  }

  test('keys are fetched over HTTPS with the certificate checked against the server name, trusting federation.tls_ca_file, and never from blacklisted addresses', async () => {
    const certs = certificates();
    const remote = await FakeHomeserver.start({ tls: { key: certs.key, cert: certs.cert } });
    const body = { device_keys: { '@alice:test.local': [] } };
    // 127.0.0.1 is blacklisted for discovered servers by default; this test server lives there.
    const local = { ip_range_whitelist: ['127.0.0.1'] };
    const trusting = await startServer({ backend: backends[0]!, config: { federation: { tls_ca_file: certs.ca, ...local } } });
    const ok = await remote.request(trusting.url, 'test.local', 'POST', '/_matrix/federation/v1/user/keys/query', { body });
    assert.equal(ok.status, 200, ok.text);
    const fetchesSoFar = remote.requests.length;

    // Without the whitelist, a server discovered on a loopback address is never contacted.
    const guarded = await startServer({ backend: backends[0]!, config: { federation: { tls_ca_file: certs.ca } } });
    const blocked = await remote.request(guarded.url, 'test.local', 'POST', '/_matrix/federation/v1/user/keys/query', { body });
    assert.equal(blocked.status, 401, blocked.text);
    assert.equal(remote.requests.length, fetchesSoFar, 'mxkeys did not connect to 127.0.0.1');

    const untrusting = await startServer({ backend: backends[0]!, config: { federation: local } });
    const refused = await remote.request(untrusting.url, 'test.local', 'POST', '/_matrix/federation/v1/user/keys/query', { body });
    assert.equal(refused.status, 401, 'a certificate from an unknown CA is not trusted');

    const wrongName = await FakeHomeserver.start({ tls: { key: certs.otherKey, cert: certs.otherCert } });
    const mismatch = await wrongName.request(trusting.url, 'test.local', 'POST', '/_matrix/federation/v1/user/keys/query', { body });
    assert.equal(mismatch.status, 401, 'a certificate for another name is not accepted');
    assert.equal(wrongName.requests.length, 0, 'the TLS handshake failed before any request');
  });
});

