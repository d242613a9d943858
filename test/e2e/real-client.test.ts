import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { http, startServer } from '../support/server.js';
import { registerUser, SHARED_SECRET } from '../support/client.js';
import { OlmClient, sdk } from '../support/olm.js';

const C = '/_matrix/client/v3';

describeEachBackend('a real Matrix client (matrix-sdk-crypto-wasm) against mxkeys', (backend) => {
  test('alice and bob upload keys, cross-sign, find each other, and bob Olm-encrypts a message alice decrypts', async () => {
    const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });
    const alice = await OlmClient.create(server, await registerUser(server, 'alice'));
    const bob = await OlmClient.create(server, await registerUser(server, 'bob'));

    // Device keys and one-time keys go up with the machines' own upload requests.
    await alice.flush();
    await bob.flush();
    const counts = await http(server.url, 'GET', `${C}/sync`, { token: alice.session.accessToken });
    assert.ok((counts.body['device_one_time_keys_count'] as Record<string, number>)['signed_curve25519']! > 0, counts.text);

    // Cross-signing: the first upload needs no password; resetting the keys does.
    await alice.bootstrapCrossSigning();
    await bob.bootstrapCrossSigning();
    const reset = await bob.bootstrapCrossSigning();
    assert.equal(reset.neededAuth, true, 'replacing existing cross-signing keys asked for the password');

    // Each tracks the other and downloads their keys from mxkeys.
    await alice.track([bob.session.userId]);
    await bob.track([alice.session.userId]);

    const bobDeviceSeenByAlice = await alice.machine.getDevice(new sdk.UserId(bob.session.userId), new sdk.DeviceId(bob.session.deviceId));
    assert.ok(bobDeviceSeenByAlice, "alice's machine knows bob's device");
    assert.equal(bobDeviceSeenByAlice.isCrossSignedByOwner(), true, "bob's device is cross-signed by bob's identity, as alice's machine sees it");
    const bobIdentity = await alice.machine.getIdentity(new sdk.UserId(bob.session.userId));
    assert.ok(bobIdentity instanceof sdk.OtherUserIdentity, "alice's machine has bob's cross-signing identity");

    // Bob claims one of alice's one-time keys and starts an Olm session.
    const claim = await bob.machine.getMissingSessions([new sdk.UserId(alice.session.userId)]);
    assert.ok(claim, 'bob needs a session with alice');
    const claimText = await bob.sendOutgoing(claim as unknown as { id: string; type: sdk.RequestType; body: string });
    const claimed = JSON.parse(claimText) as { one_time_keys: Record<string, Record<string, Record<string, unknown>>> };
    const keyIds = Object.keys(claimed.one_time_keys[alice.session.userId]![alice.session.deviceId]!);
    assert.equal(keyIds.length, 1);
    assert.match(keyIds[0]!, /^signed_curve25519:/);

    const aliceDevice = await bob.machine.getDevice(new sdk.UserId(alice.session.userId), new sdk.DeviceId(alice.session.deviceId));
    assert.ok(aliceDevice);
    const encrypted = JSON.parse(await aliceDevice.encryptToDeviceEvent('org.example.secret', { text: 'hello alice, from bob' })) as Record<string, unknown>;

    const processed = await alice.receiveToDevice([{ sender: bob.session.userId, type: 'm.room.encrypted', content: encrypted }]);
    const decrypted = processed.find((e) => e.type === sdk.ProcessedToDeviceEventType.Decrypted) as sdk.DecryptedToDeviceEvent | undefined;
    assert.ok(decrypted, `alice decrypted the message (got ${processed.map((e) => e.type).join(', ')})`);
    const event = JSON.parse(decrypted.rawEvent) as { type: string; sender: string; content: { text: string } };
    assert.equal(event.type, 'org.example.secret');
    assert.equal(event.sender, bob.session.userId);
    assert.equal(event.content.text, 'hello alice, from bob');

    // The claimed key is gone: the same key is never handed out again.
    const again = await http(server.url, 'POST', `${C}/keys/claim`, {
      token: bob.session.accessToken,
      body: { one_time_keys: { [alice.session.userId]: { [alice.session.deviceId]: 'signed_curve25519' } } },
    });
    const next = Object.keys((again.body['one_time_keys'] as Record<string, Record<string, object>>)[alice.session.userId]![alice.session.deviceId]!);
    assert.notEqual(next[0], keyIds[0]);
  });
});
