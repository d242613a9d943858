/**
 * The end-to-end key rules: upload, claim, query, changes, cross-signing keys and signatures, and
 * the key parts of /sync. Used by the client-server API and, with a server as the viewer, by the
 * federation API. Uses the KeysStore and DeviceListsStore only; no HTTP, no driver.
 */
import { MatrixError } from '../matrix/errors.js';
import { canonicalJson } from '../matrix/canonical-json.js';
import { isLocalUser, isValidDeviceId, isValidKeyPart, parseUserId } from '../matrix/ids.js';
import type { ClaimRequest, DeviceListsStore, KeysStore, StoredCrossSigningKey, StoredSignature } from '../storage/store.js';
import { sameKeyIgnoringSignatures, withSignatures, withUnsigned } from './json-text.js';
import { badJson, checkTimeout, parseKeyMap, requireObject, requireObjectField, validateDeviceKeys } from './validate.js';

/** The user and device making a client request. */
export interface Requester {
  readonly userId: string;
  readonly deviceId: string;
}

/** Who reads keys: a local user, or another server (no user: only owners' own signatures show). */
export type Viewer = { readonly userId: string } | null;

export interface KeysOptions {
  readonly store: KeysStore;
  readonly deviceLists: DeviceListsStore;
  readonly serverName: string;
  readonly maxOneTimeKeysPerDevice: number;
}

/** A `failures` entry for a server we could not ask. */
export interface ServerFailure {
  readonly status: number;
  readonly message: string;
}

type JsonObject = Record<string, unknown>;

/** `{"k":v,…}` from keys and already-encoded JSON values. */
export function objectText(entries: Iterable<readonly [string, string]>): string {
  let out = '{';
  let first = true;
  for (const [k, v] of entries) {
    if (!first) out += ',';
    first = false;
    out += `${JSON.stringify(k)}:${v}`;
  }
  return `${out}}`;
}

/** Longest a /sync waits for news, whatever the client asks for. */
const MAX_SYNC_WAIT_MS = 30_000;
const SYNC_POLL_MS = 500;

/** Waits `ms`, or less when `stop` is aborted. */
function pause(ms: number, stop: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (stop.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      stop.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    stop.addEventListener('abort', done, { once: true });
  });
}

/** Sync and /keys/changes tokens: opaque to clients, `s<stream position>` to us. */
export function streamToken(position: number): string {
  return `s${position}`;
}

export function parseStreamToken(token: string, name: string): number {
  const m = /^s(\d{1,15})$/.exec(token);
  if (!m) throw new MatrixError('M_INVALID_PARAM', `"${name}" is not a token this server issued (expected the next_batch of a /sync)`);
  return Number(m[1]);
}

/**
 * A function that adds to a stored key object the uploaded signatures on it that `viewer` may see
 * (e2e spec, "Key and signature security"). Only user-signing-key signatures are made by someone
 * other than the key's owner; those are for the signer's eyes only.
 */
function withVisibleSignatures(signatures: readonly StoredSignature[], viewer: Viewer): (json: string, owner: string, targetKeyId: string) => string {
  const byTarget = new Map<string, StoredSignature[]>();
  for (const s of signatures) {
    if (s.signerUserId !== s.targetUserId && (viewer === null || s.signerUserId !== viewer.userId)) continue;
    const key = `${s.targetUserId}\0${s.targetKeyId}`;
    const list = byTarget.get(key);
    if (list) list.push(s);
    else byTarget.set(key, [s]);
  }
  return (json, owner, targetKeyId) => withSignatures(json, byTarget.get(`${owner}\0${targetKeyId}`) ?? []);
}

export interface QueryOptions {
  /** Add `unsigned.device_display_name` (always for clients; per config over federation). */
  readonly displayNames: boolean;
  /** Include `failures` and `user_signing_keys` (client-server API only). */
  readonly clientApi: boolean;
}

/** Counts for metrics, kept by the key rules themselves. */
export interface KeyStats {
  oneTimeKeysClaimed: number;
  fallbackKeysClaimed: number;
  /** Claims for a device that had neither a one-time key nor a fallback key. */
  claimsUnanswered: number;
}

/** Query answers up to this size are kept for reuse, at most ANSWERS_KEPT of them. */
const MAX_KEPT_ANSWER_CHARS = 16_384;
const ANSWERS_KEPT = 4096;

export class Keys {
  private readonly store: KeysStore;
  readonly stats: KeyStats = { oneTimeKeysClaimed: 0, fallbackKeysClaimed: 0, claimsUnanswered: 0 };
  /**
   * Query answers by viewer, options and request, valid for one data version of the store: the
   * same question about unchanged data has the same answer (clients and servers repeat queries).
   */
  private readonly answers = new Map<string, string>();
  private answersVersion: number | undefined;

  constructor(private readonly options: KeysOptions) {
    this.store = options.store;
  }

  /** Splits the user IDs of a request into ours and other servers'; a malformed ID is a 400. */
  private partition(userIds: Iterable<string>, field: string): { local: string[]; remoteServers: Set<string> } {
    const local: string[] = [];
    const remoteServers = new Set<string>();
    for (const userId of userIds) {
      const parts = parseUserId(userId);
      if (!parts) throw new MatrixError('M_INVALID_PARAM', `${field}: "${userId}" is not a valid user ID`);
      if (parts.serverName === this.options.serverName) local.push(userId);
      else remoteServers.add(parts.serverName);
    }
    return { local, remoteServers };
  }

  /** Federation requests may only name our users (Synapse answers 400 otherwise). */
  requireLocalUsers(userIds: readonly string[], field: string): string[] {
    const { local, remoteServers } = this.partition(userIds, field);
    if (remoteServers.size > 0) {
      const foreign = [...userIds].find((u) => !isLocalUser(u, this.options.serverName));
      throw new MatrixError('M_INVALID_PARAM', `${field}: user ${foreign} is not hosted on this server (${this.options.serverName})`);
    }
    return local;
  }

  private static remoteFailures(servers: Set<string>): string {
    const failure: ServerFailure = { status: 503, message: 'mxkeys does not fetch keys from other servers' };
    return objectText([...servers].map((s) => [s, JSON.stringify(failure)] as const));
  }

  /** POST /keys/upload */
  async upload(requester: Requester, body: JsonObject): Promise<{ one_time_key_counts: Record<string, number> }> {
    const { userId, deviceId } = requester;
    const deviceKeys = body['device_keys'] === undefined || body['device_keys'] === null ? undefined : validateDeviceKeys(body['device_keys'], userId, deviceId);
    const oneTimeKeys = parseKeyMap(body['one_time_keys'], 'one_time_keys');
    const fallbackKeys = parseKeyMap(body['fallback_keys'], 'fallback_keys');
    const fallbackAlgorithms = new Set<string>();
    for (const k of fallbackKeys) {
      if (fallbackAlgorithms.has(k.algorithm)) throw new MatrixError('M_INVALID_PARAM', `fallback_keys: at most one key per algorithm, found several for ${k.algorithm}`);
      fallbackAlgorithms.add(k.algorithm);
    }
    const max = this.options.maxOneTimeKeysPerDevice;

    const counts = await this.store.transaction(async (tx) => {
      if (!(await tx.lockDevice(userId, deviceId))) throw new MatrixError('M_UNKNOWN_TOKEN', 'This device has been deleted; log in again', 401, { soft_logout: false });

      let deviceListChanged = false;
      if (deviceKeys) {
        const existing = await tx.getDeviceKeys(userId, deviceId);
        const json = JSON.stringify(deviceKeys.object);
        if (existing === undefined) {
          await tx.putDeviceKeys(userId, deviceId, json);
          deviceListChanged = true;
        } else {
          const old = JSON.parse(existing) as JsonObject;
          if (canonicalJson(old['keys']) !== canonicalJson(deviceKeys.object['keys'])) {
            throw new MatrixError(
              'M_INVALID_PARAM',
              `device_keys: device ${deviceId} already has different identity keys. Identity keys cannot change; log in as a new device to use new keys`,
            );
          }
          if (canonicalJson(old) !== canonicalJson(deviceKeys.object)) {
            await tx.putDeviceKeys(userId, deviceId, json);
            deviceListChanged = true;
          }
        }
      }

      if (oneTimeKeys.length > 0) {
        const existing = new Map((await tx.findOneTimeKeys(userId, deviceId, oneTimeKeys)).map((k) => [`${k.algorithm}:${k.keyId}`, k]));
        const fresh = oneTimeKeys.filter((k) => {
          const old = existing.get(`${k.algorithm}:${k.keyId}`);
          if (old === undefined) return true;
          if (!sameKeyIgnoringSignatures(JSON.parse(old.json), k.value)) {
            throw new MatrixError('M_INVALID_PARAM', `One-time key ${k.algorithm}:${k.keyId} already exists with a different value; nothing from this upload was stored`);
          }
          return false;
        });
        if (fresh.length > 0) {
          const held = await tx.countOneTimeKeys(userId, deviceId);
          if (held + fresh.length > max) {
            throw new MatrixError(
              'M_INVALID_PARAM',
              `Too many one-time keys: device ${deviceId} holds ${held} and this upload adds ${fresh.length}, but at most ${max} may be stored per device`,
            );
          }
          await tx.addOneTimeKeys(userId, deviceId, fresh.map((k) => ({ algorithm: k.algorithm, keyId: k.keyId, json: k.json })));
        }
      }

      if (fallbackKeys.length > 0) {
        const current = new Map((await tx.getFallbackKeys(userId, deviceId)).map((k) => [k.algorithm, k]));
        for (const k of fallbackKeys) {
          const old = current.get(k.algorithm);
          // Re-uploading the same key keeps its "used" flag; a new key starts unused.
          if (old && old.keyId === k.keyId && sameKeyIgnoringSignatures(JSON.parse(old.json), k.value)) continue;
          await tx.putFallbackKey(userId, deviceId, { algorithm: k.algorithm, keyId: k.keyId, json: k.json, used: false });
        }
      }
      const counts = await tx.oneTimeKeyCounts(userId, deviceId);
      // Last: on PostgreSQL this takes the stream lock, held until the commit.
      if (deviceListChanged) await tx.recordDeviceListChange(userId, deviceId);
      return counts;
    });
    // Some clients (matrix-nio) require signed_curve25519 to be present.
    return { one_time_key_counts: { signed_curve25519: 0, ...counts } };
  }

  /**
   * POST /keys/claim (client) and /user/keys/claim (federation): the response body as JSON text.
   * `localOnly` makes other servers' users a 400 instead of a `failures` entry.
   */
  async claim(body: unknown, localOnly: boolean): Promise<string> {
    const wanted = requireObjectField(body, 'one_time_keys');
    checkTimeout(body as JsonObject);
    const byUserDevices = new Map<string, [string, string][]>();
    for (const [userId, devices] of Object.entries(wanted)) {
      const entries = Object.entries(requireObject(devices, `one_time_keys["${userId}"]`));
      for (const [deviceId, algorithm] of entries) {
        if (typeof algorithm !== 'string') throw badJson(`one_time_keys["${userId}"]["${deviceId}"]`, 'an algorithm name (a string)');
      }
      byUserDevices.set(userId, entries as [string, string][]);
    }
    const userIds = [...byUserDevices.keys()];
    const { local, remoteServers } = localOnly
      ? { local: this.requireLocalUsers(userIds, 'one_time_keys'), remoteServers: new Set<string>() }
      : this.partition(userIds, 'one_time_keys');
    const requests: ClaimRequest[] = [];
    for (const userId of local) {
      for (const [deviceId, algorithm] of byUserDevices.get(userId)!) {
        if (!isValidDeviceId(deviceId)) throw new MatrixError('M_INVALID_PARAM', `one_time_keys["${userId}"]: "${deviceId}" is not a valid device ID`);
        if (!isValidKeyPart(algorithm)) throw new MatrixError('M_INVALID_PARAM', `one_time_keys["${userId}"]["${deviceId}"]: "${algorithm}" is not a valid algorithm name`);
        requests.push({ userId, deviceId, algorithm });
      }
    }

    const claimed = requests.length > 0 ? await this.store.claimKeys(requests) : [];
    for (const k of claimed) {
      if (k.fallback) this.stats.fallbackKeysClaimed++;
      else this.stats.oneTimeKeysClaimed++;
    }
    this.stats.claimsUnanswered += requests.length - claimed.length;
    const byUser = new Map<string, Map<string, string[]>>();
    for (const k of claimed) {
      let devices = byUser.get(k.userId);
      if (!devices) byUser.set(k.userId, (devices = new Map()));
      let keys = devices.get(k.deviceId);
      if (!keys) devices.set(k.deviceId, (keys = []));
      keys.push(`${JSON.stringify(`${k.algorithm}:${k.keyId}`)}:${k.json}`);
    }
    const oneTimeKeys = objectText([...byUser].map(([u, devices]) => [u, objectText([...devices].map(([d, keys]) => [d, `{${keys.join(',')}}`]))] as const));
    return localOnly ? `{"one_time_keys":${oneTimeKeys}}` : `{"one_time_keys":${oneTimeKeys},"failures":${Keys.remoteFailures(remoteServers)}}`;
  }

  /**
   * POST /keys/query (client) and /user/keys/query (federation): the response body as JSON text.
   * Keys come back exactly as uploaded, plus `unsigned` and the signatures the viewer may see.
   */
  async query(viewer: Viewer, body: unknown, options: QueryOptions): Promise<string> {
    const wanted = requireObjectField(body, 'device_keys');
    checkTimeout(body as JsonObject);
    for (const [userId, devices] of Object.entries(wanted)) {
      if (!Array.isArray(devices) || devices.some((d) => typeof d !== 'string')) throw badJson(`device_keys["${userId}"]`, 'a list of device IDs');
    }
    const { local, remoteServers } = options.clientApi
      ? this.partition(Object.keys(wanted), 'device_keys')
      : { local: this.requireLocalUsers(Object.keys(wanted), 'device_keys'), remoteServers: new Set<string>() };

    if (viewer) await this.store.trackUsers(viewer.userId, Object.keys(wanted));
    const version = this.store.dataVersion();
    const answerKey = version === undefined ? undefined : `${viewer?.userId ?? ''}\0${Number(options.displayNames)}${Number(options.clientApi)}\0${JSON.stringify(wanted)}`;
    if (answerKey !== undefined) {
      if (version !== this.answersVersion) {
        this.answers.clear();
        this.answersVersion = version;
      }
      const kept = this.answers.get(answerKey);
      if (kept !== undefined) return kept;
    }
    const answer = await this.buildQueryAnswer(viewer, wanted, local, remoteServers, options);
    // Built from data at least as new as `version`; a change since has moved the version on.
    if (answerKey !== undefined && this.answersVersion === version && answer.length <= MAX_KEPT_ANSWER_CHARS) {
      if (this.answers.size >= ANSWERS_KEPT) this.answers.clear();
      this.answers.set(answerKey, answer);
    }
    return answer;
  }

  private async buildQueryAnswer(viewer: Viewer, wanted: JsonObject, local: readonly string[], remoteServers: Set<string>, options: QueryOptions): Promise<string> {
    const { devices, crossSigning, signatures } = local.length ? await this.store.getKeysOf(local) : { devices: [], crossSigning: [], signatures: [] };
    const signed = withVisibleSignatures(signatures, viewer);

    const deviceEntries = new Map<string, [string, string][]>(local.map((u) => [u, []]));
    for (const d of devices) {
      const only = wanted[d.userId] as string[];
      if (only.length > 0 && !only.includes(d.deviceId)) continue;
      const unsigned = options.displayNames && d.displayName !== null ? `{"device_display_name":${JSON.stringify(d.displayName)}}` : '{}';
      deviceEntries.get(d.userId)!.push([d.deviceId, withUnsigned(signed(d.json, d.userId, d.deviceId), unsigned)]);
    }

    const keysOfType = (type: StoredCrossSigningKey['keyType']): [string, string][] =>
      crossSigning
        .filter((k) => k.keyType === type && (type !== 'user_signing' || (viewer !== null && k.userId === viewer.userId)))
        .map((k) => [k.userId, signed(k.json, k.userId, k.publicKey)]);

    let out = `{"device_keys":${objectText([...deviceEntries].map(([u, entries]) => [u, objectText(entries)] as const))}`;
    out += `,"master_keys":${objectText(keysOfType('master'))},"self_signing_keys":${objectText(keysOfType('self_signing'))}`;
    if (options.clientApi) out += `,"user_signing_keys":${objectText(keysOfType('user_signing'))},"failures":${Keys.remoteFailures(remoteServers)}`;
    return `${out}}`;
  }

  /**
   * GET /_matrix/federation/v1/user/devices/{userId} (user_devices.yaml): the user's devices with
   * keys, their cross-signing keys, and the stream position of their device list, as JSON text.
   */
  async userDevices(userId: string, displayNames: boolean): Promise<string> {
    this.requireLocalUsers([userId], 'userId');
    // The position first: keys read afterwards are at least that new, so a remote server that
    // resumes from this stream_id cannot miss a change.
    const streamId = await this.options.deviceLists.latestStreamIdForUser(userId);
    const { devices, crossSigning, signatures } = await this.store.getKeysOf([userId]);
    const signed = withVisibleSignatures(signatures, null);
    const list = devices
      .sort((a, b) => (a.deviceId < b.deviceId ? -1 : a.deviceId > b.deviceId ? 1 : 0))
      .map((d) => {
        const name = displayNames && d.displayName !== null ? `,"device_display_name":${JSON.stringify(d.displayName)}` : '';
        return `{"device_id":${JSON.stringify(d.deviceId)},"keys":${signed(d.json, userId, d.deviceId)}${name}}`;
      });
    let out = `{"user_id":${JSON.stringify(userId)},"stream_id":${streamId},"devices":[${list.join(',')}]`;
    for (const k of crossSigning) {
      if (k.keyType === 'master') out += `,"master_key":${signed(k.json, userId, k.publicKey)}`;
      if (k.keyType === 'self_signing') out += `,"self_signing_key":${signed(k.json, userId, k.publicKey)}`;
    }
    return `${out}}`;
  }

  /** GET /keys/changes: users the viewer follows whose keys changed between two tokens. */
  async changes(viewer: string, from: string, to: string | undefined): Promise<{ changed: string[]; left: string[] }> {
    const fromPos = parseStreamToken(from, 'from');
    const toPos = to === undefined ? await this.options.deviceLists.currentStreamId() : parseStreamToken(to, 'to');
    return this.changesBetween(viewer, fromPos, toPos);
  }

  /**
   * `changed` and `left` between two stream positions, as `viewer` may see them. With no rooms,
   * a user leaves the viewer's view only by being deactivated: from then on they are in `left`.
   */
  private async changesBetween(viewer: string, fromPos: number, toPos: number): Promise<{ changed: string[]; left: string[] }> {
    const users = toPos > fromPos ? await this.store.changedUsers(viewer, fromPos, toPos) : [];
    const local = users.filter((u) => isLocalUser(u, this.options.serverName));
    const gone = new Set(local.length > 0 ? await this.store.deactivatedUsers(local) : []);
    return { changed: users.filter((u) => !gone.has(u)), left: users.filter((u) => gone.has(u)) };
  }

  /**
   * GET /sync, the parts a key server has (e2e spec, "Extensions to /sync"): `next_batch`,
   * `device_lists` for an incremental sync, one-time key counts and unused fallback key types.
   * An incremental sync waits up to `timeoutMs` (at most 30 s) for a device-list change the
   * caller can see, checking every half second (changes may come from other processes).
   */
  async sync(requester: Requester, since: string | undefined, timeoutMs: number, stop: AbortSignal): Promise<Record<string, unknown>> {
    let position = await this.options.deviceLists.currentStreamId();
    let deviceLists: { changed: string[]; left: string[] } | undefined;
    if (since !== undefined) {
      const from = parseStreamToken(since, 'since');
      const deadline = Date.now() + Math.min(timeoutMs, MAX_SYNC_WAIT_MS);
      for (;;) {
        deviceLists = await this.changesBetween(requester.userId, from, position);
        if (deviceLists.changed.length > 0 || deviceLists.left.length > 0 || Date.now() >= deadline || stop.aborted) break;
        await pause(Math.min(SYNC_POLL_MS, deadline - Date.now()), stop);
        // Stopped while pausing: answer with what was read last (nothing new), at once.
        if (stop.aborted) break;
        position = await this.options.deviceLists.currentStreamId();
      }
    }
    return { next_batch: streamToken(position), ...(deviceLists ? { device_lists: deviceLists } : {}), ...(await this.deviceKeyCounts(requester)) };
  }

  /** The `device_one_time_keys_count` and `device_unused_fallback_key_types` of /sync. */
  private async deviceKeyCounts(requester: Requester): Promise<{ device_one_time_keys_count: Record<string, number>; device_unused_fallback_key_types: string[] }> {
    const [counts, fallback] = await Promise.all([
      this.store.oneTimeKeyCounts(requester.userId, requester.deviceId),
      this.store.unusedFallbackKeyTypes(requester.userId, requester.deviceId),
    ]);
    return { device_one_time_keys_count: { signed_curve25519: 0, ...counts }, device_unused_fallback_key_types: fallback };
  }

  /** Whether a device ID would collide with one of the user's cross-signing public keys. */
  isReservedDeviceId(userId: string, deviceId: string): Promise<boolean> {
    return this.store.isCrossSigningPublicKey(userId, deviceId);
  }
}
