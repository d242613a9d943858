/**
 * Checking another server's key response (`/_matrix/key/v2/server`, or one entry of a notary's
 * answer) before any of it is used: the right server name, well-formed keys, and every signature
 * of the server on it made by its own verify keys. The validity we grant is capped at 7 days, as
 * the spec requires.
 */
import { checkJsonSignature, isObject, KEY_VERSION } from '../matrix/signing.js';
import { isUnpaddedBase64OfLength } from '../matrix/base64.js';
import { CanonicalJsonError } from '../matrix/canonical-json.js';

export const MAX_KEY_VALIDITY_MS = 7 * 24 * 3_600_000;

type JsonObject = Record<string, unknown>;

/** A checked key response: its keys and the validity we grant them. */
export interface CheckedKeys {
  readonly object: JsonObject;
  readonly validUntilTs: number;
  readonly keys: { keyId: string; verifyKey: string; expiredTs: number | null }[];
}

/**
 * Checks a `/_matrix/key/v2/server` object claimed to be `serverName`'s: right name, well-formed
 * keys, and signed by (every one of its signatures from) its own verify keys.
 * Returns a reason string when it is not acceptable.
 */
export function checkServerKeys(body: unknown, serverName: string, now: number): CheckedKeys | string {
  if (!isObject(body)) return 'the key response is not a JSON object';
  if (body['server_name'] !== serverName) return `the key response is for ${JSON.stringify(body['server_name'])}, not ${serverName}`;
  const validUntil = body['valid_until_ts'];
  if (typeof validUntil !== 'number' || !Number.isSafeInteger(validUntil)) return 'the key response has no valid_until_ts';
  const verifyKeys = body['verify_keys'];
  if (!isObject(verifyKeys)) return 'the key response has no verify_keys';
  const keys: CheckedKeys['keys'] = [];
  const current = new Map<string, string>();
  for (const [keyId, k] of Object.entries(verifyKeys)) {
    const [alg, version] = keyId.split(':', 2);
    if (alg !== 'ed25519' || version === undefined || !KEY_VERSION.test(version)) continue;
    if (!isObject(k) || typeof k['key'] !== 'string' || !isUnpaddedBase64OfLength(k['key'], 32)) return `verify_keys["${keyId}"] is not an unpadded base64 Ed25519 key`;
    current.set(keyId, k['key']);
    keys.push({ keyId, verifyKey: k['key'], expiredTs: null });
  }
  if (current.size === 0) return 'the key response lists no ed25519 verify key';
  const old = body['old_verify_keys'];
  if (isObject(old)) {
    for (const [keyId, k] of Object.entries(old)) {
      if (current.has(keyId) || !isObject(k) || typeof k['key'] !== 'string' || typeof k['expired_ts'] !== 'number') continue;
      if (!keyId.startsWith('ed25519:') || !isUnpaddedBase64OfLength(k['key'], 32)) continue;
      keys.push({ keyId, verifyKey: k['key'], expiredTs: k['expired_ts'] });
    }
  }
  let problem: string | undefined;
  try {
    problem = checkJsonSignature(body, serverName, current);
  } catch (e) {
    if (e instanceof CanonicalJsonError) return `the key response is not canonical JSON: ${e.message}`;
    throw e;
  }
  if (problem) return `the key response's self-signature is not valid: ${problem}`;
  return { object: body, validUntilTs: Math.min(validUntil, now + MAX_KEY_VALIDITY_MS), keys };
}

