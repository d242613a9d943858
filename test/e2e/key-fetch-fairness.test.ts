import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { backends } from '../support/backends.js';
import { http, startServer } from '../support/server.js';
import { FakeHomeserver, Tarpit } from '../support/fake-homeserver.js';
import { FETCH_LIMITS } from '../../src/federation/key-ring.js';
import { expectMatrixError } from '../support/client.js';

const F = '/_matrix/federation/v1';
const queryBody = { device_keys: { '@alice:test.local': [] } };

/**
 * mxkeys with a legitimate remote server and a tarpit that many server names point at: a server
 * that accepts connections and never answers, as an attacker would name to tie up key fetches.
 */
async function setup(tarpitNames: readonly string[]) {
  const legit = await FakeHomeserver.start();
  const tarpit = await Tarpit.start();
  const resolve = Object.fromEntries([[legit.serverName, legit.url], ...tarpitNames.map((n) => [n, tarpit.url])]);
  // Long enough that no tarpit fetch ends by itself during a test; each test releases the tarpit.
  const server = await startServer({ backend: backends[0]!, config: { federation: { resolve, request_timeout: '120s' } } });
  /** A signed federation request claiming to come from `origin` (its keys live in the tarpit), sent from `from`. */
  const attack = (origin: string, from: string) =>
    legit.request(server.url, 'test.local', 'POST', `${F}/user/keys/query`, { body: queryBody, origin, localAddress: from });
  const legitRequest = () => legit.request(server.url, 'test.local', 'POST', `${F}/user/keys/query`, { body: queryBody });
  return { server, legit, tarpit, attack, legitRequest };
}

const names = (n: number, name: (i: number) => string) => Array.from({ length: n }, (_, i) => name(i));

/** Resolves once `n` of `requests` have been answered, with those answers. */
async function firstAnswers<T>(requests: readonly Promise<T>[], n: number): Promise<T[]> {
  const answered: T[] = [];
  for (const r of requests) void r.then((v) => answered.push(v));
  while (answered.length < n) await new Promise((r) => setTimeout(r, 20));
  return answered.slice(0, n);
}

describe('fair fetching of other servers\' keys', () => {
  test('one client naming 40 origins that never answer holds only its share of fetches; a new origin is still served', async () => {
    const origins = names(40, (i) => `s${i}.tarpit${i}.example`);
    const { tarpit, attack, legitRequest } = await setup(origins);
    const attacks = origins.map((o) => attack(o, '127.0.0.2'));
    await tarpit.receivedAtLeast(FETCH_LIMITS.perAddress);
    const ok = await legitRequest();
    assert.equal(ok.status, 200, ok.text);
    assert.equal(tarpit.received, FETCH_LIMITS.perAddress, 'no more fetches started for that client');
    // The client's requests beyond its share wait for a slot, then are told to retry; none is
    // blamed on the peer's keys.
    const limited = await firstAnswers(attacks, origins.length - FETCH_LIMITS.perAddress);
    assert.equal(tarpit.received, FETCH_LIMITS.perAddress);
    tarpit.release();
    await Promise.all(attacks);
    for (const r of limited) {
      expectMatrixError({ status: r.status, body: r.body, text: r.text }, 429, 'M_LIMIT_EXCEEDED', /key fetches at once for requests from your address/);
      assert.ok((r.body['retry_after_ms'] as number) > 0);
    }
  });

  test('many names on one host hold only that host\'s share of fetches, whoever sends them', async () => {
    const origins = names(20, (i) => `tarpit.example:${1000 + i}`);
    const { tarpit, attack, legitRequest } = await setup(origins);
    const attacks = origins.map((o, i) => attack(o, `127.0.1.${i + 1}`));
    await tarpit.receivedAtLeast(FETCH_LIMITS.perHost);
    assert.equal((await legitRequest()).status, 200);
    assert.equal(tarpit.received, FETCH_LIMITS.perHost);
    const limited = await firstAnswers(attacks, origins.length - FETCH_LIMITS.perHost);
    assert.deepEqual(new Set(limited.map((r) => r.status)), new Set([429]));
    assert.match(String(limited[0]!.body['error']), /key fetches at once for the host of tarpit\.example/);
    tarpit.release();
    await Promise.all(attacks);
  });

  test('the unauthenticated notary endpoint gets a smaller share; federation requests still have slots', async () => {
    const origins = names(100, (i) => `n${i}.tarpit${i}.example`);
    const { server, tarpit, legitRequest } = await setup(origins);
    // Four callers, each naming 25 servers that never answer.
    const callers = [0, 1, 2, 3].map((c) =>
      new FakeHomeserver().request(server.url, 'test.local', 'POST', '/_matrix/key/v2/query', {
        authorization: null,
        body: { server_keys: Object.fromEntries(origins.slice(c * 25, (c + 1) * 25).map((o) => [o, {}])) },
        localAddress: `127.0.2.${c + 1}`,
      }),
    );
    await tarpit.receivedAtLeast(FETCH_LIMITS.notary);
    assert.equal((await legitRequest()).status, 200);
    assert.equal(tarpit.received, FETCH_LIMITS.notary, 'notary-driven fetches stay within their share');
    tarpit.release();
    for (const r of await Promise.all(callers)) assert.equal(r.status, 200, r.text);
  });

  test('when every fetch slot is taken, a federation request gets 503 with Retry-After, not a 401 blaming the peer', async () => {
    const perClient = FETCH_LIMITS.perAddress;
    const clients = FETCH_LIMITS.total / perClient;
    const origins = names(FETCH_LIMITS.total, (i) => `f${i}.tarpit${i}.example`);
    const { tarpit, attack, legitRequest } = await setup(origins);
    const attacks = origins.map((o, i) => attack(o, `127.0.3.${Math.floor(i / perClient) + 1}`));
    assert.equal(clients * perClient, FETCH_LIMITS.total);
    await tarpit.receivedAtLeast(FETCH_LIMITS.total);
    const busy = await legitRequest();
    expectMatrixError({ status: busy.status, body: busy.body, text: busy.text }, 503, 'M_UNKNOWN', /busy fetching other servers' keys/);
    tarpit.release();
    await Promise.all(attacks);
    assert.equal((await legitRequest()).status, 200, 'served once slots are free again');
  });
});
