/**
 * Checking what clients send to the key backup API (key_backup.yaml): backup version bodies and
 * KeyBackupData, at the three levels a PUT of keys may come in. Every failure is a 400
 * MatrixError whose message names the field. The encrypted `session_data` and `auth_data` are
 * opaque to the server: only their type and size are checked, and they are kept as JSON text.
 */
import { MatrixError } from '../matrix/errors.js';
import type { StoredRoomKey } from '../storage/store.js';

type JsonObject = Record<string, unknown>;

/** Room IDs, session IDs and algorithm names longer than this are not IDs. */
export const MAX_ID_BYTES = 255;
/**
 * One `session_data`, as JSON text. matrix-sdk-crypto uploads about 750 bytes for a session
 * (m.megolm_backup.v1.curve25519-aes-sha2: a 43-character ephemeral key, an 11-character MAC and
 * the ciphertext of a ~550-byte session export); each forwarding hop in the session's history adds
 * about 60. 4 KiB leaves five times that: room for dozens of hops or a newer algorithm's extra
 * fields, while a user's budget (key_backup.max_bytes_per_user) counts what is really stored.
 */
export const MAX_SESSION_DATA_BYTES = 4096;
/**
 * A version's `auth_data`: about 200 bytes with one signature (a public key and a signature per
 * signing device or key); 16 KiB leaves room for a hundred signatures.
 */
export const MAX_AUTH_DATA_BYTES = 16_384;

const isObject = (v: unknown): v is JsonObject => typeof v === 'object' && v !== null && !Array.isArray(v);
const badJson = (message: string) => new MatrixError('M_BAD_JSON', message);

function requireObject(value: unknown, path: string): JsonObject {
  if (!isObject(value)) throw badJson(`${path} must be an object`);
  return value;
}

function requireField(obj: JsonObject, key: string, path: string): unknown {
  if (obj[key] === undefined) throw badJson(`${path} is missing the required field "${key}"`);
  return obj[key];
}

/** 1–255 bytes of well-formed text without control characters. */
function isPlainId(s: string): boolean {
  return s.length > 0 && Buffer.byteLength(s) <= MAX_ID_BYTES && s.isWellFormed() && !/[\u0000-\u001f\u007f]/.test(s);
}

/** A room ID as the spec's `rooms` map requires it (pattern `^!`). */
export function checkRoomId(roomId: string, path: string): void {
  if (!roomId.startsWith('!') || !isPlainId(roomId)) {
    throw new MatrixError('M_INVALID_PARAM', `${path}: "${roomId.slice(0, 80)}" is not a room ID (it must start with "!" and be at most ${MAX_ID_BYTES} bytes)`);
  }
}

export function checkSessionId(sessionId: string, path: string): void {
  if (!isPlainId(sessionId)) {
    throw new MatrixError('M_INVALID_PARAM', `${path}: a session ID must be 1–${MAX_ID_BYTES} bytes without control characters`);
  }
}

/** An opaque object (auth_data, session_data) as JSON text, refused beyond `maxBytes`. */
function opaqueJson(value: unknown, path: string, maxBytes: number): string {
  const json = JSON.stringify(requireObject(value, path));
  if (Buffer.byteLength(json) > maxBytes) throw new MatrixError('M_INVALID_PARAM', `${path} is larger than ${maxBytes} bytes (as JSON)`);
  return json;
}

function nonNegativeInteger(value: unknown, path: string): number {
  if (!Number.isSafeInteger(value) || (value as number) < 0) throw badJson(`${path} must be a non-negative integer`);
  return value as number;
}

export interface VersionBody {
  readonly algorithm: string;
  /** `auth_data` as JSON text. */
  readonly authData: string;
  /** `version`, when the body carries it (PUT). */
  readonly version?: string;
}

/** The body of POST /room_keys/version or PUT /room_keys/version/{version}. */
export function parseVersionBody(body: unknown): VersionBody {
  const obj = requireObject(body, 'the request body');
  const algorithm = requireField(obj, 'algorithm', 'the request body');
  // The spec's enum lists one algorithm; like Synapse we accept any name, so newer algorithms work.
  if (typeof algorithm !== 'string' || !isPlainId(algorithm)) throw badJson(`"algorithm" must be a string of 1–${MAX_ID_BYTES} bytes, e.g. "m.megolm_backup.v1.curve25519-aes-sha2"`);
  const authData = opaqueJson(requireField(obj, 'auth_data', 'the request body'), '"auth_data"', MAX_AUTH_DATA_BYTES);
  const version = obj['version'];
  if (version !== undefined && typeof version !== 'string') throw badJson('"version" must be a string');
  return { algorithm, authData, ...(version !== undefined ? { version } : {}) };
}

/** One KeyBackupData object (key_backup_data.yaml). */
function parseKeyBackupData(value: unknown, roomId: string, sessionId: string, path: string): StoredRoomKey {
  const obj = requireObject(value, path);
  const firstMessageIndex = nonNegativeInteger(requireField(obj, 'first_message_index', path), `${path}.first_message_index`);
  const forwardedCount = nonNegativeInteger(requireField(obj, 'forwarded_count', path), `${path}.forwarded_count`);
  const isVerified = requireField(obj, 'is_verified', path);
  if (typeof isVerified !== 'boolean') throw badJson(`${path}.is_verified must be true or false`);
  const sessionData = opaqueJson(requireField(obj, 'session_data', path), `${path}.session_data`, MAX_SESSION_DATA_BYTES);
  return { roomId, sessionId, firstMessageIndex, forwardedCount, isVerified, sessionData };
}

/** A RoomKeyBackup object: `{"sessions": {<session ID>: KeyBackupData}}`. */
function parseRoomKeyBackup(value: unknown, roomId: string, path: string, out: StoredRoomKey[]): void {
  const sessions = requireObject(requireField(requireObject(value, path), 'sessions', path), `${path}.sessions`);
  for (const [sessionId, data] of Object.entries(sessions)) {
    const at = `${path}.sessions["${sessionId.slice(0, 80)}"]`;
    checkSessionId(sessionId, at);
    out.push(parseKeyBackupData(data, roomId, sessionId, at));
  }
}

/**
 * The keys in the body of PUT /room_keys/keys (`{"rooms": …}`), /room_keys/keys/{roomId}
 * (`{"sessions": …}`) or /room_keys/keys/{roomId}/{sessionId} (one KeyBackupData).
 */
export function parseRoomKeys(body: unknown, scope: { roomId?: string | undefined; sessionId?: string | undefined }): StoredRoomKey[] {
  const out: StoredRoomKey[] = [];
  if (scope.roomId !== undefined) {
    checkRoomId(scope.roomId, 'the room ID in the path');
    if (scope.sessionId !== undefined) {
      checkSessionId(scope.sessionId, 'the session ID in the path');
      out.push(parseKeyBackupData(body, scope.roomId, scope.sessionId, 'the request body'));
    } else {
      parseRoomKeyBackup(body, scope.roomId, 'the request body', out);
    }
    return out;
  }
  const rooms = requireObject(requireField(requireObject(body, 'the request body'), 'rooms', 'the request body'), 'rooms');
  for (const [roomId, room] of Object.entries(rooms)) {
    const at = `rooms["${roomId.slice(0, 80)}"]`;
    checkRoomId(roomId, at);
    parseRoomKeyBackup(room, roomId, at, out);
  }
  return out;
}
