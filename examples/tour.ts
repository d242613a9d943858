/**
 * The whole point of a key server, end to end: two users register on a running mxkeys, their
 * devices upload identity and one-time keys, bob claims one of alice's one-time keys, builds an
 * Olm session with it and encrypts a message that only alice's device can decrypt.
 *
 * The crypto is matrix-sdk-crypto-wasm, the Rust stack inside Element. Run against a server with
 * open registration (README.md, "A five-minute tour"):
 *
 *   MXKEYS_ENABLE_REGISTRATION=true node dist/main.js serve &
 *   npx tsx examples/tour.ts http://127.0.0.1:8008
 */
import * as sdk from '@matrix-org/matrix-sdk-crypto-wasm';

const base = process.argv[2] ?? 'http://127.0.0.1:8008';
const C = `${base}/_matrix/client/v3`;

async function call(method: string, path: string, body: unknown, token?: string): Promise<Record<string, any>> {
  const res = await fetch(C + path, { method, body: JSON.stringify(body), headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) } });
  const json = (await res.json()) as Record<string, any>;
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
  return json;
}

// Open registration takes one user-interactive auth stage, m.login.dummy.
async function register(name: string) {
  const account = await call('POST', '/register', { username: `${name}-${Date.now().toString(36)}`, password: 'tour', auth: { type: 'm.login.dummy' } });
  const machine = await sdk.OlmMachine.initialize(new sdk.UserId(account.user_id), new sdk.DeviceId(account.device_id));
  return { ...account, machine } as { user_id: string; device_id: string; access_token: string; machine: sdk.OlmMachine };
}
type User = Awaited<ReturnType<typeof register>>;

// The machine says what to send (key uploads, queries, claims); we send it and hand back the answer.
const PATHS: Partial<Record<sdk.RequestType, string>> = { [sdk.RequestType.KeysUpload]: '/keys/upload', [sdk.RequestType.KeysQuery]: '/keys/query', [sdk.RequestType.KeysClaim]: '/keys/claim' };
async function send(user: User, request: { id?: string | undefined; type: sdk.RequestType; body: string }): Promise<Record<string, any>> {
  const answer = await call('POST', PATHS[request.type]!, JSON.parse(request.body), user.access_token);
  await user.machine.markRequestAsSent(request.id!, request.type, JSON.stringify(answer));
  return answer;
}
async function flush(user: User) {
  for (const request of await user.machine.outgoingRequests()) if (PATHS[request.type]) await send(user, request);
}

await sdk.initAsync();
const alice = await register('alice');
const bob = await register('bob');
console.log(`registered ${alice.user_id} (device ${alice.device_id}) and ${bob.user_id}`);

await flush(alice); // device keys and one-time keys go up
const { one_time_key_counts } = await call('POST', '/keys/upload', {}, alice.access_token);
console.log(`alice's device uploaded its keys: ${one_time_key_counts.signed_curve25519} one-time keys on the server`);

await bob.machine.updateTrackedUsers([new sdk.UserId(alice.user_id)]);
await flush(bob); // bob downloads alice's device keys (POST /keys/query)
const claim = await bob.machine.getMissingSessions([new sdk.UserId(alice.user_id)]);
const claimed = await send(bob, claim as sdk.KeysClaimRequest); // POST /keys/claim: the key is handed out once, ever
console.log(`bob claimed alice's one-time key ${Object.keys(claimed.one_time_keys[alice.user_id][alice.device_id])[0]}`);

// Bob encrypts for alice's device. A homeserver would carry this to-device event (PUT
// /sendToDevice, then alice's /sync); here we hand it over directly.
const device = await bob.machine.getDevice(new sdk.UserId(alice.user_id), new sdk.DeviceId(alice.device_id));
const content = JSON.parse(await device!.encryptToDeviceEvent('org.example.tour', { text: 'hello alice, from bob' }));
const events = await alice.machine.receiveSyncChanges(JSON.stringify([{ sender: bob.user_id, type: 'm.room.encrypted', content }]), new sdk.DeviceLists(), new Map(), new Set());
const decrypted = events.find((e) => e.type === sdk.ProcessedToDeviceEventType.Decrypted) as sdk.DecryptedToDeviceEvent | undefined;
if (!decrypted) throw new Error('alice could not decrypt the message');
console.log(`alice decrypted: ${JSON.parse(decrypted.rawEvent).content.text}`);
