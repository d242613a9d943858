import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { http, startServer } from '../support/server.js';
import { login, registerUser, SHARED_SECRET } from '../support/client.js';
import { OlmClient, sdk } from '../support/olm.js';
import { canonicalJson } from '../../src/matrix/canonical-json.js';
import { MAX_SESSION_DATA_BYTES } from '../../src/backup/validate.js';

const C = '/_matrix/client/v3';
type Json = Record<string, unknown>;

describeEachBackend('key backup with a real Matrix client (matrix-sdk-crypto-wasm)', (backend) => {
  test('alice backs up the key of a Megolm session she shared, and a new device of hers restores it from mxkeys and decrypts her message', async () => {
    const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET } });
    const aliceSession = await registerUser(server, 'alice');
    const alice = await OlmClient.create(server, aliceSession);
    const bob = await OlmClient.create(server, await registerUser(server, 'bob'));
    await alice.flush();
    await bob.flush();

    // Alice shares a Megolm session with bob's device in a room and encrypts a message with it.
    const roomId = '!backup-room:test.local';
    await alice.track([alice.session.userId, bob.session.userId]);
    const claim = await alice.machine.getMissingSessions([new sdk.UserId(bob.session.userId)]);
    assert.ok(claim, 'alice needs an Olm session with bob');
    await alice.sendOutgoing(claim as unknown as { id: string; type: sdk.RequestType; body: string });
    const shares = await alice.machine.shareRoomKey(new sdk.RoomId(roomId), [new sdk.UserId(bob.session.userId)], new sdk.EncryptionSettings());
    assert.ok(shares.length > 0, 'the room key goes to bob in to-device messages');
    // mxkeys carries no to-device messages; what matters here is that alice's machine counts the key as shared.
    for (const share of shares) await alice.machine.markRequestAsSent(share.id, share.type, '{}');
    const content = await alice.machine.encryptRoomEvent(new sdk.RoomId(roomId), 'm.room.message', JSON.stringify({ msgtype: 'm.text', body: 'kept safe in the backup' }));
    const event = { type: 'm.room.encrypted', event_id: '$backed-up', sender: alice.session.userId, origin_server_ts: Date.now(), room_id: roomId, content: JSON.parse(content) as Json };

    // A backup key and a version whose auth_data alice's device signs.
    const backupKey = sdk.BackupDecryptionKey.createRandomKey();
    const authData: Json = { public_key: backupKey.megolmV1PublicKey.publicKeyBase64 };
    authData['signatures'] = JSON.parse((await alice.machine.sign(canonicalJson(authData))).asJSON()) as Json;
    const created = await http(server.url, 'POST', `${C}/room_keys/version`, {
      token: alice.session.accessToken,
      body: { algorithm: backupKey.megolmV1PublicKey.algorithm, auth_data: authData },
    });
    assert.equal(created.status, 200, created.text);
    const version = created.body['version'] as string;

    // The machine backs up its room keys with its own request, and learns the answer.
    await alice.machine.enableBackupV1(backupKey.megolmV1PublicKey.publicKeyBase64, version);
    const backup = await alice.machine.backupRoomKeys();
    assert.ok(backup, 'the machine has room keys to back up');
    assert.equal(backup.version, version);
    // What the SDK uploads for a session leaves MAX_SESSION_DATA_BYTES a wide margin (validate.ts says why).
    const uploaded = JSON.parse(backup.body) as { rooms: Record<string, { sessions: Record<string, { session_data: Json }> }> };
    for (const room of Object.values(uploaded.rooms)) {
      for (const key of Object.values(room.sessions)) assert.ok(Buffer.byteLength(JSON.stringify(key.session_data)) * 4 < MAX_SESSION_DATA_BYTES);
    }
    const stored = await alice.send('PUT', `${C}/room_keys/keys?version=${encodeURIComponent(backup.version)}`, backup.body);
    assert.equal((JSON.parse(stored) as Json)['count'], 1);
    await alice.machine.markRequestAsSent(backup.id, backup.type, stored);
    assert.equal(await alice.machine.backupRoomKeys(), undefined, 'nothing is left to back up');

    // A new device of alice's, given the backup key (as a user would type it in), restores from mxkeys.
    const fresh = await OlmClient.create(server, await login(server, 'alice', aliceSession.password));
    await fresh.flush();
    const settings = new sdk.DecryptionSettings(sdk.TrustRequirement.Untrusted);
    await assert.rejects(fresh.machine.decryptRoomEvent(JSON.stringify(event), new sdk.RoomId(roomId), settings), 'the new device cannot decrypt before restoring');

    const get = async (path: string) => {
      const r = await http(server.url, 'GET', `${C}${path}`, { token: fresh.session.accessToken });
      assert.equal(r.status, 200, r.text);
      return r.body;
    };
    const info = await get('/room_keys/version');
    assert.equal(info['version'], version);
    assert.equal(info['count'], 1);
    assert.deepEqual(info['auth_data'], authData, 'auth_data comes back as uploaded, signatures included');
    const recovery = sdk.BackupDecryptionKey.fromBase64(backupKey.toBase64());
    assert.equal(recovery.megolmV1PublicKey.publicKeyBase64, (info['auth_data'] as Json)['public_key']);

    const keys = (await get(`/room_keys/keys?version=${encodeURIComponent(version)}`)) as unknown as {
      rooms: Record<string, { sessions: Record<string, { session_data: { ephemeral: string; mac: string; ciphertext: string } }> }>;
    };
    const restored = new Map<sdk.RoomId, Map<string, unknown>>();
    for (const [room, { sessions }] of Object.entries(keys.rooms)) {
      const decrypted = new Map<string, unknown>();
      for (const [sessionId, { session_data: d }] of Object.entries(sessions)) decrypted.set(sessionId, JSON.parse(recovery.decryptV1(d.ephemeral, d.mac, d.ciphertext)));
      restored.set(new sdk.RoomId(room), decrypted);
    }
    assert.deepEqual(Object.keys(keys.rooms), [roomId]);
    const imported = await fresh.machine.importBackedUpRoomKeys(restored, () => undefined, version);
    assert.equal(imported.importedCount, 1);

    const decrypted = await fresh.machine.decryptRoomEvent(JSON.stringify(event), new sdk.RoomId(roomId), settings);
    const plain = JSON.parse(decrypted.event) as { type: string; content: { body: string } };
    assert.equal(plain.type, 'm.room.message');
    assert.equal(plain.content.body, 'kept safe in the backup');
  });
});
