/**
 * Cross-signing: POST /keys/device_signing/upload and POST /keys/signatures/upload
 * (cross_signing.yaml; e2e spec "Cross-signing" and "Key and signature security").
 * Uses the KeysStore only; user-interactive auth is a function handed in by the composition root.
 */
import { MatrixError, type Errcode } from '../matrix/errors.js';
import { canonicalJson, CanonicalJsonError } from '../matrix/canonical-json.js';
import { isValidKeyPart, parseUserId } from '../matrix/ids.js';
import { getSignature, isObject, verifyJsonSignature } from '../matrix/signing.js';
import type { CrossSigningKeyType, KeysStore, KeysTransaction, StoredCrossSigningKey, StoredSignature } from '../storage/store.js';
import { signedContent } from './json-text.js';
import { requireObject, signedBy, validateCrossSigningKey, type ValidCrossSigningKey } from './validate.js';
import type { Requester } from './service.js';

type JsonObject = Record<string, unknown>;

/** Runs user-interactive auth for a request: resolves when complete, throws the 401 to answer otherwise. */
export type RequireUserInteractiveAuth = (requester: Requester, request: { method: string; path: string; body: JsonObject }) => Promise<void>;

export interface CrossSigningOptions {
  readonly store: KeysStore;
  readonly serverName: string;
  readonly requireUserInteractiveAuth: RequireUserInteractiveAuth;
  readonly now?: () => number;
}

const KEY_FIELDS: readonly [string, CrossSigningKeyType][] = [
  ['master_key', 'master'],
  ['self_signing_key', 'self_signing'],
  ['user_signing_key', 'user_signing'],
];

/** Thrown inside the transaction when another request stored a master key meanwhile. */
class NeedsAuthNow extends Error {}

function failure(errcode: Errcode, error: string): { errcode: Errcode; error: string } {
  return { errcode, error };
}

export class CrossSigning {
  private readonly now: () => number;

  constructor(private readonly options: CrossSigningOptions) {
    this.now = options.now ?? Date.now;
  }

  /** Whether `key` is exactly what is stored for its type. */
  private static same(stored: StoredCrossSigningKey | undefined, key: ValidCrossSigningKey): boolean {
    if (stored === undefined) return false;
    try {
      return canonicalJson(JSON.parse(stored.json)) === canonicalJson(key.object);
    } catch {
      return false;
    }
  }

  /** Whether uploading `keys` replaces anything stored (MSC3967: only then is UIA needed). */
  private static needsAuth(stored: readonly StoredCrossSigningKey[], keys: readonly ValidCrossSigningKey[]): boolean {
    if (!stored.some((k) => k.keyType === 'master')) return false;
    return keys.some((k) => !CrossSigning.same(stored.find((s) => s.keyType === k.keyType), k));
  }

  /** The self-signing and user-signing keys among `keys` must be signed by the master key `master`. */
  private static checkSignedByMaster(userId: string, keys: readonly ValidCrossSigningKey[], master: string | undefined): void {
    for (const k of keys) {
      if (k.keyType === 'master') continue;
      const field = k.keyType === 'self_signing' ? 'self_signing_key' : 'user_signing_key';
      if (master === undefined) throw new MatrixError('M_MISSING_PARAM', `${field} needs a master key to be signed by, and none is available: upload master_key too`);
      if (!signedBy(k.object, userId, master, field)) {
        throw new MatrixError('M_INVALID_SIGNATURE', `${field} must be signed by the master key ed25519:${master}`);
      }
    }
  }

  /** POST /keys/device_signing/upload */
  async uploadKeys(requester: Requester, body: JsonObject, request: { method: string; path: string }): Promise<void> {
    const userId = requester.userId;
    const keys = KEY_FIELDS.filter(([field]) => body[field] !== undefined && body[field] !== null).map(([field, type]) =>
      validateCrossSigningKey(body[field], field, userId, type),
    );
    if (keys.length === 0) return;
    const stored = await this.options.store.getCrossSigningKeys([userId]);
    const uploadedMaster = keys.find((k) => k.keyType === 'master')?.publicKey;
    CrossSigning.checkSignedByMaster(userId, keys, uploadedMaster ?? stored.find((k) => k.keyType === 'master')?.publicKey);

    let authenticated = false;
    // An admin may have allowed one replacement without UIA for a while (Synapse's admin API):
    // then the permission is used up inside the transaction that replaces the keys, so two
    // uploads cannot both get in; without it, UIA comes first.
    if (CrossSigning.needsAuth(stored, keys) && (await this.options.store.masterKeyReplaceableWithoutUiaUntil(userId)) <= this.now()) {
      await this.options.requireUserInteractiveAuth(requester, { ...request, body });
      authenticated = true;
    }
    const store = async (tx: KeysTransaction): Promise<void> => {
      // Two first uploads at once: the second must see the first's keys (and then need auth).
      await tx.lockUser(userId);
      const current = await tx.getCrossSigningKeys(userId);
      if (!authenticated && CrossSigning.needsAuth(current, keys) && !(await tx.takeReplacementWithoutUia(userId, this.now()))) throw new NeedsAuthNow();
      // The stored master key may have changed since the check above.
      if (uploadedMaster === undefined) CrossSigning.checkSignedByMaster(userId, keys, current.find((k) => k.keyType === 'master')?.publicKey);
      const devices = new Set(await tx.deviceIds(userId));
      for (const k of keys) {
        if (devices.has(k.publicKey)) throw new MatrixError('M_FORBIDDEN', `The public key of the ${k.keyType} key is the ID of one of your devices; generate a new key`);
      }
      for (const k of keys) {
        const old = current.find((c) => c.keyType === k.keyType);
        const json = JSON.stringify(k.object);
        if (CrossSigning.same(old, k)) continue;
        if (old && old.publicKey !== k.publicKey) await tx.deleteSignaturesOfKey(userId, old.publicKey);
        await tx.putCrossSigningKey({ userId, keyType: k.keyType, publicKey: k.publicKey, json });
        // Only the owner ever sees their user-signing key.
        await tx.recordDeviceListChange(userId, null, k.keyType === 'user_signing' ? userId : undefined);
      }
    };
    try {
      await this.options.store.transaction(store);
    } catch (e) {
      if (!(e instanceof NeedsAuthNow)) throw e;
      await this.options.requireUserInteractiveAuth(requester, { ...request, body });
      authenticated = true;
      await this.options.store.transaction(store);
    }
  }

  /**
   * POST /keys/signatures/upload. Accepted: the caller's self-signing key on the caller's devices,
   * the caller's devices on the caller's master key, and the caller's user-signing key on another
   * user's master key (a user of another server: as last fetched from their server). Each
   * signature is verified, and the signed object must be the stored key. Per-item problems are
   * returned as `failures`; valid signatures are stored.
   */
  async uploadSignatures(requester: Requester, body: JsonObject): Promise<{ failures: Record<string, Record<string, { errcode: Errcode; error: string }>> }> {
    const me = requester.userId;
    for (const [userId, keys] of Object.entries(body)) {
      if (!parseUserId(userId)) throw new MatrixError('M_INVALID_PARAM', `"${userId}" is not a valid user ID`);
      requireObject(keys, `["${userId}"]`);
    }
    const failures: Record<string, Record<string, { errcode: Errcode; error: string }>> = {};
    const fail = (userId: string, keyId: string, f: { errcode: Errcode; error: string }) => {
      (failures[userId] ??= {})[keyId] = f;
    };

    await this.options.store.transaction(async (tx) => {
      const mine = await tx.getCrossSigningKeys(me);
      const myKey = (t: CrossSigningKeyType) => mine.find((k) => k.keyType === t);
      const accepted: StoredSignature[] = [];
      const changes: { userId: string; deviceId: string | null; privateTo?: string }[] = [];

      for (const [targetUser, keys] of Object.entries(body)) {
        for (const [keyId, signed] of Object.entries(keys as JsonObject)) {
          if (!isObject(signed)) {
            fail(targetUser, keyId, failure('M_BAD_JSON', 'The signed key must be an object'));
            continue;
          }
          if (!isValidKeyPart(keyId)) {
            fail(targetUser, keyId, failure('M_NOT_FOUND', 'No device or cross-signing key has this ID'));
            continue;
          }
          try {
            const result = targetUser === me ? await this.ownSignature(tx, me, keyId, signed, myKey) : await this.userSignature(tx, me, targetUser, keyId, signed, myKey);
            if ('errcode' in result) fail(targetUser, keyId, result);
            else {
              accepted.push(...result.signatures);
              changes.push(result.change);
            }
          } catch (e) {
            if (e instanceof CanonicalJsonError) fail(targetUser, keyId, failure('M_BAD_JSON', `The signed object is not canonical JSON: ${e.message}`));
            else throw e;
          }
        }
      }
      await tx.putSignatures(accepted);
      for (const c of changes) await tx.recordDeviceListChange(c.userId, c.deviceId, c.privateTo);
    });
    return { failures };
  }

  /** The caller signs one of their own keys: a device (with the self-signing key) or the master key (with a device). */
  private async ownSignature(
    tx: KeysTransaction,
    me: string,
    keyId: string,
    signed: JsonObject,
    myKey: (t: CrossSigningKeyType) => StoredCrossSigningKey | undefined,
  ): Promise<{ errcode: Errcode; error: string } | { signatures: StoredSignature[]; change: { userId: string; deviceId: string | null } }> {
    const master = myKey('master');
    if (master && keyId === master.publicKey) {
      if (signedContent(signed) !== signedContent(JSON.parse(master.json) as JsonObject)) {
        return failure('M_INVALID_SIGNATURE', 'The signed object is not your current master key');
      }
      const signatures: StoredSignature[] = [];
      const bySigner = isObject(signed['signatures']) && isObject(signed['signatures'][me]) ? (signed['signatures'][me] as JsonObject) : {};
      for (const [signerKeyId, signature] of Object.entries(bySigner)) {
        if (!signerKeyId.startsWith('ed25519:') || typeof signature !== 'string') continue;
        const deviceId = signerKeyId.slice('ed25519:'.length);
        if (deviceId === master.publicKey) continue;
        const deviceJson = await tx.getDeviceKeys(me, deviceId);
        if (deviceJson === undefined) continue;
        const deviceKey = ((JSON.parse(deviceJson) as JsonObject)['keys'] as Record<string, string>)[signerKeyId];
        if (deviceKey === undefined || !verifyJsonSignature(signed, me, signerKeyId, deviceKey)) {
          return failure('M_INVALID_SIGNATURE', `The signature by device ${deviceId} does not verify`);
        }
        signatures.push({ targetUserId: me, targetKeyId: master.publicKey, signerUserId: me, signerKeyId, signature });
      }
      if (signatures.length === 0) return failure('M_INVALID_SIGNATURE', 'No signature by one of your devices was found on your master key');
      return { signatures, change: { userId: me, deviceId: null } };
    }

    const deviceJson = await tx.getDeviceKeys(me, keyId);
    if (deviceJson === undefined) return failure('M_NOT_FOUND', `${keyId} is neither one of your devices with keys nor your master key`);
    const selfSigning = myKey('self_signing');
    if (!selfSigning) return failure('M_NOT_FOUND', 'You have no self-signing key to sign devices with; upload one first');
    if (signedContent(signed) !== signedContent(JSON.parse(deviceJson) as JsonObject)) {
      return failure('M_INVALID_SIGNATURE', `The signed object is not the stored device keys of ${keyId}`);
    }
    const signerKeyId = `ed25519:${selfSigning.publicKey}`;
    const signature = getSignature(signed, me, signerKeyId);
    if (signature === undefined) return failure('M_INVALID_SIGNATURE', `The device keys are not signed by your self-signing key ${signerKeyId}`);
    if (!verifyJsonSignature(signed, me, signerKeyId, selfSigning.publicKey)) return failure('M_INVALID_SIGNATURE', 'The self-signing signature does not verify');
    return { signatures: [{ targetUserId: me, targetKeyId: keyId, signerUserId: me, signerKeyId, signature }], change: { userId: me, deviceId: keyId } };
  }

  /** The caller signs another user's master key with their user-signing key. */
  private async userSignature(
    tx: KeysTransaction,
    me: string,
    targetUser: string,
    keyId: string,
    signed: JsonObject,
    myKey: (t: CrossSigningKeyType) => StoredCrossSigningKey | undefined,
  ): Promise<{ errcode: Errcode; error: string } | { signatures: StoredSignature[]; change: { userId: string; deviceId: string | null; privateTo: string } }> {
    const userSigning = myKey('user_signing');
    if (!userSigning) return failure('M_NOT_FOUND', 'You have no user-signing key to sign other users with; upload one first');
    // A user of another server: their master key as this server last fetched it (keys.yaml: "previously uploaded or retrieved").
    const local = parseUserId(targetUser)?.serverName === this.options.serverName;
    const theirMaster = (local ? await tx.getCrossSigningKeys(targetUser) : await tx.getRemoteCrossSigningKeys(targetUser)).find((k) => k.keyType === 'master');
    if (!theirMaster || theirMaster.publicKey !== keyId) return failure('M_NOT_FOUND', `${keyId} is not the current master key of ${targetUser}`);
    if (signedContent(signed) !== signedContent(JSON.parse(theirMaster.json) as JsonObject)) {
      return failure('M_INVALID_SIGNATURE', `The signed object is not the stored master key of ${targetUser}`);
    }
    const signerKeyId = `ed25519:${userSigning.publicKey}`;
    const signature = getSignature(signed, me, signerKeyId);
    if (signature === undefined) return failure('M_INVALID_SIGNATURE', `The master key is not signed by your user-signing key ${signerKeyId}`);
    if (!verifyJsonSignature(signed, me, signerKeyId, userSigning.publicKey)) return failure('M_INVALID_SIGNATURE', 'The user-signing signature does not verify');
    return {
      signatures: [{ targetUserId: targetUser, targetKeyId: keyId, signerUserId: me, signerKeyId, signature }],
      // Only the signer may learn of it (social graph).
      change: { userId: targetUser, deviceId: null, privateTo: me },
    };
  }
}
