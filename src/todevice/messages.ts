/**
 * The shapes of to-device messages (send_to_device.md, to_device.yaml, m.direct_to_device.yaml):
 * checking a client's `messages` map and a received EDU, the event text a device receives, and
 * the EDUs that carry messages to another server. Nothing here stores anything.
 */
import { MatrixError } from '../matrix/errors.js';
import { canonicalJson, CanonicalJsonError } from '../matrix/canonical-json.js';
import { isValidDeviceId, parseUserId } from '../matrix/ids.js';
import { isObject } from '../matrix/signing.js';
import { badJson, requireObject, requireObjectField } from '../keys/validate.js';

/**
 * Synapse's MAX_EDU_SIZE: it refuses to send an m.direct_to_device EDU larger than 64 KiB of
 * canonical JSON, and so do we; messages to one server are spread over as many EDUs as needed.
 */
export const MAX_EDU_BYTES = 65_536;
/** One message's content: with the longest IDs around it, its EDU still fits in MAX_EDU_BYTES. */
export const MAX_MESSAGE_BYTES = 60 * 1024;
/** Event types, transaction IDs and message IDs: the spec sets no limit; these are far above any in use. */
const MAX_ID_LENGTH = 255;

/** One message of a request: for a device, or for all of a user's devices (`*`). */
export interface DeviceMessage {
  readonly userId: string;
  readonly deviceId: string;
  /** The content as canonical JSON text. */
  readonly content: string;
}

/** `{"content":…,"sender":…,"type":…}`: the event a device receives in /sync. */
export function eventText(sender: string, type: string, content: string): string {
  return `{"content":${content},"sender":${JSON.stringify(sender)},"type":${JSON.stringify(type)}}`;
}

/** An event type or transaction ID from a request path: 1 to 255 characters. */
export function checkPathId(value: string, name: string): void {
  if (value.length === 0 || value.length > MAX_ID_LENGTH) throw new MatrixError('M_INVALID_PARAM', `${name} must be 1 to ${MAX_ID_LENGTH} characters`);
}

/**
 * The `messages` of a PUT /sendToDevice body, checked: user IDs, device IDs (or `*`), contents
 * that are objects of at most MAX_MESSAGE_BYTES of canonical JSON (they may have to travel to
 * another server, signed). More than `maxMessages` device entries is a 413 naming the setting.
 */
export function parseSendBody(body: unknown, maxMessages: number): DeviceMessage[] {
  const messages = requireObjectField(body, 'messages');
  const out: DeviceMessage[] = [];
  for (const [userId, byDevice] of Object.entries(messages)) {
    if (!parseUserId(userId)) throw new MatrixError('M_INVALID_PARAM', `messages: "${userId.slice(0, 300)}" is not a valid user ID`);
    for (const [deviceId, content] of Object.entries(requireObject(byDevice, `messages["${userId}"]`))) {
      const path = `messages["${userId}"]["${deviceId.slice(0, 300)}"]`;
      if (!isValidDeviceId(deviceId)) throw new MatrixError('M_INVALID_PARAM', `${path}: not a valid device ID (1-255 printable ASCII characters, or "*" for all devices)`);
      if (!isObject(content)) throw badJson(path, 'an object (the message content)');
      if (out.length >= maxMessages) {
        throw new MatrixError('M_TOO_LARGE', `The request carries more than ${maxMessages} messages, the most this server takes at once (to_device.max_messages_per_request); send them in several requests`);
      }
      let text: string;
      try {
        text = canonicalJson(content);
      } catch (e) {
        if (e instanceof CanonicalJsonError) throw badJson(path, `canonical JSON, so that it can be signed for other servers (${e.message})`);
        throw e;
      }
      if (Buffer.byteLength(text) > MAX_MESSAGE_BYTES) {
        throw new MatrixError('M_TOO_LARGE', `${path} is ${Buffer.byteLength(text)} bytes; a to-device message may be at most ${MAX_MESSAGE_BYTES} bytes`);
      }
      out.push({ userId, deviceId, content: text });
    }
  }
  return out;
}

/** A received m.direct_to_device EDU, checked. */
export interface DirectToDevice {
  readonly sender: string;
  readonly type: string;
  readonly messageId: string;
  /** Messages for users of this server. */
  readonly messages: DeviceMessage[];
  /** Entries left out (not for a user of ours, a malformed device ID or content), for the log. */
  readonly skipped: number;
  /** Entries for users of ours whose content is larger than MAX_MESSAGE_BYTES: dropped. */
  readonly tooLarge: number;
  /** Entries for users of ours beyond the first `maxMessages`: dropped. */
  readonly tooMany: number;
}

/**
 * Checks an m.direct_to_device EDU from `origin`: the sender must be a user of `origin`; entries
 * for users of other servers, malformed device IDs and contents that are not objects are left out
 * (Synapse fails the whole transaction for a user of another server, which makes the origin send
 * it again forever; one bad entry should not hold up the others). Entries are held to the limits
 * of a local request: contents of at most MAX_MESSAGE_BYTES, at most `maxMessages` entries (the
 * first ones); the rest are dropped and counted. A string says why the EDU as a whole cannot be used.
 */
export function parseDirectToDevice(origin: string, content: unknown, serverName: string, maxMessages: number): DirectToDevice | string {
  if (!isObject(content)) return 'the content is not an object';
  const { sender, type, message_id: messageId, messages } = content;
  if (typeof sender !== 'string' || !parseUserId(sender)) return 'sender is not a user ID';
  if (parseUserId(sender)!.serverName !== origin) return `the sender ${sender} is not a user of ${origin}, the server that sent it`;
  if (typeof type !== 'string' || type.length === 0 || type.length > MAX_ID_LENGTH) return `type must be a string of 1 to ${MAX_ID_LENGTH} characters`;
  if (typeof messageId !== 'string' || messageId.length === 0 || messageId.length > MAX_ID_LENGTH) return `message_id must be a string of 1 to ${MAX_ID_LENGTH} characters`;
  if (!isObject(messages)) return 'messages is not an object';
  const out: DeviceMessage[] = [];
  let skipped = 0;
  let tooLarge = 0;
  let tooMany = 0;
  for (const [userId, byDevice] of Object.entries(messages)) {
    const local = parseUserId(userId)?.serverName === serverName;
    for (const [deviceId, body] of Object.entries(isObject(byDevice) ? byDevice : {})) {
      if (!local || !isValidDeviceId(deviceId) || !isObject(body)) {
        skipped++;
        continue;
      }
      if (out.length >= maxMessages) {
        tooMany++;
        continue;
      }
      const text = JSON.stringify(body);
      if (Buffer.byteLength(text) > MAX_MESSAGE_BYTES) tooLarge++;
      else out.push({ userId, deviceId, content: text });
    }
    if (!isObject(byDevice)) skipped++;
  }
  return { sender, type, messageId, messages: out, skipped, tooLarge, tooMany };
}

/** An m.direct_to_device EDU content as JSON text, with the number of device entries it carries. */
export interface OutgoingEdu {
  readonly json: string;
  readonly messages: number;
}

/**
 * The m.direct_to_device EDU contents that carry `messages` (all for users of one server), each
 * at most MAX_EDU_BYTES with the EDU around it. A user's messages stay in one EDU unless they
 * alone do not fit; then they are spread over several, one device entry at a time.
 */
export function directToDeviceEdus(sender: string, type: string, messages: readonly DeviceMessage[], newMessageId: () => string): OutgoingEdu[] {
  const byUser = new Map<string, string[]>();
  for (const m of messages) {
    const entries = byUser.get(m.userId);
    const entry = `${JSON.stringify(m.deviceId)}:${m.content}`;
    if (entries) entries.push(entry);
    else byUser.set(m.userId, [entry]);
  }
  const edus: OutgoingEdu[] = [];
  const head = () => `{"message_id":${JSON.stringify(newMessageId())},"messages":{`;
  const tail = `},"sender":${JSON.stringify(sender)},"type":${JSON.stringify(type)}}`;
  const push = (users: string, count: number) => edus.push({ json: `${head()}${users}${tail}`, messages: count });
  // Room for the head (message_id) and the EDU around the content: {"content":…,"edu_type":…}
  const budget = MAX_EDU_BYTES - Buffer.byteLength(tail) - 128;
  let users: string[] = [];
  let size = 0;
  let count = 0;
  const flush = () => {
    if (users.length === 0) return;
    push(users.join(','), count);
    users = [];
    size = 0;
    count = 0;
  };
  for (const [userId, entries] of byUser) {
    const key = JSON.stringify(userId);
    const whole = `${key}:{${entries.join(',')}}`;
    const wholeSize = Buffer.byteLength(whole) + 1;
    if (size + wholeSize > budget) flush();
    if (size + wholeSize <= budget) {
      users.push(whole);
      size += wholeSize;
      count += entries.length;
      continue;
    }
    // One user's messages alone are too large: one EDU per group of devices that fits.
    let part: string[] = [];
    let partSize = Buffer.byteLength(key) + 4;
    for (const entry of entries) {
      const entrySize = Buffer.byteLength(entry) + 1;
      if (part.length > 0 && partSize + entrySize > budget) {
        push(`${key}:{${part.join(',')}}`, part.length);
        part = [];
        partSize = Buffer.byteLength(key) + 4;
      }
      part.push(entry);
      partSize += entrySize;
    }
    if (part.length > 0) push(`${key}:{${part.join(',')}}`, part.length);
  }
  flush();
  return edus;
}
