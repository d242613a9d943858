/**
 * The HTTPS listener (tls_certificate_path, tls_private_key_path): other homeservers federate only
 * over HTTPS, so two mxkeys servers named by their addresses find and reach each other with real
 * server discovery, and a renewed certificate is taken up on reload without dropping connections.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:tls';
import { request as httpsRequest, Agent } from 'node:https';
import { copyFileSync, readFileSync } from 'node:fs';
import { backends } from '../support/backends.js';
import { startServer, type TestServer } from '../support/server.js';
import { registrationMac, SHARED_SECRET } from '../support/client.js';
import { TestDevice } from '../support/keys.js';
import { testCa } from '../support/tls.js';
import { freePort, QUICK_FEDERATION } from '../support/federation.js';

const C = '/_matrix/client/v3';

/** The certificate a new TLS connection to `port` is served (its fingerprint). */
function servedCertificate(port: number, ca: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port, ca }, () => {
      resolve(socket.getPeerCertificate().fingerprint256);
      socket.end();
    });
    socket.on('error', reject);
  });
}

/** A GET over HTTPS, on `agent`'s kept-alive connection if it has one. */
function get(url: string, ca: string, agent: Agent): Promise<{ status: number; text: string; socketPort: number }> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest(url, { ca, agent }, (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text, socketPort: req.socket?.localPort ?? 0 }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** JSON requests over HTTPS trusting the test CA (fetch cannot be given a CA). */
class HttpsClient {
  private readonly agent: Agent;

  constructor(ca: string) {
    this.agent = new Agent({ ca });
  }

  call(server: TestServer, method: string, path: string, token: string | undefined, body?: unknown): Promise<{ status: number; body: Record<string, unknown> }> {
    return new Promise((resolve, reject) => {
      const payload = body === undefined ? undefined : JSON.stringify(body);
      const headers = { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(payload ? { 'content-type': 'application/json' } : {}) };
      const req = httpsRequest(`${server.url}${path}`, { method, agent: this.agent, headers }, (res) => {
        let text = '';
        res.on('data', (c: Buffer) => (text += c.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) as Record<string, unknown> }));
      });
      req.on('error', reject);
      req.end(payload);
    });
  }

  /** Registers a user through the shared-secret admin API. */
  async register(server: TestServer, user: string): Promise<{ user_id: string; access_token: string; device_id: string }> {
    const nonce = (await this.call(server, 'GET', '/_synapse/admin/v1/register', undefined)).body['nonce'] as string;
    const mac = registrationMac(SHARED_SECRET, nonce, user, 'pw', false);
    const r = await this.call(server, 'POST', '/_synapse/admin/v1/register', undefined, { nonce, username: user, password: 'pw', admin: false, mac });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return r.body as { user_id: string; access_token: string; device_id: string };
  }

  close(): void {
    this.agent.destroy();
  }
}

describe('the HTTPS listener [sqlite]', () => {
  test('serves HTTPS with the configured certificate, and a renewed one after reload without dropping open connections', async () => {
    const ca = testCa();
    const first = ca.leaf('first', 'IP:127.0.0.1');
    const second = ca.leaf('second', 'IP:127.0.0.1');
    const live = ca.leaf('live', 'IP:127.0.0.1');
    copyFileSync(first.certPath, live.certPath);
    copyFileSync(first.keyPath, live.keyPath);
    const s = await startServer({ backend: backends[0]!, config: { tls_certificate_path: live.certPath, tls_private_key_path: live.keyPath } });
    assert.match(s.url, /^https:/);
    const port = Number(new URL(s.url).port);
    const caPem = readFileSync(ca.caPath, 'utf8');
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    const before = await get(`${s.url}/_matrix/federation/v1/version`, caPem, agent);
    assert.equal(before.status, 200, before.text);
    const firstFingerprint = await servedCertificate(port, caPem);

    copyFileSync(second.certPath, live.certPath);
    copyFileSync(second.keyPath, live.keyPath);
    s.mx.reloadTls();
    const after = await get(`${s.url}/_matrix/federation/v1/version`, caPem, agent);
    assert.equal(after.status, 200, after.text);
    assert.equal(after.socketPort, before.socketPort, 'the open connection kept working');
    const secondFingerprint = await servedCertificate(port, caPem);
    assert.notEqual(secondFingerprint, firstFingerprint, 'new connections get the renewed certificate');
    agent.destroy();
  });

  test('two servers named by address:port find each other by real discovery and exchange keys over HTTPS', async () => {
    const ca = testCa();
    const cert = ca.leaf('loopback', 'IP:127.0.0.1');
    const [p1, p2] = [await freePort(), await freePort()];
    const start = (port: number) =>
      startServer({
        backend: backends[0]!,
        config: {
          server_name: `127.0.0.1:${port}`,
          registration_shared_secret: SHARED_SECRET,
          listen: { host: '127.0.0.1', port },
          tls_certificate_path: cert.certPath,
          tls_private_key_path: cert.keyPath,
          // Discovered servers on loopback are refused by default; these two live there.
          federation: { ...QUICK_FEDERATION, tls_ca_file: ca.caPath, ip_range_whitelist: ['127.0.0.1'] },
        },
      });
    const hs1 = await start(p1);
    const hs2 = await start(p2);
    const client = new HttpsClient(readFileSync(ca.caPath, 'utf8'));
    const alice = await client.register(hs1, 'alice');
    const bob = await client.register(hs2, 'bob');
    const up = await client.call(hs2, 'POST', `${C}/keys/upload`, bob.access_token, { device_keys: new TestDevice(bob.user_id, bob.device_id).deviceKeys() });
    assert.equal(up.status, 200);
    const q = await client.call(hs1, 'POST', `${C}/keys/query`, alice.access_token, { device_keys: { [bob.user_id]: [] } });
    assert.equal(q.status, 200, JSON.stringify(q.body));
    assert.deepEqual(q.body['failures'], {});
    assert.deepEqual(Object.keys((q.body['device_keys'] as Record<string, object>)[bob.user_id]!), [bob.device_id]);
    client.close();
  });
});
