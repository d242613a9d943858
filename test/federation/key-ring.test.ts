import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';
import { openStore } from '../../src/storage/index.js';
import { KeyRing, MAX_KEY_VALIDITY_MS, REFETCH_INTERVAL_MS, URGENT_REFETCH_LIMIT } from '../../src/federation/key-ring.js';
import { FederationClient } from '../../src/federation/client.js';
import { federationKeyFetcher } from '../../src/federation/notary.js';
import { TestSigningKey } from '../support/keys.js';

// The key ring against a real database and a fake server over real HTTP, with a clock we move.
describeEachBackend('the key ring of other servers\' keys', (backend) => {
  async function ring(remote: FakeHomeserver, clock: { now: number }) {
    const store = await openStore(await backend.freshDatabase());
    const client = new FederationClient({ resolve: { [remote.serverName]: remote.url } });
    const keyRing = new KeyRing({ serverName: 'test.local', store: store.serverKeys, fetcher: federationKeyFetcher(client), trustedKeyServers: [], now: () => clock.now });
    return { keyRing, store };
  }

  test('an unknown key ID triggers a refetch, but at most once per interval', async () => {
    const remote = await FakeHomeserver.start();
    const clock = { now: Date.now() };
    const { keyRing, store } = await ring(remote, clock);
    const fetches = () => remote.requests.filter((r) => r.url === '/_matrix/key/v2/server').length;
    assert.ok('verifyKey' in (await keyRing.requestKey(remote.serverName, 'ed25519:fake1')));
    assert.equal(fetches(), 1);

    remote.verifyKeys.push({ version: 'fake2', key: new TestSigningKey() });
    assert.ok('error' in (await keyRing.requestKey(remote.serverName, 'ed25519:fake2')), 'within the interval the new key is not fetched');
    assert.equal(fetches(), 1);
    clock.now += REFETCH_INTERVAL_MS + 1;
    assert.ok('verifyKey' in (await keyRing.requestKey(remote.serverName, 'ed25519:fake2')), 'after the interval it is');
    assert.equal(fetches(), 2);
    await store.close();
  });

  test('valid_until_ts is capped at seven days, after which the key is fetched again', async () => {
    const remote = await FakeHomeserver.start();
    remote.validForMs = 365 * 24 * 3_600_000;
    const clock = { now: Date.now() };
    const { keyRing, store } = await ring(remote, clock);
    await keyRing.requestKey(remote.serverName, 'ed25519:fake1');
    const [stored] = await store.serverKeys.getServerKeys(remote.serverName);
    assert.ok(stored!.validUntilTs <= clock.now + MAX_KEY_VALIDITY_MS);
    clock.now += MAX_KEY_VALIDITY_MS + 1000;
    remote.serveKeys = false;
    const r = await keyRing.requestKey(remote.serverName, 'ed25519:fake1');
    assert.ok('error' in r && /expired/.test(r.error), JSON.stringify(r));
    await store.close();
  });

  test('a response for another server name, or with a bad self-signature, is refused', async () => {
    const remote = await FakeHomeserver.start();
    const clock = { now: Date.now() };
    const { keyRing, store } = await ring(remote, clock);
    const original = remote.keyResponse.bind(remote);
    remote.keyResponse = () => ({ ...original(), server_name: 'someone.else' });
    assert.ok('error' in (await keyRing.requestKey(remote.serverName, 'ed25519:fake1')));
    clock.now += REFETCH_INTERVAL_MS + 1;
    remote.keyResponse = () => ({ ...original(), valid_until_ts: clock.now + 5 });
    assert.ok('error' in (await keyRing.requestKey(remote.serverName, 'ed25519:fake1')));
    assert.deepEqual(await store.serverKeys.getServerKeys(remote.serverName), [], 'nothing unverified was stored');
    await store.close();
  });

  test('when the keys cannot be fetched, the error says why, also within the refetch interval', async () => {
    const remote = await FakeHomeserver.start();
    const clock = { now: Date.now() };
    const { keyRing, store } = await ring(remote, clock);
    await remote.stop();
    for (let i = 0; i < 2; i++) {
      const r = await keyRing.requestKey(remote.serverName, 'ed25519:fake1');
      assert.ok('error' in r, JSON.stringify(r));
      assert.match(r.error, new RegExp(`has no published key ed25519:fake1 \\(fetching its keys failed: cannot reach 127\\.0\\.0\\.1:\\d+: connection refused \\(ECONNREFUSED\\)\\)`));
    }
    await store.close();
  });

  test('the notary fetches again, even within the refetch interval, when its copy is not valid until minimum_valid_until_ts; a failing origin gets the old copy, even expired', async () => {
    const remote = await FakeHomeserver.start();
    remote.validForMs = 60_000;
    const clock = { now: Date.now() };
    const { keyRing, store } = await ring(remote, clock);
    const fetches = () => remote.requests.filter((r) => r.url === '/_matrix/key/v2/server').length;
    const notary = { kind: 'notary' as const };
    const [first] = await keyRing.notaryResponses(remote.serverName, [], clock.now, notary);
    assert.equal(fetches(), 1);
    assert.ok(first);

    // Valid now, but not for as long as the caller asks: fetched again at once.
    const later = clock.now + 120_000;
    await keyRing.notaryResponses(remote.serverName, [], later, notary);
    assert.equal(fetches(), 2);
    // Still rate limited per origin: a burst, then no more until it refills (but never refused).
    for (let i = 0; i < 5; i++) assert.equal((await keyRing.notaryResponses(remote.serverName, [], later, notary)).length, 1);
    assert.equal(fetches(), 1 + URGENT_REFETCH_LIMIT.burst_count);

    // Expired, and the origin is down: the last response comes back with its own valid_until_ts.
    const [held] = await keyRing.notaryResponses(remote.serverName, [], clock.now, notary);
    remote.serveKeys = false;
    clock.now += 10 * 60_000;
    const answer = await keyRing.notaryResponses(remote.serverName, [], clock.now, notary);
    assert.equal(fetches(), 2 + URGENT_REFETCH_LIMIT.burst_count, 'the origin was asked');
    assert.deepEqual(answer, [held]);
    assert.ok((answer[0]!['valid_until_ts'] as number) < clock.now, 'an expired copy, as published');
    await store.close();
  });

  test('a later, different answer from the origin does not take away a key the notary holds that is still valid', async () => {
    const remote = await FakeHomeserver.start();
    const clock = { now: Date.now() };
    const { keyRing, store } = await ring(remote, clock);
    const notary = { kind: 'notary' as const };
    const keyIds = (objects: Record<string, unknown>[]) => objects.map((o) => Object.keys(o['verify_keys'] as object)).sort();
    assert.deepEqual(keyIds(await keyRing.notaryResponses(remote.serverName, [], clock.now, notary)), [['ed25519:fake1']]);

    remote.verifyKeys = [{ version: 'fake2', key: new TestSigningKey() }];
    clock.now += 1000;
    const both = await keyRing.notaryResponses(remote.serverName, [], clock.now + 2 * 3_600_000, notary);
    assert.deepEqual(keyIds(both), [['ed25519:fake1'], ['ed25519:fake2']], 'the first response still vouches for fake1');
    assert.deepEqual(keyIds(await keyRing.notaryResponses(remote.serverName, ['ed25519:fake1'], clock.now, notary)).flat().sort(), ['ed25519:fake1', 'ed25519:fake2']);

    // Once fake1's response has expired, only the newest response is passed on.
    clock.now += 2 * 3_600_000;
    remote.serveKeys = false;
    assert.deepEqual(keyIds(await keyRing.notaryResponses(remote.serverName, [], clock.now, notary)), [['ed25519:fake2']]);
    await store.close();
  });

  test('a key the server stops listing no longer authenticates requests once a fresh response is in', async () => {
    const remote = await FakeHomeserver.start();
    const clock = { now: Date.now() };
    const { keyRing, store } = await ring(remote, clock);
    assert.ok('verifyKey' in (await keyRing.requestKey(remote.serverName, 'ed25519:fake1')));
    remote.verifyKeys = [{ version: 'fake2', key: new TestSigningKey() }];
    clock.now += REFETCH_INTERVAL_MS + 1;
    assert.ok('verifyKey' in (await keyRing.requestKey(remote.serverName, 'ed25519:fake2')));
    const old = await keyRing.requestKey(remote.serverName, 'ed25519:fake1');
    assert.ok('error' in old, JSON.stringify(old));
    await store.close();
  });
});
