/**
 * /sync and /keys/changes tokens: opaque to clients. To us `s<device-list position>_<to-device
 * position>`: where the device-list change stream was read up to, and the stream ID of the last
 * to-device message handed to the device (0: none yet). Tokens issued before to-device messages
 * existed, `s<device-list position>`, stay valid: they acknowledge no to-device message.
 * /keys/changes reads only the device-list part, so it takes either form.
 */
import { MatrixError } from '../matrix/errors.js';

export interface SyncPosition {
  readonly deviceLists: number;
  readonly toDevice: number;
}

const TOKEN = /^s(\d{1,15})(?:_(\d{1,15}))?$/;

export function syncToken(position: SyncPosition): string {
  return `s${position.deviceLists}_${position.toDevice}`;
}

export function parseSyncToken(token: string, name: string): SyncPosition {
  const m = TOKEN.exec(token);
  if (!m) throw new MatrixError('M_INVALID_PARAM', `"${name}" is not a token this server issued (expected the next_batch of a /sync)`);
  return { deviceLists: Number(m[1]), toDevice: Number(m[2] ?? 0) };
}

/** The device-list position of a token (/keys/changes). */
export function parseStreamToken(token: string, name: string): number {
  return parseSyncToken(token, name).deviceLists;
}
