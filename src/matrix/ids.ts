/**
 * Identifier grammar (appendices, "Identifier Grammar"): server names, user IDs, device IDs.
 */

const IPV4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/;
const IPV6_CHARS = /^[0-9A-Fa-f:.]{2,45}$/;
const DNS_NAME = /^[0-9A-Za-z.-]{1,255}$/;
const PORT = /^\d{1,5}$/;

export interface ServerNameParts {
  /** The hostname as written: a DNS name, an IPv4 literal, or an IPv6 literal with brackets. */
  readonly host: string;
  readonly port: number | undefined;
  readonly kind: 'dns' | 'ipv4' | 'ipv6';
}

/** Parses `hostname [":" port]`; undefined when the string is not a valid server name. */
export function parseServerName(name: string): ServerNameParts | undefined {
  let host = name;
  let portText: string | undefined;
  if (name.startsWith('[')) {
    const close = name.indexOf(']');
    if (close < 0) return undefined;
    host = name.slice(0, close + 1);
    const rest = name.slice(close + 1);
    if (rest !== '') {
      if (!rest.startsWith(':')) return undefined;
      portText = rest.slice(1);
    }
    if (!IPV6_CHARS.test(host.slice(1, -1)) || !host.includes(':')) return undefined;
  } else {
    const colon = name.lastIndexOf(':');
    if (colon >= 0) {
      host = name.slice(0, colon);
      portText = name.slice(colon + 1);
    }
  }
  let port: number | undefined;
  if (portText !== undefined) {
    if (!PORT.test(portText)) return undefined;
    port = Number(portText);
    if (port > 65535) return undefined;
  }
  if (host.startsWith('[')) return { host, port, kind: 'ipv6' };
  const v4 = IPV4.exec(host);
  if (v4) {
    if (v4.slice(1).some((octet) => Number(octet) > 255)) return undefined;
    return { host, port, kind: 'ipv4' };
  }
  if (!DNS_NAME.test(host)) return undefined;
  // Conventional hostname labels: non-empty, alphanumerics and hyphens.
  if (host.split('.').some((label, i, all) => label === '' && !(i === all.length - 1 && i > 0))) return undefined;
  return { host, port, kind: 'dns' };
}

export function isValidServerName(name: string): boolean {
  return parseServerName(name) !== undefined;
}

export const MAX_USER_ID_BYTES = 255;
const LOCALPART = /^[a-z0-9._=\-/+]+$/;

export interface UserIdParts {
  readonly localpart: string;
  readonly serverName: string;
}

/**
 * Splits `@localpart:server_name` at the first colon (the server name may itself contain one).
 * Accepts historical localparts (any code points but `:` and NUL) because the spec says servers
 * MUST accept them; isValidNewLocalpart is the stricter grammar we allocate with.
 */
const parsedUserIds = new Map<string, UserIdParts | undefined>();

export function parseUserId(userId: string): UserIdParts | undefined {
  // Cheap refusal before the cache, so over-long input is never remembered.
  if (userId.length > MAX_USER_ID_BYTES) return undefined;
  // The same few user IDs are parsed over and over on hot paths; the answer never changes.
  if (parsedUserIds.has(userId)) return parsedUserIds.get(userId);
  const parts = parseUserIdUncached(userId);
  if (parsedUserIds.size >= 10_000) parsedUserIds.clear();
  parsedUserIds.set(userId, parts);
  return parts;
}

function parseUserIdUncached(userId: string): UserIdParts | undefined {
  if (!userId.startsWith('@')) return undefined;
  if (Buffer.byteLength(userId, 'utf8') > MAX_USER_ID_BYTES) return undefined;
  const colon = userId.indexOf(':');
  if (colon < 0) return undefined;
  const localpart = userId.slice(1, colon);
  const serverName = userId.slice(colon + 1);
  if (localpart.includes('\0') || !localpart.isWellFormed()) return undefined;
  if (!isValidServerName(serverName)) return undefined;
  return Object.freeze({ localpart, serverName });
}

/** The current grammar for localparts, which is what we allocate for new users. */
export function isValidNewLocalpart(localpart: string): boolean {
  return LOCALPART.test(localpart);
}

export function userIdFor(localpart: string, serverName: string): string {
  return `@${localpart}:${serverName}`;
}

/** True when `userId` is syntactically valid and hosted on `serverName` (case-sensitive). */
export function isLocalUser(userId: string, serverName: string): boolean {
  const parts = parseUserId(userId);
  return parts !== undefined && parts.serverName === serverName;
}

/**
 * Device IDs are opaque strings in the spec. We accept 1–255 printable ASCII characters without
 * spaces: wide enough for every client we know (including base64 dehydrated-device IDs), narrow
 * enough that a device ID never needs escaping in a key ID, log line or URL path segment.
 */
const DEVICE_ID = /^[\x21-\x7e]{1,255}$/;

export function isValidDeviceId(deviceId: string): boolean {
  return DEVICE_ID.test(deviceId);
}

/** Algorithm names and key IDs (`<algorithm>:<key_id>`) follow the same rule as device IDs. */
export const isValidKeyPart = isValidDeviceId;
