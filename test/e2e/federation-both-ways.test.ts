/**
 * Two mxkeys servers federating over loopback, with real clients on each: remote keys for local
 * clients, device-list updates sent and received, and what happens when one server is down.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import type { AddressInfo } from 'node:net';
import { describeEachBackend } from '../support/backends.js';
import { http } from '../support/server.js';
import { login, registerUser, type Session } from '../support/client.js';
import { OlmClient, sdk } from '../support/olm.js';
import { TestCrossSigning, TestDevice } from '../support/keys.js';
import { startFederation } from '../support/federation.js';
import type { TestServer } from '../support/server.js';

const C = '/_matrix/client/v3';
type Json = Record<string, unknown>;

async function query(server: TestServer, session: Session, users: Record<string, string[]>, timeout?: number): Promise<Json> {
  const r = await http(server.url, 'POST', `${C}/keys/query`, { token: session.accessToken, body: { device_keys: users, ...(timeout !== undefined ? { timeout } : {}) } });
  assert.equal(r.status, 200, r.text);
  return r.body;
}

const devicesOf = (answer: Json, userId: string) => Object.keys(((answer['device_keys'] as Record<string, Json>)[userId] ?? {}) as Json).sort();

/** A device logged in on `server` with uploaded (signed) device keys. */
async function deviceWithKeys(server: TestServer, user: string, password: string, deviceId: string, displayName?: string): Promise<Session & { device: TestDevice }> {
  const s = await login(server, user, password, { device_id: deviceId, ...(displayName ? { initial_device_display_name: displayName } : {}) });
  const device = new TestDevice(s.userId, deviceId);
  const r = await http(server.url, 'POST', `${C}/keys/upload`, { token: s.accessToken, body: { device_keys: device.deviceKeys() } });
  assert.equal(r.status, 200, r.text);
  return { ...s, device };
}

/** Syncs from `since` until `userId` is listed in device_lists.changed; returns the next token. */
async function syncUntilChanged(server: TestServer, session: Session, since: string, userId: string): Promise<string> {
  let token = since;
  const deadline = Date.now() + 20_000;
  for (;;) {
    const r = await http(server.url, 'GET', `${C}/sync?since=${token}&timeout=5000`, { token: session.accessToken });
    assert.equal(r.status, 200, r.text);
    token = r.body['next_batch'] as string;
    const changed = ((r.body['device_lists'] as Json | undefined)?.['changed'] as string[] | undefined) ?? [];
    if (changed.includes(userId)) return token;
    assert.ok(Date.now() < deadline, `${userId} never showed up in device_lists.changed`);
  }
}

/**
 * Syncs until `userId` is listed as changed and the query that follows shows what `arrived`
 * looks for. One change can reach hs1 as several updates (a new device, then its keys), each
 * listed as a change on its own: a query after the first may not show the rest yet.
 */
async function untilArrived(server: TestServer, session: Session, since: string, userId: string, arrived: (answer: Json) => boolean): Promise<{ since: string; answer: Json }> {
  let token = since;
  for (let round = 1; ; round++) {
    token = await syncUntilChanged(server, session, token, userId);
    const answer = await query(server, session, { [userId]: [] });
    if (arrived(answer)) return { since: token, answer };
    assert.ok(round < 10, `still not there after ${round} changes: ${JSON.stringify(answer)}`);
  }
}

async function syncToken(server: TestServer, session: Session): Promise<string> {
  const r = await http(server.url, 'GET', `${C}/sync`, { token: session.accessToken });
  return r.body['next_batch'] as string;
}

describeEachBackend('two mxkeys servers federating', (backend) => {
  test('alice on hs1 queries and claims the keys of bob on hs2, builds an Olm session, and bob decrypts her message', async () => {
    const { servers } = await startFederation(backend, ['hs1.test', 'hs2.test']);
    const [hs1, hs2] = servers as [TestServer, TestServer];
    const alice = await OlmClient.create(hs1, await registerUser(hs1, 'alice'));
    const bob = await OlmClient.create(hs2, await registerUser(hs2, 'bob'));
    await alice.flush();
    await bob.flush();
    await bob.bootstrapCrossSigning();

    // Alice's machine asks hs1 for bob's keys; hs1 fetches them from hs2.
    await alice.track([bob.session.userId]);
    const bobDevice = await alice.machine.getDevice(new sdk.UserId(bob.session.userId), new sdk.DeviceId(bob.session.deviceId));
    assert.ok(bobDevice, "alice's machine knows bob's device, fetched over federation");
    assert.equal(bobDevice.isCrossSignedByOwner(), true, "bob's device is cross-signed by bob's identity as alice sees it");

    // Alice claims a one-time key of bob's through hs1 and encrypts to him.
    const claim = await alice.machine.getMissingSessions([new sdk.UserId(bob.session.userId)]);
    assert.ok(claim, 'alice needs an Olm session with bob');
    const claimed = JSON.parse(await alice.sendOutgoing(claim as unknown as { id: string; type: sdk.RequestType; body: string })) as Json;
    assert.deepEqual(claimed['failures'], {});
    const keys = ((claimed['one_time_keys'] as Record<string, Record<string, Json>>)[bob.session.userId] ?? {})[bob.session.deviceId];
    assert.ok(keys && Object.keys(keys)[0]?.startsWith('signed_curve25519:'), JSON.stringify(claimed));

    const encrypted = JSON.parse(await bobDevice.encryptToDeviceEvent('org.example.secret', { text: 'hello bob, from alice on another server' })) as Json;
    const processed = await bob.receiveToDevice([{ sender: alice.session.userId, type: 'm.room.encrypted', content: encrypted }]);
    const decrypted = processed.find((e) => e.type === sdk.ProcessedToDeviceEventType.Decrypted) as sdk.DecryptedToDeviceEvent | undefined;
    assert.ok(decrypted, `bob decrypted alice's message (got ${processed.map((e) => e.type).join(', ')})`);
    assert.equal((JSON.parse(decrypted.rawEvent) as { content: { text: string } }).content.text, 'hello bob, from alice on another server');

    // Alice cross-signs bob: her user-signing key's signature on his master key stays on hs1, for her eyes.
    await alice.bootstrapCrossSigning();
    const bobIdentity = await alice.machine.getIdentity(new sdk.UserId(bob.session.userId));
    assert.ok(bobIdentity instanceof sdk.OtherUserIdentity);
    const signed = JSON.parse(await alice.sendOutgoing({ type: sdk.RequestType.SignatureUpload, body: (await bobIdentity.verify()).body })) as Json;
    assert.deepEqual(signed['failures'] ?? {}, {}, 'hs1 accepted the signature on a remote master key');
    const seen = async (who: OlmClient, server: TestServer) => {
      const r = await http(server.url, 'POST', `${C}/keys/query`, { token: who.session.accessToken, body: { device_keys: { [bob.session.userId]: [] } } });
      const master = (r.body['master_keys'] as Record<string, Json>)[bob.session.userId]!;
      return Object.keys((master['signatures'] as Record<string, Json>)[alice.session.userId] ?? {});
    };
    assert.equal((await seen(alice, hs1)).length, 1, "alice sees her signature on bob's master key");
    assert.deepEqual(await seen(bob, hs2), [], 'hs2 never heard of it');

    // The key alice claimed is gone on hs2: bob's server handed it out once.
    const again = await http(hs2.url, 'POST', `${C}/keys/claim`, {
      token: bob.session.accessToken,
      body: { one_time_keys: { [bob.session.userId]: { [bob.session.deviceId]: 'signed_curve25519' } } },
    });
    const next = Object.keys((again.body['one_time_keys'] as Record<string, Record<string, Json>>)[bob.session.userId]![bob.session.deviceId]!);
    assert.notDeepEqual(next, Object.keys(keys));
  });

  test("bob's new, renamed, signed and deleted devices and new cross-signing keys reach alice's /sync and her next query without another request to hs2", async () => {
    const { servers, proxies } = await startFederation(backend, ['hs1.test', 'hs2.test'], { federation: { allow_device_name_lookup: true } });
    const [hs1, hs2] = servers as [TestServer, TestServer];
    const toHs2 = proxies[1]!;
    const alice = await registerUser(hs1, 'alice');
    const bob = await registerUser(hs2, 'bob');
    await deviceWithKeys(hs2, bob.userId, bob.password, 'PHONE', 'phone');

    assert.deepEqual(devicesOf(await query(hs1, alice, { [bob.userId]: [] }), bob.userId), ['PHONE']);
    const fetched = toHs2.count('/_matrix/federation/v1/user/');
    assert.ok(fetched >= 1, 'hs1 asked hs2 for the list the first time');
    let since = await syncToken(hs1, alice);

    // A new device with keys.
    const laptop = await deviceWithKeys(hs2, bob.userId, bob.password, 'LAPTOP', 'laptop');
    let answer: Json;
    ({ since, answer } = await untilArrived(hs1, alice, since, bob.userId, (a) => devicesOf(a, bob.userId).includes('LAPTOP')));
    assert.deepEqual(devicesOf(answer, bob.userId), ['LAPTOP', 'PHONE']);

    // A rename: the new display name arrives.
    const rename = await http(hs2.url, 'PUT', `${C}/devices/LAPTOP`, { token: laptop.accessToken, body: { display_name: 'work laptop' } });
    assert.equal(rename.status, 200, rename.text);
    const laptopOf = (a: Json) => (a['device_keys'] as Record<string, Record<string, Json>>)[bob.userId]!['LAPTOP']!;
    ({ since, answer } = await untilArrived(hs1, alice, since, bob.userId, (a) => (laptopOf(a)['unsigned'] as Json | undefined)?.['device_display_name'] !== 'laptop'));
    const laptopKeys = laptopOf(answer);
    assert.equal((laptopKeys['unsigned'] as Json)['device_display_name'], 'work laptop');

    // New cross-signing keys.
    const cs = new TestCrossSigning(bob.userId);
    const upload = await http(hs2.url, 'POST', `${C}/keys/device_signing/upload`, { token: laptop.accessToken, body: cs.upload() });
    assert.equal(upload.status, 200, upload.text);
    ({ since, answer } = await untilArrived(hs1, alice, since, bob.userId, (a) => (a['self_signing_keys'] as Record<string, Json>)[bob.userId] !== undefined));
    assert.deepEqual((answer['master_keys'] as Record<string, Json>)[bob.userId], cs.masterKey());
    assert.deepEqual((answer['self_signing_keys'] as Record<string, Json>)[bob.userId], cs.selfSigningKey());
    assert.equal((answer['user_signing_keys'] as Json)[bob.userId], undefined, "bob's user-signing key never leaves hs2");

    // Bob's self-signing key signs his laptop: the signature arrives with the device.
    const ssk = `ed25519:${cs.selfSigning.publicKey}`;
    const signedLaptop = cs.selfSigning.sign(laptop.device.deviceKeys(), bob.userId, ssk);
    const sig = await http(hs2.url, 'POST', `${C}/keys/signatures/upload`, { token: laptop.accessToken, body: { [bob.userId]: { LAPTOP: signedLaptop } } });
    assert.deepEqual(sig.body['failures'], {}, sig.text);
    ({ since, answer } = await untilArrived(hs1, alice, since, bob.userId, (a) => Object.keys((laptopOf(a)['signatures'] as Record<string, Json>)[bob.userId]!).length > 1));
    const laptopSignatures = ((answer['device_keys'] as Record<string, Record<string, Json>>)[bob.userId]!['LAPTOP']!['signatures'] as Record<string, Json>)[bob.userId]!;
    assert.ok(laptopSignatures[ssk], `the self-signing signature is on the laptop's keys at hs1: ${JSON.stringify(laptopSignatures)}`);

    // A deleted device.
    const remove = await http(hs2.url, 'POST', `${C}/logout`, { token: laptop.accessToken });
    assert.equal(remove.status, 200, remove.text);
    ({ since, answer } = await untilArrived(hs1, alice, since, bob.userId, (a) => !devicesOf(a, bob.userId).includes('LAPTOP')));
    assert.deepEqual(devicesOf(answer, bob.userId), ['PHONE']);

    // /keys/changes lists bob too.
    const changes = await http(hs1.url, 'GET', `${C}/keys/changes?from=s0&to=${since}`, { token: alice.accessToken });
    assert.ok((changes.body['changed'] as string[]).includes(bob.userId), changes.text);

    assert.equal(toHs2.count('/_matrix/federation/v1/user/'), fetched, 'every later answer came from the cache that the updates kept fresh');
    assert.ok(toHs2.count('/_matrix/federation/v1/send/') === 0, 'hs1 sent nothing to hs2 (alice changed nothing)');
  });

  test("while hs2 is down, alice still gets bob's last known devices and no failure", async () => {
    const { servers, proxies } = await startFederation(backend, ['hs1.test', 'hs2.test'], { federation: { device_list_refresh_interval: 1 } });
    const [hs1, hs2] = servers as [TestServer, TestServer];
    const alice = await registerUser(hs1, 'alice');
    const bob = await registerUser(hs2, 'bob');
    await deviceWithKeys(hs2, bob.userId, bob.password, 'PHONE');
    assert.deepEqual(devicesOf(await query(hs1, alice, { [bob.userId]: [] }), bob.userId), ['PHONE']);

    proxies[1]!.up = false;
    await new Promise((r) => setTimeout(r, 5)); // the 1 ms refresh interval has passed: hs1 tries hs2 again
    const answer = await query(hs1, alice, { [bob.userId]: [] });
    assert.deepEqual(devicesOf(answer, bob.userId), ['PHONE'], 'the cached list is served');
    assert.deepEqual(answer['failures'], {}, 'and hs2 is not a failure');

    // A user of hs2 that hs1 has never seen cannot be answered: that is a failure.
    const unknown = await query(hs1, alice, { '@carol:hs2.test': [] });
    assert.ok((unknown['failures'] as Json)['hs2.test'], JSON.stringify(unknown));
    assert.deepEqual(unknown['device_keys'], {});
  });

  test('a server that does not answer in time is a failure entry, and the rest of the answer still arrives', async () => {
    // hs3 accepts connections and never answers.
    const silent = createServer(() => undefined);
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    try {
      const hs3 = `http://127.0.0.1:${(silent.address() as AddressInfo).port}`;
      const { servers } = await startFederation(backend, ['hs1.test', 'hs2.test'], {}, { 'hs3.test': hs3 });
      const [hs1, hs2] = servers as [TestServer, TestServer];
      const alice = await registerUser(hs1, 'alice');
      const bob = await registerUser(hs2, 'bob');
      await deviceWithKeys(hs2, bob.userId, bob.password, 'PHONE');

      const answer = await query(hs1, alice, { [bob.userId]: [], '@dave:hs3.test': [] }, 700);
      assert.deepEqual(devicesOf(answer, bob.userId), ['PHONE'], "hs2's answer is there");
      const failures = answer['failures'] as Record<string, Json>;
      assert.deepEqual(Object.keys(failures), ['hs3.test']);
      assert.equal(typeof failures['hs3.test']!['status'], 'number');
      assert.match(String(failures['hs3.test']!['message']), /\b(6\d\d|700) ms\b/, 'the wait was the timeout the client asked for (700 ms), not the default 10 s');

      // Claims follow the same rule; hs3 is now also waiting for a retry, so it fails at once.
      const claim = await http(hs1.url, 'POST', `${C}/keys/claim`, {
        token: alice.accessToken,
        body: { timeout: 700, one_time_keys: { '@dave:hs3.test': { DEV: 'signed_curve25519' } } },
      });
      assert.equal(claim.status, 200, claim.text);
      assert.ok((claim.body['failures'] as Json)['hs3.test'], claim.text);
      assert.deepEqual(claim.body['one_time_keys'], {});
    } finally {
      silent.close();
    }
  });
});
