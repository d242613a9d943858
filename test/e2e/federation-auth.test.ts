import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { backends, describeEachBackend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';
import { TestSigningKey } from '../support/keys.js';

const F = '/_matrix/federation/v1';
type Json = Record<string, unknown>;

async function setup(backend: (typeof backends)[number], config: Json = {}, fakes = 1) {
  const remotes = await Promise.all(Array.from({ length: fakes }, () => FakeHomeserver.start()));
  const server = await startServer({
    backend,
    config: { ...config, federation: { resolve: Object.fromEntries(remotes.map((r) => [r.serverName, r.url])), ...(config['federation'] as Json | undefined) } },
  });
  return { server, remote: remotes[0]!, remotes, dest: server.config.server_name };
}

const queryBody = { device_keys: { '@alice:test.local': [] } };

function expectUnauthorized(r: { status: number; body: Json; text: string }, message: RegExp): void {
  assert.equal(r.status, 401, r.text);
  assert.equal(r.body['errcode'], 'M_UNAUTHORIZED', r.text);
  assert.match(String(r.body['error']), message);
}

describeEachBackend('X-Matrix authentication of federation requests', (backend) => {
  test('a correctly signed request is accepted', async () => {
    const { server, remote, dest } = await setup(backend);
    const r = await remote.request(server.url, dest, 'POST', `${F}/user/keys/query`, { body: queryBody });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.body, { device_keys: { '@alice:test.local': {} }, master_keys: {}, self_signing_keys: {} });
  });

  test('every kind of bad or missing signature is refused with 401 M_UNAUTHORIZED saying what failed', async () => {
    const { server, remote, remotes, dest } = await setup(backend, {}, 2);
    const other = remotes[1]!;
    const uri = `${F}/user/keys/query`;
    const send = (options: Parameters<FakeHomeserver['request']>[4], method = 'POST', path = uri) => remote.request(server.url, dest, method, path, { body: queryBody, ...options });

    expectUnauthorized(await send({ authorization: null }), /Missing Authorization header/);
    expectUnauthorized(await send({ authorization: 'Bearer abc' }), /does not use the X-Matrix scheme/);
    expectUnauthorized(await send({ authorization: 'X-Matrix origin=' }), /Malformed/);
    expectUnauthorized(await send({ authorization: 'X-Matrix key="ed25519:fake1",sig="abc"' }), /no origin/);
    expectUnauthorized(await send({ signed: { content: { device_keys: { '@bob:test.local': [] } } } }), /does not match this request/);
    expectUnauthorized(await send({ signed: { uri: `${F}/user/keys/claim` } }), /does not match this request/);
    expectUnauthorized(await send({ signed: { method: 'PUT' } }), /does not match this request/);
    expectUnauthorized(await send({ destination: 'someone.else' }), /addressed to someone.else/);
    expectUnauthorized(await send({ keyVersion: 'nosuchkey', signWith: new TestSigningKey() }), /has no published key ed25519:nosuchkey/);
    // A key it holds but never published, used under the ID of a published key.
    expectUnauthorized(await send({ signWith: new TestSigningKey() }), /does not match this request/);
    expectUnauthorized(await send({ origin: other.serverName }), /does not match this request/);
    expectUnauthorized(await send({ origin: 'not a server name' }), /not a valid server name/);
    expectUnauthorized(await send({ origin: dest }), /this server itself/);

    // Bodies of refused requests are never looked at: a malformed body still gets the 401 first.
    expectUnauthorized(await remote.request(server.url, dest, 'POST', uri, { rawBody: '{"device_keys": 5}', authorization: null }), /Missing/);
    // The valid request from the same server still works.
    assert.equal((await send({})).status, 200);
  });

  test('keys from old_verify_keys never authenticate requests, and neither do expired keys', async () => {
    const { server, remote, dest } = await setup(backend);
    remote.oldKeys.push({ version: 'retired', key: new TestSigningKey(), expiredTs: Date.now() - 1000 });
    const old = await remote.request(server.url, dest, 'POST', `${F}/user/keys/query`, { body: queryBody, keyVersion: 'retired' });
    expectUnauthorized(old, /old key/);

    const { server: server2, remote: expired, dest: dest2 } = await setup(backend);
    expired.validForMs = -60_000;
    const r = await expired.request(server2.url, dest2, 'POST', `${F}/user/keys/query`, { body: queryBody });
    expectUnauthorized(r, /expired/);
  });

  test('a request without a destination parameter is accepted when signed for this server', async () => {
    const { server, remote, dest } = await setup(backend);
    const r = await remote.request(server.url, dest, 'POST', `${F}/user/keys/query`, { body: queryBody, destination: null });
    assert.equal(r.status, 200, r.text);
  });

  test('the signature covers the request target exactly as sent, query string included', async () => {
    const { server, remote, dest } = await setup(backend);
    const path = `${F}/user/devices/%40alice%3Atest.local?x=1&y=%2F`;
    assert.equal((await remote.request(server.url, dest, 'GET', path)).status, 200);
    expectUnauthorized(await remote.request(server.url, dest, 'GET', path, { signed: { uri: `${F}/user/devices/@alice:test.local?x=1&y=/` } }), /does not match/);
  });

  test('concurrent requests from a new server share one key fetch, and unknown key IDs do not make us refetch each time', async () => {
    const { server, remote, dest } = await setup(backend);
    const results = await Promise.all(Array.from({ length: 20 }, () => remote.request(server.url, dest, 'POST', `${F}/user/keys/query`, { body: queryBody })));
    assert.ok(results.every((r) => r.status === 200));
    const fetches = () => remote.requests.filter((r) => r.url === '/_matrix/key/v2/server').length;
    assert.equal(fetches(), 1);
    for (let i = 0; i < 5; i++) {
      await remote.request(server.url, dest, 'POST', `${F}/user/keys/query`, { body: queryBody, keyVersion: `junk${i}`, signWith: new TestSigningKey() });
    }
    assert.equal(fetches(), 1, 'no refetch within the refetch interval');
  });

  test('the server keys survive a restart: the database holds them', async () => {
    const remote = await FakeHomeserver.start();
    const database = { ...(await backend.freshDatabase()) };
    const config = { federation: { resolve: { [remote.serverName]: remote.url } } };
    const first = await startServer({ backend, database, config });
    assert.equal((await remote.request(first.url, 'test.local', 'POST', `${F}/user/keys/query`, { body: queryBody })).status, 200);
    await first.close();
    remote.serveKeys = false;
    const second = await startServer({ backend, database, config });
    assert.equal((await remote.request(second.url, 'test.local', 'POST', `${F}/user/keys/query`, { body: queryBody })).status, 200);
  });

  test('a request from a server whose keys cannot be fetched is refused with 401 saying why', async () => {
    const { server, remote, dest } = await setup(backend);
    const r = await remote.request(server.url, dest, 'POST', `${F}/user/keys/query`, { body: queryBody, origin: 'hs3.invalid' });
    expectUnauthorized(r, /hs3\.invalid has no published key ed25519:fake1 \(fetching its keys failed: cannot reach hs3\.invalid:8448: DNS lookup failed/);
  });

  test('requests beyond the per-origin rate limit get 429 M_LIMIT_EXCEEDED', async () => {
    const { server, remote, dest } = await setup(backend, { federation: { rate_limit: { per_second: 0.5, burst_count: 3 } } });
    const statuses: number[] = [];
    for (let i = 0; i < 5; i++) statuses.push((await remote.request(server.url, dest, 'POST', `${F}/user/keys/query`, { body: queryBody })).status);
    assert.deepEqual(statuses, [200, 200, 200, 429, 429]);
    const limited = await remote.request(server.url, dest, 'POST', `${F}/user/keys/query`, { body: queryBody });
    assert.match(String(limited.body['error']), new RegExp(`^Too many requests from ${remote.serverName.replaceAll('.', '\\.')}; retry in \\d+ s$`));
  });

  test('an empty header, a key that is not ed25519, or an unterminated quoted value is refused with 401 saying which', async () => {
    const { server, remote, dest } = await setup(backend);
    const send = (authorization: string) => remote.request(server.url, dest, 'POST', `${F}/user/keys/query`, { body: queryBody, authorization });
    expectUnauthorized(await send(''), /^Missing Authorization header/);
    const good = remote.authorization('POST', `${F}/user/keys/query`, dest, { body: queryBody });
    expectUnauthorized(await send(good.replace('key="ed25519:', 'key="curve25519:')), /^Unsupported key curve25519:\S+: only ed25519 keys sign requests$/);
    expectUnauthorized(await send(good.replace(/"$/, '')), /^Malformed Authorization header: the value of "sig" in the X-Matrix header has no closing quote$/);
    assert.equal((await send(`${good},`)).status, 200, 'a trailing comma is allowed');
    assert.equal((await send(`${good},origin="other.example",sig="x"`)).status, 200, 'the first of duplicate parameters counts');
  });

  test('a signed body that is not canonical JSON (a float) is 400 M_BAD_JSON, not a signature failure', async () => {
    const { server, remote, dest } = await setup(backend);
    // The sender's signature covers the body as it wrote it; we cannot encode it canonically to check.
    const body = { device_keys: { '@alice:test.local': [] }, weight: 0.5 };
    const r = await remote.request(server.url, dest, 'POST', `${F}/user/keys/query`, { body });
    assert.equal(r.status, 400, r.text);
    assert.equal(r.body['errcode'], 'M_BAD_JSON', r.text);
    assert.match(String(r.body['error']), /^The request body cannot be signed as canonical JSON: content\.weight: 0\.5 is not an integer/);
  });

  test('the metrics count accepted and refused signed requests', async () => {
    const { server, remote, dest } = await setup(backend, { metrics: { enabled: true, port: 0 } });
    const send = (options: Parameters<FakeHomeserver['request']>[4]) => remote.request(server.url, dest, 'POST', `${F}/user/keys/query`, { body: queryBody, ...options });
    for (let i = 0; i < 3; i++) assert.equal((await send({})).status, 200);
    expectUnauthorized(await send({ authorization: null }), /Missing/);
    expectUnauthorized(await send({ destination: 'someone.else' }), /addressed to/);
    const text = await (await fetch(server.mx.metricsUrl()!)).text();
    assert.match(text, /mxkeys_federation_requests_authenticated_total\{result="accepted"\} 3\n/);
    assert.match(text, /mxkeys_federation_requests_authenticated_total\{result="refused"\} 2\n/);
  });
});

describeEachBackend('other servers\' keys through notaries', (backend) => {
  async function withNotary(configureNotary: (notary: FakeHomeserver, origin: FakeHomeserver) => void, pin: boolean) {
    const origin = await FakeHomeserver.start();
    const notary = await FakeHomeserver.start();
    origin.serveKeys = false; // the origin cannot be reached for its keys
    notary.notaryFor.set(origin.serverName, () => {
      origin.serveKeys = true;
      const keys = origin.keyResponse();
      origin.serveKeys = false;
      return keys;
    });
    configureNotary(notary, origin);
    const server = await startServer({
      backend,
      config: {
        federation: {
          resolve: { [origin.serverName]: origin.url, [notary.serverName]: notary.url },
          trusted_key_servers: [
            pin ? { server_name: notary.serverName, verify_keys: { [`ed25519:${notary.verifyKeys[0]!.version}`]: notary.verifyKeys[0]!.key.publicKey } } : { server_name: notary.serverName },
          ],
        },
      },
    });
    return origin.request(server.url, 'test.local', 'POST', `${F}/user/keys/query`, { body: queryBody });
  }

  test('when the origin is down, its keys come from a trusted notary, with both signatures checked', async () => {
    assert.equal((await withNotary(() => undefined, true)).status, 200);
    assert.equal((await withNotary(() => undefined, false)).status, 200, 'the notary keys can be fetched from the notary itself');
  });

  test('a notary response with a bad notary signature is refused', async () => {
    const r = await withNotary((notary) => (notary.badNotarySignature = true), true);
    expectUnauthorized(r, /has no published key/);
  });

  test('a notary response whose origin self-signature is bad is refused', async () => {
    const r = await withNotary((notary, origin) => {
      notary.notaryFor.set(origin.serverName, () => ({ ...origin.keyResponse(), valid_until_ts: Date.now() + 1 }));
    }, true);
    expectUnauthorized(r, /has no published key/);
  });
});

describe('serving as a notary', () => {
  test('GET and POST /_matrix/key/v2/query return our own keys and other servers\' keys, countersigned by us', async () => {
    const remote = await FakeHomeserver.start();
    const server: TestServer = await startServer({ backend: backends[0]!, config: { federation: { resolve: { [remote.serverName]: remote.url } } } });
    const own = await http<{ server_keys: Json[] }>(server.url, 'GET', '/_matrix/key/v2/query/test.local');
    assert.equal(own.body.server_keys.length, 1);
    assert.equal(own.body.server_keys[0]!['server_name'], 'test.local');

    const theirs = await http<{ server_keys: Json[] }>(server.url, 'POST', '/_matrix/key/v2/query', {
      body: { server_keys: { [remote.serverName]: {}, 'unreachable.invalid': {} } },
    });
    assert.equal(theirs.status, 200, theirs.text);
    assert.equal(theirs.body.server_keys.length, 1, 'servers that cannot be reached and have no cached keys are left out');
    const entry = theirs.body.server_keys[0]!;
    assert.equal(entry['server_name'], remote.serverName);
    const sigs = entry['signatures'] as Record<string, Json>;
    assert.ok(sigs[remote.serverName]?.[`ed25519:${remote.verifyKeys[0]!.version}`], "the origin's own signature is kept");
    const ourKeyId = Object.keys((own.body.server_keys[0]!['verify_keys'] as Json))[0]!;
    assert.ok(sigs['test.local']?.[ourKeyId], 'and ours is added');

    // Once cached, the keys are served even when the origin goes down.
    remote.serveKeys = false;
    const cached = await http<{ server_keys: Json[] }>(server.url, 'GET', `/_matrix/key/v2/query/${remote.serverName}`);
    assert.equal(cached.body.server_keys.length, 1);
    const empty = await http<{ server_keys: Json[] }>(server.url, 'POST', '/_matrix/key/v2/query', { body: { server_keys: {} } });
    assert.deepEqual(empty.body, { server_keys: [] });
  });

  test('POST /_matrix/key/v2/query fetches a key ID it does not hold, and keeps vouching for a key the origin stopped listing while it is valid', async () => {
    const remote = await FakeHomeserver.start();
    const server: TestServer = await startServer({ backend: backends[0]!, config: { federation: { resolve: { [remote.serverName]: remote.url } } } });
    const query = (keys: Json) => http<{ server_keys: Json[] }>(server.url, 'POST', '/_matrix/key/v2/query', { body: { server_keys: { [remote.serverName]: keys } } });
    const keyIdsOf = (r: { body: { server_keys: Json[] } }) => r.body.server_keys.map((k) => Object.keys(k['verify_keys'] as Json).join()).sort();
    assert.deepEqual(keyIdsOf(await query({})), ['ed25519:fake1']);

    remote.verifyKeys = [{ version: 'fake2', key: new TestSigningKey() }];
    const asked = await query({ 'ed25519:fake2': { minimum_valid_until_ts: Date.now() } });
    assert.deepEqual(keyIdsOf(asked), ['ed25519:fake2'], 'a key ID we did not hold is fetched at once');
    assert.deepEqual(keyIdsOf(await query({})), ['ed25519:fake1', 'ed25519:fake2'], 'fake1 is still valid, as its own signed response says');
  });
});
