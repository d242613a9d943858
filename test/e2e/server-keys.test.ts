import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { mkdirSync, readdirSync } from 'node:fs';
import nacl from 'tweetnacl';
import { backends, tempDir } from '../support/backends.js';
import { http, startServer } from '../support/server.js';
import { runCli, startServerProcess } from '../support/process.js';

/** An independent canonicaliser for the simple, ASCII-keyed key objects: sorted keys, no spaces. */
function independentCanonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(independentCanonical).join(',')}]`;
  if (v && typeof v === 'object') {
    return `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${independentCanonical((v as Record<string, unknown>)[k])}`).join(',')}}`;
  }
  return JSON.stringify(v);
}

const b64 = (s: string) => Buffer.from(s, 'base64');

/** Verifies every server signature on a key response with tweetnacl, not with our own code. */
function verifiedWithTweetnacl(body: Record<string, unknown>): string[] {
  const serverName = body['server_name'] as string;
  const verifyKeys = body['verify_keys'] as Record<string, { key: string }>;
  const sigs = (body['signatures'] as Record<string, Record<string, string>>)[serverName]!;
  const { signatures: _s, ...unsignedPart } = body;
  const message = Buffer.from(independentCanonical(unsignedPart));
  return Object.entries(sigs).map(([keyId, sig]) => {
    const pub = verifyKeys[keyId];
    assert.ok(pub, `signature by ${keyId}, which is not in verify_keys`);
    assert.ok(nacl.sign.detached.verify(message, b64(sig), b64(pub.key)), `signature ${keyId} does not verify`);
    return keyId;
  });
}

describe('GET /_matrix/key/v2/server', () => {
  const backend = backends[0]!;

  test('publishes keys whose signature an independent Ed25519 implementation verifies, as canonical JSON bytes', async () => {
    const s = await startServer({ backend, config: { server_name: 'keys.example' } });
    const r = await http(s.url, 'GET', '/_matrix/key/v2/server');
    assert.equal(r.status, 200);
    assert.match(r.headers.get('content-type') ?? '', /application\/json/);
    assert.equal(r.text, independentCanonical(JSON.parse(r.text)), 'the response bytes are canonical JSON');
    assert.equal(r.body['server_name'], 'keys.example');
    assert.deepEqual(r.body['old_verify_keys'], {});
    assert.equal(verifiedWithTweetnacl(r.body).length, 1);
  });

  test('valid_until_ts is now plus key_refresh_interval (one day by default)', async () => {
    const before = Date.now();
    const s = await startServer({ backend });
    const r = await http(s.url, 'GET', '/_matrix/key/v2/server');
    const until = r.body['valid_until_ts'] as number;
    assert.ok(until >= before + 86_400_000 && until <= Date.now() + 86_400_000 + 1000, String(until - before));
    const short = await startServer({ backend, config: { key_refresh_interval: '1h' } });
    const r2 = await http(short.url, 'GET', '/_matrix/key/v2/server');
    assert.ok((r2.body['valid_until_ts'] as number) <= Date.now() + 3_600_000 + 1000);
  });

  test('retired keys from old_signing_keys are listed in old_verify_keys with their expiry', async () => {
    const oldKey = Buffer.from(nacl.sign.keyPair().publicKey).toString('base64').replace(/=+$/, '');
    const s = await startServer({ backend, config: { old_signing_keys: { 'ed25519:retired': { key: oldKey, expired_ts: 1_600_000_000_000 } } } });
    const r = await http(s.url, 'GET', '/_matrix/key/v2/server');
    assert.deepEqual(r.body['old_verify_keys'], { 'ed25519:retired': { key: oldKey, expired_ts: 1_600_000_000_000 } });
    verifiedWithTweetnacl(r.body);
  });

  test('the deprecated per-key-ID form answers the same keys', async () => {
    const s = await startServer({ backend });
    const all = await http(s.url, 'GET', '/_matrix/key/v2/server');
    const one = await http(s.url, 'GET', `/_matrix/key/v2/server/${encodeURIComponent(Object.keys(all.body['verify_keys'] as object)[0]!)}`);
    assert.equal(one.status, 200);
    assert.deepEqual(one.body['verify_keys'], all.body['verify_keys']);
  });

  test('a Synapse-format key file brought by the operator is used as is', async () => {
    const dir = tempDir();
    const path = join(dir, 'signing.key');
    const seed = Buffer.alloc(32, 9);
    const { writeFileSync } = await import('node:fs');
    writeFileSync(path, `ed25519 a_AbCd ${seed.toString('base64').replace(/=+$/, '')}\n`);
    const s = await startServer({ backend, signingKeyPath: path });
    const r = await http(s.url, 'GET', '/_matrix/key/v2/server');
    const expected = Buffer.from(nacl.sign.keyPair.fromSeed(seed).publicKey).toString('base64').replace(/=+$/, '');
    assert.deepEqual(r.body['verify_keys'], { 'ed25519:a_AbCd': { key: expected } });
  });

  test('GET /_matrix/federation/v1/version names mxkeys and its version', async () => {
    const s = await startServer({ backend });
    const r = await http(s.url, 'GET', '/_matrix/federation/v1/version');
    assert.deepEqual(Object.keys(r.body), ['server']);
    assert.equal((r.body['server'] as Record<string, unknown>)['name'], 'mxkeys');
    assert.match(String((r.body['server'] as Record<string, unknown>)['version']), /^\d+\.\d+\.\d+/);
  });
});

/** A directory like a fresh clone: an empty ./data (the repository carries it), nothing else. */
function freshClone(): string {
  const cwd = tempDir();
  mkdirSync(join(cwd, 'data'));
  return cwd;
}

describe('npm start in a fresh clone', () => {
  test('serves a signed key from ./data, and a restart keeps the same key', async () => {
    const cwd = freshClone();
    const first = await startServerProcess([], { cwd });
    const r1 = await http(first.url, 'GET', '/_matrix/key/v2/server');
    assert.equal(r1.body['server_name'], 'localhost');
    verifiedWithTweetnacl(r1.body);
    first.child.kill('SIGTERM');
    assert.equal(await first.exited, 0);
    const { existsSync } = await import('node:fs');
    assert.ok(existsSync(join(cwd, 'data', 'signing.key')));
    assert.ok(existsSync(join(cwd, 'data', 'mxkeys.db')));

    const second = await startServerProcess([], { cwd });
    const r2 = await http(second.url, 'GET', '/_matrix/key/v2/server');
    assert.deepEqual(r2.body['verify_keys'], r1.body['verify_keys']);
    second.child.kill('SIGTERM');
    assert.equal(await second.exited, 0);
  });

  test('the first start creates the signing key and logs its ID and public key at warning level', async () => {
    const server = await startServerProcess([], { cwd: freshClone() });
    const r = await http(server.url, 'GET', '/_matrix/key/v2/server');
    server.child.kill('SIGTERM');
    assert.equal(await server.exited, 0);
    const line = server.output().split('\n').find((l) => l.includes('created a new server signing key'));
    assert.ok(line, server.output());
    const logged = JSON.parse(line) as { level: number; key_id: string; public_key: string };
    assert.equal(logged.level, 40, 'logged at warn');
    assert.deepEqual({ [logged.key_id]: { key: logged.public_key } }, r.body['verify_keys'], 'the logged key is the published one');
  });

  test('without ./data, serve refuses to invent a signing key, says how to make one, and creates nothing', () => {
    const cwd = tempDir();
    const r = runCli(['serve'], { cwd, env: { MXKEYS_LISTEN_PORT: '0' } });
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /signing_key_path: \.\/data\/signing\.key does not exist, and neither does its directory/);
    assert.match(r.stderr, /mxkeys generate-key --out \.\/data\/signing\.key/);
    assert.deepEqual(readdirSync(cwd), [], 'no directory, key or database was created');
  });

  test('SIGTERM lets an in-flight request finish before the process exits', async () => {
    const cwd = freshClone();
    const server = await startServerProcess([], { cwd });
    const { request } = await import('node:http');
    // A request whose body is still arriving when the signal comes.
    const response = new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = request(`${server.url}/_matrix/client/v3/keys/upload`, { method: 'POST', headers: { 'content-type': 'application/json', 'content-length': '2' } }, (res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      });
      req.on('error', reject);
      req.write('{');
      setTimeout(() => {
        server.child.kill('SIGTERM');
        setTimeout(() => req.end('}'), 300);
      }, 200);
    });
    const res = await response;
    assert.ok(res.status > 0 && JSON.parse(res.body).errcode, `got a Matrix answer: ${res.status} ${res.body}`);
    assert.equal(await server.exited, 0);
    assert.match(server.output(), /shutting down/);
    assert.match(server.output(), /"msg":"stopped"/);
  });

  test('SIGTERM still stops the server after whoever read its log output has gone away', async () => {
    const server = await startServerProcess([], { cwd: freshClone() });
    server.child.stdout!.destroy(); // like `mxkeys serve | head -2` after head exits
    server.child.stderr!.destroy();
    await new Promise((r) => setTimeout(r, 100));
    server.child.kill('SIGTERM');
    const code = await Promise.race([server.exited, new Promise((r) => setTimeout(() => r('still running after 5 s'), 5000))]);
    assert.equal(code, 0);
  });
});
