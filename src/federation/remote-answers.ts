/**
 * Checks what other servers answer before any of it is used: /user/devices (user_devices.yaml),
 * /user/keys/query and /user/keys/claim (user_keys.yaml), and the device-list EDUs
 * (m.device_list_update, m.signing_key_update). Only what was asked for, about users of the server
 * that answered, in the shapes the spec gives, is kept; each key object must name the user and
 * device it is filed under. Everything else is dropped with a reason for the log — never passed on
 * to our clients.
 */
import { MatrixError } from '../matrix/errors.js';
import { isObject } from '../matrix/signing.js';
import { isValidDeviceId, parseUserId } from '../matrix/ids.js';
import { canonicalJson, CanonicalJsonError } from '../matrix/canonical-json.js';
import { MAX_SIGNED_OBJECT_BYTES, parseKeyMap, signedBy, validateCrossSigningKey } from '../keys/validate.js';
import type {
  ClaimedKey,
  ClaimRequest,
  CrossSigningKeyType,
  KeysOfUsers,
  RemoteCrossSigningKey,
  RemoteDevice,
  RemoteDeviceListSnapshot,
  RemoteDeviceUpdate,
  StoredCrossSigningKey,
} from '../storage/store.js';

type JsonObject = Record<string, unknown>;

/** A user with more devices than this is not a person's device list; its answer is refused. */
export const MAX_REMOTE_DEVICES = 10_000;
/** Display names are shown to users; Synapse limits its own to 100 characters. */
const MAX_DISPLAY_NAME = 512;

/** Problems found while checking, for the log (bounded, so a hostile answer cannot flood it). */
export class Problems {
  readonly list: string[] = [];
  count = 0;
  add(problem: string): void {
    this.count++;
    if (this.list.length < 5) this.list.push(problem);
  }
}

function isStringList(v: unknown): v is string[] {
  return Array.isArray(v) && v.every((x) => typeof x === 'string');
}

function isStringMap(v: unknown): v is Record<string, string> {
  return isObject(v) && Object.values(v).every((x) => typeof x === 'string');
}

function isSignatures(v: unknown): boolean {
  return isObject(v) && Object.values(v).every(isStringMap);
}

/** JSON text of a signed object without `unsigned`, or a reason when it is not acceptable. */
function signedObjectText(obj: JsonObject, path: string): string | { problem: string } {
  const { unsigned: _unsigned, ...rest } = obj;
  let text: string;
  try {
    canonicalJson(rest);
    text = JSON.stringify(rest);
  } catch (e) {
    if (e instanceof CanonicalJsonError) return { problem: `${path} is not canonical JSON (${e.message})` };
    throw e;
  }
  if (text.length > MAX_SIGNED_OBJECT_BYTES) return { problem: `${path} is larger than ${MAX_SIGNED_OBJECT_BYTES} bytes` };
  return text;
}

/**
 * Device keys of `userId`'s device `deviceId` as another server sent them: the object's own
 * `user_id`/`device_id` must match, and the fields have the DeviceKeys types. The device's
 * self-signature is left to clients, which check it (as Synapse does not check it either).
 */
export function checkRemoteDeviceKeys(value: unknown, userId: string, deviceId: string, path: string): string | { problem: string } {
  if (!isObject(value)) return { problem: `${path} is not an object` };
  if (value['user_id'] !== userId) return { problem: `${path}.user_id is ${JSON.stringify(value['user_id'])}, not ${userId}` };
  if (value['device_id'] !== deviceId) return { problem: `${path}.device_id is ${JSON.stringify(value['device_id'])}, not ${deviceId}` };
  if (!isStringList(value['algorithms'])) return { problem: `${path}.algorithms is not a list of strings` };
  if (!isStringMap(value['keys'])) return { problem: `${path}.keys is not a map of strings` };
  if (!isSignatures(value['signatures'])) return { problem: `${path}.signatures is not a map of signatures` };
  return signedObjectText(value, path);
}

/** A cross-signing key of `userId` of the given usage, as another server sent it. */
export function checkRemoteCrossSigningKey(value: unknown, userId: string, keyType: CrossSigningKeyType, path: string): RemoteCrossSigningKey | { problem: string } {
  try {
    const k = validateCrossSigningKey(value, path, userId, keyType);
    const text = signedObjectText(k.object, path);
    return typeof text === 'string' ? { publicKey: k.publicKey, json: text } : text;
  } catch (e) {
    if (e instanceof MatrixError) return { problem: e.message };
    throw e;
  }
}

/** The self-signing key must be signed by the master key (e2e spec; rule 68 of the extract). */
function selfSigningSignedBy(ssk: RemoteCrossSigningKey, master: RemoteCrossSigningKey | undefined, userId: string): boolean {
  if (!master) return false;
  try {
    return signedBy(JSON.parse(ssk.json) as JsonObject, userId, master.publicKey, 'self_signing_key');
  } catch (e) {
    if (e instanceof MatrixError) return false;
    throw e;
  }
}

/** The cross-signing keys of one user from fields `master` and `selfSigning`, checked. */
function crossSigningPair(
  userId: string,
  master: unknown,
  selfSigning: unknown,
  problems: Problems,
  where: { master: string; selfSigning: string },
): { masterKey: RemoteCrossSigningKey | undefined; selfSigningKey: RemoteCrossSigningKey | undefined } {
  let masterKey: RemoteCrossSigningKey | undefined;
  let selfSigningKey: RemoteCrossSigningKey | undefined;
  if (master !== undefined) {
    const m = checkRemoteCrossSigningKey(master, userId, 'master', where.master);
    if ('problem' in m) problems.add(m.problem);
    else masterKey = m;
  }
  if (selfSigning !== undefined) {
    const s = checkRemoteCrossSigningKey(selfSigning, userId, 'self_signing', where.selfSigning);
    if ('problem' in s) problems.add(s.problem);
    else if (!selfSigningSignedBy(s, masterKey, userId)) problems.add(`${where.selfSigning} is not signed by the master key`);
    else selfSigningKey = s;
  }
  return { masterKey, selfSigningKey };
}

/** GET /user/devices/{userId}: the whole list, or a reason it cannot be used at all. */
export function checkUserDevicesAnswer(body: unknown, userId: string, serverName: string, problems: Problems): RemoteDeviceListSnapshot | string {
  if (!isObject(body)) return 'the answer is not a JSON object';
  if (body['user_id'] !== userId) return `the answer is about ${JSON.stringify(body['user_id'])}, not ${userId}`;
  const streamId = body['stream_id'];
  if (typeof streamId !== 'number' || !Number.isSafeInteger(streamId) || streamId < 0) return 'stream_id is not a non-negative integer';
  const list = body['devices'];
  if (!Array.isArray(list)) return 'devices is not a list';
  if (list.length > MAX_REMOTE_DEVICES) return `the user has ${list.length} devices, more than ${MAX_REMOTE_DEVICES}`;
  const devices = new Map<string, RemoteDevice>();
  for (const [i, d] of list.entries()) {
    if (!isObject(d) || typeof d['device_id'] !== 'string' || !isValidDeviceId(d['device_id'])) {
      problems.add(`devices[${i}] has no valid device_id`);
      continue;
    }
    const deviceId = d['device_id'];
    let keyJson: string | null = null;
    // user_devices.yaml requires `keys`; a device that has not uploaded any is listed without (G7).
    if (d['keys'] !== undefined) {
      const k = checkRemoteDeviceKeys(d['keys'], userId, deviceId, `devices[${i}].keys`);
      if (typeof k === 'string') keyJson = k;
      else problems.add(k.problem);
    }
    const name = d['device_display_name'];
    const displayName = typeof name === 'string' && name.length <= MAX_DISPLAY_NAME ? name : null;
    devices.set(deviceId, { deviceId, displayName, keyJson });
  }
  const { masterKey, selfSigningKey } = crossSigningPair(userId, body['master_key'], body['self_signing_key'], problems, { master: 'master_key', selfSigning: 'self_signing_key' });
  return { userId, serverName, streamId, devices: [...devices.values()], masterKey, selfSigningKey };
}

/**
 * POST /user/keys/query: the keys of the users and devices asked for (`asked`: user → device
 * IDs, empty for all), each filed under the user and device it names.
 */
export function checkKeysQueryAnswer(body: unknown, asked: ReadonlyMap<string, readonly string[]>, problems: Problems): KeysOfUsers | string {
  if (!isObject(body)) return 'the answer is not a JSON object';
  const deviceKeys = body['device_keys'];
  if (!isObject(deviceKeys)) return 'device_keys is not an object';
  const out: KeysOfUsers = { devices: [], crossSigning: [], signatures: [] };
  for (const [userId, devices] of Object.entries(deviceKeys)) {
    const only = asked.get(userId);
    if (only === undefined) {
      problems.add(`device_keys names ${userId}, who was not asked for`);
      continue;
    }
    if (!isObject(devices)) {
      problems.add(`device_keys["${userId}"] is not an object`);
      continue;
    }
    const entries = Object.entries(devices);
    if (entries.length > MAX_REMOTE_DEVICES) {
      problems.add(`device_keys["${userId}"] has more than ${MAX_REMOTE_DEVICES} devices`);
      continue;
    }
    for (const [deviceId, keys] of entries) {
      if (only.length > 0 && !only.includes(deviceId)) {
        problems.add(`device_keys["${userId}"] has device ${deviceId}, which was not asked for`);
        continue;
      }
      const path = `device_keys["${userId}"]["${deviceId}"]`;
      const k = checkRemoteDeviceKeys(keys, userId, deviceId, path);
      if (typeof k !== 'string') {
        problems.add(k.problem);
        continue;
      }
      const unsigned = (keys as JsonObject)['unsigned'];
      const name = isObject(unsigned) ? unsigned['device_display_name'] : undefined;
      out.devices.push({ userId, deviceId, displayName: typeof name === 'string' && name.length <= MAX_DISPLAY_NAME ? name : null, json: k });
    }
  }
  const masterKeys = isObject(body['master_keys']) ? body['master_keys'] : {};
  const selfSigningKeys = isObject(body['self_signing_keys']) ? body['self_signing_keys'] : {};
  for (const userId of asked.keys()) {
    const { masterKey, selfSigningKey } = crossSigningPair(userId, masterKeys[userId], selfSigningKeys[userId], problems, {
      master: `master_keys["${userId}"]`,
      selfSigning: `self_signing_keys["${userId}"]`,
    });
    const add = (keyType: StoredCrossSigningKey['keyType'], k: RemoteCrossSigningKey | undefined) => {
      if (k) out.crossSigning.push({ userId, keyType, publicKey: k.publicKey, json: k.json });
    };
    add('master', masterKey);
    add('self_signing', selfSigningKey);
  }
  return out;
}

/** POST /user/keys/claim: at most one key of the asked algorithm per asked device. */
export function checkKeysClaimAnswer(body: unknown, asked: readonly ClaimRequest[], problems: Problems): ClaimedKey[] | string {
  if (!isObject(body)) return 'the answer is not a JSON object';
  const all = body['one_time_keys'];
  if (!isObject(all)) return 'one_time_keys is not an object';
  const claimed: ClaimedKey[] = [];
  for (const { userId, deviceId, algorithm } of asked) {
    const devices = all[userId];
    const keys = isObject(devices) ? devices[deviceId] : undefined;
    if (!isObject(keys)) continue;
    const path = `one_time_keys["${userId}"]["${deviceId}"]`;
    const name = Object.keys(keys).find((n) => n.startsWith(`${algorithm}:`));
    if (name === undefined) {
      if (Object.keys(keys).length > 0) problems.add(`${path} holds no ${algorithm} key`);
      continue;
    }
    try {
      const [k] = parseKeyMap({ [name]: keys[name] }, path);
      const fallback = isObject(k!.value) && k!.value['fallback'] === true;
      claimed.push({ userId, deviceId, algorithm, keyId: k!.keyId, json: k!.json, fallback });
    } catch (e) {
      if (!(e instanceof MatrixError)) throw e;
      problems.add(e.message);
    }
  }
  return claimed;
}

/** The server part of a user ID (undefined for an invalid one). */
export function serverOf(userId: string): string | undefined {
  return parseUserId(userId)?.serverName;
}

/** An m.device_list_update EDU's content, checked; `origin` must be the user's server. */
export function checkDeviceListUpdate(content: unknown, origin: string): RemoteDeviceUpdate | string {
  if (!isObject(content)) return 'content is not an object';
  const userId = content['user_id'];
  if (typeof userId !== 'string' || serverOf(userId) === undefined) return 'user_id is not a valid user ID';
  if (serverOf(userId) !== origin) return `user ${userId} does not belong to ${origin}, which sent the update`;
  const deviceId = content['device_id'];
  if (typeof deviceId !== 'string' || !isValidDeviceId(deviceId)) return 'device_id is not a valid device ID';
  const streamId = content['stream_id'];
  if (typeof streamId !== 'number' || !Number.isSafeInteger(streamId) || streamId < 0) return 'stream_id is not a non-negative integer';
  const prev = content['prev_id'] ?? [];
  if (!Array.isArray(prev) || !prev.every((p) => typeof p === 'number' && Number.isSafeInteger(p))) return 'prev_id is not a list of integers';
  const deleted = content['deleted'] === true;
  let keyJson: string | null = null;
  if (!deleted && content['keys'] !== undefined) {
    const k = checkRemoteDeviceKeys(content['keys'], userId, deviceId, 'keys');
    if (typeof k !== 'string') return k.problem;
    keyJson = k;
  }
  const name = content['device_display_name'];
  const displayName = typeof name === 'string' && name.length <= MAX_DISPLAY_NAME ? name : null;
  return { userId, deviceId, streamId, prevIds: prev as number[], deleted, displayName, keyJson };
}

/** An m.signing_key_update EDU's content, checked; `origin` must be the user's server. */
export function checkSigningKeyUpdate(
  content: unknown,
  origin: string,
): { userId: string; master: RemoteCrossSigningKey | undefined; selfSigning: RemoteCrossSigningKey | undefined } | string {
  if (!isObject(content)) return 'content is not an object';
  const userId = content['user_id'];
  if (typeof userId !== 'string' || serverOf(userId) === undefined) return 'user_id is not a valid user ID';
  if (serverOf(userId) !== origin) return `user ${userId} does not belong to ${origin}, which sent the update`;
  let master: RemoteCrossSigningKey | undefined;
  if (content['master_key'] !== undefined) {
    const m = checkRemoteCrossSigningKey(content['master_key'], userId, 'master', 'master_key');
    if ('problem' in m) return m.problem;
    master = m;
  }
  let selfSigning: RemoteCrossSigningKey | undefined;
  if (content['self_signing_key'] !== undefined) {
    const s = checkRemoteCrossSigningKey(content['self_signing_key'], userId, 'self_signing', 'self_signing_key');
    if ('problem' in s) return s.problem;
    selfSigning = s;
  }
  return { userId, master, selfSigning };
}

/** Whether a self-signing key is signed by the given master key. */
export function isSelfSigningKeySignedBy(ssk: RemoteCrossSigningKey, master: RemoteCrossSigningKey | undefined, userId: string): boolean {
  return selfSigningSignedBy(ssk, master, userId);
}
