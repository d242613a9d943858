import { test } from 'node:test';
import assert from 'node:assert/strict';
import { describeEachBackend } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { login, registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { FakeHomeserver } from '../support/fake-homeserver.js';
import { TestCrossSigning, TestDevice } from '../support/keys.js';
import { responseValidator } from '../support/spec-schema.js';
import { OlmClient, sdk } from '../support/olm.js';

const C = '/_matrix/client/v3';
const F = '/_matrix/federation/v1';
type Json = Record<string, unknown>;

const validQuery = responseValidator('server-server/user_keys.yaml', '/user/keys/query', 'post');
const validClaim = responseValidator('server-server/user_keys.yaml', '/user/keys/claim', 'post');
const validDevices = responseValidator('server-server/user_devices.yaml', '/user/devices/{userId}', 'get');

async function setup(backend: Parameters<typeof startServer>[0]['backend'], federation: Json = {}) {
  const remote = await FakeHomeserver.start();
  const server = await startServer({
    backend,
    config: { registration_shared_secret: SHARED_SECRET, federation: { resolve: { [remote.serverName]: remote.url }, ...federation } },
  });
  const alice = await registerUser(server, 'alice');
  const device = new TestDevice(alice.userId, alice.deviceId);
  const cs = new TestCrossSigning(alice.userId);
  return { server, remote, alice, device, cs };
}

const fed = (remote: FakeHomeserver, server: TestServer, method: string, path: string, body?: unknown) =>
  remote.request(server.url, server.config.server_name, method, path, body === undefined ? {} : { body });
const upload = (s: TestServer, who: Session, body: Json) => http(s.url, 'POST', `${C}/keys/upload`, { token: who.accessToken, body });

describeEachBackend('POST /_matrix/federation/v1/user/keys/query', (backend) => {
  test('returns device keys byte-equal to the upload, master and self-signing keys, matching user_keys.yaml', async () => {
    const { server, remote, alice, device, cs } = await setup(backend);
    await http(server.url, 'PUT', `${C}/devices/${alice.deviceId}`, { token: alice.accessToken, body: { display_name: 'Private name' } });
    const keys = device.deviceKeys({ 'org.example.unknown': ['kept'] });
    assert.equal((await upload(server, alice, { device_keys: keys })).status, 200);
    assert.equal((await http(server.url, 'POST', `${C}/keys/device_signing/upload`, { token: alice.accessToken, body: cs.upload() })).status, 200);

    const r = await fed(remote, server, 'POST', `${F}/user/keys/query`, { device_keys: { [alice.userId]: [], '@nobody:test.local': [] } });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(validQuery(r.body), []);
    const got = ((r.body['device_keys'] as Json)[alice.userId] as Json)[alice.deviceId] as Json;
    const { unsigned, ...rest } = got;
    assert.deepEqual(rest, keys);
    assert.deepEqual(unsigned, {}, 'no display name over federation unless allowed');
    assert.deepEqual((r.body['device_keys'] as Json)['@nobody:test.local'], {});
    assert.deepEqual((r.body['master_keys'] as Json)[alice.userId], cs.masterKey());
    assert.deepEqual((r.body['self_signing_keys'] as Json)[alice.userId], cs.selfSigningKey());
    assert.equal(r.body['user_signing_keys'], undefined, 'user-signing keys never go over federation');
    assert.equal(r.body['failures'], undefined);
  });

  test('display names go over federation only when allow_device_name_lookup is on', async () => {
    const { server, remote, alice, device } = await setup(backend, { allow_device_name_lookup: true });
    await http(server.url, 'PUT', `${C}/devices/${alice.deviceId}`, { token: alice.accessToken, body: { display_name: 'Shared name' } });
    await upload(server, alice, { device_keys: device.deviceKeys() });
    const r = await fed(remote, server, 'POST', `${F}/user/keys/query`, { device_keys: { [alice.userId]: [alice.deviceId] } });
    assert.deepEqual((((r.body['device_keys'] as Json)[alice.userId] as Json)[alice.deviceId] as Json)['unsigned'], { device_display_name: 'Shared name' });
  });

  test('signatures made with someone\'s user-signing key are never sent over federation', async () => {
    const { server, remote, alice, device, cs } = await setup(backend);
    await upload(server, alice, { device_keys: device.deviceKeys() });
    await http(server.url, 'POST', `${C}/keys/device_signing/upload`, { token: alice.accessToken, body: cs.upload() });
    const bob = await registerUser(server, 'bob');
    const bobCs = new TestCrossSigning(bob.userId);
    await http(server.url, 'POST', `${C}/keys/device_signing/upload`, { token: bob.accessToken, body: bobCs.upload() });
    const signedAlice = bobCs.userSigning.sign(cs.masterKey(), bob.userId, `ed25519:${bobCs.userSigning.publicKey}`);
    const selfSigned = cs.selfSigning.sign(device.deviceKeys(), alice.userId, `ed25519:${cs.selfSigning.publicKey}`);
    const up = await http(server.url, 'POST', `${C}/keys/signatures/upload`, { token: bob.accessToken, body: { [alice.userId]: { [cs.master.publicKey]: signedAlice } } });
    assert.deepEqual(up.body, { failures: {} });
    await http(server.url, 'POST', `${C}/keys/signatures/upload`, { token: alice.accessToken, body: { [alice.userId]: { [alice.deviceId]: selfSigned } } });

    const r = await fed(remote, server, 'POST', `${F}/user/keys/query`, { device_keys: { [alice.userId]: [] } });
    assert.deepEqual((r.body['master_keys'] as Json)[alice.userId], cs.masterKey(), "bob's signature on alice's master key stays private");
    assert.deepEqual((((r.body['device_keys'] as Json)[alice.userId] as Json)[alice.deviceId] as Json)['signatures'], selfSigned['signatures'], "alice's own signatures are shared");
    const devices = await fed(remote, server, 'GET', `${F}/user/devices/${encodeURIComponent(alice.userId)}`);
    assert.deepEqual(devices.body['master_key'], cs.masterKey());
  });

  test('users of other servers are refused with 400 M_INVALID_PARAM naming the user; bad bodies are 400 too', async () => {
    const { server, remote } = await setup(backend);
    const foreign = await fed(remote, server, 'POST', `${F}/user/keys/query`, { device_keys: { '@eve:elsewhere.example': [] } });
    assert.equal(foreign.status, 400);
    assert.equal(foreign.body['errcode'], 'M_INVALID_PARAM');
    assert.match(String(foreign.body['error']), /@eve:elsewhere.example/);
    for (const body of [{}, { device_keys: [] }, { device_keys: { '@alice:test.local': 'all' } }, { device_keys: { '@alice:test.local': [7] } }, { device_keys: { 'alice': [] } }]) {
      const r = await fed(remote, server, 'POST', `${F}/user/keys/query`, body);
      assert.equal(r.status, 400, `${JSON.stringify(body)} → ${r.text}`);
      assert.match(String(r.body['errcode']), /^M_(BAD_JSON|MISSING_PARAM|INVALID_PARAM)$/);
    }
    const notJson = await remote.request(server.url, 'test.local', 'POST', `${F}/user/keys/query`, { rawBody: '{"device_keys":', authorization: 'X-Matrix origin="x.example",key="ed25519:a",sig="b"' });
    assert.equal(notJson.status, 400);
    assert.equal(notJson.body['errcode'], 'M_NOT_JSON');
  });
});

describeEachBackend('POST /_matrix/federation/v1/user/keys/claim', (backend) => {
  test('claims oldest upload first, then the fallback key, matching user_keys.yaml', async () => {
    const { server, remote, alice, device } = await setup(backend);
    const first = device.oneTimeKeys(2, 'first');
    const second = device.oneTimeKeys(2, 'second');
    const fallback = device.fallbackKey();
    await upload(server, alice, { one_time_keys: first });
    await upload(server, alice, { one_time_keys: second, fallback_keys: { 'signed_curve25519:fb': fallback } });
    const order: string[] = [];
    for (let i = 0; i < 5; i++) {
      const r = await fed(remote, server, 'POST', `${F}/user/keys/claim`, { one_time_keys: { [alice.userId]: { [alice.deviceId]: 'signed_curve25519' } } });
      assert.equal(r.status, 200, r.text);
      assert.deepEqual(validClaim(r.body), []);
      const [[id, value]] = Object.entries((((r.body['one_time_keys'] as Json)[alice.userId] as Json)[alice.deviceId] as Json)) as [[string, Json]];
      assert.deepEqual(value, ({ ...first, ...second, 'signed_curve25519:fb': fallback } as Json)[id], 'the key object exactly as uploaded');
      order.push(id);
    }
    assert.deepEqual(order.slice(0, 2).sort(), Object.keys(first).sort());
    assert.deepEqual(order.slice(2, 4).sort(), Object.keys(second).sort());
    assert.equal(order[4], 'signed_curve25519:fb');
    const foreign = await fed(remote, server, 'POST', `${F}/user/keys/claim`, { one_time_keys: { '@eve:elsewhere.example': { D: 'signed_curve25519' } } });
    assert.equal(foreign.status, 400);
    assert.equal(foreign.body['errcode'], 'M_INVALID_PARAM');
  });

  test('concurrent claims over federation and the client API together never hand out a key twice', async () => {
    const { server, remote, alice, device } = await setup(backend);
    const n = 30;
    const keys = device.oneTimeKeys(n);
    await upload(server, alice, { one_time_keys: keys, fallback_keys: { 'signed_curve25519:fb': device.fallbackKey() } });
    const bob = await registerUser(server, 'bob');
    const body = { one_time_keys: { [alice.userId]: { [alice.deviceId]: 'signed_curve25519' } } };
    const pick = (b: Json) => Object.keys((((b['one_time_keys'] as Json)[alice.userId] as Json)[alice.deviceId] as Json))[0]!;
    const claims = Array.from({ length: 48 }, (_, i) =>
      i % 2 === 0
        ? fed(remote, server, 'POST', `${F}/user/keys/claim`, body).then((r) => pick(r.body))
        : http(server.url, 'POST', `${C}/keys/claim`, { token: bob.accessToken, body }).then((r) => pick(r.body)),
    );
    const ids = await Promise.all(claims);
    const oneTime = ids.filter((id) => id !== 'signed_curve25519:fb');
    assert.equal(oneTime.length, n);
    assert.equal(new Set(oneTime).size, n);
    assert.deepEqual(new Set(oneTime), new Set(Object.keys(keys)));
  });
});

describeEachBackend('GET /_matrix/federation/v1/user/devices/{userId}', (backend) => {
  test('lists devices with keys, cross-signing keys and a stream_id that grows with each change, matching user_devices.yaml', async () => {
    const { server, remote, alice, device, cs } = await setup(backend);
    const path = `${F}/user/devices/${encodeURIComponent(alice.userId)}`;
    await upload(server, alice, { device_keys: device.deviceKeys() });
    const before = await fed(remote, server, 'GET', path);
    assert.equal(before.status, 200, before.text);
    assert.deepEqual(validDevices(before.body), []);
    assert.equal(before.body['user_id'], alice.userId);
    assert.deepEqual(before.body['devices'], [{ device_id: alice.deviceId, keys: device.deviceKeys() }]);

    await http(server.url, 'POST', `${C}/keys/device_signing/upload`, { token: alice.accessToken, body: cs.upload() });
    const phone = await login(server, 'alice', alice.password, { initial_device_display_name: 'Phone' });
    await upload(server, phone, { device_keys: new TestDevice(alice.userId, phone.deviceId).deviceKeys() });
    const after = await fed(remote, server, 'GET', path);
    assert.deepEqual(validDevices(after.body), []);
    assert.ok((after.body['stream_id'] as number) > (before.body['stream_id'] as number));
    assert.equal((after.body['devices'] as Json[]).length, 2);
    assert.ok((after.body['devices'] as Json[]).every((d) => d['device_display_name'] === undefined));
    assert.deepEqual(after.body['master_key'], cs.masterKey());
    assert.deepEqual(after.body['self_signing_key'], cs.selfSigningKey());

    const unknown = await fed(remote, server, 'GET', `${F}/user/devices/${encodeURIComponent('@nobody:test.local')}`);
    assert.deepEqual(unknown.body, { user_id: '@nobody:test.local', stream_id: 0, devices: [] });
    const foreign = await fed(remote, server, 'GET', `${F}/user/devices/${encodeURIComponent('@eve:elsewhere.example')}`);
    assert.equal(foreign.status, 400);
    assert.equal(foreign.body['errcode'], 'M_INVALID_PARAM');
    assert.match(String(foreign.body['error']), /@eve:elsewhere.example/);
  });
});

describeEachBackend('a real client\'s keys, fetched over federation', (backend) => {
  test('a remote OlmMachine fed the federation query and claim answers sets up an Olm session that alice decrypts', async () => {
    const remote = await FakeHomeserver.start();
    const server = await startServer({ backend, config: { registration_shared_secret: SHARED_SECRET, federation: { resolve: { [remote.serverName]: remote.url } } } });
    const alice = await OlmClient.create(server, await registerUser(server, 'alice'));
    await alice.flush();
    await alice.bootstrapCrossSigning();

    // carol lives on the fake remote server; her machine's key requests are answered by mxkeys over federation.
    await sdk.initAsync();
    const carolId = `@carol:${remote.serverName}`;
    const carol = await sdk.OlmMachine.initialize(new sdk.UserId(carolId), new sdk.DeviceId('CAROLDEVICE'));
    await carol.updateTrackedUsers([new sdk.UserId(alice.session.userId)]);
    for (const request of (await carol.outgoingRequests()) as { id: string; type: sdk.RequestType; body: string }[]) {
      if (request.type === sdk.RequestType.KeysQuery) {
        const body = JSON.parse(request.body) as { device_keys: Json };
        const r = await fed(remote, server, 'POST', `${F}/user/keys/query`, { device_keys: body.device_keys });
        assert.equal(r.status, 200, r.text);
        await carol.markRequestAsSent(request.id, request.type, r.text);
      } else if (request.type === sdk.RequestType.KeysUpload) {
        // carol's own keys would go to her own server; tell her machine they were stored.
        await carol.markRequestAsSent(request.id, request.type, JSON.stringify({ one_time_key_counts: { signed_curve25519: 50 } }));
      }
    }
    const aliceDevice = await carol.getDevice(new sdk.UserId(alice.session.userId), new sdk.DeviceId(alice.session.deviceId));
    assert.ok(aliceDevice, "carol's machine learned alice's device over federation");
    assert.equal(aliceDevice.isCrossSignedByOwner(), true, 'and sees it cross-signed by alice');

    const claim = (await carol.getMissingSessions([new sdk.UserId(alice.session.userId)])) as unknown as { id: string; type: sdk.RequestType; body: string };
    assert.ok(claim);
    const claimBody = JSON.parse(claim.body) as { one_time_keys: Json };
    const claimed = await fed(remote, server, 'POST', `${F}/user/keys/claim`, { one_time_keys: claimBody.one_time_keys });
    assert.equal(claimed.status, 200, claimed.text);
    await carol.markRequestAsSent(claim.id, claim.type, claimed.text);

    const encrypted = JSON.parse(await aliceDevice.encryptToDeviceEvent('org.example.hello', { text: 'hi alice, carol here' })) as Json;
    const processed = await alice.receiveToDevice([{ sender: carolId, type: 'm.room.encrypted', content: encrypted }]);
    const decrypted = processed.find((e) => e.type === sdk.ProcessedToDeviceEventType.Decrypted) as sdk.DecryptedToDeviceEvent | undefined;
    assert.ok(decrypted, `alice decrypted carol's message (got ${processed.map((e) => e.type).join(', ')})`);
    assert.equal((JSON.parse(decrypted.rawEvent) as { content: { text: string } }).content.text, 'hi alice, carol here');
  });
});
