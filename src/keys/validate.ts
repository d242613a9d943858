/**
 * Checking uploaded key objects (device keys, one-time/fallback key maps, cross-signing keys).
 * Every failure is a 400 MatrixError whose message names the field, so a client developer can see
 * what to fix. Nothing here stores anything.
 */
import { MatrixError } from '../matrix/errors.js';
import { canonicalJson, CanonicalJsonError } from '../matrix/canonical-json.js';
import { isUnpaddedBase64OfLength } from '../matrix/base64.js';
import { getSignature, isObject, verifyJsonSignature } from '../matrix/signing.js';
import { isValidKeyPart } from '../matrix/ids.js';
import type { CrossSigningKeyType } from '../storage/store.js';

type JsonObject = Record<string, unknown>;

/** A one-time or fallback key is a few hundred bytes; anything far larger is not a key. */
export const MAX_KEY_OBJECT_BYTES = 4096;
/** Device keys and cross-signing keys: a few hundred bytes plus signatures. */
export const MAX_SIGNED_OBJECT_BYTES = 65_536;

export function badJson(path: string, expected: string): MatrixError {
  return new MatrixError('M_BAD_JSON', `${path} must be ${expected}`);
}

export function requireObject(value: unknown, path: string): JsonObject {
  if (!isObject(value)) throw badJson(path, 'an object');
  return value;
}

/**
 * The object in a required field of a request body: the body not an object or the field not an
 * object → 400 M_BAD_JSON, the field missing → 400 M_MISSING_PARAM.
 */
export function requireObjectField(body: unknown, field: string): JsonObject {
  const obj = requireObject(body, 'the request body');
  if (obj[field] === undefined) throw new MatrixError('M_MISSING_PARAM', `the request body is missing the required field "${field}"`);
  return requireObject(obj[field], field);
}

/** keys.yaml: "10 seconds is the recommended default." */
export const DEFAULT_REMOTE_TIMEOUT_MS = 10_000;
/** However long a client asks to wait, a request is not held open longer than this. */
export const MAX_REMOTE_TIMEOUT_MS = 60_000;

/**
 * `timeout` of a key query or claim: absent, or a non-negative integer (milliseconds), how long to
 * wait for other servers. Returns the milliseconds to wait.
 */
export function checkTimeout(body: JsonObject): number {
  const t = body['timeout'];
  if (t === undefined) return DEFAULT_REMOTE_TIMEOUT_MS;
  if (!(Number.isSafeInteger(t) && (t as number) >= 0)) throw badJson('timeout', 'a non-negative integer (milliseconds)');
  return Math.min(t as number, MAX_REMOTE_TIMEOUT_MS);
}

function requireField(obj: JsonObject, key: string, path: string, errcode: 'M_MISSING_PARAM' | 'M_BAD_JSON' = 'M_MISSING_PARAM'): unknown {
  if (obj[key] === undefined) throw new MatrixError(errcode, `${path}.${key} is required`);
  return obj[key];
}

function requireStringMap(value: unknown, path: string): Record<string, string> {
  const obj = requireObject(value, path);
  for (const [k, v] of Object.entries(obj)) if (typeof v !== 'string') throw badJson(`${path}["${k}"]`, 'a string');
  return obj as Record<string, string>;
}

/** `signatures`: user ID → key ID → signature string. */
function requireSignatures(value: unknown, path: string): void {
  const obj = requireObject(value, path);
  for (const [user, sigs] of Object.entries(obj)) requireStringMap(sigs, `${path}["${user}"]`);
}

/** Verifies a signature, turning a non-canonical object into a 400 rather than a crash. */
function verifies(obj: JsonObject, entity: string, keyId: string, publicKey: string, path: string): boolean {
  try {
    return verifyJsonSignature(obj, entity, keyId, publicKey);
  } catch (e) {
    if (e instanceof CanonicalJsonError) throw new MatrixError('M_BAD_JSON', `${path} cannot be signed as canonical JSON: ${e.message}`);
    throw e;
  }
}

export interface ValidDeviceKeys {
  /** The object as uploaded, without `unsigned`. */
  readonly object: JsonObject;
}

export interface DeviceKeysOptions {
  /**
   * Accept a self-signature that is missing or does not verify (accept_invalid_device_self_signatures):
   * test suites upload placeholder keys; clients drop such devices anyway.
   */
  readonly acceptInvalidSelfSignature?: boolean;
}

/**
 * `device_keys` of /keys/upload: the caller's own user and device, the required fields with the
 * right types, key names `<algorithm>:<device_id>`, and a valid self-signature by the device's
 * ed25519 key (unless `acceptInvalidSelfSignature`).
 */
export function validateDeviceKeys(value: unknown, userId: string, deviceId: string, options: DeviceKeysOptions = {}): ValidDeviceKeys {
  const path = 'device_keys';
  const obj = requireObject(value, path);
  const { unsigned: _unsigned, ...object } = obj;
  // A DeviceKeys object without one of its required fields is malformed JSON to Synapse: M_BAD_JSON.
  const uid = requireField(object, 'user_id', path, 'M_BAD_JSON');
  const did = requireField(object, 'device_id', path, 'M_BAD_JSON');
  const algorithms = requireField(object, 'algorithms', path, 'M_BAD_JSON');
  const keys = requireField(object, 'keys', path, 'M_BAD_JSON');
  requireField(object, 'signatures', path, 'M_BAD_JSON');
  if (typeof uid !== 'string') throw badJson(`${path}.user_id`, 'a string');
  if (typeof did !== 'string') throw badJson(`${path}.device_id`, 'a string');
  if (uid !== userId) throw new MatrixError('M_INVALID_PARAM', `${path}.user_id is ${uid}, but you are logged in as ${userId}`);
  if (did !== deviceId) throw new MatrixError('M_INVALID_PARAM', `${path}.device_id is ${did}, but your access token belongs to device ${deviceId}`);
  if (!Array.isArray(algorithms) || algorithms.some((a) => typeof a !== 'string')) throw badJson(`${path}.algorithms`, 'a list of strings');
  const keyMap = requireStringMap(keys, `${path}.keys`);
  for (const name of Object.keys(keyMap)) {
    const colon = name.indexOf(':');
    if (colon <= 0 || name.slice(colon + 1) !== deviceId) {
      throw new MatrixError('M_INVALID_PARAM', `${path}.keys["${name}"]: key names must be "<algorithm>:${deviceId}"`);
    }
  }
  requireSignatures(object['signatures'], `${path}.signatures`);
  const ed25519 = keyMap[`ed25519:${deviceId}`];
  if (ed25519 === undefined) throw new MatrixError('M_MISSING_PARAM', `${path}.keys must include the device's "ed25519:${deviceId}" key`);
  if (JSON.stringify(object).length > MAX_SIGNED_OBJECT_BYTES) throw new MatrixError('M_INVALID_PARAM', `${path} is larger than ${MAX_SIGNED_OBJECT_BYTES} bytes`);
  if (options.acceptInvalidSelfSignature) {
    requireCanonical(object, path);
    return { object };
  }
  if (getSignature(object, userId, `ed25519:${deviceId}`) === undefined) {
    throw new MatrixError('M_INVALID_SIGNATURE', `${path} must be signed by the device's own key: ${path}.signatures["${userId}"]["ed25519:${deviceId}"] is missing`);
  }
  if (!verifies(object, userId, `ed25519:${deviceId}`, ed25519, path)) {
    throw new MatrixError('M_INVALID_SIGNATURE', `${path}: the signature by ed25519:${deviceId} does not verify; sign the object without "signatures" and "unsigned" as canonical JSON`);
  }
  return { object };
}

export interface UploadedKey {
  readonly algorithm: string;
  readonly keyId: string;
  readonly value: unknown;
  readonly json: string;
}

/**
 * A `one_time_keys` or `fallback_keys` map: `<algorithm>:<key_id>` → a key string or a key object
 * `{key, signatures?, …}`.
 */
export function parseKeyMap(value: unknown, path: string): UploadedKey[] {
  if (value === undefined || value === null) return [];
  const obj = requireObject(value, path);
  return Object.entries(obj).map(([name, key]) => {
    const colon = name.indexOf(':');
    const algorithm = name.slice(0, colon);
    const keyId = name.slice(colon + 1);
    if (colon <= 0 || !isValidKeyPart(algorithm) || !isValidKeyPart(keyId)) {
      throw new MatrixError('M_INVALID_PARAM', `${path}["${name}"]: key names must be "<algorithm>:<key_id>", each part 1–255 printable ASCII characters`);
    }
    if (typeof key !== 'string') {
      if (!isObject(key)) throw badJson(`${path}["${name}"]`, 'a key string or a key object');
      if (typeof key['key'] !== 'string') throw badJson(`${path}["${name}"].key`, 'a string');
      if (key['signatures'] !== undefined) requireSignatures(key['signatures'], `${path}["${name}"].signatures`);
    }
    requireCanonical(key, `${path}["${name}"]`);
    const json = JSON.stringify(key);
    if (json.length > MAX_KEY_OBJECT_BYTES) throw new MatrixError('M_INVALID_PARAM', `${path}["${name}"] is larger than ${MAX_KEY_OBJECT_BYTES} bytes`);
    return { algorithm, keyId, value: key, json };
  });
}

export interface ValidCrossSigningKey {
  readonly keyType: CrossSigningKeyType;
  readonly object: JsonObject;
  readonly publicKey: string;
}

/** A CrossSigningKey: the caller's user, the right usage, exactly one `ed25519:<public key>` key. */
export function validateCrossSigningKey(value: unknown, path: string, userId: string, keyType: CrossSigningKeyType): ValidCrossSigningKey {
  const obj = requireObject(value, path);
  const { unsigned: _unsigned, ...object } = obj;
  const uid = requireField(object, 'user_id', path);
  const usage = requireField(object, 'usage', path);
  const keys = requireStringMap(requireField(object, 'keys', path), `${path}.keys`);
  if (typeof uid !== 'string') throw badJson(`${path}.user_id`, 'a string');
  if (uid !== userId) throw new MatrixError('M_INVALID_PARAM', `${path}.user_id is ${uid}, but you are logged in as ${userId}`);
  if (!Array.isArray(usage) || usage.some((u) => typeof u !== 'string')) throw badJson(`${path}.usage`, 'a list of strings');
  if (!usage.includes(keyType)) throw new MatrixError('M_INVALID_PARAM', `${path}.usage must contain "${keyType}"`);
  const entries = Object.entries(keys);
  if (entries.length !== 1) throw new MatrixError('M_INVALID_PARAM', `${path}.keys must have exactly one entry, found ${entries.length}`);
  const [name, publicKey] = entries[0]!;
  if (name !== `ed25519:${publicKey}` || !isUnpaddedBase64OfLength(publicKey, 32)) {
    throw new MatrixError('M_INVALID_PARAM', `${path}.keys must be {"ed25519:<public key>": "<public key>"} with an unpadded base64 Ed25519 public key`);
  }
  if (object['signatures'] !== undefined) requireSignatures(object['signatures'], `${path}.signatures`);
  requireCanonical(object, path);
  if (JSON.stringify(object).length > MAX_SIGNED_OBJECT_BYTES) throw new MatrixError('M_INVALID_PARAM', `${path} is larger than ${MAX_SIGNED_OBJECT_BYTES} bytes`);
  return { keyType, object, publicKey };
}

/**
 * Refuses an object that cannot be canonical JSON (floats, integers beyond ±(2^53−1), lone
 * surrogates): nobody can verify a signature on it, and it would not come back as uploaded.
 */
export function requireCanonical(value: unknown, path: string): void {
  try {
    canonicalJson(value);
  } catch (e) {
    if (e instanceof CanonicalJsonError) throw new MatrixError('M_BAD_JSON', `${path} cannot be encoded as canonical JSON: ${e.message}`);
    throw e;
  }
}

/** True when `obj` carries a valid signature by `userId`'s key `publicKey`. */
export function signedBy(obj: JsonObject, userId: string, publicKey: string, path: string): boolean {
  return verifies(obj, userId, `ed25519:${publicKey}`, publicKey, path);
}
