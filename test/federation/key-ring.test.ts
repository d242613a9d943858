import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';
import { openStore } from '../../src/storage/index.js';
import { KeyRing, MAX_KEY_VALIDITY_MS, REFETCH_INTERVAL_MS } from '../../src/federation/key-ring.js';
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
