/**
 * Signing and verifying JSON (appendices, "Signing Details" and "Checking for a Signature"), with
 * Ed25519 from node:crypto.
 */
import { createPrivateKey, createPublicKey, generateKeyPairSync, randomBytes, sign, verify, type KeyObject } from 'node:crypto';
import { canonicalJsonBytes } from './canonical-json.js';
import { decodeBase64, encodeUnpaddedBase64, isUnpaddedBase64OfLength } from './base64.js';

const PKCS8_ED25519_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');
const SPKI_ED25519_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

/** A key version is the part after `ed25519:`; the spec allows `[a-zA-Z0-9_]` there. */
export const KEY_VERSION = /^[a-zA-Z0-9_]+$/;

export interface SigningKey {
  /** `ed25519:<version>` */
  readonly keyId: string;
  readonly version: string;
  /** The 32-byte Ed25519 seed: what Synapse-format key files store. */
  readonly seed: Buffer;
  readonly privateKey: KeyObject;
  /** Unpadded base64 of the 32-byte public key. */
  readonly publicKey: string;
}

export function signingKeyFromSeed(version: string, seed: Buffer): SigningKey {
  if (!KEY_VERSION.test(version)) throw new Error(`key version "${version}" must match [a-zA-Z0-9_]+`);
  if (seed.length !== 32) throw new Error(`an ed25519 seed is 32 bytes, got ${seed.length}`);
  const privateKey = createPrivateKey({ key: Buffer.concat([PKCS8_ED25519_PREFIX, seed]), format: 'der', type: 'pkcs8' });
  const spki = createPublicKey(privateKey).export({ format: 'der', type: 'spki' });
  return {
    keyId: `ed25519:${version}`,
    version,
    seed: Buffer.from(seed),
    privateKey,
    publicKey: encodeUnpaddedBase64(spki.subarray(SPKI_ED25519_PREFIX.length)),
  };
}

/** A fresh key with a Synapse-style version (`a_` and four random characters) unless one is given. */
export function generateSigningKey(version?: string): SigningKey {
  const { privateKey } = generateKeyPairSync('ed25519');
  const pkcs8 = privateKey.export({ format: 'der', type: 'pkcs8' });
  const chars = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789';
  const v = version ?? `a_${Array.from(randomBytes(4), (b) => chars[b % chars.length]).join('')}`;
  return signingKeyFromSeed(v, pkcs8.subarray(PKCS8_ED25519_PREFIX.length));
}

const publicKeyCache = new Map<string, KeyObject | null>();

/** Parses an unpadded-base64 Ed25519 public key; cached, since verification is a hot path. */
export function ed25519PublicKey(base64: string): KeyObject | undefined {
  // 32 bytes are 43 characters of unpadded base64 (44 padded): longer input is no key, and is not remembered.
  if (base64.length > 44) return undefined;
  let key = publicKeyCache.get(base64);
  if (key === undefined) {
    key = null;
    if (isUnpaddedBase64OfLength(base64.replace(/=+$/, ''), 32)) {
      const raw = decodeBase64(base64);
      try {
        key = createPublicKey({ key: Buffer.concat([SPKI_ED25519_PREFIX, raw!]), format: 'der', type: 'spki' });
      } catch {
        key = null;
      }
    }
    if (publicKeyCache.size >= 10_000) publicKeyCache.clear();
    publicKeyCache.set(base64, key);
  }
  return key ?? undefined;
}

export function signBytes(key: SigningKey, message: Uint8Array): string {
  return encodeUnpaddedBase64(sign(null, message, key.privateKey));
}

/** Verifies a detached Ed25519 signature; false for any malformed key or signature. */
export function verifyBytes(publicKeyBase64: string, message: Uint8Array, signatureBase64: string): boolean {
  const key = ed25519PublicKey(publicKeyBase64);
  if (!key) return false;
  const sig = decodeBase64(signatureBase64);
  if (!sig || sig.length !== 64) return false;
  return verify(null, message, key, sig);
}

/**
 * The same check, run on libuv's thread pool: the event loop goes on serving other requests
 * while the signature is checked, so verification uses the machine's other cores.
 */
export function verifyBytesAsync(publicKeyBase64: string, message: Uint8Array, signatureBase64: string): Promise<boolean> {
  const key = ed25519PublicKey(publicKeyBase64);
  const sig = key ? decodeBase64(signatureBase64) : undefined;
  if (!key || !sig || sig.length !== 64) return Promise.resolve(false);
  return new Promise((resolve) => verify(null, message, key, sig, (err, ok) => resolve(!err && ok)));
}

type JsonObject = Record<string, unknown>;

/** The bytes a signature covers: the object without `signatures` and `unsigned`, canonicalised. */
export function signedBytes(obj: JsonObject): Buffer {
  const { signatures: _s, unsigned: _u, ...rest } = obj;
  return canonicalJsonBytes(rest);
}

/**
 * Returns a copy of `obj` with our signature added under `signatures[entity][keyId]`. Signatures
 * already present (from other entities or keys) are kept; `unsigned` is carried over unchanged.
 */
export type Signatures = Record<string, Record<string, string>>;

export function signJson<T extends JsonObject>(obj: T, entity: string, key: SigningKey): T & { signatures: Signatures } {
  const signature = signBytes(key, signedBytes(obj));
  const existing = (isObject(obj['signatures']) ? obj['signatures'] : {}) as Signatures;
  const forEntity = isObject(existing[entity]) ? existing[entity] : {};
  return { ...obj, signatures: { ...existing, [entity]: { ...forEntity, [key.keyId]: signature } } };
}

/** The signature `obj` carries from `entity` with `keyId`, if it is a string. */
export function getSignature(obj: JsonObject, entity: string, keyId: string): string | undefined {
  const sigs = obj['signatures'];
  if (!isObject(sigs)) return undefined;
  const forEntity = sigs[entity];
  if (!isObject(forEntity)) return undefined;
  const sig = forEntity[keyId];
  return typeof sig === 'string' ? sig : undefined;
}

/**
 * Checks that `entity` signed `obj` with the Ed25519 key `keyId` whose public key is
 * `publicKeyBase64` (steps 1 and 4–7 of "Checking for a Signature"; the caller has picked the key).
 * Throws CanonicalJsonError when the object cannot be canonicalised, so callers can say why.
 */
export function verifyJsonSignature(obj: JsonObject, entity: string, keyId: string, publicKeyBase64: string): boolean {
  if (!keyId.startsWith('ed25519:')) return false;
  const sig = getSignature(obj, entity, keyId);
  if (sig === undefined) return false;
  return verifyBytes(publicKeyBase64, signedBytes(obj), sig);
}

/**
 * The full check: `entity` must have at least one ed25519 signature on `obj` made by one of
 * `keys` (key ID → public key); every ed25519 signature whose key we know must verify.
 * Returns a reason string on failure, undefined on success.
 */
export function checkJsonSignature(obj: JsonObject, entity: string, keys: ReadonlyMap<string, string>): string | undefined {
  const sigs = obj['signatures'];
  const forEntity = isObject(sigs) ? sigs[entity] : undefined;
  if (!isObject(forEntity)) return `no signature from ${entity}`;
  const known = Object.keys(forEntity).filter((id) => id.startsWith('ed25519:'));
  if (known.length === 0) return `no ed25519 signature from ${entity}`;
  const usable = known.filter((id) => keys.has(id));
  if (usable.length === 0) return `no known verification key among ${known.join(', ')}`;
  const bytes = signedBytes(obj);
  for (const id of usable) {
    const sig = forEntity[id];
    if (typeof sig !== 'string' || !verifyBytes(keys.get(id)!, bytes, sig)) return `signature ${id} from ${entity} does not verify`;
  }
  return undefined;
}

export function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
