/**
 * Real clients (matrix-sdk-crypto-wasm, the crypto behind Element) talking through mxkeys'
 * to-device messages: a Megolm room key shared with two devices, on one server and across two
 * federating servers, and a SAS verification between two devices of one user.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { startServer, type TestServer } from '../support/server.js';
import { login, registerUser, SHARED_SECRET } from '../support/client.js';
import { OlmClient, sdk, type OutgoingLike } from '../support/olm.js';
import { startFederation } from '../support/federation.js';

const ROOM = '!room:hs.example';

/** Syncs `client` until it has processed a decrypted m.room_key, or fails after `rounds` syncs. */
async function syncUntilRoomKey(client: OlmClient, rounds = 20): Promise<void> {
  for (let i = 0; i < rounds; i++) {
    const processed = await client.sync(5_000);
    for (const e of processed) {
      if (e.type !== sdk.ProcessedToDeviceEventType.Decrypted) continue;
      if ((JSON.parse((e as sdk.DecryptedToDeviceEvent).rawEvent) as { type: string }).type === 'm.room_key') return;
    }
  }
  assert.fail(`${client.session.deviceId} never received the room key`);
}

/**
 * Alice shares a Megolm session of ROOM with every device of bob's through /sendToDevice, each
 * device receives the key in its /sync, and each decrypts a room event alice encrypted with it.
 */
async function shareRoomKeyAndDecrypt(alice: OlmClient, bobDevices: readonly OlmClient[]): Promise<void> {
  const bob = new sdk.UserId(bobDevices[0]!.session.userId);
  await alice.track([bob.toString()]);
  const claim = await alice.machine.getMissingSessions([new sdk.UserId(bob.toString())]);
  assert.ok(claim, 'alice needs Olm sessions with bob\'s devices');
  await alice.sendOutgoing(claim as unknown as OutgoingLike);

  const room = new sdk.RoomId(ROOM);
  const shares = await alice.machine.shareRoomKey(room, [new sdk.UserId(bob.toString())], new sdk.EncryptionSettings());
  assert.ok(shares.length > 0, 'the room key goes out as to-device messages');
  const recipients = new Set<string>();
  for (const r of shares) {
    for (const devices of Object.values((JSON.parse(r.body) as { messages: Record<string, Record<string, unknown>> }).messages)) for (const d of Object.keys(devices)) recipients.add(d);
    await alice.sendOutgoing(r as unknown as OutgoingLike);
  }
  assert.deepEqual([...recipients].sort(), bobDevices.map((d) => d.session.deviceId).sort(), "one Olm-encrypted m.room_key for each of bob's devices");

  const encrypted = await alice.machine.encryptRoomEvent(room, 'm.room.message', JSON.stringify({ msgtype: 'm.text', body: 'only bob can read this' }));
  const event = JSON.stringify({ type: 'm.room.encrypted', content: JSON.parse(encrypted) as unknown, sender: alice.session.userId, event_id: '$e1', origin_server_ts: Date.now(), room_id: ROOM });
  for (const device of bobDevices) {
    await syncUntilRoomKey(device);
    const decrypted = await device.machine.decryptRoomEvent(event, room, new sdk.DecryptionSettings(sdk.TrustRequirement.Untrusted));
    assert.equal((JSON.parse(decrypted.event) as { content: { body: string } }).content.body, 'only bob can read this', `${device.session.deviceId} decrypted the room event`);
  }
}

async function olmDevices(server: TestServer, user: string, count: number): Promise<OlmClient[]> {
  const first = await registerUser(server, user);
  const sessions = [first];
  for (let i = 1; i < count; i++) sessions.push(await login(server, user, first.password));
  const clients = await Promise.all(sessions.map((s) => OlmClient.create(server, s)));
  for (const c of clients) await c.flush();
  return clients;
}

describeEachBackend('real clients exchanging to-device messages through mxkeys', (backend) => {
  test("alice shares a Megolm room key with bob's two devices on the same server, and both decrypt her room event", async () => {
    const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });
    const [alice] = await olmDevices(server, 'alice', 1);
    const bobDevices = await olmDevices(server, 'bob', 2);
    for (const d of bobDevices) await d.sync(); // each device's first /sync
    await shareRoomKeyAndDecrypt(alice!, bobDevices);
  });

  test("alice on hs1 shares a Megolm room key with bob's two devices on hs2, and both decrypt her room event", async () => {
    const { servers } = await startFederation(backend, ['hs1.test', 'hs2.test']);
    const [hs1, hs2] = servers as [TestServer, TestServer];
    const [alice] = await olmDevices(hs1, 'alice', 1);
    const bobDevices = await olmDevices(hs2, 'bob', 2);
    for (const d of bobDevices) await d.sync();
    await shareRoomKeyAndDecrypt(alice!, bobDevices);
  });

  test('two devices of one user verify each other with SAS emoji over to-device messages, and each ends up trusting the other', async () => {
    const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });
    const [a] = (await olmDevices(server, 'alice', 1)) as [OlmClient];
    await a.sync();
    // Device B logs in later: A hears of it in its next /sync (device_lists.changed) and fetches its keys.
    const b = await OlmClient.create(server, await login(server, 'alice', a.session.password));
    await b.flush();
    await b.sync();
    await a.sync();
    const alice = new sdk.UserId(a.session.userId);
    const send = async (client: OlmClient, request: unknown) => {
      assert.ok(request, 'the step produced a message to send');
      await client.sendOutgoing(request as OutgoingLike);
    };
    /** Both devices sync (sending what their machines queued) until `done` holds. */
    const until = async (what: string, done: () => boolean) => {
      for (let i = 0; i < 20 && !done(); i++) {
        await a.sync();
        await b.sync();
      }
      assert.ok(done(), `never reached: ${what}`);
    };

    const deviceB = await a.machine.getDevice(alice, new sdk.DeviceId(b.session.deviceId));
    assert.ok(deviceB, "device A knows device B's keys");
    assert.equal(deviceB.isVerified(), false, 'not verified yet');
    const [requestA, requestMessage] = deviceB.requestVerification([sdk.VerificationMethod.SasV1]);
    await send(a, requestMessage);

    let requestB: sdk.VerificationRequest | undefined;
    await until('B sees the request', () => (requestB = b.machine.getVerificationRequest(alice, requestA.flowId)) !== undefined);
    await send(b, requestB!.acceptWithMethods([sdk.VerificationMethod.SasV1]));
    await until('A sees B ready', () => requestA.isReady());

    const started = await requestA.startSas();
    assert.ok(started, 'A starts SAS');
    const [sasA, startMessage] = started;
    await send(a, startMessage);
    let sasB: sdk.Sas | undefined;
    await until('B sees the SAS start', () => (sasB = requestB!.getVerification() as sdk.Sas | undefined) instanceof sdk.Sas);
    await send(b, sasB!.accept());

    // The keys are exchanged by the machines themselves (queued requests that sync sends).
    await until('both show the emoji', () => sasA.canBePresented() && sasB!.canBePresented());
    const emojiA = sasA.emoji()!.map((e) => e.symbol);
    const emojiB = sasB!.emoji()!.map((e) => e.symbol);
    assert.equal(emojiA.length, 7);
    assert.deepEqual(emojiA, emojiB, 'the user compares the emoji on both devices: they match');

    for (const m of await sasA.confirm()) await send(a, m);
    for (const m of await sasB!.confirm()) await send(b, m);
    await until('both sides done', () => sasA.isDone() && sasB!.isDone());

    const bSeenByA = await a.machine.getDevice(alice, new sdk.DeviceId(b.session.deviceId));
    const aSeenByB = await b.machine.getDevice(alice, new sdk.DeviceId(a.session.deviceId));
    assert.equal(bSeenByA!.isVerified(), true, 'A trusts B');
    assert.equal(aSeenByB!.isVerified(), true, 'B trusts A');
    assert.equal(sasA.isCancelled() || sasB!.isCancelled(), false);
  });
});
